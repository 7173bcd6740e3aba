"""`sink`: the end of a pipeline. `mode` log | stdout | file | null.

`file` appends one JSON object per line (`path` required): id, ts, meta, data and raw (as
text when it is UTF-8, else `hex:<hex>`); the file is flushed on drain and stop. `log` writes
one INFO line per message; `stdout` prints the JSON line; `null` only counts.
"""

from __future__ import annotations

import json
import sys

from ..msg import FluxMsg
from ..runtime.gear import Gear, Manifest
from ..runtime.registry import register

SCHEMA = {
    "type": "object",
    "properties": {
        "mode": {"type": "string", "enum": ["log", "stdout", "file", "null"], "default": "log",
                 "description": "where messages go"},
        "path": {"type": "string", "description": "JSON-lines file for mode=file"},
        "flush_every": {"type": "integer", "minimum": 1, "default": 1,
                        "description": "mode=file: flush after this many lines"},
    },
    "additionalProperties": False,
}


def _jsonable(v):
    if isinstance(v, (bytes, bytearray)):
        try:
            return bytes(v).decode("utf-8")
        except UnicodeDecodeError:
            return "hex:" + bytes(v).hex()
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def message_json(msg: FluxMsg) -> str:
    """One message as a JSON line (no newline)."""
    return json.dumps(
        {"id": msg.id.hex(), "ts": msg.ts, "meta": msg.meta, "data": _jsonable(msg.data), "raw": _jsonable(msg.raw)},
        separators=(",", ":"),
    )


@register
class SinkGear(Gear):
    MANIFEST = Manifest(
        "sink",
        "Ends a pipeline: log, stdout, JSON-lines file, or null",
        category="observability",
        outputs=(),
        schema=SCHEMA,
        terminus="io",
    )

    @staticmethod
    def validate_config(config: dict):
        if config.get("mode") == "file" and not config.get("path"):
            yield "path", "mode=file needs path"

    def __init__(self, name, config, ctx):
        super().__init__(name, config, ctx)
        self._mode = config["mode"]
        self._fh = None
        self._pending = 0

    async def start(self) -> None:
        if self._mode == "file":
            self._fh = open(self.config["path"], "a", encoding="utf-8")

    async def process(self, port: str, msg: FluxMsg) -> None:
        mode = self._mode
        if mode == "null":
            return
        if mode == "log":
            self.log.info("%s: %s", self.name, message_json(msg))
        elif mode == "stdout":
            sys.stdout.write(message_json(msg) + "\n")
            sys.stdout.flush()
        else:
            self._fh.write(message_json(msg) + "\n")
            self._pending += 1
            if self._pending >= self.config["flush_every"]:
                self._fh.flush()
                self._pending = 0

    async def drain(self, deadline: float) -> None:
        if self._fh:
            self._fh.flush()

    async def stop(self) -> None:
        if self._fh:
            self._fh.close()
            self._fh = None


