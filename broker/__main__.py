"""``python -m broker``: the Procfile's ``broker`` entry (broker/launcher.py)."""

from stopright.signals import exit_on_stop_signals

exit_on_stop_signals()  # first: a stop while the launcher imports exits 0 (it has started nothing yet)

from broker.launcher import cli  # noqa: E402

cli()
