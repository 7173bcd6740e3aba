"""Log-safe views of messages: what any gear may print about a message.

Gears that learn which values are sensitive (the ISO 8583 codec, from its spec) list their
data paths in meta `log.mask` (comma-separated). `log_view(msg)` returns a JSON-ready dict
in which those values are masked (PAN: first six and last four digits kept) and the raw
payload, which holds the same values in clear, is replaced by its length. A frame read by an
ISO 8583 I/O gear (meta `flux.source` iso8583) that no codec has decoded yet (no
`codec.spec_id`) shows only its length too: its PAN is somewhere in those bytes. Every other
raw payload, every byte string and string of data and every meta value has its card numbers
masked (fluxrig.iso8583.masking.mask_card_bytes / mask_card_numbers: Luhn-valid runs, also
glued into longer digit runs or grouped, ASCII, EBCDIC, and packed BCD in binary payloads)
before it is rendered: a frame from a plain TCP or serial link, or a transform's output, may
carry an ISO 8583 message nobody decoded.
"""

from __future__ import annotations

import copy

from .iso8583.masking import mask_card_bytes, mask_card_numbers, mask_value
from .msg import FluxMsg, get_path, set_path
from .wire import meta as M

__all__ = ["log_view", "jsonable", "MASK_META"]

MASK_META = M.LOG_MASK


def jsonable(v):
    if isinstance(v, (bytes, bytearray)):
        try:
            return bytes(v).decode("utf-8")
        except UnicodeDecodeError:
            return "hex:" + bytes(v).hex()
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v


def log_view(msg: FluxMsg) -> dict:
    """id, ts, meta, data and raw of `msg`, with `log.mask` paths masked."""
    paths = msg.meta.get(MASK_META)
    data = msg.data
    raw = _masked(msg.raw)
    if msg.raw and msg.meta.get(M.SOURCE) == "iso8583" and M.CODEC_SPEC_ID not in msg.meta:
        raw = f"<{len(msg.raw)} bytes from an ISO 8583 link, masked until a codec decodes them>"
    if paths:
        data = copy.deepcopy(data)
        for path in paths.split(","):
            value = get_path(data, path)
            if value is not None:
                last = path.rsplit(".", 1)[-1]
                set_path(data, path, mask_value(value, "pan" if last in ("2", "34") or "pan" in last else "sad"))
        raw = f"<{len(msg.raw)} bytes, masked>"
    return {"id": msg.id.hex(), "ts": msg.ts, "meta": _masked(msg.meta), "data": _masked(data), "raw": raw}


def _masked(v):
    """`jsonable(v)` with card numbers masked in every string and byte string (bytes before
    they are rendered, so hex or BCD cannot carry one out)."""
    if isinstance(v, str):
        return mask_card_numbers(v)
    if isinstance(v, (bytes, bytearray)):
        b = mask_card_bytes(v)
        try:
            return mask_card_numbers(b.decode("utf-8"))
        except UnicodeDecodeError:
            return "hex:" + b.hex()
    if isinstance(v, dict):
        return {str(k): _masked(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_masked(x) for x in v]
    return v
