"""What every process of the set shares: settings, logs, the database, the broker probes, the Celery app.

No Flask here, and nothing from app/ (web), tasks/ (worker, beat), jobs/ or broker/:
those depend on this package, never the other way round.
"""
