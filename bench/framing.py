"""Framer throughput: compiled twin vs pure Python, in one run.

What io_tcp does on ingress: 268-byte payloads behind a 2-byte big-endian length (len2_be),
arriving in 64 KiB reads, so each feed returns ~243 frames and leaves a partial one buffered.
Also measured the same way: newline-delimited frames, and encode (one call per frame).

    python bench/framing.py            # table
    python bench/framing.py --json     # one JSON object

Prints {"frame_payload_bytes", "chunk_bytes", "compiled_frames_per_s", "pure_frames_per_s",
"ratio", "delimiter": {...}, "encode": {...}, "single_frame_feed_ns": {...}}; "ratio" = compiled / pure for length-prefixed
ingress. Best of --repeat runs over --frames frames. Without a compiled twin the compiled
figures are null.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fluxrig.framing as F  # noqa: E402

PAYLOAD_BYTES = 268
CHUNK_BYTES = 64 * 1024


def chunks_of(stream: bytes, size: int) -> list:
    return [stream[i : i + size] for i in range(0, len(stream), size)]


def best_rate(run, count: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        got = run()
        elapsed = time.perf_counter() - start
        if got != count:
            raise SystemExit(f"benchmark broken: {got} frames, expected {count}")
        best = min(best, elapsed)
    return count / best


def ingress(cls, chunks, count, repeat, **kwargs):
    if cls is None:
        return None

    def run():
        fr = cls(**kwargs)
        n = 0
        for chunk in chunks:
            n += len(fr.feed(chunk))
        return n

    return best_rate(run, count, repeat)


def egress(cls, payload, count, repeat, **kwargs):
    if cls is None:
        return None

    def run():
        fr = cls(**kwargs)
        encode = fr.encode
        for _ in range(count):
            encode(payload)
        return count

    return best_rate(run, count, repeat)


def single_feed_ns(cls, wire, repeat, **kwargs):
    """Cost of one feed holding exactly one frame (a request/response peer, one in flight)."""
    if cls is None:
        return None
    fr = cls(**kwargs)
    rounds = 200_000
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(rounds):
            fr.feed(wire)
        best = min(best, time.perf_counter() - start)
    return round(best / rounds * 1e9)


def pair(compiled, pure):
    return {
        "compiled_frames_per_s": None if compiled is None else round(compiled),
        "pure_frames_per_s": round(pure),
        "ratio": None if compiled is None else round(compiled / pure, 2),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--frames", type=int, default=200_000, help="frames per run (default 200000)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per figure, best kept (default 5)")
    args = parser.parse_args(argv)

    payload = bytes((i * 7) & 0xFF for i in range(PAYLOAD_BYTES))
    lp_stream = F.LengthPrefixFramerPy().encode(payload) * args.frames
    lp_chunks = chunks_of(lp_stream, CHUNK_BYTES)
    line = bytes(b"A"[0] + (i % 26) for i in range(PAYLOAD_BYTES))
    nl_chunks = chunks_of((line + b"\n") * args.frames, CHUNK_BYTES)

    lp = pair(
        ingress(F.LengthPrefixFramerC, lp_chunks, args.frames, args.repeat),
        ingress(F.LengthPrefixFramerPy, lp_chunks, args.frames, args.repeat),
    )
    nl = pair(
        ingress(F.DelimiterFramerC, nl_chunks, args.frames, args.repeat),
        ingress(F.DelimiterFramerPy, nl_chunks, args.frames, args.repeat),
    )
    enc = pair(
        egress(F.LengthPrefixFramerC, payload, args.frames, args.repeat),
        egress(F.LengthPrefixFramerPy, payload, args.frames, args.repeat),
    )
    single = {
        "len2_be_compiled": single_feed_ns(F.LengthPrefixFramerC, lp_stream[: PAYLOAD_BYTES + 2], args.repeat),
        "len2_be_pure": single_feed_ns(F.LengthPrefixFramerPy, lp_stream[: PAYLOAD_BYTES + 2], args.repeat),
        "newline_compiled": single_feed_ns(F.DelimiterFramerC, line + b"\n", args.repeat),
        "newline_pure": single_feed_ns(F.DelimiterFramerPy, line + b"\n", args.repeat),
    }
    result = {
        "frame_payload_bytes": PAYLOAD_BYTES,
        "chunk_bytes": CHUNK_BYTES,
        "frames": args.frames,
        "backend": F.BACKEND,
        **lp,
        "mb_per_s_compiled": None
        if lp["compiled_frames_per_s"] is None
        else round(lp["compiled_frames_per_s"] * (PAYLOAD_BYTES + 2) / 1e6, 1),
        "delimiter": nl,
        "encode": enc,
        "single_frame_feed_ns": single,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"framing benchmark: {PAYLOAD_BYTES}-byte payloads, {CHUNK_BYTES // 1024} KiB chunks, "
        f"{args.frames} frames, best of {args.repeat}"
    )
    for name, fig in (("len2_be feed", lp), ("newline feed", nl), ("len2_be encode", enc)):
        c = fig["compiled_frames_per_s"]
        print(
            f"  {name:15s} compiled {c or 0:>12,} /s   pure {fig['pure_frames_per_s']:>12,} /s   ratio {fig['ratio']}"
        )
    print("  one frame per feed (ns per feed): " + ", ".join(f"{k} {v}" for k, v in single.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
