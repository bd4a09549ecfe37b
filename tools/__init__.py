"""The repository's tools, one package each: stopcheck (scripts/shutdown-report), bench (scripts/bench)."""
