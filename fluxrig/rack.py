"""The Rack process: configuration, instance lock, scenario, runtime, signals, systemd.

`Rack.run()` loads the scenario, starts the runtime, tells systemd READY=1 once the graph
is running, keeps the watchdog fed, and waits. SIGTERM or SIGINT drain the graph within
`rack.drain_timeout` then exit 0; SIGHUP (or `fluxrig reload`) re-reads the scenario file and
shadow-swaps it in (see runtime/reload.py): unchanged gears keep running. Signal
handlers only post a request to the loop; the work happens in `run()`.

Kill switch (fluxrig/killswitch.py): signed commands from the Mixer arrive through the agent
(`_on_command`); the Rack is their `KillTarget`. A kill stops every gear at once and leaves
an empty graph running (agent, WAL and telemetry carry on, so the Mixer can still see and
revive it); the killed state is on disk, so `run()` starts no gear while it is set, and
`apply_scenario` refuses every scenario (RackKilled) until a revive.
"""

from __future__ import annotations

import asyncio
import fcntl
import gc
import json
import logging
import os
import signal
import time

from . import systemd
from .config import Config
from .errors import FluxError, ScenarioError
from .killswitch import KillSwitch
from .logs import TRACE
from .msg import set_limits
from .runtime.graph import Runtime
from .runtime.reload import ReloadError, shadow_swap
from .scenario import Scenario, load_scenario

# A joined Rack starts with no gears; the passport's scenario is shadow-swapped in.
EMPTY_SCENARIO = Scenario(name="", version="none", gears=[], wires=[], racks=[], doc={})

__all__ = ["Rack", "InstanceLocked"]

log = logging.getLogger("fluxrig.rack")


class InstanceLocked(FluxError):
    def __init__(self, path: str):
        self.path = path
        super().__init__(f"another fluxrig Rack holds {path}; stop it or give this one its own base.state_dir")


