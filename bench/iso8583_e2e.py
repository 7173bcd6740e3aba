"""The authorizer scenario under the load tool, on loopback: the Rack in its own process, the
load generator in this one.

Phase 1: as many matched request/response pairs per second as 100 requests in flight allow.
Phase 2: 5,000 TPS held for --hold seconds (default 60), p99 latency and mismatches.
Prints {"max_matched_per_s", "p99_ms_at_5000_tps", "mismatched", "timeouts", ...}.
Targets: max_matched_per_s >= 20,000; p99 < 5 ms at 5,000 TPS with zero mismatches. The Go
original publishes 1,000-1,800 TPS at p99 30-130 ms for its switch: `--switch` loads our switch
scenario (acquirer -> conductor -> issuer leg to the authorizer, two Racks) for that comparison.
`--tls` then runs the authorizer again with TLS on its link (a certificate made for the run)
and adds "tls_max_matched_per_s", "tls_p99_ms_at_5000_tps", "tls_ratio" (TLS / plain) from
the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import PY, ROOT, backend, emit, free_port, spawn, stop, wait_port  # noqa: E402

sys.path.insert(0, ROOT)
from fluxrig.tools.iso_load import run_load  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--max-seconds", type=float, default=10, help="phase 1 duration (default 10)")
    ap.add_argument("--hold", type=float, default=60, help="phase 2 duration at --tps (default 60)")
    ap.add_argument("--tps", type=float, default=5000, help="phase 2 rate (default 5000)")
    ap.add_argument("--concurrency", type=int, default=100, help="in flight in phase 1 (default 100)")
    ap.add_argument(
        "--switch",
        action="store_true",
        help="load scenarios/iso8583-switch.yaml instead, with the authorizer as its issuer host "
        "(two Racks in their own processes)",
    )
    ap.add_argument("--tls", action="store_true", help="also measure the authorizer with TLS on its link")
    args = ap.parse_args(argv)
    port = free_port()
    base = dict(os.environ, FLUXRIG_LOGGING_LEVEL="warning", PYTHONPATH=ROOT)
    procs = []
    if args.switch:
        host_port = free_port()
        procs.append(
            spawn(
                [PY, "-m", "fluxrig.cli.main", "run", "--scenario", "scenarios/iso8583-authorizer.yaml"],
                dict(
                    base,
                    FLUXRIG_BASE_STATE_DIR=tempfile.mkdtemp(prefix="fluxrig-iso-host-"),
                    FLUXRIG_ISO_BIND=f"127.0.0.1:{host_port}",
                ),
            )
        )
        env = dict(
            base,
            FLUXRIG_BASE_STATE_DIR=tempfile.mkdtemp(prefix="fluxrig-iso-switch-"),
            FLUXRIG_ISO_BIND=f"127.0.0.1:{port}",
            FLUXRIG_ISSUER_A=f"127.0.0.1:{host_port}",
            FLUXRIG_ISSUER_B=f"127.0.0.1:{free_port()}",
        )
        procs.append(spawn([PY, "-m", "fluxrig.cli.main", "run", "--scenario", "scenarios/iso8583-switch.yaml"], env))
    else:
        env = dict(
            base,
            FLUXRIG_BASE_STATE_DIR=tempfile.mkdtemp(prefix="fluxrig-iso-bench-"),
            FLUXRIG_ISO_BIND=f"127.0.0.1:{port}",
        )
        procs.append(
            spawn([PY, "-m", "fluxrig.cli.main", "run", "--scenario", "scenarios/iso8583-authorizer.yaml"], env)
        )
    try:
        wait_port(port)
        if args.switch:
            # the first requests wait for the issuer leg to come up
            asyncio.run(run_load(f"127.0.0.1:{port}", duration=0.5, concurrency=1, timeout=10))
        target = f"127.0.0.1:{port}"
        asyncio.run(run_load(target, duration=1.0, concurrency=args.concurrency))  # warm-up
        peak = asyncio.run(run_load(target, duration=args.max_seconds, concurrency=args.concurrency))
        held = asyncio.run(run_load(target, duration=args.hold, rate=args.tps, concurrency=1000))
    finally:
        for p in procs:
            stop(p)
    out = {}
    if args.tls and not args.switch:
        tls_peak, tls_held = _tls_run(args, base)
        out = {
            "tls_max_matched_per_s": round(tls_peak.tps),
            "tls_p99_ms_at_5000_tps": tls_held.p99_ms,
            "tls_mismatched": tls_peak.mismatched + tls_held.mismatched,
            "tls_ratio": round(tls_peak.tps / peak.tps, 3) if peak.tps else None,
        }
    emit(
        {
            **out,
            "max_matched_per_s": round(peak.tps),
            "p99_ms_at_5000_tps": held.p99_ms,
            "mismatched": peak.mismatched + held.mismatched,
            "timeouts": peak.timeouts + held.timeouts,
            "peak_p99_ms": peak.p99_ms,
            "held_tps": held.tps,
            "held_p50_ms": held.p50_ms,
            "held_max_ms": held.max_ms,
            "held_seconds": args.hold,
            "scenario": "switch" if args.switch else "authorizer",
            "backend": backend(),
        },
        args.json,
    )
    return 0


def _tls_run(args, base):
    """The authorizer with a tls block on its server link, loaded over TLS."""
    import ssl

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from tls_pki import CA, write_pair

    d = tempfile.mkdtemp(prefix="fluxrig-iso-tls-")
    ca = CA("bench CA")
    cafile = ca.write_ca(os.path.join(d, "ca.pem"))
    k, c = ca.issue("authorizer.test", dns=["authorizer.test"], ips=["127.0.0.1"])
    cert, key = write_pair(k, c, os.path.join(d, "server.pem"), os.path.join(d, "server.key"))
    with open(os.path.join(ROOT, "scenarios", "iso8583-authorizer.yaml")) as fh:
        text = fh.read()
    text = text.replace(
        "      idle_timeout: 5m\n", f'      idle_timeout: 5m\n      tls: {{cert: "{cert}", key: "{key}"}}\n', 1
    )
    scen = os.path.join(d, "authorizer-tls.yaml")
    with open(scen, "w") as fh:
        fh.write(text)
    port = free_port()
    env = dict(base, FLUXRIG_BASE_STATE_DIR=tempfile.mkdtemp(prefix="fluxrig-iso-tls-state-"))
    env["FLUXRIG_ISO_BIND"] = f"127.0.0.1:{port}"
    proc = spawn([PY, "-m", "fluxrig.cli.main", "run", "--scenario", scen], env)
    ctx = ssl.create_default_context(cafile=cafile)
    target = f"127.0.0.1:{port}"
    tls = {"ssl_context": ctx, "server_hostname": "authorizer.test"}
    try:
        wait_port(port)
        asyncio.run(run_load(target, duration=1.0, concurrency=args.concurrency, **tls))
        peak = asyncio.run(run_load(target, duration=args.max_seconds, concurrency=args.concurrency, **tls))
        held = asyncio.run(run_load(target, duration=args.hold, rate=args.tps, concurrency=1000, **tls))
    finally:
        stop(proc)
    return peak, held


if __name__ == "__main__":
    sys.exit(main())
