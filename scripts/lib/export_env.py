"""scripts/export's environment: the app's settings into a file only root reads, not into unit files.

Unit files are world-readable, and ``systemctl show`` prints ``Environment=``
to any user: a ``DATABASE_URL`` with its password must not be there. The
settings (read with honcho's own .env parser, as ``honcho start`` would) go
into an ``EnvironmentFile=`` written with mode 0600; the units keep only what
the templates need to read (the stop budget) and the path of that file.

    python scripts/lib/export_env.py ENV_FILES PRIVATE PUBLIC
"""

from __future__ import annotations

import os
import sys

from honcho import environ

#: Read by the templates (deploy/honcho/_budget.j2): not secret, kept inline.
BUDGET_KEYS = ("SHUTDOWN_GRACE_SECONDS", "SHUTDOWN_DRAIN_SECONDS")
#: The variable through which the templates learn the private file's path (never set in a process).
FILE_KEY = "EXPORT_ENVIRONMENT_FILE"


def read(files: str) -> dict[str, str]:
    """Comma-separated env files, later ones winning, parsed as honcho parses .env."""
    content = []
    for name in files.split(","):
        if name.strip() and os.path.exists(name.strip()):
            with open(name.strip()) as f:
                content.append(f.read())
    return environ.parse("\n".join(content))


def systemd_value(value: str) -> str:
    """A value quoted for systemd's environment file parser: single quotes keep every
    character as it is; double quotes (for a value holding one) escape ``\\ " ` $``."""
    if "'" not in value:
        return f"'{value}'"
    return '"' + "".join("\\" + c if c in '\\"`$' else c for c in value) + '"'


def write_private(path: str, env: dict[str, str]) -> None:
    """The settings, mode 0600 from the first byte (never readable by others, not even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as f:
        f.write("# Written by scripts/export: the app's settings (mode 0600; systemd reads it as root).\n")
        for key, value in env.items():
            f.write(f"{key}={systemd_value(value)}\n")


def main(files: str, private: str, public: str) -> None:
    env = read(files)
    write_private(private, env)
    inline = {key: env[key] for key in BUDGET_KEYS if key in env}
    inline[FILE_KEY] = os.path.abspath(private)
    with open(public, "w") as f:
        f.writelines(f"{key}={value}\n" for key, value in inline.items())


if __name__ == "__main__":
    main(*sys.argv[1:4])
