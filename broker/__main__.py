"""``python -m broker``: the Procfile's ``broker`` entry (broker/launcher.py)."""

from broker.launcher import cli

cli()
