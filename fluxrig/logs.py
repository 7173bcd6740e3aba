"""Logging set-up for the Rack: level, text or JSON lines, a TRACE level below DEBUG.

Per-message logging is TRACE and guarded by `isEnabledFor`; PAN-like values are masked by
the gears that know which fields hold them (ISO 8583 sensitivity in the spec).
"""

from __future__ import annotations

import json
import logging
import sys
import time

__all__ = ["TRACE", "setup_logging"]

TRACE = 5
logging.addLevelName(TRACE, "TRACE")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, separators=(",", ":"))


def setup_logging(level: str = "info", fmt: str = "text", filename: str = "", trace: bool = False, debug: bool = False) -> None:
    lvl = TRACE if trace else logging.DEBUG if debug else {"trace": TRACE}.get(level, None)
    if lvl is None:
        lvl = getattr(logging, level.upper(), logging.INFO)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    formatter = JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    )
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if filename:
        handlers.append(logging.FileHandler(filename))
    for h in handlers:
        h.setFormatter(formatter)
        root.addHandler(h)
    root.setLevel(lvl)
