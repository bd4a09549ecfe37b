"""Stop checks: how process managers and platforms stop a Procfile's set, simulated or real.

Used by ``scripts/shutdown-report --manager NAME`` and by the tests.
"""
