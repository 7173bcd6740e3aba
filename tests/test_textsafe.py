"""Control characters from Racks never reach the operator's terminal raw (fluxrig/textsafe.py),
`fluxrig logs` against a real HTTP server prints them escaped, one record per line."""

from __future__ import annotations

import http.server
import json
import logging
import threading

from fluxrig.cli.main import main as rack_main
from fluxrig.textsafe import EscapingFormatter, SafeStream, escape_text

NASTY = "ok\x1b]0;pwned\x07\x1b[2J\nFAKE 00:00 rack-x ERROR forged\r\u202eevil\x00\x9b"


def test_escape_text():
    out = escape_text(NASTY)
    assert out == "ok\\e]0;pwned\\x07\\e[2J\\nFAKE 00:00 rack-x ERROR forged\\r\\u202eevil\\x00\\x9b"
    assert escape_text("plain é ü 中文 C:\\path") == "plain é ü 中文 C:\\path"
    assert escape_text("a\nb", keep="\n") == "a\nb"
    assert escape_text(5) == "5"


def test_safe_stream_and_formatter(capsys):
    import io

    buf = io.StringIO()
    SafeStream(buf).write("line\x1b[31m\n")
    assert buf.getvalue() == "line\\e[31m\n"
    rec = logging.LogRecord("x", logging.WARNING, "f", 1, "rack %s said %s", ("r1", "a\nb\x1b"), None)
    assert EscapingFormatter("%(message)s").format(rec) == "rack r1 said a\\nb\\e"


class _Logs(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        body = json.dumps(
            [{"timestamp": "2026-01-01T00:00:00Z", "rack": "r\x1b[1m1", "level": "info", "body": NASTY}]
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def test_fluxrig_logs_escapes_what_the_mixer_relays(capsys):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Logs)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        code = rack_main(["logs", "--api-url", url, "--api-token", "t"])
    finally:
        srv.shutdown()
    out = capsys.readouterr().out
    assert code == 0
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out and "\u202e" not in out
    assert out.count("\n") == 1, out  # one record, one line: the forged line stayed inside it
    assert "\\e[2J\\nFAKE" in out
