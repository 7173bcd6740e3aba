"""The operator CLI against several Mixer API URLs (issue 14 item 4): the next node is tried when
one does not answer, a change is never sent twice, the node that answered is kept. Real HTTP
servers on loopback sockets (http.server in threads), a dead port, and a node that accepts a
request and never answers."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cluster_fixtures import ROOT, free_port

from fluxrig.cli.mixer_api import MixerClient
from fluxrig.errors import MixerApiError


class _Node:
    """An HTTP server answering JSON {"node": name, "path": ...}; `status` forces an error."""

    def __init__(self, name: str, status: int = 200):
        self.name, self.status, self.hits = name, status, []
        node = self

        class H(BaseHTTPRequestHandler):
            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                node.hits.append((self.command, self.path, body))
                out = json.dumps({"node": node.name, "path": self.path} if node.status == 200 else {"error": "busy"})
                self.send_response(node.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out.encode())

            do_GET = do_POST = do_DELETE = _answer

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class _Silent:
    """Accepts connections and reads, never answers (a node that hangs after the request)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.conns = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)

    def close(self):
        for c in self.conns:
            c.close()
        self.sock.close()


@pytest.fixture
def nodes():
    made = []

    def make(*a, **kw):
        n = _Node(*a, **kw)
        made.append(n)
        return n

    yield make
    for n in made:
        n.close()


def test_the_next_url_answers_when_the_first_is_down_and_is_kept(nodes):
    b = nodes("b")
    dead = f"http://127.0.0.1:{free_port()}"
    client = MixerClient(f"{dead},{b.url}", "t")
    assert client.get("/api/v1/racks")["node"] == "b"
    assert client.url == b.url  # the next call starts at the node that answered
    assert client.post("/api/v1/racks/x/approve")["node"] == "b"
    assert [h[0] for h in b.hits] == ["GET", "POST"]


def test_a_node_answering_503_hands_over_to_the_next(nodes):
    a, b = nodes("a", status=503), nodes("b")
    client = MixerClient(f"{a.url}, {b.url}", "t")
    assert client.post("/api/v1/scenarios/x/activate", {"k": 1})["node"] == "b"
    assert len(a.hits) == 1 and len(b.hits) == 1


def test_a_refusal_is_not_retried_elsewhere(nodes):
    a, b = nodes("a", status=409), nodes("b")
    with pytest.raises(MixerApiError) as e:
        MixerClient(f"{a.url},{b.url}", "t").post("/api/v1/racks/x/approve")
    assert e.value.status == 409 and not b.hits


def test_a_change_that_may_have_been_applied_is_not_sent_twice(nodes):
    silent, b = _Silent(), nodes("b")
    try:
        client = MixerClient(f"{silent.url},{b.url}", "t", timeout=0.5)
        with pytest.raises(MixerApiError, match="may have been applied"):
            client.post("/api/v1/racks/x/approve")
        assert not b.hits
        assert client.get("/api/v1/racks")["node"] == "b"  # a read goes on to the next node
    finally:
        silent.close()


def test_every_url_down_names_each_and_exits_3():
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    with pytest.raises(MixerApiError) as e:
        MixerClient(",".join(dead), "t").get("/api/v1/racks")
    assert e.value.status == 0 and all(u in str(e.value) for u in dead)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fluxrig.cli.main",
            "admin",
            "racks",
            "list",
            "--api-url",
            ",".join(dead),
            "--api-token",
            "t",
        ],
        capture_output=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 3 and b"cannot reach the Mixer" in proc.stderr, proc.stderr


def test_the_cli_takes_a_comma_list(nodes):
    b = nodes("b")
    dead = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.run(
        [sys.executable, "-m", "fluxrig.cli.main", "admin", "racks", "list", "--json", "--api-url", f"{dead},{b.url}"],
        capture_output=True,
        cwd=ROOT,
        timeout=60,
        env={"FLUXRIG_API_TOKEN": "t", "PATH": "/usr/bin:/bin", "PYTHONPATH": ROOT},
    )
    assert proc.returncode == 0, proc.stderr
    assert b.hits and b.hits[0][1].startswith("/api/v1/racks")
