"""ISO 8583 codec throughput: fluxrig.iso8583 vs pyiso8583 4.x on the same message, in one run.

The message is a 0200 financial request with 22 data elements (PAN, processing code, amount,
dates, STAN, POS data, track 2, RRN, terminal and merchant, name/location, currency, PIN
block, two LLL private fields): 268 bytes in ASCII with a hex primary bitmap. Ours encodes it
with `moov:spec87ascii`; pyiso8583 with its `default_ascii` spec, which puts exactly the same
bytes on the wire (checked before timing, as is that each side decodes the other's bytes).

A round trip is encode(fields) then decode(bytes). Ours and pyiso8583 are timed in
alternating rounds so both see the same machine load; each figure is the best round.

    python bench/iso8583_codec.py                    # table
    python bench/iso8583_codec.py --json             # one JSON object
    FLUXRIG_PURE_PYTHON=1 python bench/iso8583_codec.py --json   # the pure-Python codec

Prints {"ours_roundtrips_per_s", "pyiso8583_roundtrips_per_s", "ratio", "backend",
"decode_only_per_s", "encode_only_per_s", "pyiso8583_decode_only_per_s", "message_bytes",
"data_fields", "seconds"}; "ratio" = ours / pyiso8583 round trips. The round trips run with
validation off (the codec alone). The cost of `validation: warn|strict` is printed beside it:
"decode_validated_per_s" is a decode plus `spec.rules.check` under a spec with a usage entry
for every field of the message, a PAN format, a `when` condition and two value checks, and
"validation_cost_pct" what that check takes off a decode. warn and strict run the same checks
on a message that passes; they differ only in what happens to one that does not.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import emit  # noqa: E402
from fluxrig.iso8583 import load_spec  # noqa: E402

ROUNDS = 5
BATCH = 200

MESSAGE = {
    0: "0200",
    2: "4761739001010119",
    3: "000000",
    4: "000000010000",
    7: "0521123045",
    11: "123456",
    12: "123045",
    13: "0521",
    14: "2512",
    18: "5999",
    22: "051",
    23: "001",
    25: "00",
    32: "123456",
    35: "4761739001010119=25122011143804400000",
    37: "123456789012",
    41: "TERM0001",
    42: "MERCHANT0000001",
    43: "ACME STORE 42           MONTEVIDEO    UY",
    48: "ADDL DATA1",
    49: "858",
    52: bytes.fromhex("0123456789ABCDEF"),
    61: "POS DATA 0001",
}


def pyiso_doc(fields: dict) -> dict:
    """The same message in pyiso8583's shape (str keys, 't' MTI, hex text for binary)."""
    doc = {"t": fields[0]}
    for num, value in fields.items():
        if num:
            doc[str(num)] = value.hex().upper() if isinstance(value, bytes) else value
    return doc


def rules_doc(fields: dict) -> dict:
    """A v2 spec over the same base whose rules every field of the message takes part in."""
    usage = {str(n): {"messages": [{"mti": "0200", "usage": "mandatory"}]} for n in fields if n > 1}
    usage["2"]["format"] = {"kind": "pan"}
    usage["14"]["messages"] = [
        {"mti": "0200", "usage": "mandatory", "when": 'field(22) == "051" || field(22) == "071"'},
        {"mti": "0200", "usage": "optional"},
    ]
    return {
        "spec": {
            "id": "bench-rules",
            "name": "bench",
            "version": "1.0.0",
            "wire": {"source": "moov:spec87ascii"},
            "messages": {"catalog": {"0200": {"flow": "request"}}},
            "fields": usage,
            "validation_policy": {"unlisted": "forbidden"},
            "checks": [
                {"name": "amount", "mti": "0200", "field": 4, "min": 1, "max": 99999999},
                {"name": "terminal", "field": 41, "charset": "alnum"},
            ],
        }
    }


def rate(fn, seconds: float) -> float:
    """Calls per second of fn() over about `seconds`, timed in batches."""
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(BATCH):
            fn()
        count += BATCH
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - start)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--seconds", type=float, default=5.0, help="total measuring time (default 5)")
    args = ap.parse_args(argv)

    import iso8583
    from iso8583.specs import default_ascii

    spec = load_spec("moov:spec87ascii")
    enc, dec = spec.encode, spec.decode
    raw = enc(MESSAGE)
    doc = pyiso_doc(MESSAGE)
    theirs, _ = iso8583.encode(dict(doc), default_ascii)
    if bytes(theirs) != raw:
        raise SystemExit(f"benchmark broken: wire bytes differ\n ours   {raw!r}\n theirs {bytes(theirs)!r}")
    if dec(bytes(theirs)) != MESSAGE:
        raise SystemExit("benchmark broken: ours does not decode pyiso8583's bytes back to the message")
    their_dec, _ = iso8583.decode(raw, default_ascii)
    if any(their_dec[k] != v for k, v in doc.items()):
        raise SystemExit("benchmark broken: pyiso8583 does not decode our bytes back to the message")

    ruled = load_spec(rules_doc(MESSAGE))
    rdec, check = ruled.decode, ruled.rules.check
    if check(rdec(raw)):
        raise SystemExit(f"benchmark broken: the message breaks the bench rules: {check(rdec(raw))}")

    def ours_rt():
        dec(enc(MESSAGE))

    def theirs_rt():
        out, _ = iso8583.encode(dict(doc), default_ascii)
        iso8583.decode(out, default_ascii)

    def theirs_dec():
        iso8583.decode(raw, default_ascii)

    jobs = {
        "ours_rt": ours_rt,
        "theirs_rt": theirs_rt,
        "ours_dec": lambda: dec(raw),
        "ours_enc": lambda: enc(MESSAGE),
        "theirs_dec": theirs_dec,
        "ours_dec_rules": lambda: check(rdec(raw)),
    }
    best = dict.fromkeys(jobs, 0.0)
    slice_s = max(args.seconds, 0.05) / (ROUNDS * len(jobs))
    for _ in range(ROUNDS):
        for name, fn in jobs.items():
            best[name] = max(best[name], rate(fn, slice_s))

    result = {
        "ours_roundtrips_per_s": round(best["ours_rt"]),
        "pyiso8583_roundtrips_per_s": round(best["theirs_rt"]),
        "ratio": round(best["ours_rt"] / best["theirs_rt"], 2),
        "backend": spec.backend,
        "decode_only_per_s": round(best["ours_dec"]),
        "encode_only_per_s": round(best["ours_enc"]),
        "pyiso8583_decode_only_per_s": round(best["theirs_dec"]),
        "decode_validated_per_s": round(best["ours_dec_rules"]),
        "validation_cost_pct": round(100 * (1 - best["ours_dec_rules"] / best["ours_dec"]), 1),
        "message_bytes": len(raw),
        "data_fields": len(MESSAGE) - 1,
        "seconds": args.seconds,
    }
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
