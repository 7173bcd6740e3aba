"""A Rack group behind HAProxy running the switch: TPS and p99 with 1, 2 and 3 members, the
CPU each transaction costs, and the gap new connections see when a member is SIGKILLed.

Real parts on loopback: a Mixer (in this process: nats-server child, DuckDB), the switch
scenario (scenarios/iso8583-switch.yaml) turned into group `pos` (every gear `deploy: pos`; each
member's reversal STANs from its own `saf.stan_range`, disjoint thirds of 1..999999, given per
member through `${STAN_LO}`/`${STAN_HI}`), three `fluxrig run` member processes enrolled with
`role=pos` tokens, an issuer host in this process with two links and one set of books
(tests/cluster_group.Ledger: A approves on the leg a request came on, B is the route's failover;
every member dials both: each member keeps its own legs), Debian's haproxy in front with the
configuration fluxrig.balancer.haproxy_config renders (health checks on /health/pos), and
fluxrig's ISO 8583 load tool.

Runs:
1. For N = 1, 2, 3: haproxy with the first N members; the load tool at `--tps` (a bounded,
   held rate: the box is shared) for `--seconds`: `tps`, `p99_ms`, `cpu_ms_per_txn` (user+system
   CPU of the N members and the nats-server over the run, per answered transaction; the issuer
   host and the load tool share this process and are not counted).
   `ticket_sharing`: the same with three members and `saf.share_tickets` off, the baseline of
   what sharing requests in flight with the group's saga stream costs (issue 17 item 4).
2. Failover: haproxy with the three members, the held load on long-lived connections plus a
   prober opening a new connection for one 0800 every 20 ms; member 1 SIGKILLed. `failover_gap_s`
   is the longest stretch after the kill in which no new connection was answered (target <= 1);
   `probe_failures` the probes that got no answer; the load's connections on the killed member
   are lost with it (`load_errors`/`load_timeouts`: those transactions end declined by the
   switch or unanswered; the acquirer then reverses each unanswered request through the
   balancer, `acquirer_reversals`). `claim` (issue 17 item 4): the survivors claim the dead member's
   requests in flight and owed reversals from the group's saga stream after the lease (15 s):
   `claimed_within_s` (seen through heartbeats: an upper bound), `tickets_claimed`,
   `sagas_adopted`, and how many of the survivors' reversals were answered. `ledger`: the
   issuer's books for that run: `unreversed_approvals` (approved, never delivered to the
   acquirer, never reversed: must be empty), `reversed_delivered` (a delivered approval
   reversed: must be empty) and `stan_collisions` (a reversal STAN used for two originals).

   `sign_on` / `sign_on_b`: every member signs on its own leg to each issuer (0800 DE 70=001, the
   leg is up only once answered 00) and proves it with echo tests, as its heartbeats report.
3. Cross-member matching: issuer A stops, the switch fails over to issuer B, a
   host written here that answers every request on ANOTHER leg (another member's). The member
   that gets a reply without its ticket relays it (fluxrig.gears.group_relay) and the owner
   matches it: `cross_leg` (TPS, p99, timeouts of the two surviving members) and
   `cross_member_match_p99_ms` (relay publish at the receiving member to emit at the owner, from
   the members' gear metrics in their heartbeats).

    python bench/cluster.py --json [--tps 150] [--seconds 6]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "mixer"))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, HERE)

import yaml  # noqa: E402
from _common import backend, emit  # noqa: E402
from cluster_group import CrossLegIssuer, Haproxy, Ledger, RackProcess, http_get  # noqa: E402

from fluxrig.framing.config import make_framer  # noqa: E402
from fluxrig.iso8583 import load_spec  # noqa: E402
from fluxrig.tools.iso_load import build_request, run_load  # noqa: E402

SPEC = "moov:spec87ascii"
NETMGMT = {"echo_interval": "1s", "echo_timeout": "1s", "echo_max_failures": 3}
MEMBERS = 3
STAN_MAX = 999_999


def group_switch_text(key_file: str, share_tickets: bool = True) -> str:
    """scenarios/iso8583-switch.yaml as the scenario of group `pos` (see the module docstring),
    its reversals shared by the members (`saf.group`, one `saf.key_file` for all)."""
    with open(os.path.join(ROOT, "scenarios", "iso8583-switch.yaml"), encoding="utf-8") as fh:
        doc = yaml.safe_load(fh)
    doc["meta"]["name"] = "iso8583-switch-group"
    doc["racks"] = [{"group": "pos", "match": {"labels": {"role": "pos"}}}]
    for gear in doc["gears"]:
        gear["deploy"] = "pos"
        if gear["type"] == "conductor":
            gear["config"]["ttl"] = "2s"
            gear["config"]["saf"]["stan_range"] = ["${STAN_LO:-1}", "${STAN_HI:-999999}"]
            gear["config"]["saf"].update({"group": "pos", "key_file": key_file, "share_tickets": share_tickets})
        if gear["type"] == "io_iso8583" and gear["config"].get("mode") == "client":
            # every member signs on its own legs and proves them with echo tests (item 5)
            gear["config"]["network_management"] = dict(NETMGMT)  # a copy: safe_dump would write an alias
        if gear["name"] == "triage":  # replies whose ticket another member holds: to the relay
            rule = {"name": "relay", "match": {"field": "meta.error.reason", "in": ["unmatched_reply"]}}
            gear["config"]["rules"].insert(0, rule)
    doc["gears"].append({"name": "relay", "type": "group_relay", "deploy": "pos", "config": {"group": "pos"}})
    doc["wires"] += [{"from": "triage.out_relay", "to": "relay.in"}, {"from": "relay.out", "to": "switch.in_reply"}]
    return yaml.safe_dump(doc, sort_keys=False)


async def _acquirer_reversals(port: int, unanswered: list[dict], timeout: float = 10.0) -> dict:
    """Send a 0400 for each request in `unanswered` (its fields; DE 90 names it, the STAN is
    the original's) on one connection to `port`; count the 0410s and their DE 39."""
    spec, framer = load_spec(SPEC), make_framer({"framing": "len2_be"})
    wanted = [f for f in unanswered if f and str(f.get(0, "")).startswith("02")]
    out = {"sent": len(wanted), "answered": 0, "codes": {}}
    if not wanted:
        return out
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for f in wanted:
            rev = {k: v for k, v in f.items() if k in (2, 3, 4, 7, 11, 12, 13, 37, 41, 42, 49)}
            rev[0] = "0400"
            rev[90] = f"{f[0]}{f[11]}{f[7]}" + "0" * 22
            writer.write(framer.encode(spec.encode(rev)))
        deadline = time.monotonic() + timeout
        while out["answered"] < len(wanted) and time.monotonic() < deadline:
            data = await asyncio.wait_for(reader.read(65536), max(0.01, deadline - time.monotonic()))
            if not data:
                break
            for frame in framer.feed(data):
                doc = spec.decode(frame)
                if doc.get(0) == "0410":
                    out["answered"] += 1
                    code = str(doc.get(39))
                    out["codes"][code] = out["codes"].get(code, 0) + 1
    except (OSError, TimeoutError, ValueError):
        pass
    finally:
        writer.close()
    return out


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (/proc/<pid>/stat)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


class Prober:
    """A new connection through the balancer for one 0800 every `period` s."""

    def __init__(self, port: int, period: float = 0.02, timeout: float = 1.0):
        self.port, self.period, self.timeout = port, period, timeout
        self.spec = load_spec(SPEC)
        self.results: list[tuple[float, float, bool]] = []  # (started, ended, answered)
        self._stop = asyncio.Event()
        self._stan = 0

    async def _one(self) -> bool:
        framer = make_framer({"framing": "len2_be"})
        self._stan = self._stan % STAN_MAX + 1
        frame = framer.encode(self.spec.encode(build_request("0800", self._stan, "PROBE001", "")))
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), self.timeout)
        except (OSError, TimeoutError):
            return False
        try:
            writer.write(frame)
            deadline = time.monotonic() + self.timeout
            while time.monotonic() < deadline:
                data = await asyncio.wait_for(reader.read(4096), max(0.01, deadline - time.monotonic()))
                if not data:
                    return False
                for f in framer.feed(data):
                    return self.spec.decode(f).get(0) == "0810"
            return False
        except (OSError, TimeoutError, ValueError):
            return False
        finally:
            writer.close()

    async def run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            ok = await self._one()
            self.results.append((t0, time.monotonic(), ok))
            await asyncio.sleep(self.period)

    def stop(self) -> None:
        self._stop.set()

    def gap_after(self, t_kill: float) -> tuple[float, int]:
        """(longest stretch after t_kill without an answered new connection, failed probes)."""
        last_ok, gap, failures = t_kill, 0.0, 0
        for _t0, t1, ok in self.results:
            if t1 < t_kill:
                continue
            if ok:
                gap = max(gap, t1 - last_ok)
                last_ok = t1
            else:
                failures += 1
        return round(gap, 3), failures


