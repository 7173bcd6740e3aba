"""A Mixer's telemetry ingest into ClickHouse in a process of its own, to be SIGKILLed.

Run by tests/test_mixer_archive.py (`python tests/archive_ingest_child.py`). Settings come in
one JSON object on stdin (the Snake URL and the NKey seed never go in argv). After each insert
into ClickHouse, before the JetStream ack, it prints `inserted <rows>` and waits
`hold_after_insert` seconds: the parent kills it there, between the insert and the ack.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time


async def main() -> None:
    cfg = json.loads(sys.stdin.readline())
    import nats
    from fluxrig_mixer.clickhouse_store import ClickHouseSettings, ClickHouseStore
    from fluxrig_mixer.ingest import TelemetryIngest

    store = ClickHouseStore(
        ClickHouseSettings(
            port=cfg["port"], user=cfg["user"], password=cfg["password"], database=cfg["database"], flush_interval=0.1
        ),
        spool_dir=cfg["spool"],
    )
    write = store.write

    def write_then_hold(parts, sources, prepared=None):  # the ingest's own write path, prepared or not
        out = write(parts, sources, prepared)
        print(f"inserted {sum(out.values())}", flush=True)
        time.sleep(cfg["hold_after_insert"])
        return out

    store.write = write_then_hold
    import ssl

    tls = ssl.create_default_context(cafile=cfg["bus_ca"])
    tls.check_hostname = False  # its own Snake on loopback, verified against the CA
    nc = await nats.connect(cfg["url"], nkeys_seed_str=cfg["bus_seed"], tls=tls)
    ingest = TelemetryIngest(store)
    await ingest.start(nc.jetstream())
    print("started", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
