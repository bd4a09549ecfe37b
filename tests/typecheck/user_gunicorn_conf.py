"""A user's own gunicorn.conf.py with stopright's hooks, as stopright/README.md shows it (never run)."""

from stopright.gunicorn_hooks import *  # noqa: F403

bind = "127.0.0.1:8000"
workers = 2