async def _legs_signed_on(mixer, members, gear: str, timeout: float = 15.0) -> dict:
    """{member: its `gear` leg's network management, as its heartbeats report it}: each member
    signs on its own leg (item 5); waits until every one says `up` and has answered an echo."""
    deadline = time.monotonic() + timeout
    while True:
        legs = {}
        for r in members:
            g = ((mixer.registry.get(r.name).stats or {}).get("gears") or {}).get(gear) or {}
            legs[r.name] = {k: g.get(k) for k in ("netmgmt_state", "sign_ons_answered", "echoes_answered")}
        if all(v["netmgmt_state"] == "up" and (v["echoes_answered"] or 0) > 0 for v in legs.values()):
            return legs
        if time.monotonic() > deadline:
            return legs
        await asyncio.sleep(0.3)


async def _measured(lb_dir: Path, members: list, other_pids: list[int], args) -> dict:
    """One held run through haproxy in front of `members`: TPS, latency, and the CPU per
    answered transaction of the members and `other_pids` (issuer, nats-server)."""
    lb_dir.mkdir()
    lb = Haproxy(lb_dir, "pos", [r.member() for r in members])
    lb.start()
    try:
        await lb.wait_status({r.name: "UP" for r in members}, timeout=20)
        target, conns = f"127.0.0.1:{lb.port}", 3 * len(members)
        await run_load(target, duration=1.0, rate=args.tps, concurrency=64, connections=conns)  # warm-up
        pids = [r.proc.pid for r in members] + other_pids
        c0 = sum(cpu_s(p) for p in pids)
        res = await run_load(target, duration=args.seconds, rate=args.tps, concurrency=64, connections=conns)
        cpu = sum(cpu_s(p) for p in pids) - c0
    finally:
        lb.stop()
    return {
        "tps": round(res.tps, 1), "p50_ms": res.p50_ms, "p99_ms": res.p99_ms, "answered": res.answered,
        "mismatched": res.mismatched, "timeouts": res.timeouts,
        "cpu_ms_per_txn": round(cpu * 1000 / res.answered, 3) if res.answered else None,
    }  # fmt: skip


