"""A small concurrent HTTP/1.1 load client (run as its own process by scripts/bench).

Why not urllib in threads: the GIL would make the client the bottleneck. Why
not wrk: one more system package, and POST /jobs needs the ids back. This
client keeps each connection alive when the server allows it (gunicorn's
gthread does; its sync worker closes after every response) and reconnects
when it does not, so each server is measured as a real client sees it.

Usage: python -m tools.bench.load --port P [--method POST --path /jobs --body JSON]
                            [--concurrency 16] (--count N | --seconds S) [--ids]
       python -m tools.bench.load --port P --flow jobs --seconds S [--wait W]
Prints one JSON object: requests, ok (2xx), errors by kind, started (the
system-wide monotonic clock, so the caller can time end to end), seconds,
rate (ok per second), and with --ids the ``id`` of each 2xx JSON body in
completion order.

``--flow jobs`` is the "stop under load" client: each connection loops
``POST /jobs`` (an echo job) then ``GET /jobs/<id>?wait=W`` (a long poll),
and every request ends in exactly one outcome (:func:`outcome_of`):
``answered:<status>``, ``refused`` (connection refused: never accepted),
``reset`` (the server reset a connection it had accepted), ``closed`` (the
server closed it without answering: a dropped request), ``truncated`` (the
answer was cut), ``hung`` (no answer within ``--request-timeout``). It adds
``outcomes`` by method, the ids of the accepted (202) jobs, and ``events``:
the monotonic time, method and outcome of every request that was not 2xx.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from typing import Any


class Budget:
    """How much work is left: a request count or a deadline, shared by all connections."""

    def __init__(self, count: int | None, seconds: float | None) -> None:
        self.left = count
        self.deadline = None if seconds is None else time.monotonic() + seconds

    def take(self) -> bool:
        if self.deadline is not None:
            return time.monotonic() < self.deadline
        assert self.left is not None
        if self.left <= 0:
            return False
        self.left -= 1
        return True


def build_request(method: str, path: str, port: int, body: bytes | None) -> bytes:
    head = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Accept: application/json"]
    if body is not None:
        head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + (body or b"")


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """One response: status, body, and whether the connection stays open."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    else:  # no length: the body runs to the end of the connection
        body = await reader.read()
        return status, body, False
    keep = headers.get("connection", "").lower() != "close"
    return status, body, keep


async def connection(port: int, request: bytes, budget: Budget, tally: Counter[str],
                     ids: list[str] | None) -> None:
    reader = writer = None
    while budget.take():
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert reader is not None
            writer.write(request)
            status, body, keep = await read_response(reader)
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            tally[f"error:{type(exc).__name__}"] += 1
            if writer is not None:
                writer.close()
            reader = writer = None
            await asyncio.sleep(0.01)
            continue
        tally["requests"] += 1
        if 200 <= status < 300:
            tally["ok"] += 1
            if ids is not None:
                ids.append(json.loads(body)["id"])
        else:
            tally[f"status:{status}"] += 1
        if not keep:
            writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


REFUSED, RESET, CLOSED, TRUNCATED, HUNG = "refused", "reset", "closed", "truncated", "hung"


def outcome_of(exc: BaseException, *, connected: bool) -> str:
    """How a request that got no complete answer ended, by what the client saw."""
    if isinstance(exc, ConnectionRefusedError):
        return REFUSED
    if isinstance(exc, TimeoutError):
        return HUNG
    if isinstance(exc, asyncio.IncompleteReadError):
        return TRUNCATED if exc.partial else CLOSED
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return RESET
    return f"error:{type(exc).__name__}" if connected else f"connect:{type(exc).__name__}"


