"""The Rack's telemetry producers: logs, metrics and traces written to the WAL first.

Records are CBOR maps `{"kind": "logs"|"metrics"|"traces", ...columns}` (columns in
fluxrig.wire.telemetry.COLUMNS, times in unix ns); the TelemetryShipper publishes them to
the Snake and acknowledges them in the WAL only once JetStream has them on disk.

* `WalLogHandler`: every log record at or above its level becomes a `logs` record. Called
  from any thread; appends happen on the event loop. The hot path never waits on it: when
  the WAL's write buffer is full the record is counted in `dropped` and the caller goes on.
* `MetricsReporter`: every `interval` seconds, each gear's counters (`flux.gear.messages_in`,
  `messages_out`, `errors`, `dropped`, plus what a gear adds, e.g. connections) become
  `metrics` records, with the WAL's own health (`flux.wal.*`).
* `Telemetry.event(...)`: Rack events (a reload) as a log record plus a `traces` span.
* `record_span(...)`: the same for code that does not hold the Telemetry (a conductor's
  reversal saga, ended: answered or parked), into the running Rack's telemetry; a span, unlike
  a log line, does not depend on the log level.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from .aiotools import cancel_and_wait
from .ids import uuid7
from .iso8583.masking import mask_card_numbers
from .logs import safe_message
from .wire.telemetry import SEVERITY
from .wire.vocab import TelemetryKind

__all__ = ["Telemetry", "WalLogHandler", "MetricsReporter", "record_span"]

log = logging.getLogger("fluxrig.telemetry")


# Snapshot sections that are the Rack's own, not a gear's (their metrics carry no gear attr).
_SECTION_PREFIX = {"_wal": "flux.wal.", "_ctrl": "flux.ctrl."}


class WalLogHandler(logging.Handler):
    def __init__(self, wal, loop: asyncio.AbstractEventLoop, level: int = logging.INFO):
        super().__init__(level)
        self.wal = wal
        self.loop = loop
        self.dropped = 0
        self.written = 0
        self._busy = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(self._busy, "on", False) or record.name.startswith("fluxrig.wal"):
            return  # never log about logging into the WAL from inside the WAL
        try:
            doc = {
                "kind": TelemetryKind.LOGS,
                "ts": int(record.created * 1e9),
                "severity": SEVERITY.get(record.levelname.lower(), 9),
                "severity_text": record.levelname,
                # masked here too: a LogRecord subclass of another library's making is not a
                # MaskingLogRecord (fluxrig.logs), and this line leaves the Rack
                "body": safe_message(record),
                "attrs": {"logger": record.name},
                "trace_id": "",
                "span_id": "",
            }
        except Exception:
            self.handleError(record)
            return
        if record.exc_info:
            # an exception's text is no safer than a message: "bad field 2: '4111...'"
            doc["attrs"]["exception"] = mask_card_numbers(logging.Formatter().formatException(record.exc_info))
        extra = getattr(record, "flux_attrs", None)  # structured attributes: log.info(..., extra={"flux_attrs": {...}})
        if isinstance(extra, dict):
            doc["attrs"].update(
                {str(k): v if isinstance(v, (int, float)) else mask_card_numbers(str(v)) for k, v in extra.items()}
            )
            doc["trace_id"] = str(getattr(record, "flux_trace", "") or "")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            self._append(doc)
        elif not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._append, doc)

    def _append(self, doc: dict) -> None:
        self._busy.on = True
        try:
            self.wal.append_nowait(doc)
            self.written += 1
        except Exception:  # WalFull, closed, failed: telemetry gives way, traffic does not
            self.dropped += 1
        finally:
            self._busy.on = False


class MetricsReporter:
    def __init__(self, wal, snapshot, interval: float):
        self.wal = wal
        self.snapshot = snapshot  # () -> {gear: {counter: value}}
        self.interval = interval
        self.dropped = 0
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="telemetry-metrics")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    def report(self) -> int:
        ts = time.time_ns()
        n = 0
        for gear, counters in self.snapshot().items():
            for name, value in counters.items():
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                prefix = _SECTION_PREFIX.get(gear, "flux.gear.")
                doc = {
                    "kind": TelemetryKind.METRICS,
                    "ts": ts,
                    "name": prefix + name,
                    "type": "gauge",
                    "value": float(value),
                    "unit": "1",
                    "attrs": {} if gear in _SECTION_PREFIX else {"gear": gear},
                }
                try:
                    self.wal.append_nowait(doc)
                    n += 1
                except Exception:
                    self.dropped += 1
        return n

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.report()


class Telemetry:
    """Owns the producers of one Rack; `event()` for Rack-level events."""

    def __init__(self, wal, snapshot, interval: float, level: int = logging.INFO):
        self.wal = wal
        self.handler = WalLogHandler(wal, asyncio.get_running_loop(), level)
        self.metrics = MetricsReporter(wal, snapshot, interval)

    async def start(self) -> None:
        global _current
        logging.getLogger().addHandler(self.handler)
        await self.metrics.start()
        _current = self

    async def stop(self) -> None:
        global _current
        if _current is self:
            _current = None
        logging.getLogger().removeHandler(self.handler)
        await self.metrics.stop()

    def event(self, name: str, attrs: dict, start_ns: int, end_ns: int, ok: bool = True, trace_id: str = "") -> None:
        """One span for a Rack-level operation (a reload, a reversal saga): start, end, status,
        attributes; `trace_id` ties it to the traffic it belongs to (a new one when empty)."""
        # "kind" is the record type for the shipper; the span's own kind goes in span_kind
        doc = {
            "kind": TelemetryKind.TRACES,
            "span_kind": "internal",
            "trace_id": trace_id or uuid7().hex(),
            "span_id": uuid7().hex()[:16],
            "parent_span_id": "",
            "name": name,
            "start": start_ns,
            "end": end_ns,
            "status": "ok" if ok else "error",
            # a span leaves the Rack like a log line: its text attributes are masked the same way
            "attrs": {k: mask_card_numbers(v) if isinstance(v, str) else v for k, v in attrs.items()},
        }
        try:
            self.wal.append_nowait(doc)
        except Exception:
            self.metrics.dropped += 1

    def stats(self) -> dict:
        return {
            "logs_written": self.handler.written,
            "logs_dropped": self.handler.dropped,
            "metrics_dropped": self.metrics.dropped,
        }


_current: Telemetry | None = None  # the running Rack's telemetry, record_span's sink


def record_span(name: str, attrs: dict, start_ns: int, end_ns: int, ok: bool = True, trace_id: str = "") -> bool:
    """One `traces` span into the running Rack's telemetry WAL (Telemetry.event); False when
    no telemetry runs (a Rack without a Mixer). Never blocks: a full WAL counts it dropped."""
    telemetry = _current
    if telemetry is None:
        return False
    telemetry.event(name, attrs, start_ns, end_ns, ok, trace_id)
    return True
