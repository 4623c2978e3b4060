"""The labelling app behind uvicorn, as `rlhfkit label serve` runs it: X-Forwarded-For cannot dodge the rate limit
unless the operator names the proxy (--trusted-proxy), and a request that announces a 1 GB body is refused at once
with a 413 instead of being read."""

import socket
import subprocess
import sys

import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402

from rlhfkit.feedback.service import FeedbackService  # noqa: E402
from rlhfkit.feedback.store import open_store  # noqa: E402

from .test_web_load import free_port  # noqa: E402
from .web_helpers import assert_secure_headers, populate, wait_until_serving  # noqa: E402


def start(tmp_path, rate_limit: int, **kwargs):
    """run_server in a subprocess with fast password hashing (the users were made with the tests' cost)."""
    db = str(tmp_path / "f.db")
    populate(FeedbackService(open_store(db)))
    port = free_port()
    extra = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    code = ("import rlhfkit.feedback.service as s; s.SCRYPT_N = 2**10\n"
            "from rlhfkit.feedback.web.app import run_server\n"
            f"run_server({db!r}, host='127.0.0.1', port={port}, secret_file={str(tmp_path / 'key')!r}, "
            f"rate_limit={rate_limit}{extra})")
    server = subprocess.Popen([sys.executable, "-c", code])
    base = f"http://127.0.0.1:{port}"
    return server, base, port


def stop(server):
    server.terminate()
    server.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_forwarded_for_does_not_dodge_the_rate_limit_and_a_1gb_body_is_refused_unread(tmp_path):
    server, base, port = start(tmp_path, rate_limit=8)
    try:
        wait_until_serving(base, server)  # one request of the 8
        codes = [httpx.get(base + "/login", headers={"X-Forwarded-For": f"203.0.113.{i}"}, timeout=10).status_code
                 for i in range(10)]
        assert codes[:7] == [200] * 7 and codes[-1] == 429, codes  # one address, one budget

        # announce 1 GB and send a few bytes: the answer comes without the server waiting for the rest
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1073741824\r\n\r\n"
                         b"name=ann&password=")
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                head += chunk
        status_line, *header_lines = head.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
        assert status_line.split()[1] == "413", status_line
        headers = httpx.Headers([tuple(h.split(": ", 1)) for h in header_lines])
        assert_secure_headers(httpx.Response(413, headers=headers, request=httpx.Request("POST", base + "/login")))
        assert server.poll() is None
    finally:
        stop(server)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_named_proxy_is_believed_so_each_client_behind_it_has_its_own_budget(tmp_path):
    server, base, _ = start(tmp_path, rate_limit=4, trusted_proxies=["127.0.0.1"])
    try:
        wait_until_serving(base, server)  # counted against 127.0.0.1 itself
        for i in range(6):  # six clients behind the proxy, three requests each: all within their budget
            for _ in range(3):
                r = httpx.get(base + "/login", headers={"X-Forwarded-For": f"203.0.113.{i}"}, timeout=10)
                assert r.status_code == 200
        codes = [httpx.get(base + "/login", headers={"X-Forwarded-For": "198.51.100.7"}, timeout=10).status_code
                 for _ in range(6)]
        assert codes[:4] == [200] * 4 and codes[-1] == 429, codes  # one client still has one budget
    finally:
        stop(server)
