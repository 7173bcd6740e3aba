"""A joined Rack's link to its Mixer: the Snake session, the guaranteed lane and the telemetry pipeline.

`MixerLink` builds and owns, in this order of start and reverse order of stop:

    lane WAL + JetStreamBus   `<store_dir>/lanes`; opened before the runtime, so a scenario with
                              guaranteed wires finds its bus at once (open_lanes)
    RackAgent                 the SnakeSession: enrollment, passport, heartbeats, control (start)
    telemetry WAL + Telemetry + TelemetryShipper   logs, metrics and reload traces to the WAL
                              first, shipped exactly once when the link is up (start)

It never drives the Rack: the agent posts requests on the Rack's RequestQueue. What it needs
from the Rack for heartbeats is read through `StatsSources` (plain functions returning data).
Nothing here imports nats until a link is opened (a standalone Rack never imports it).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .config import Config
from .rack_requests import RequestQueue

__all__ = ["MixerLink", "StatsSources"]

log = logging.getLogger("fluxrig.rack")

TELEMETRY_WAL_DIR = "wal"


@dataclass(frozen=True, slots=True)
class StatsSources:
    """What the heartbeat reports about the Rack, read when a heartbeat is sent."""

    gears: Callable[[], Mapping]
    ctrl: Callable[[], Mapping]


class MixerLink:
    def __init__(self, config: Config, requests: RequestQueue, sources: StatsSources):
        self.config = config
        self.requests = requests
        self.sources = sources
        self.agent = None
        self.bus = None
        self.wal = None
        self.telemetry = None
        self.shipper = None
        self._telemetry_retry = None
        self._telemetry_open_error = ""

    async def open_lanes(self):
        """The agent object and the guaranteed lane (not connected yet); returns the bus."""
        from .agent import AgentConfig, RackAgent  # imports nats only when joined to a Mixer
        from .agent.lanes import JetStreamBus, open_lane_wal

        self.agent = RackAgent(AgentConfig.from_config(self.config), self.requests, stats=self.stats)
        mb = self.config.store.wal_max_size_mb
        # A lane WAL that cannot open (a full disk) does not stop the Rack: the bus receives,
        # refuses sends with the error, and opens the WAL once it can (issue 13).
        self.bus = await JetStreamBus.open(self.agent, lambda: open_lane_wal(self.config),
                                           send_timeout=self.config.rack.lane_send_timeout,
                                           max_backlog_bytes=mb * 1024 * 1024 if mb > 0 else None)  # fmt: skip
        self.bus.start()
        return self.bus

    @property
    def lane_wal(self):
        """The lane WAL, once open (the bus opens it again later when it could not at start)."""
        return self.bus.wal if self.bus is not None else None

    async def start(self) -> None:
        """Start the session (a stored passport's scenario is posted at once), then telemetry."""
        await self.agent.start()
        if not self.config.telemetry.disabled:
            await self._start_telemetry_or_retry()

    # -- storage (issue 13): a telemetry WAL that cannot be opened (a full disk) never stops
    # the Rack: it runs without telemetry, says so once, and opens it once space returns.
    TELEMETRY_REOPEN_S = 5.0

    async def _start_telemetry_or_retry(self) -> None:
        import asyncio

        from .wal.errors import WalOpenFailed

        try:
            await self._start_telemetry()
            return
        except WalOpenFailed as exc:
            self._telemetry_open_error = str(exc)
            log.error("telemetry WAL not opened (%s): the Rack runs without telemetry and retries every %gs",
                      exc, self.TELEMETRY_REOPEN_S)  # fmt: skip
        self._telemetry_retry = asyncio.get_running_loop().create_task(self._retry_telemetry(), name="telemetry-open")

    async def _retry_telemetry(self) -> None:
        import asyncio

        from .wal.errors import WalOpenFailed

        t0 = time.monotonic()
        while True:
            await asyncio.sleep(self.TELEMETRY_REOPEN_S)
            try:
                await self._start_telemetry()
            except WalOpenFailed as exc:
                self._telemetry_open_error = str(exc)
                continue
            self._telemetry_open_error = ""
            log.error("telemetry WAL opened after %.0fs: telemetry is recorded again", time.monotonic() - t0)
            return

    async def close(self) -> None:
        """Lanes first (they flush acks over the session), then telemetry, then the session."""
        bus, lane_wal = self.bus, self.lane_wal
        self.bus = None
        if bus is not None:
            await bus.close()
            lane_wal = bus.wal  # opened meanwhile, perhaps
        if lane_wal is not None:
            await lane_wal.close()
        if self._telemetry_retry is not None:
            self._telemetry_retry.cancel()
            self._telemetry_retry = None
        shipper, telemetry, wal = self.shipper, self.telemetry, self.wal
        self.shipper = self.telemetry = self.wal = None
        if shipper is not None:
            await shipper.stop()
        if telemetry is not None:
            await telemetry.stop()
        if wal is not None:
            await wal.close()
        if self.agent is not None:
            await self.agent.stop()

    def reapply(self) -> bool:
        """Ask the session to post its passport's scenario again (after a revive); False when
        there is none to run."""
        return self.agent is not None and self.agent.reapply()

    def record_event(self, event: dict) -> None:
        """A reload outcome becomes a trace span in the telemetry WAL."""
        if self.telemetry is None or event.get("event") != "reload":
            return
        end = time.time_ns()
        start = end - int(float(event.get("duration_ms") or 0) * 1e6)
        attrs = {k: v for k, v in event.items() if k != "event"}
        self.telemetry.event("reload", attrs, start, end, bool(event.get("ok")))

    def stats(self) -> dict:
        """The heartbeat's `stats`."""
        return {
            "ctrl": dict(self.sources.ctrl()),
            "gears": dict(self.sources.gears()),
            "lanes": self.bus.metrics() if self.bus else {},
            "telemetry": self._telemetry_stats(),
            "storage": self.storage_stats(),
        }

    def storage_stats(self) -> dict:
        """Health of the Rack's two WALs (storage, issue 13): `failed` lists the ones refusing
        appends right now (a full disk; they heal by themselves), each with its counters."""
        out: dict = {"failed": []}
        for name, wal in (("lanes", self.lane_wal), ("telemetry", self.wal)):
            if wal is None:
                continue
            m = wal.metrics()
            out[name] = {k: m.get(k) for k in ("failed", "failures", "heals", "refused_records", "cursor_errors",
                                              "failed_since", "last_failure", "dropped_records")}  # fmt: skip
            if m.get("failed"):
                out["failed"].append(name)
        if self.bus is not None and self.bus.wal_open_error is not None:
            out["lanes"] = {"failed": True, "last_failure": str(self.bus.wal_open_error)}
            out["failed"].append("lanes")
        if self._telemetry_open_error and self.wal is None:
            out["telemetry"] = {"failed": True, "last_failure": self._telemetry_open_error}
            out["failed"].append("telemetry")
        return out

    #: What the heartbeat carries of the shipper's stats (how far behind, how it paces).
    SHIPPER_STATS = ("backlog", "shipped", "publish_failures", "undecodable", "records_per_batch", "window", "rtt_ms")

    def _telemetry_stats(self) -> dict:
        """How far the shipper is behind the WAL (the backlog after an outage) and how it paces."""
        if self.shipper is None or self.wal is None:
            return {}
        st = self.shipper.stats
        out = {k: st[k] for k in self.SHIPPER_STATS if k in st}
        out.update(wal_committed_seq=self.wal.committed_seq, wal_cursor=self.wal.cursor, at=round(time.time(), 3))
        return out

    async def _start_telemetry(self) -> None:
        from .agent.shipper import TelemetryShipper
        from .telemetry import Telemetry
        from .wal import AsyncWal
        from .wal.log import options_from_config

        self.wal = await AsyncWal.open(os.path.join(self.config.store_dir, TELEMETRY_WAL_DIR),
                                       **options_from_config(self.config))  # fmt: skip
        rec = self.wal.recovery
        if rec.corrupt_records_skipped or rec.torn_bytes_truncated or rec.headers_damaged:
            log.warning("telemetry WAL repaired itself: %d corrupt records skipped, %d torn bytes cut",
                        rec.corrupt_records_skipped, rec.torn_bytes_truncated)  # fmt: skip

        def snapshot():
            m = dict(self.sources.gears())
            m["_wal"] = self.wal.metrics()
            # Control-verb counters (accepted, refused by reason): the refusals' metric.
            m["_ctrl"] = dict(self.sources.ctrl().get("metrics") or {})
            return m

        self.telemetry = Telemetry(self.wal, snapshot, self.config.telemetry.batch_interval)
        await self.telemetry.start()
        self.shipper = TelemetryShipper.from_config(self.wal, self.agent, self.config)
        await self.shipper.start()
