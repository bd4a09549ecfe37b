"""A small concurrent HTTP/1.1 load client (run as its own process by scripts/bench).

Why not urllib in threads: the GIL would make the client the bottleneck. Why
not wrk: one more system package, and POST /jobs needs the ids back. This
client keeps each connection alive when the server allows it (gunicorn's
gthread does; its sync worker closes after every response) and reconnects
when it does not, so each server is measured as a real client sees it.

Usage: python -m bench.load --port P [--method POST --path /jobs --body JSON]
                            [--concurrency 16] (--count N | --seconds S) [--ids]
Prints one JSON object: requests, ok (2xx), errors by kind, started (the
system-wide monotonic clock, so the caller can time end to end), seconds,
rate (ok per second), and with --ids the ``id`` of each 2xx JSON body in
completion order.
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
    args = parser.parse_args(argv)
    json.dump(asyncio.run(run(args)), sys.stdout)


if __name__ == "__main__":
    main()
