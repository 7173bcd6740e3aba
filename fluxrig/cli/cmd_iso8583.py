"""`fluxrig iso8583 load|decode|packager`: drive an ISO 8583 endpoint, read a message, turn a
jPOS GenericPackager file into a spec document an operator can review and edit."""

from __future__ import annotations

import asyncio
import json
import sys

from ..framing.config import ISO_PRESETS

__all__ = ["register", "run_load_cmd", "run_decode", "run_packager"]


def register(sub) -> None:
    p = sub.add_parser(
        "iso8583",
        help="ISO 8583 tools: load generator, message decoder",
        description="ISO 8583 tools: `load` drives a server with 0200/0800 traffic, `decode` "
        "pretty-prints one message with PAN and track data masked.",
    )
    isub = p.add_subparsers(dest="iso_command", metavar="SUBCOMMAND")
    load = isub.add_parser(
        "load",
        help="send 0200/0800 requests with unique STANs, match replies, report TPS and latency",
        description="Send 0200 (and one 0800 in twenty) requests to an ISO 8583 server, match each reply by "
        "MTI, STAN, terminal and RRN, and report sent, answered, mismatched (cross-wired), timeouts, "
        "TPS and latency percentiles. Progress goes to stderr every second.",
    )
    load.add_argument("--target", required=True, metavar="HOST:PORT", help="server to load")
    load.add_argument("--framing", default="len2_be", choices=list(ISO_PRESETS), help="length header (default len2_be)")
    load.add_argument("--rate", type=float, default=0, help="requests per second; 0 = as fast as replies allow")
    load.add_argument("--concurrency", type=int, default=100, help="requests in flight at most (default 100)")
    load.add_argument("--connections", type=int, default=1, help="TCP connections sharing the load (default 1)")
    load.add_argument("--duration", type=float, default=10, metavar="S", help="seconds of sending (default 10)")
    load.add_argument("--timeout", type=float, default=5, metavar="S", help="reply timeout (default 5)")
    load.add_argument("--spec", default="moov:spec87ascii", help="spec for requests and replies")
    load.add_argument("--json", action="store_true", help="print one JSON object at the end")
    load.add_argument("--quiet", action="store_true", help="no live progress")
    load.set_defaults(func=run_load_cmd)
    dec = isub.add_parser(
        "decode",
        help="decode one message given in hex; PAN and track data masked",
        description="Decode a hex ISO 8583 message (no length header) with a spec and print its "
        "fields; sensitive fields are masked.",
    )
    dec.add_argument("hex", help="the message in hex (spaces allowed)")
    dec.add_argument("--spec", default="moov:spec87ascii", help="spec file or base (default moov:spec87ascii)")
    dec.add_argument("--json", action="store_true", help="print JSON")
    dec.set_defaults(func=run_decode)
    pk = isub.add_parser(
        "packager",
        help="convert a jPOS GenericPackager XML file into a spec document (YAML)",
        description="Read a jPOS GenericPackager XML file (isofield / isofieldpackager), map every field "
        "packager class to the moov vocabulary and print the wire document as YAML, ready to be a "
        "spec's wire layer. Classes fluxrig does not map are listed with the field and the reason "
        "(exit 2). The XML file itself also works directly as `spec:` of codec_iso8583.",
    )
    pk.add_argument("file", help="the packager XML file")
    pk.add_argument("--out", metavar="PATH", help="write the YAML here instead of stdout")
    pk.set_defaults(func=run_packager)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_load_cmd(args) -> int:
    from ..tools.iso_load import print_progress, run_load

    try:
        result = asyncio.run(
            run_load(
                args.target,
                framing=args.framing,
                rate=args.rate,
                concurrency=args.concurrency,
                duration=args.duration,
                connections=args.connections,
                spec=args.spec,
                timeout=args.timeout,
                progress=None if args.quiet else print_progress,
            )
        )
    except OSError as exc:
        print(f"fluxrig: cannot load {args.target}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if not args.quiet:
        sys.stderr.write("\n")
    d = result.as_dict()
    if args.json:
        print(
            json.dumps(
                {
                    k: d[k]
                    for k in (
                        "sent",
                        "answered",
                        "mismatched",
                        "timeouts",
                        "tps",
                        "p50_ms",
                        "p95_ms",
                        "p99_ms",
                        "max_ms",
                    )
                }
            )
        )
    else:
        for k, v in d.items():
            print(f"{k:<11} {v}")
    return 0 if result.mismatched == 0 and result.timeouts == 0 else 1


def _printable(v):
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).hex().upper()
    if isinstance(v, dict):
        return {str(k): _printable(x) for k, x in v.items()}
    return v


def run_decode(args) -> int:
    from ..iso8583 import Iso8583DecodeError, SpecError, load_spec

    try:
        spec = load_spec(args.spec)
        raw = bytes.fromhex("".join(args.hex.split()))
        fields = spec.decode(raw)
    except ValueError as exc:
        print(f"fluxrig: not hex: {exc}", file=sys.stderr)
        return 2
    except (Iso8583DecodeError, SpecError) as exc:
        print(f"fluxrig: {exc}", file=sys.stderr)
        return 2
    safe = spec.log_safe(fields)
    violations = [str(v) for v in spec.rules.check(fields)]
    if args.json:
        doc = {str(k): _printable(v) for k, v in safe.items()}
        if violations:
            doc["violations"] = violations
        print(json.dumps(doc))
        return 0
    for num, value in safe.items():
        label = spec.labels.get(num, "") if num else "Message Type Indicator"
        print(f"DE{num:<4} {label[:40]:<40} {_printable(value)}")
    for v in violations:
        print(f"violation: {v}")
    return 0


def run_packager(args) -> int:
    import yaml

    from ..iso8583 import SpecError, load_spec
    from ..iso8583.jpos import read_packager

    try:
        with open(args.file, encoding="utf-8") as fh:
            doc = read_packager(fh.read(), args.file)
        load_spec(doc)  # compiles: the document is usable as it is printed
    except OSError as exc:
        print(f"fluxrig: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    except SpecError as exc:
        print(f"fluxrig: {exc}", file=sys.stderr)
        return 2
    text = "# converted from the jPOS packager " + args.file + " by `fluxrig iso8583 packager`\n"

    class _NoAliases(yaml.SafeDumper):
        def ignore_aliases(self, data):  # shared sub-dicts written out in full: no &anchors
            return True

    text += yaml.dump(doc, Dumper=_NoAliases, sort_keys=False, allow_unicode=True, width=120)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    return 0
