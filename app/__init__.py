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

    from app import api
    from jobs import ledger
    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=MAX_BODY_BYTES)  # JSON keys: sorted (Flask's default)
    if test_config:
        app.config.update(test_config)
    ledger.ensure_schema()
    app.register_blueprint(api.bp)
    return app
