"""Every reach into Celery's, billiard's, kombu's, gunicorn's and CPython's internals: one module per library.

Each module lists, at its top (``REACHES``), what it relies on that the
library does not promise: a private attribute, a method it overrides by
copying upstream code, a name it replaces. tests/unit/test_upstream_shapes.py
and test_upstream_shapes_gunicorn.py check each against the installed
library (the source of every copied method, by its digest; the signature of
every hook; the call sites whose behaviour is relied on; every private
attribute) and fail loudly, naming the reach, when an upgrade changes it; a
reach without a check fails too. Nothing outside this package touches those
internals.
"""

from __future__ import annotations

import hashlib
import inspect
from typing import Any


def source_digest(obj: Any) -> str:
    """A short digest of ``obj``'s source, blank lines and indentation ignored: what the shape tests pin."""
    lines = [line.strip() for line in inspect.getsource(obj).splitlines() if line.strip()]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