class Rack:
    def __init__(self, config: Config, scenario_path: str | None = None):
        set_limits(config.rack.max_hops, config.rack.max_payload_size)
        self.config = config
        self.scenario_path = scenario_path or config.base.scenario or None
        self.runtime: Runtime | None = None
        self._stop = asyncio.Event()
        self._reload_requested = asyncio.Event()
        self._lock_fd: int | None = None
        self.name = config.base.name
        self._reload_lock = asyncio.Lock()
        self.agent = None
        self.wal = None
        self.telemetry = None
        self.shipper = None
        self.killswitch: KillSwitch | None = None
        self.bus = None  # the guaranteed lane (fluxrig.agent.lanes.JetStreamBus) when joined
        self.lane_wal = None
        self.event_listeners: list = []

    # -- instance lock ---------------------------------------------------------------------------
    def _lock(self) -> None:
        state_dir = self.config.base.state_dir
        os.makedirs(state_dir, exist_ok=True)
        path = os.path.join(state_dir, ".lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InstanceLocked(path) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- scenario ----------------------------------------------------------------------------------
    def load(self) -> Scenario:
        if not self.scenario_path:
            raise FluxError("no scenario to run: pass --scenario FILE, set base.scenario in fluxrig.toml, "
                            "or join a Mixer with snake.url and snake.bootstrap_token")
        return load_scenario(self.scenario_path)

    async def apply_scenario(self, scenario: Scenario):
        """Shadow-swap the running graph to `scenario`; ReloadError leaves it unchanged.
        RackKilled while the kill switch is set."""
        async with self._reload_lock:
            if self.killswitch is not None:
                self.killswitch.raise_if_killed()
            if self.bus is not None:  # the guaranteed lane fetches nothing mid-swap
                async with self.bus.hold():
                    report = await shadow_swap(self.runtime, scenario)
            else:
                report = await shadow_swap(self.runtime, scenario)
            if self.killswitch is not None:
                for name in list(self.killswitch.stopped_gears):  # a reload must not bring it back
                    await self.runtime.stop_gear(name)
        self._telemetry_event(report.as_dict())
        return report

    def _telemetry_event(self, event: dict) -> None:
        log.info("event %s", json.dumps(event, separators=(",", ":")))
        if self.telemetry is not None and event.get("event") == "reload":
            end = time.time_ns()
            start = end - int(float(event.get("duration_ms") or 0) * 1e6)
            attrs = {k: v for k, v in event.items() if k != "event"}
            self.telemetry.event("reload", attrs, start, end, bool(event.get("ok")))
        for listener in self.event_listeners:
            try:
                listener(event)
            except Exception:
                log.exception("event listener failed")

    # -- main loop -----------------------------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        self._reload_requested.set()

    async def _apply_from_mixer(self, doc: dict, version: str) -> None:
        """The agent's apply callback: a scenario from a verified passport. Raising refuses it;
        the message is reported to the Mixer as the `rejected` reason."""
        from .agent.lanes import scenario_from_projection

        if self.agent is not None and self.agent.rack_name:
            self.runtime.rack_name = self.agent.rack_name
        scenario = scenario_from_projection(doc, self.runtime.rack_name, source=None)
        await self.apply_scenario(scenario)

    def _on_shutdown(self, reason: str = "") -> None:
        log.warning("the Mixer asked this Rack to shut down%s", f": {reason}" if reason else "")
        self.request_stop()

    @staticmethod
    def _set_log_level(level: str) -> None:
        """`set_log_level` from the Mixer: trace, debug, info, warning or error."""
        value = TRACE if level.lower() == "trace" else logging.getLevelName(level.upper())
        if not isinstance(value, int):
            raise FluxError(f"unknown log level {level!r}: use trace, debug, info, warning or error")
        logging.getLogger().setLevel(value)

    # -- kill switch (KillTarget for fluxrig.killswitch) ------------------------------------------------
    async def _on_command(self, verb: str, data: bytes) -> None:
        agent = self.agent
        passport = agent.passport if agent is not None else None
        await self.killswitch.handle(verb, data, pins=agent.store.pins() if agent is not None else [],
                                     rack_id=passport.rack_id if passport is not None else None, target=self)

    async def _empty_graph(self) -> None:
        """Stop every gear now (no drain: connections and listeners close at once) and leave an
        empty graph running in its place. Caller holds the reload lock."""
        old = self.runtime
        await old.stop()
        self.runtime = Runtime(EMPTY_SCENARIO, old.rack_name, self.config.rack, bus=old.bus)
        await self.runtime.start()

    async def kill_gears(self, reason: str) -> None:
        async with self._reload_lock:
            await self._empty_graph()
        log.warning("kill switch: every gear stopped (%s); new traffic is refused until revived",
                    reason or "no reason given")

    async def revive_gears(self) -> None:
        """A fresh graph, then the scenario again: the passport's, else the scenario file."""
        async with self._reload_lock:
            await self._empty_graph()
        log.warning("kill switch: revived; starting the scenario again")
        passport = self.agent.passport if self.agent is not None else None
        if passport is not None and passport.scenario is not None:
            await self.agent.reapply()
        elif self.scenario_path:
            await self.apply_scenario(self.load())

    async def stop_gear(self, name: str) -> bool:
        async with self._reload_lock:
            return await self.runtime.stop_gear(name)

    def close_connection(self, gear: str, conn_id: str, reason: str) -> int:
        """Relay `conn.close` on the in-Rack control bus; returns how many gears received it."""
        cmd = {"cmd": "conn.close", "args": {"conn_id": conn_id, "reason": reason}}
        names = [gear] if gear else list(self.runtime.gears)
        return sum(self.runtime.control.publish(name, cmd) for name in names)

    async def _prepare_agent(self) -> None:
        """The agent object and the guaranteed lane, before the runtime exists: a local
        scenario with guaranteed wires then finds its bus."""
        from .agent import AgentConfig, RackAgent  # imports nats only when joined to a Mixer

        self.agent = RackAgent(
            AgentConfig.from_config(self.config),
            self._apply_from_mixer,
            on_shutdown=self._on_shutdown,
            on_command=self._on_command,
            on_log_level=self._set_log_level,
            stats=lambda: {"ctrl": self.killswitch.status() if self.killswitch else {},
                           "gears": self.runtime.metrics() if self.runtime else {},
                           "lanes": self.bus.metrics() if self.bus else {},
                           "telemetry": self._telemetry_stats()},
        )
        await self._start_lanes()  # before agent.start(): it may apply a stored passport at once

    async def _start_agent(self) -> None:
        await self.agent.start()
        if not self.config.telemetry.disabled:
            await self._start_telemetry()

    async def _start_lanes(self) -> None:
        """The guaranteed lane: its own WAL at <store_dir>/lanes and a JetStreamBus the runtime uses."""
        from .agent.lanes import JetStreamBus, open_lane_wal

        self.lane_wal = await open_lane_wal(self.config)
        mb = self.config.store.wal_max_size_mb
        self.bus = JetStreamBus(self.agent, self.lane_wal, send_timeout=self.config.rack.lane_send_timeout,
                                max_backlog_bytes=mb * 1024 * 1024 if mb > 0 else None)
        self.bus.start()
        if self.runtime is not None:
            self.runtime.bus = self.bus

    async def _stop_lanes(self) -> None:
        bus, wal = self.bus, self.lane_wal
        self.bus = self.lane_wal = None
        if bus is not None:
            await bus.close()
        if wal is not None:
            await wal.close()

    def _telemetry_stats(self) -> dict:
        """For the heartbeat: how far the shipper is behind the WAL (the backlog after an outage)."""
        if self.shipper is None or self.wal is None:
            return {}
        st = self.shipper.stats
        return {"backlog": st["backlog"], "shipped": st["shipped"], "publish_failures": st["publish_failures"],
                "undecodable": st["undecodable"], "wal_committed_seq": self.wal.committed_seq,
                "wal_cursor": self.wal.cursor, "at": round(time.time(), 3)}

    async def _start_telemetry(self) -> None:
        """Logs, metrics and traces go to the WAL first; the shipper drains it to the Snake."""
        from .agent.shipper import TelemetryShipper
        from .telemetry import Telemetry
        from .wal import AsyncWal
        from .wal.log import options_from_config

        self.wal = await AsyncWal.open(os.path.join(self.config.store_dir, "wal"), **options_from_config(self.config))
        rec = self.wal.recovery
        if rec.corrupt_records_skipped or rec.torn_bytes_truncated or rec.headers_damaged:
            log.warning("telemetry WAL repaired itself: %d corrupt records skipped, %d torn bytes cut",
                        rec.corrupt_records_skipped, rec.torn_bytes_truncated)

        def snapshot():
            m = dict(self.runtime.metrics()) if self.runtime else {}
            m["_wal"] = self.wal.metrics()
            return m

        self.telemetry = Telemetry(self.wal, snapshot, self.config.telemetry.batch_interval)
        await self.telemetry.start()
        self.shipper = TelemetryShipper(self.wal, self.agent, rate=self.config.telemetry.ship_rate or None)
        await self.shipper.start()

    async def _stop_telemetry(self) -> None:
        shipper, telemetry, wal = self.shipper, self.telemetry, self.wal
        self.shipper = self.telemetry = self.wal = None
        if shipper is not None:
            await shipper.stop()
        if telemetry is not None:
            await telemetry.stop()
        if wal is not None:
            await wal.close()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._lock()
        try:
            joined = bool(self.config.snake.url)
            self.killswitch = KillSwitch(self.config.base.state_dir)
            self.killswitch.load()
            if self.killswitch.killed is not None:
                scenario = EMPTY_SCENARIO  # killed by the Mixer: no gear runs until revived
                if not joined:
                    log.error("standalone (no snake.url), nothing can revive this Rack: delete %s to run again",
                              self.killswitch.path)
            elif self.scenario_path or not joined:
                scenario = self.load()
            else:
                scenario = EMPTY_SCENARIO  # the Mixer's passport brings the scenario
            if joined:
                await self._prepare_agent()
            self.runtime = Runtime(scenario, self.name, self.config.rack, bus=self.bus)
            await self.runtime.start()
            if joined:
                await self._start_agent()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
            loop.add_signal_handler(signal.SIGHUP, self.request_reload)
            # Objects alive now (modules, specs, the graph) live as long as the process: keep
            # them out of the collector's scans, which otherwise grow with every import.
            gc.freeze()
            current = self.runtime.scenario
            systemd.ready(f"running {current.name or current.source or '-'} {current.version}")
            log.info("fluxrig ready: scenario %s version %s%s", current.name or current.source or "-", current.version,
                     f" (joined to {self.config.snake.url})" if joined else "")
            watchdog = loop.create_task(self._watchdog()) if systemd.watchdog_interval() else None
            while not self._stop.is_set():
                stop_wait = loop.create_task(self._stop.wait())
                reload_wait = loop.create_task(self._reload_requested.wait())
                await asyncio.wait({stop_wait, reload_wait}, return_when=asyncio.FIRST_COMPLETED)
                stop_wait.cancel()
                reload_wait.cancel()
                if self._reload_requested.is_set() and not self._stop.is_set():
                    self._reload_requested.clear()
                    if self.scenario_path:
                        await self._reload_from_file()
                    else:
                        log.warning("SIGHUP ignored: this Rack's scenario comes from the Mixer, not a file")
            systemd.stopping()
            log.info("stopping: draining for up to %gs", self.config.rack.drain_timeout)
            clean = await self.runtime.shutdown(self.config.rack.drain_timeout)
            await self._stop_lanes()
            await self._stop_telemetry()
            if self.agent is not None:
                await self.agent.stop()
            log.info("stopped (%s)", "drained" if clean else "drain deadline reached")
            if watchdog:
                watchdog.cancel()
            return 0
        except BaseException:
            # A failed start must not leave the agent's connection or the WAL's writer thread
            # behind: they would keep the process alive after the error is reported.
            await self._stop_lanes()
            await self._stop_telemetry()
            if self.agent is not None:
                await self.agent.stop()
            raise
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            self._unlock()

    async def _reload_from_file(self) -> None:
        systemd.reloading()
        try:
            scenario = self.load()
            await self.apply_scenario(scenario)
        except ScenarioError as exc:
            log.error("reload refused, the running scenario is unchanged: %s", exc)
            self._telemetry_event({"event": "reload", "ok": False, "reason": str(exc),
                                   "old_version": self.runtime.scenario.version})
        except ReloadError as exc:
            self._telemetry_event(exc.report.as_dict())
        except FluxError as exc:
            log.error("reload failed, the running scenario is unchanged: %s", exc)
        finally:
            systemd.ready()

    async def _watchdog(self) -> None:
        period = systemd.watchdog_interval() or 10.0
        while True:
            systemd.watchdog()
            await asyncio.sleep(period)