async def _applied(mixer, members, version: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        rows = [mixer.registry.get(r.name) for r in members]
        if all(row is not None and row.scenario_version == version and row.apply_state == "applied" for row in rows):
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"members did not apply scenario {version}")
        await asyncio.sleep(0.2)
    for r in members:  # the rebuilt conductors' legs are up
        await run_load(f"127.0.0.1:{r.service_port}", duration=0.5, concurrency=1, timeout=10)


async def main_async(args) -> dict:
    from fluxrig_mixer.app import Mixer
    from fluxrig_mixer.config import load_config as mixer_config
    from mixer_fixtures import snake_toml

    work = Path(tempfile.mkdtemp(prefix="fluxrig-bench-cluster-"))
    overrides = {"base.state_dir": str(work / "mixer"), "api.host": "127.0.0.1", "api.port": 0,
                 "snake.host": "127.0.0.1", "snake.port": 0, "enrollment.heartbeat_interval": 1.0,
                 "enrollment.auto_adopt": True, "telemetry.flush_interval": 0.5}  # fmt: skip
    mixer = Mixer(mixer_config(None, environ={}, overrides=overrides), announce=lambda text: None)
    await mixer.start()
    # One issuer host with two links, its books shared (the ledger): A approves on the leg a
    # request came on, B (the route's failover) answers every request on another leg.
    ledger = Ledger()
    issuer = await CrossLegIssuer(ledger, same_leg=True).start()
    issuer_port = issuer.port
    cross = await CrossLegIssuer(ledger).start()
    members: list[RackProcess] = []
    lb = None
    out: dict = {"backend": backend(), "held_tps": args.tps, "seconds": args.seconds, "box": "shared 2-core"}
    try:
        third = STAN_MAX // MEMBERS
        for i in range(1, MEMBERS + 1):
            name = f"pos-{i}"
            r = RackProcess(work, name, snake_toml(mixer, labels={"role": "pos"}, rack_name=name))
            r.env.update(FLUXRIG_ISO_BIND=f"127.0.0.1:{r.service_port}", FLUXRIG_ISSUER_A=f"127.0.0.1:{issuer_port}",
                         FLUXRIG_ISSUER_B=f"127.0.0.1:{cross.port}", STAN_LO=str((i - 1) * third + 1),
                         STAN_HI=str(i * third))  # fmt: skip
            members.append(r.start())
        deadline = time.monotonic() + 90
        while not all([(await http_get(r.health_port, "/health"))[0] == 200 for r in members]):
            if time.monotonic() > deadline:
                raise SystemExit("members did not come up: see " + str(work))
            await asyncio.sleep(0.2)
        from fluxrig.saga.seal import FieldSeal

        key_file = str(work / "pos-saga.key")
        FieldSeal.load(key_file)  # 0600, created once: every member seals and opens with it
        stored, _ = mixer.scenarios.import_text(group_switch_text(key_file))
        await mixer.controller.activate_scenario(stored)
        deadline = time.monotonic() + 90
        while not all([(await http_get(r.health_port, "/health/pos"))[0] == 200 for r in members]):
            if time.monotonic() > deadline:
                raise SystemExit("members did not run the group switch: see " + str(work))
            await asyncio.sleep(0.2)
        for r in members:  # each member's issuer leg is up (first request waits for it)
            await run_load(f"127.0.0.1:{r.service_port}", duration=0.5, concurrency=1, timeout=10)
        out["sign_on"] = await _legs_signed_on(mixer, members, "issuer_a")

        for n in range(1, MEMBERS + 1):
            out[f"members_{n}"] = await _measured(work / f"lb{n}", members[:n], [mixer.snake.pid], args)

        # The baseline of item 4's cost: the same three members with saf.share_tickets off (only
        # owed reversals shared), measured the same way, then the shared scenario back.
        stored_off, _ = mixer.scenarios.import_text(group_switch_text(key_file, share_tickets=False))
        await mixer.controller.activate_scenario(stored_off)
        await _applied(mixer, members, stored_off.version)
        on = out[f"members_{MEMBERS}"]
        off = await _measured(work / "lb-off", members, [mixer.snake.pid], args)
        out["ticket_sharing"] = {
            "cpu_ms_per_txn_shared": on["cpu_ms_per_txn"], "cpu_ms_per_txn_not_shared": off["cpu_ms_per_txn"],
            "p99_ms_shared": on["p99_ms"], "p99_ms_not_shared": off["p99_ms"],
            "cost_ratio": round(on["cpu_ms_per_txn"] / off["cpu_ms_per_txn"], 3)
            if off["cpu_ms_per_txn"] and on["cpu_ms_per_txn"] else None,
        }  # fmt: skip
        stored, _ = mixer.scenarios.import_text(group_switch_text(key_file))
        await mixer.controller.activate_scenario(stored)
        await _applied(mixer, members, stored.version)

        (work / "lb-failover").mkdir()
        lb = Haproxy(work / "lb-failover", "pos", [r.member() for r in members])
        lb.start()
        await lb.wait_status({r.name: "UP" for r in members}, timeout=20)
        prober = Prober(lb.port)
        probe_task = asyncio.get_running_loop().create_task(prober.run())
        ledger.window = set()  # the approvals this run's load gets
        load_task = asyncio.get_running_loop().create_task(
            run_load(
                f"127.0.0.1:{lb.port}", duration=args.seconds, rate=args.tps, concurrency=64, connections=9, keep=True
            )  # fmt: skip
        )
        await asyncio.sleep(args.seconds / 3)
        t_kill = time.monotonic()
        members[0].kill()
        down_s = None
        while time.monotonic() - t_kill < 10:
            if lb.status().get("pos-1", "").startswith("DOWN"):
                down_s = round(time.monotonic() - t_kill, 3)
                break
            await asyncio.sleep(0.02)
        res = await load_task
        await asyncio.sleep(0.5)
        prober.stop()
        await probe_task
        gap, failures = prober.gap_after(t_kill)
        out["failover_gap_s"] = gap
        out["probe_failures"] = failures
        out["probes_after_kill"] = sum(1 for _a, b, _ok in prober.results if b >= t_kill)
        out["marked_down_s"] = down_s
        out["load_answered"] = res.answered
        out["load_errors"] = res.errors
        out["load_timeouts"] = res.timeouts
        await mixer.controller.sweep_once()
        out["stan_overlaps"] = list(mixer.controller.stan_overlaps)  # the members' reversal STAN ranges
        out["stan_ranges"] = {}
        for r in members:
            sw = ((mixer.registry.get(r.name).stats or {}).get("gears") or {}).get("switch") or {}
            if "saf_stan_lo" in sw:
                out["stan_ranges"][r.name] = [sw["saf_stan_lo"], sw["saf_stan_hi"]]

        # Cross-member matching: the authorizer (issuer A) stops, the switch fails over to issuer
        # B, which answers each request on another member's leg: the two survivors relay.
        approved, ledger.window = ledger.window, None
        # The acquirer reverses what it never heard back (ISO 8583 practice), through the
        # balancer: to the survivors, which have no ticket for it and route it to the issuer.
        kill_run = res
        out["acquirer_reversals"] = await _acquirer_reversals(lb.port, kill_run.unanswered)
        await issuer.stop()  # issuer A goes away: the route fails over to B
        live = members[1:]
        deadline = time.monotonic() + 30
        while len(cross.legs) < len(live) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(2.0)  # the conductors see issuer A's links down
        out["sign_on_b"] = await _legs_signed_on(mixer, live, "issuer_b")
        out["sign_on_b"]["signed_on_at_the_host"] = cross.sign_ons
        await run_load(f"127.0.0.1:{lb.port}", duration=1.0, rate=args.tps, concurrency=64, connections=4)
        c0, n0 = cross.crossed, cross.network
        res = await run_load(
            f"127.0.0.1:{lb.port}", duration=args.seconds, rate=args.tps, concurrency=64, connections=4
        )
        await asyncio.sleep(2.5)  # two heartbeats: the members' gear metrics reach the Mixer
        relay_p99 = []
        for r in live:
            gears = (mixer.registry.get(r.name).stats or {}).get("gears") or {}
            if "relay_p99_ms" in (gears.get("relay") or {}):
                relay_p99.append(gears["relay"]["relay_p99_ms"])
        out["cross_member_match_p99_ms"] = max(relay_p99) if relay_p99 else None
        out["cross_leg"] = {
            "members": len(live),
            "tps": round(res.tps, 1),
            "p99_ms": res.p99_ms,
            "answered": res.answered,
            "timeouts": res.timeouts,
            "mismatched": res.mismatched,
            "replies_on_another_leg": cross.crossed - c0,
            "network_on_own_leg": cross.network - n0,  # 08xx (the load's 5 %, echoes): the link's own
        }
        # Item 4: the survivors claim pos-1's requests in flight and owed reversals (lease 15 s).
        claimed_at = None
        while time.monotonic() - t_kill < 45:
            sw = [((mixer.registry.get(r.name).stats or {}).get("gears") or {}).get("switch") or {} for r in live]
            if any(x.get("mirror_claims", 0) for x in sw):
                claimed_at = time.monotonic()
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(5.0)  # their reversals are sent and answered; heartbeats carry the counts
        sw = [((mixer.registry.get(r.name).stats or {}).get("gears") or {}).get("switch") or {} for r in live]
        out["claim"] = {
            "claimed_within_s": round(claimed_at - t_kill, 1) if claimed_at else None,  # heartbeat-coarse
            "tickets_claimed": sum(x.get("mirror_tickets_claimed", 0) for x in sw),
            "sagas_adopted": sum(x.get("saf_adopted", 0) for x in sw),
            "survivor_reversals_answered": sum(x.get("saf_answered", 0) for x in sw),
            "survivor_reversals_open": sum(x.get("saf_open", 0) for x in sw),
            "unshared": sum(x.get("unshared", 0) for x in sw),
        }
        # The issuer's books for the kill run: every approval delivered to the acquirer or
        # reversed (by a survivor's claim, or the acquirer's own reversal), none delivered and
        # reversed, and no reversal STAN used for two originals.
        delivered = {(t, stan) for t, stan, code in kill_run.answered_keys if code == "00"}
        reversed_ = set(ledger.reversed)
        out["ledger"] = {
            "approved": len(approved), "delivered": len(approved & delivered),
            "reversed": len(approved & reversed_),
            # of those, reversed by the acquirer alone: replied to on the dead member after its
            # ticket was closed, never delivered (the acquirer's timeout reversal covers them)
            "reversed_by_acquirer_only": ledger.reversed_only_under_own_stan(approved & reversed_),
            "unreversed_approvals": sorted(approved - delivered - reversed_)[:20],
            "reversed_delivered": sorted(delivered & reversed_)[:20],
            "stan_collisions": ledger.collisions[:20],
        }  # fmt: skip
    finally:
        if lb is not None:
            lb.stop()
        for r in members:
            r.stop()
        await issuer.stop()
        await cross.stop()
        await mixer.stop()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--json", action="store_true", help="one JSON line")
    ap.add_argument("--tps", type=float, default=150.0, help="held request rate (bounded: the box is shared)")
    ap.add_argument("--seconds", type=float, default=6.0, help="length of each measured run")
    args = ap.parse_args(argv)
    emit(asyncio.run(main_async(args)), args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
