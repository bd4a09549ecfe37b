"""The Flask application: ``create_app()`` builds it (gunicorn ``app:create_app()``)."""

from __future__ import annotations

from typing import Any

from flask import Flask

MAX_BODY_BYTES = 64 * 1024


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    from app import api, ledger

    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=MAX_BODY_BYTES, JSON_SORT_KEYS=False)
    if test_config:
        app.config.update(test_config)
    ledger.ensure_schema()
    app.register_blueprint(api.bp)
    return app
