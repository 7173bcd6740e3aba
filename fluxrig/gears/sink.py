"""`sink`: the end of a pipeline. `mode` log | stdout | file | null.

`file` appends one JSON object per line (`path` required): id, ts, meta, data and raw (as
text when it is UTF-8, else `hex:<hex>`); the file is flushed on drain and stop. Values a
codec marked sensitive (meta `log.mask`) are masked in every mode, and raw is then elided; card
numbers anywhere else (raw from a plain TCP or serial link, meta, data) are masked before they
are rendered (fluxrig.redact). `log` writes
one INFO line per message; `stdout` prints the JSON line; `null` only counts.
"""

from __future__ import annotations

import json
import sys

from ..iso8583.masking import LogSafe
from ..msg import FluxMsg
from ..redact import log_view
from ..runtime.gear import Gear, Manifest
from ..runtime.registry import register

__all__ = ["message_json", "SinkGear"]

SCHEMA = {
    "type": "object",
    "properties": {
        "mode": {
            "type": "string",
            "enum": ["log", "stdout", "file", "null"],
            "default": "log",
            "description": "where messages go",
        },
        "path": {"type": "string", "description": "JSON-lines file for mode=file"},
        "flush_every": {
            "type": "integer",
            "minimum": 1,
            "default": 1,
            "description": "mode=file: flush after this many lines",
        },
    },
    "additionalProperties": False,
}


def message_json(msg: FluxMsg) -> LogSafe:
    """One message as a JSON line (no newline), sensitive values masked (see fluxrig.redact);
    LogSafe: a log line does not mask it again (its nanosecond `ts` is not a card number)."""
    return LogSafe(json.dumps(log_view(msg), separators=(",", ":")))


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
