"""`fluxrig iso8583 load` and `decode` against the authorizer, as an operator would run them."""

import json
import subprocess
import sys

from helpers import ROOT, free_port, wait_port


def cli(*args, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "fluxrig.cli.main", *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout
    )


def test_load_tool_matches_every_reply(start_rack, rack_env):
    port = free_port()
    rack_env["FLUXRIG_ISO_BIND"] = f"127.0.0.1:{port}"
    rack = start_rack("run", "--scenario", "scenarios/iso8583-authorizer.yaml")
    wait_port(port)
    r = cli(
        "iso8583",
        "load",
        "--target",
        f"127.0.0.1:{port}",
        "--rate",
        "500",
        "--duration",
        "2",
        "--json",
        "--connections",
        "2",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"sent", "answered", "mismatched", "timeouts", "tps", "p50_ms", "p95_ms", "p99_ms", "max_ms"}
    assert out["sent"] == out["answered"] >= 900
    assert out["mismatched"] == 0 and out["timeouts"] == 0
    assert "answered" in r.stderr  # live progress
    assert rack.stop()[0] == 0


def test_load_tool_counts_timeouts_against_a_silent_host():
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    conns = []
    threading.Thread(target=lambda: conns.append(srv.accept()), daemon=True).start()
    r = cli(
        "iso8583",
        "load",
        "--target",
        f"127.0.0.1:{port}",
        "--rate",
        "50",
        "--duration",
        "1",
        "--timeout",
        "0.5",
        "--json",
        "--quiet",
    )
    srv.close()
    out = json.loads(r.stdout)
    assert r.returncode == 1
    assert out["answered"] == 0 and out["timeouts"] == out["sent"] > 0


def test_decode_masks_the_pan():
    from fluxrig.iso8583 import load_spec
    from fluxrig.tools.iso_load import build_request

    raw = load_spec("moov:spec87ascii").encode(build_request("0200", 42, "TERM0001", "000000000042"))
    r = cli("iso8583", "decode", raw.hex())
    assert r.returncode == 0
    assert "411111******1111" in r.stdout and "4111111111111111" not in r.stdout
    assert "000042" in r.stdout
    bad = cli("iso8583", "decode", "3032")
    assert bad.returncode == 2 and "offset" in bad.stderr


async def test_keep_lists_what_was_answered_and_the_fields_of_what_was_not():
    """run_load(keep=True): (terminal, STAN, DE 39) per answer and the request fields of every
    unanswered one (what an acquirer reverses), against a host that answers every other STAN."""
    import asyncio

    from fluxrig.framing.config import make_framer
    from fluxrig.iso8583 import load_spec
    from fluxrig.tools.iso_load import run_load

    spec = load_spec("moov:spec87ascii")

    async def host(reader, writer):
        framer = make_framer({"framing": "len2_be"})
        while data := await reader.read(65536):
            for frame in framer.feed(data):
                req = spec.decode(frame)
                if int(req[11]) % 2 == 0:
                    rsp = dict(req)
                    rsp[0], rsp[39] = req[0][:2] + "1" + req[0][3], "00"
                    writer.write(framer.encode(spec.encode(rsp)))

    server = await asyncio.start_server(host, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        res = await run_load(f"127.0.0.1:{port}", rate=200, duration=0.5, concurrency=20, timeout=0.5,
                             mix=("0200",), keep=True)  # fmt: skip
    finally:
        server.close()
    assert res.answered == len(res.answered_keys) > 0 and res.timeouts == len(res.unanswered) > 0
    assert all(t == "LOAD0001" and int(s) % 2 == 0 and c == "00" for t, s, c in res.answered_keys)
    assert all(f[0] == "0200" and int(f[11]) % 2 == 1 and f[41] == "LOAD0001" for f in res.unanswered)
