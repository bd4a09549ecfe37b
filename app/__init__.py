"""The Flask application: ``create_app()`` builds it (gunicorn ``app:create_app()``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask

MAX_BODY_BYTES = 64 * 1024


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    # Imported here, not at the top: the worker, beat and the broker launcher
    # import app.* too, and Flask would cost each of them ~15 MB for nothing.
    from flask import Flask

    from app import api, ledger

    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=MAX_BODY_BYTES)  # JSON keys: sorted (Flask's default)
    if test_config:
        app.config.update(test_config)
    ledger.ensure_schema()
    app.register_blueprint(api.bp)
    return app


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
