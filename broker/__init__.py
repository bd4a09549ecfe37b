"""The embedded broker, a Procfile program of its own: ``python -m broker``.

Depends only on core/ and stopright/.
"""
