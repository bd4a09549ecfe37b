"""Every reach into Celery's, billiard's, kombu's and gunicorn's internals: one module per library.

Each module lists, at its top (``REACHES``), what it relies on that the
library does not promise: a private attribute, a method it overrides by
copying upstream code, a name it replaces. tests/unit/test_upstream_shapes.py
checks each against the installed library (the source of every copied
method, by its digest; every private attribute) and fails loudly, naming
the reach, when an upgrade changes it. Nothing outside this package touches
those internals.
"""

from __future__ import annotations

import hashlib
import inspect


def source_digest(obj: object) -> str:
    """A short digest of ``obj``'s source, blank lines and indentation ignored: what the shape tests pin."""
    lines = [line.strip() for line in inspect.getsource(obj).splitlines() if line.strip()]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
