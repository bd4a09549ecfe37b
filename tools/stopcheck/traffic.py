"""Requests that keep arriving while a set stops, as a platform's load balancer sends them.

Kubernetes keeps routing new connections to a pod for a few seconds after
SIGTERM (endpoint propagation); Heroku's router and a systemd host's proxy do
the same while they notice. :class:`Traffic` sends one request every
``interval`` on a new connection and records how each ended: the HTTP
status, ``refused`` (nothing listening), ``reset`` (accepted, then closed
without an answer) or ``timeout``. A server that stops right answers every
one (200, or 503 from a readiness URL) during its drain delay.
"""

from __future__ import annotations

import http.client
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from urllib.parse import urlsplit


def url_answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return 200 <= r.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def request(url: str, timeout: float = 5.0) -> str:
    """GET ``url`` on a new connection: its status as text, or refused / reset / timeout / error."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout)
    try:
        conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""))
        response = conn.getresponse()
        response.read()
        return str(response.status)
    except ConnectionRefusedError:
        return "refused"
    except (http.client.RemoteDisconnected, http.client.BadStatusLine, http.client.IncompleteRead,
            ConnectionError):
        return "reset"
    except TimeoutError:
        return "timeout"
    except OSError as e:
        return f"error:{e.__class__.__name__}"
    finally:
        conn.close()


class Traffic:
    """One request every ``interval`` to each URL until :meth:`stop`; outcomes with their times."""

    def __init__(self, urls: list[str], interval: float = 0.05) -> None:
        self.urls = urls
        self.interval = interval
        self.results: list[tuple[float, str, str]] = []  # (monotonic time, url, outcome)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> Traffic:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            for url in self.urls:
                outcome = request(url)
                with self._lock:
                    self.results.append((began, url, outcome))
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - began)))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)

    def counts(self, url: str | None = None, since: float | None = None,
               until: float | None = None) -> Counter[str]:
        """Outcomes of the requests sent to ``url`` (default: the first) between two monotonic times."""
        url = url or self.urls[0]
        with self._lock:
            return Counter(o for t, u, o in self.results if u == url and (since is None or t >= since)
                           and (until is None or t < until))
