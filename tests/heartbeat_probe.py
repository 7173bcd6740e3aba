"""A heartbeat prober in its own process (used by test_mixer_guard.py).

Reads one JSON line on stdin: {"url", "period", "racks": [{"user", "password", "rack", "serial"}]};
then sends a Heartbeat request every `period` seconds, on each Rack's subject with its own
credentials in turn (several Racks: each stays within the Mixer's per-Rack heartbeat rate), and
prints one line per answer: "<time.time()> <round trip seconds or -1 when unanswered>". Runs
until stdin closes. Apart from the test's process, so the load the test generates does not
share the loop that measures."""

from __future__ import annotations

import asyncio
import json
import sys
import time

import nats

from fluxrig.wire import messages as W
from fluxrig.wire import subjects as S


async def main() -> int:
    cfg = json.loads(sys.stdin.readline())
    import ssl

    senders = []
    for r in cfg["racks"]:
        # Each Rack's own NKey (seed on stdin, never argv) over TLS against the bundle's CA.
        nc = await nats.connect(
            cfg["url"], nkeys_seed_str=r["seed"], tls=ssl.create_default_context(cadata=r["ca_pem"]),
            inbox_prefix=S.inbox_prefix(r["rack"]), allow_reconnect=False, connect_timeout=3,
        )  # fmt: skip
        senders.append((nc, S.heartbeat(r["rack"]), W.Heartbeat(serial=r["serial"]).encode()))
    loop = asyncio.get_running_loop()
    stdin_closed = loop.run_in_executor(None, sys.stdin.read)
    i = 0
    while not stdin_closed.done():
        nc, subject, data = senders[i % len(senders)]
        i += 1
        t0 = time.perf_counter()
        try:
            await nc.request(subject, data, timeout=5)
            rtt = time.perf_counter() - t0
        except Exception:
            rtt = -1.0
        print(f"{time.time():.3f} {rtt:.6f}", flush=True)
        await asyncio.sleep(cfg["period"])
    for nc, _s, _d in senders:
        await nc.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
