"""Serve under abuse: after each malformed, oversized, slow or stalled request, and after its queue overflows, the
server still answers a good photo with 200 and its top-k.

One local Ray and one Serve application for the module (a short body timeout, a small queue, so every case is
bounded in seconds); malformed requests go through raw sockets to 127.0.0.1 only. Every socket has a timeout.
"""
import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from typer.testing import CliRunner

pytest.importorskip("ray.serve", reason="ray[serve] not installed (or its HTTP stack is missing): "
                                        "pip install 'levit-deploy[ray]'")

BODY_TIMEOUT_S = 3.0
MAX_BATCH = 2  # max_ongoing_requests = 4 * MAX_BATCH = 8 per replica
ONGOING = 4 * MAX_BATCH
MAX_QUEUED = 4
MAX_BYTES = 200_000
pytestmark = pytest.mark.timeout(120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(artifact_128s):
    """(port, photo bytes): the application on 127.0.0.1, started once; Ray and Serve are shut down after."""
    import ray
    from ray import serve

    from levit_deploy.preprocess import bundled_photos
    from levit_deploy.serve import start

    artifact = artifact_128s("onnx").folder
    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        start(artifact, port=port, max_batch=MAX_BATCH, batch_wait_ms=5, max_bytes=MAX_BYTES,
              body_timeout_s=BODY_TIMEOUT_S, max_queued=MAX_QUEUED)
        yield port, bundled_photos()[0].read_bytes()
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def good(server) -> None:
    """The server still answers a real photo: 200 with five classes."""
    port, photo = server
    req = urllib.request.Request(f"http://127.0.0.1:{port}/?name=photo.jpg", data=photo, method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200
        doc = json.loads(r.read())
    assert doc["ok"] and len(doc["topk"]) == 5 and {"index", "prob"} <= set(doc["topk"][0])


def head(path: str = "/", length: int | str | None = None, extra: str = "") -> bytes:
    cl = "" if length is None else f"Content-Length: {length}\r\n"
    return f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{cl}{extra}\r\n".encode()


class Raw:
    """One connection to the server, every read and write bounded by ``timeout``."""

    def __init__(self, port: int, timeout: float = 30):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def send(self, data: bytes, pieces: int = 1, over_s: float = 0.0) -> None:
        step = -(-len(data) // pieces)
        for i in range(0, len(data), step):
            self.sock.sendall(data[i:i + step])
            if pieces > 1:
                time.sleep(over_s / pieces)

    def response(self) -> tuple[int, dict, bytes]:
        r = http.client.HTTPResponse(self.sock)
        r.begin()
        body = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, body

    def closed_by_server(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def exchange(server, data: bytes, **kw) -> tuple[int, dict, bytes]:
    conn = Raw(server[0])
    try:
        conn.send(data, **kw)
        return conn.response()
    finally:
        conn.close()


def test_empty_body_is_400_and_the_server_still_answers(server):
    status, _, body = exchange(server, head(length=0))
    assert status == 400 and not json.loads(body)["ok"]
    status, _, _ = exchange(server, head() + b"")  # no Content-Length at all: an empty body too
    assert status == 400
    good(server)


def test_text_body_is_400_and_the_server_still_answers(server):
    text = b"this is not an image, just some text\n" * 10
    status, _, body = exchange(server, head(length=len(text)) + text)
    assert status == 400 and "error" in json.loads(body)
    good(server)


def test_bodies_over_max_bytes_are_413_declared_or_streamed(server):
    # declared: refused on the header alone, whatever follows
    status, _, body = exchange(server, head(length=MAX_BYTES + 1) + bytes(1000))
    assert status == 413 and str(MAX_BYTES) in json.loads(body)["error"]
    # streamed without a Content-Length (chunked): refused once the bytes read pass the limit
    chunk = bytes(64 * 1024)
    chunked = b"".join(b"%x\r\n" % len(chunk) + chunk + b"\r\n" for _ in range(4)) + b"0\r\n\r\n"
    status, _, _ = exchange(server, head(extra="Transfer-Encoding: chunked\r\n") + chunked)
    assert status == 413
    good(server)


@pytest.mark.parametrize("length", ["abc", "-5", "1e3", "10, 20"])
def test_bogus_content_length_is_400_from_the_http_server(server, length):
    status, _, _ = exchange(server, head(length=length) + b"0123456789")
    assert status == 400
    good(server)


def test_content_length_shorter_than_the_body_is_400(server):
    """600 bytes of a JPEG are an undecodable image (400 from the replica), and the bytes after them are no HTTP
    request (400 from the HTTP server, which may answer it first and close): either way a 400."""
    port, photo = server
    conn = Raw(port)
    try:
        conn.send(head(length=600) + photo)
        status, _, _ = conn.response()
        assert status == 400
    finally:
        conn.close()
    good(server)


def test_content_length_larger_than_sent_is_cut_with_408_after_the_body_timeout(server):
    conn = Raw(server[0], timeout=BODY_TIMEOUT_S + 20)
    try:
        start = time.monotonic()
        conn.send(head(length=100_000) + b"0123456789")
        status, headers, body = conn.response()
        elapsed = time.monotonic() - start
        assert status == 408 and "not received within" in json.loads(body)["error"]
        assert BODY_TIMEOUT_S - 0.5 <= elapsed <= BODY_TIMEOUT_S + 10, elapsed
        assert headers.get("connection") == "close" and conn.closed_by_server()
    finally:
        conn.close()
    good(server)


def test_a_body_trickled_under_the_timeout_succeeds_and_one_that_stalls_is_cut(server):
    port, photo = server
    start = time.monotonic()
    status, _, body = exchange(server, head(length=len(photo)) + photo, pieces=12,
                               over_s=BODY_TIMEOUT_S / 2)  # 12 pieces over 1.5 s
    assert status == 200 and len(json.loads(body)["topk"]) == 5
    assert time.monotonic() - start >= BODY_TIMEOUT_S / 2 - 0.2

    conn = Raw(port, timeout=BODY_TIMEOUT_S + 20)
    try:
        start = time.monotonic()
        conn.send(head(length=len(photo)) + photo[:len(photo) // 2], pieces=4, over_s=1.0)  # then nothing more
        status, _, _ = conn.response()
        assert status == 408 and time.monotonic() - start <= BODY_TIMEOUT_S + 10
        assert conn.closed_by_server()
    finally:
        conn.close()
    good(server)


def test_a_full_queue_answers_503_and_stalled_requests_are_released(server):
    """ONGOING stalled bodies fill the replica, MAX_QUEUED more wait at the proxy: the next one is 503 at once;
    the stalled ones are 408 (or 503: Serve may refuse a little early under a burst) within two body timeouts."""
    port, _ = server
    results: dict[int, tuple[int, float]] = {}

    def stall(i: int) -> None:
        conn = Raw(port, timeout=3 * BODY_TIMEOUT_S + 20)
        try:
            start = time.monotonic()
            conn.send(head(length=1000) + b"0123456789")
            results[i] = conn.response()[0], time.monotonic() - start
        finally:
            conn.close()

    threads = [threading.Thread(target=stall, args=(i,), daemon=True) for i in range(ONGOING + MAX_QUEUED)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    time.sleep(0.5)
    start = time.monotonic()
    status, _, body = exchange(server, head(length=10) + b"0123456789")
    assert status == 503 and b"backpressure" in body and time.monotonic() - start < 2
    for t in threads:
        t.join(3 * BODY_TIMEOUT_S + 25)
    assert len(results) == len(threads)
    statuses = [s for s, _ in results.values()]
    assert set(statuses) <= {408, 503} and statuses.count(408) >= ONGOING, results
    assert max(e for _, e in results.values()) <= 2 * BODY_TIMEOUT_S + 10, results
    good(server)


def test_cli_serve_takes_the_options():
    from levit_deploy.cli import app

    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "--body-timeout" in result.output and "--max-queued" in result.output


def test_bad_options_are_refused_before_anything_starts(artifact_128s):
    from levit_deploy.serve import deployment

    folder = artifact_128s("onnx").folder
    with pytest.raises(ValueError, match="body_timeout_s must be positive"):
        deployment(folder, body_timeout_s=0)
    with pytest.raises(ValueError, match="max_queued must be positive, or -1"):
        deployment(folder, max_queued=0)


def test_healthz_still_answers_after_the_abuse(server):
    port, _ = server
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30) as r:
        doc = json.loads(r.read())
    assert r.status == 200 and doc["ok"] and sum(doc["batch_sizes"].values()) >= 1
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30)  # GET /: not an image
    assert refused.value.code == 405
