"""Malformed HTTP gets one 4xx answer, never a 500 and never two answers (issue 7, point 8)."""

from __future__ import annotations

import concurrent.futures
import re
import socket
import sys
import time
from pathlib import Path

import pytest

from tests.procset import ProcessSet

GUNICORN = [sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py", "app:create_app()"]
JSON = b"Content-Type: application/json\r\n"
POST = b"POST /jobs HTTP/1.1\r\nHost: x\r\n" + JSON

CASES = {
    "bad chunk size": POST + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    "chunk without its terminator": POST + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}",
    "chunk longer than sent": POST + b"Transfer-Encoding: chunked\r\n\r\n10\r\n{}\r\n0\r\n\r\n",
    "bad trailer": POST + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nbad trailer\r\n\r\n",
    "bad chunk extension": POST + b"Transfer-Encoding: chunked\r\n\r\n2;\x01\r\n{}\r\n0\r\n\r\n",
    "unknown transfer coding": POST + b"Transfer-Encoding: gzip\r\n\r\n{}",
    "length and chunked": POST + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
                          b"2\r\n{}\r\n0\r\n\r\n",
    "bad content length": POST + b"Content-Length: abc\r\n\r\n{}",
    "negative content length": POST + b"Content-Length: -1\r\n\r\n{}",
    "body shorter than its length": POST + b"Content-Length: 100\r\n\r\n{}",
    "body not UTF-8": POST + b"Content-Length: 4\r\n\r\n\xff\xfe{}",
    "garbage": b"\x00\x01\x02garbage\r\n\r\n",
    "no request line": b"GET\r\n\r\n",
    "unknown version": b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n",
    "header without colon": b"GET /healthz HTTP/1.1\r\nHost x\r\n\r\n",
    "bad method": b"G@T /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    "huge header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
    "bad percent-encoding in the query": b"GET /jobs/x?wait=%zz HTTP/1.1\r\nHost: x\r\n\r\n",
    "HTTP/1.0 POST without a length": b"POST /jobs HTTP/1.0\r\n" + JSON + b"\r\n{}",
}
# An endpoint that reads no body answers as usual; the broken body after it closes the connection.
UNREAD_BODY = b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n"
STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


def exchange(port: int, raw: bytes) -> list[int]:
    """Send ``raw``, read until the server closes: the status of every answer on the wire."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
        conn.sendall(raw)
        conn.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    return [int(code) for code in STATUS_LINE.findall(data)]


@pytest.fixture(params=["gthread", "sync"])
def web(request, tmp_path: Path):
    ps = ProcessSet(tmp_path, command=GUNICORN, env={"WEB_WORKER_CLASS": request.param, "WEB_WORKERS": "2"})
    try:
        ps.start()
        deadline = time.monotonic() + 60
        while ps.http("GET", "/healthz").status != 200:
            assert time.monotonic() < deadline, ps.output
            time.sleep(0.05)
        yield ps
    finally:
        ps.cleanup()


def test_each_malformed_request_gets_exactly_one_4xx(web: ProcessSet) -> None:
    answers = {name: exchange(web.port, raw) for name, raw in CASES.items()}
    wrong = {name: codes for name, codes in answers.items() if len(codes) != 1 or not 400 <= codes[0] < 500}
    assert not wrong, wrong
    assert exchange(web.port, UNREAD_BODY) == [200]
    assert "unhandled error" not in web.output, web.output


def test_two_thousand_malformed_requests_crash_nothing(web: ProcessSet) -> None:
    raws = [*CASES.values(), UNREAD_BODY] * 100  # 2,000
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(lambda raw: exchange(web.port, raw), raws))
    assert len(answers) == 2000
    assert not [codes for codes in answers if len(codes) != 1 or codes[0] >= 500]
    assert web.http("GET", "/healthz").status == 200
    booted = re.findall(r"Booting worker with pid", web.output)
    assert len(booted) == 2, web.output  # no worker died and was replaced
    assert "unhandled error" not in web.output
