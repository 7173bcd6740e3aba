"""Logging set-up for the Rack: level, text or JSON lines, a TRACE level below DEBUG; card
numbers masked in every log line; a per-key rate limiter for lines a peer can provoke.

Per-message logging is TRACE and guarded by `isEnabledFor`; PAN-like values are masked by
the gears that know which fields hold them (ISO 8583 sensitivity in the spec). As a last line
of defence, every log record's message (whatever handler formats it: stderr, file, the
telemetry WAL shipped to the Mixer) has its card numbers masked (Luhn-valid runs of 13-19
digits, also glued into longer runs or grouped: fluxrig.iso8583.masking; first six, last four
kept): the record factory is replaced once, at import, and the formatters and the telemetry
handler mask again what they write (a record another library's factory made, a traceback).

`LogLimiter(log, burst, window)` lets at most `burst` lines per key (a connection id) and
`gear_burst` per limiter (the gear) through in each `window` seconds; the rest are counted and
the next line let through, or `flush()`, says how many were suppressed.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from .iso8583.masking import mask_card_numbers, mask_log_message
from .wire.vocab import TRACE_LEVEL, LogLevel

__all__ = [
    "TRACE",
    "JsonFormatter",
    "MaskingFormatter",
    "setup_logging",
    "LogLimiter",
    "MaskingLogRecord",
    "install_masking",
    "safe_message",
]

TRACE = TRACE_LEVEL
logging.addLevelName(TRACE, "TRACE")


class MaskingLogRecord(logging.LogRecord):
    """A LogRecord whose message never carries a card number in clear (its LogSafe arguments,
    masked where they were built, are left as they are: mask_log_message)."""

    def getMessage(self) -> str:
        return mask_log_message(self.msg, self.args)


def safe_message(record: logging.LogRecord) -> str:
    """The message of any record, card numbers masked: ours mask themselves; a record of
    another library's class is masked whole (its getMessage may be its own)."""
    if type(record) is MaskingLogRecord or type(record) is logging.LogRecord:
        return mask_log_message(record.msg, record.args)
    return mask_card_numbers(record.getMessage())


def install_masking() -> None:
    """Make every new log record a MaskingLogRecord (idempotent; keeps a custom factory's class
    only if it already masks)."""
    current = logging.getLogRecordFactory()
    if getattr(current, "_fluxrig_masking", False):
        return

    def factory(*args, **kwargs):
        rec = current(*args, **kwargs)
        if type(rec) is logging.LogRecord:
            rec.__class__ = MaskingLogRecord
        return rec

    factory._fluxrig_masking = True
    logging.setLogRecordFactory(factory)


install_masking()


class LogLimiter:
    """Rate-limit log lines per key and per owner (see the module docstring)."""

    def __init__(self, log: logging.Logger, *, burst: int = 5, gear_burst: int = 50, window: float = 10.0):
        self.log = log
        self.burst = burst
        self.gear_burst = gear_burst
        self.window = window
        self._start = time.monotonic()
        self._used = 0
        self._per_key: dict = {}
        self.suppressed = 0  # lines not written since the last summary
        self.suppressed_total = 0

    def _roll(self, now: float) -> None:
        if now - self._start >= self.window:
            self._start = now
            self._used = 0
            self._per_key.clear()

    def allow(self, key=None) -> bool:
        now = time.monotonic()
        self._roll(now)
        n = self._per_key.get(key, 0) if key is not None else 0
        if self._used >= self.gear_burst or (key is not None and n >= self.burst):
            self.suppressed += 1
            self.suppressed_total += 1
            return False
        self._used += 1
        if key is not None:
            if len(self._per_key) < 4 * self.gear_burst:  # bounded: keys are peers
                self._per_key[key] = n + 1
        return True

    def log_line(self, level: int, key, msg: str, *args) -> None:
        """Log `msg % args` at `level` unless `key` (or the owner) is over its budget."""
        if not self.log.isEnabledFor(level) or not self.allow(key):
            return
        if self.suppressed:
            msg = msg + " (%d similar lines suppressed)"
            args = (*args, self.suppressed)
            self.suppressed = 0
        self.log.log(level, msg, *args)

    def flush(self, name: str = "") -> None:
        """Say how many lines were suppressed, once the window they fell in is over."""
        if self.suppressed and time.monotonic() - self._start >= self.window:
            self.log.warning("%s: %d log lines suppressed in the last %gs", name, self.suppressed, self.window)
            self.suppressed = 0


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": safe_message(record),  # a record not of our factory too
        }
        if record.exc_info:
            doc["exc"] = mask_card_numbers(self.formatException(record.exc_info))
        if record.stack_info:
            doc["stack"] = mask_card_numbers(self.formatStack(record.stack_info))
        return json.dumps(doc, separators=(",", ":"))


class MaskingFormatter(logging.Formatter):
    """Text lines with card numbers masked: the message (safe_message: also of a record another
    library's factory made), the traceback and the stack. The line's other fields are the
    formatter's own (time, level, logger name)."""

    def format(self, record: logging.LogRecord) -> str:
        record.message = safe_message(record)
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        s = self.formatMessage(record)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            s = s + "\n" + mask_card_numbers(record.exc_text)
        if record.stack_info:
            s = s + "\n" + mask_card_numbers(self.formatStack(record.stack_info))
        return s


def setup_logging(
    level: str = "info", fmt: str = "text", filename: str = "", trace: bool = False, debug: bool = False
) -> None:
    lvl = TRACE if trace else logging.DEBUG if debug else LogLevel.parse(level).number
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    formatter = (
        JsonFormatter() if fmt == "json" else MaskingFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    )
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if filename:
        handlers.append(logging.FileHandler(filename))
    for h in handlers:
        h.setFormatter(formatter)
        root.addHandler(h)
    root.setLevel(lvl)