class JobFlow:
    """One connection's loop of POST /jobs then a long-poll GET, with every outcome counted."""

    def __init__(self, port: int, wait: float, request_timeout: float, budget: Budget,
                 tally: dict[str, Counter[str]], accepted: list[str], events: list[list[Any]]) -> None:
        self.port, self.wait, self.request_timeout = port, wait, request_timeout
        self.budget, self.tally, self.accepted, self.events = budget, tally, accepted, events
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.sent = 0

    async def request(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes] | None:
        """One request on the kept-alive connection (or a new one): its answer, or None."""
        connected = self.writer is not None
        try:
            async with asyncio.timeout(self.request_timeout):
                if self.writer is None:
                    self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
                    connected = True
                assert self.reader is not None
                self.writer.write(build_request(method, path, self.port, body))
                await self.writer.drain()
                status, payload, keep = await read_response(self.reader)
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
            self._drop()
            self._count(method, outcome_of(exc, connected=connected))
            await asyncio.sleep(0.01)
            return None
        if not keep:
            self._drop()
        self._count(method, f"answered:{status}")
        return status, payload

    def _count(self, method: str, outcome: str) -> None:
        self.tally.setdefault(method, Counter())[outcome] += 1
        if not outcome.startswith("answered:2"):
            self.events.append([time.monotonic(), method, outcome])

    def _drop(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def run(self) -> None:
        while self.budget.take():
            self.sent += 1
            body = json.dumps({"task": "echo", "args": {"value": self.sent}}).encode()
            answer = await self.request("POST", "/jobs", body)
            if answer is None or answer[0] != 202:
                continue
            job_id = json.loads(answer[1])["id"]
            self.accepted.append(job_id)
            await self.request("GET", f"/jobs/{job_id}?wait={self.wait:g}", None)
        self._drop()


async def run_jobs(args: argparse.Namespace) -> dict[str, Any]:
    budget = Budget(args.count, args.seconds)
    tally: dict[str, Counter[str]] = {}
    accepted: list[str] = []
    events: list[list[Any]] = []
    started = time.monotonic()
    await asyncio.gather(*(JobFlow(args.port, args.wait, args.request_timeout, budget, tally,
                                   accepted, events).run() for _ in range(args.concurrency)))
    seconds = time.monotonic() - started
    return {"started": started, "seconds": seconds, "accepted": accepted,
            "outcomes": {method: dict(counts) for method, counts in tally.items()},
            "events": sorted(events)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    body = None if args.body is None else args.body.encode()
    request = build_request(args.method, args.path, args.port, body)
    budget = Budget(args.count, args.seconds)
    tally: Counter[str] = Counter()
    ids: list[str] | None = [] if args.ids else None
    started = time.monotonic()
    await asyncio.gather(*(connection(args.port, request, budget, tally, ids)
                           for _ in range(args.concurrency)))
    seconds = time.monotonic() - started
    errors = {k: v for k, v in tally.items() if k not in ("requests", "ok")}
    out: dict[str, Any] = {"requests": tally["requests"], "ok": tally["ok"], "errors": errors,
                           "started": started, "seconds": seconds, "rate": tally["ok"] / seconds}
    if ids is not None:
        out["ids"] = ids
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--method", default="GET")
    parser.add_argument("--path", default="/healthz")
    parser.add_argument("--body")
    parser.add_argument("--concurrency", type=int, default=16)
    amount = parser.add_mutually_exclusive_group(required=True)
    amount.add_argument("--count", type=int)
    amount.add_argument("--seconds", type=float)
    parser.add_argument("--ids", action="store_true", help="collect the id of each 2xx body")
    parser.add_argument("--flow", choices=["request", "jobs"], default="request",
                        help="jobs: POST an echo job, long-poll it, count every outcome")
    parser.add_argument("--wait", type=float, default=5.0, help="jobs flow: the long poll's ?wait=")
    parser.add_argument("--request-timeout", type=float, default=15.0,
                        help="jobs flow: a request unanswered this long counts as hung")
    args = parser.parse_args(argv)
    json.dump(asyncio.run(run_jobs(args) if args.flow == "jobs" else run(args)), sys.stdout)


if __name__ == "__main__":
    main()
