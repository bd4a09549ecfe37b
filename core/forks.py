"""Memory shared between a parent and the children it forks."""

from __future__ import annotations


def share_with_forks(*modules: str) -> None:
    """In a parent about to fork (gunicorn master, Celery MainProcess): keep pages shared.

    Import now the ``modules`` every forked child would otherwise load on its
    own, then move every object to the garbage collector's permanent
    generation (``gc.freeze``): a child's collections then never write to the
    parent's objects, so their pages stay shared instead of being copied into
    each child. Without it, each web worker and pool child held 10-20 MB more
    private memory after its first requests (scripts/bench, PSS).
    """
    import gc
    import importlib

    for name in modules:
        importlib.import_module(name)
    gc.freeze()
