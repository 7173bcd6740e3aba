"""The Rack process: instance lock, scenario, runtime, and the one loop that handles every request.

`Rack.run()` takes the instance lock, starts the runtime (and, when joined to a Mixer, its
`MixerLink`), tells systemd READY=1 once the graph runs, keeps the watchdog fed, then handles
requests (fluxrig/rack_requests.py) one at a time until a Stop or Shutdown:

    Stop / Shutdown   drain within rack.drain_timeout, stop, exit 0 (SIGTERM, SIGINT; the Mixer)
    ReloadFile        re-read the scenario file and shadow-swap it in (SIGHUP, `fluxrig reload`)
    ApplyScenario     the scenario of a verified passport (from the agent); refusal = rejected
    ControlCommand    a signed command (kill, revive, gear-stop, conn-close, shutdown, log-level),
                      verified and applied by the KillSwitch

Signal handlers and the agent only post requests; nothing else changes the graph, so reloads,
kills and revives never interleave and need no lock.

Kill switch (fluxrig/killswitch.py): the Rack is its `KillTarget`. A kill stops every gear at
once and leaves an empty graph running (session, WAL and telemetry carry on, so the Mixer can
still see and revive it); the killed state is on disk, so `run()` starts no gear while it is
set, and every scenario is refused (RackKilled) until a revive.

Time. Commands are judged by the Mixer's time as the agent learned it from signed heartbeat
replies (`agent.mixer_clock`, fluxrig/timesync.py); the passport's standing in time (valid,
renew, expired, unknown when the clock is unset and no Mixer time is known yet) is reported
in the heartbeat's `ctrl.passport` and logged when it changes, never a reason to stop running
it (fluxrig/passport.py).
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

from . import health, systemd
from .balancer import BalancerHealth, parse_listen
from .config import Config
from .errors import FluxError, ScenarioError
from .fileutil import secure_tree
from .killswitch import KillSwitch
from .mixer_link import MixerLink, StatsSources
from .msg import set_limits
from .passport import validity
from .rack_requests import (
    ApplyScenario,
    ControlCommand,
    RackRequest,
    ReloadFile,
    RequestQueue,
    SetLogLevel,
    Shutdown,
    Stop,
)
from .runtime import EMPTY, ReloadError, Runtime
from .scenario import Scenario, load_scenario
from .timesync import CLOCK_FLOOR, LOCAL_WINDOW_S, ClockSource, Judgement, clock_plausible
from .wire import meta as M
from .wire.vocab import LogLevel

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
        self.name = config.base.name
        self.requests = RequestQueue()
        self.runtime: Runtime | None = None
        self.killswitch: KillSwitch | None = None
        self.link: MixerLink | None = None
        self.event_listeners: list = []
        self._lock_fd: int | None = None
        self.health: health.HealthServer | None = None
        self.balancer_health: BalancerHealth | None = None
        self._health_status = "starting"
        self._passport_state = ""  # last reported (logged when it changes)

    @property
    def joined(self) -> bool:
        return bool(self.config.snake.url or self.config.snake.enrollment_bundle)

    @property
    def bus(self):
        """The guaranteed lane when joined (fluxrig.agent.lanes.JetStreamBus), else None."""
        return self.link.bus if self.link is not None else None

    @property
    def agent(self):
        """The Snake session when joined (fluxrig.agent.RackAgent), else None; for diagnostics."""
        return self.link.agent if self.link is not None else None

    # -- what others may ask ----------------------------------------------------------------------
    def request_stop(self) -> None:
        self.requests.post_nowait(Stop())

    def request_reload(self) -> None:
        self.requests.post_nowait(ReloadFile())

    # -- instance lock ---------------------------------------------------------------------------
    def _lock(self) -> None:
        state_dir = self.config.base.state_dir
        # Issue 12 item 6: nothing this process writes is group/other-readable, and a state dir
        # left readable by an older version or a restore is fixed at every start (WAL included).
        os.umask(0o077)
        for d in dict.fromkeys((state_dir, self.config.store_dir)):
            secure_tree(d)
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
            raise FluxError(
                "no scenario to run: pass --scenario FILE, set base.scenario in fluxrig.toml, "
                "or join a Mixer with snake.enrollment_bundle"
            )
        return load_scenario(self.scenario_path)

    def _first_scenario(self) -> Scenario:
        if self.killswitch.killed is not None:
            if not self.joined:
                log.error("standalone (no snake.url), nothing can revive this Rack: delete %s to run again",
                          self.killswitch.path)  # fmt: skip
            return EMPTY  # killed by the Mixer: no gear runs until revived
        if self.scenario_path or not self.joined:
            return self.load()
        return EMPTY  # the Mixer's passport brings the scenario

    async def apply_scenario(self, scenario: Scenario):
        """Shadow-swap the running graph to `scenario` (the runtime holds the guaranteed lane
        meanwhile); ReloadError leaves it unchanged. RackKilled while the kill switch is set."""
        self.killswitch.raise_if_killed()
        report = await self.runtime.swap(scenario)
        for name in list(self.killswitch.stopped_gears):  # a reload must not bring it back
            await self.runtime.stop_gear(name)
        self._event(report.as_dict())
        return report

    def _event(self, event: dict) -> None:
        log.info("event %s", json.dumps(event, separators=(",", ":")))
        if self.link is not None:
            self.link.record_event(event)
        for listener in self.event_listeners:
            try:
                listener(event)
            except Exception:
                log.exception("event listener failed")

    # -- the loop ------------------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._lock()
        watchdog = None
        try:
            # Before anything starts: a reload asked for during the cold start is queued and
            # handled before READY. Installed after the swap, a SIGHUP that came once the
            # listeners were up killed the Rack (its default action; seen in CI). SIGTERM and
            # SIGINT keep theirs until the Rack runs: a stop during start ends it at once.
            loop.add_signal_handler(signal.SIGHUP, self.requests.post_nowait, ReloadFile())
            await self._start_health()
            self.killswitch = KillSwitch(self.config.base.state_dir, time_source=self._judge_time)
            self.killswitch.load()
            scenario = self._first_scenario()
            bus = None
            if self.joined:
                self.link = MixerLink(
                    self.config, self.requests, StatsSources(gears=self._gear_metrics, ctrl=self.ctrl_status)
                )
                bus = await self.link.open_lanes()
            # Cold start is the same swap as a reload, from the empty graph.
            self.runtime = Runtime(
                rack_name=self.name, rack_config=self.config.rack, bus=bus, state_dir=self.config.base.state_dir
            )
            await self.runtime.swap(scenario)
            if self.link is not None:
                await self.link.start()
                self.ctrl_status()  # logs where the stored passport stands in time
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.requests.post_nowait, Stop(sig.name))
            # What the agent posted at start (a stored passport's scenario) runs before READY.
            stop = False
            while not stop and (request := self.requests.get_nowait()) is not None:
                stop = await self._handle(request)
            # Objects alive now (modules, specs, the graph) live as long as the process: keep
            # them out of the collector's scans, which otherwise grow with every import.
            gc.freeze()
            current = self.runtime.scenario
            self._health_status = "running"
            systemd.ready(f"running {current.name or current.source or '-'} {current.version}")
            log.info("fluxrig ready: scenario %s version %s%s", current.name or current.source or "-",
                     current.version, " (joined to a Mixer)" if self.joined else "")  # fmt: skip
            watchdog = loop.create_task(self._watchdog()) if systemd.watchdog_interval() else None
            while not stop:
                stop = await self._handle(await self.requests.get())
            self._health_status = "stopping"
            systemd.stopping()
            log.info("stopping: draining for up to %gs", self.config.rack.drain_timeout)
            clean = await self.runtime.shutdown(self.config.rack.drain_timeout)
            await self._close_link()
            log.info("stopped (%s)", "drained" if clean else "drain deadline reached")
            return 0
        except BaseException:
            # A failed start must not leave the session or the WAL's writer thread behind: they
            # would keep the process alive after the error is reported.
            await self._close_link()
            raise
        finally:
            if watchdog is not None:
                watchdog.cancel()
            if self.health is not None:
                await self.health.close()
            if self.balancer_health is not None:
                await self.balancer_health.close()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            self._unlock()

    async def _close_link(self) -> None:
        self.requests.cancel_pending()
        link, self.link = self.link, None
        if link is not None:
            await link.close()

    async def _handle(self, request: RackRequest) -> bool:
        """Handle one request; True when the Rack is to stop. Never raises for a refused request."""
        match request:
            case Stop(signal=sig):
                log.info("stop requested%s", f" ({sig})" if sig else "")
                return True
            case Shutdown(reason=reason):
                log.warning("the Mixer asked this Rack to shut down%s", f": {reason}" if reason else "")
                return True
            case ReloadFile():
                if self.scenario_path:
                    await self._reload_from_file()
                else:
                    log.warning("SIGHUP ignored: this Rack's scenario comes from the Mixer, not a file")
            case ApplyScenario():
                await _settle(request.outcome, self._apply_from_mixer(request))
            case ControlCommand(verb=verb, data=data, pins=pins, rack_id=rack_id):
                await _settle(request.outcome, self.killswitch.handle(verb, data, pins=pins, rack_id=rack_id,
                                                                      target=self))  # fmt: skip
            case SetLogLevel(level=level):
                logging.getLogger().setLevel(level.number)
                log.info("log level set to %s", level)
            case _:
                log.error("unknown request %r ignored", request)
        return False

    async def _apply_from_mixer(self, request: ApplyScenario):
        """A scenario from a verified passport; raising refuses it (the text is the `rejected`
        reason the Mixer shows)."""
        from .agent.lanes import scenario_from_projection

        if request.rack_name:
            self.runtime.rack_name = request.rack_name
        return await self.apply_scenario(scenario_from_projection(request.doc, self.runtime.rack_name, source=None))

    async def _reload_from_file(self) -> None:
        systemd.reloading()
        try:
            await self.apply_scenario(self.load())
        except ScenarioError as exc:
            log.error("reload refused, the running scenario is unchanged: %s", exc)
            self._event({"event": "reload", "ok": False, "reason": str(exc),
                         "old_version": self.runtime.scenario.version})  # fmt: skip
        except ReloadError as exc:
            self._event(exc.report.as_dict())
        except FluxError as exc:
            log.error("reload failed, the running scenario is unchanged: %s", exc)
        finally:
            systemd.ready()

    # -- liveness (fluxrig/health.py: `fluxrig healthcheck`, the image's HEALTHCHECK) -------------
    async def _start_health(self) -> None:
        self.health = health.HealthServer(health.socket_path(self.config.base.state_dir), self._health_snapshot)
        if not await self.health.start():
            self.health = None
        listen = parse_listen(self.config.rack.health_listen)
        if listen is not None:  # issue 17 item 6: what an L4 balancer checks
            self.balancer_health = BalancerHealth(*listen, self._health_snapshot)
            if not await self.balancer_health.start():
                self.balancer_health = None

    def _health_snapshot(self) -> dict:
        status = self._health_status
        if status == "running" and self.killswitch is not None and self.killswitch.killed is not None:
            status = "killed"
        scenario = self.runtime.scenario if self.runtime is not None else None
        return {
            "status": status,
            "name": self.name,
            "pid": os.getpid(),
            "scenario": (scenario.name or scenario.source or "-") if scenario is not None else None,
            "scenario_version": scenario.version if scenario is not None else None,
            "gears": len(self.runtime.gears) if self.runtime is not None else 0,
            "joined": self.joined,
            # Issue 17: what a balancer decides on (fluxrig/balancer.py).
            "rack_status": self._rack_status(),
            "groups": sorted(scenario.groups) if scenario is not None else [],
            "unshared_groups": self._unshared_groups(),
            # Where the passport stands in time (never a reason to stop: fluxrig/passport.py).
            "passport": self._passport_report() if self.joined else None,
        }

    def _unshared_groups(self) -> list[str]:
        """Groups whose conductors here cannot share with the group's stream right now: they
        decline every reversible request (fluxrig.saga.mirror), so a balancer should go elsewhere."""
        out = set()
        for gear in self.runtime.gears.values() if self.runtime is not None else ():
            mirror = getattr(gear, "mirror", None)
            if mirror is not None and mirror.share_tickets and not mirror.bus.usable():
                out.add(mirror.group)
        return sorted(out)

    def _rack_status(self) -> str | None:
        """The status in this Rack's passport (None standalone, `unenrolled` before one)."""
        if not self.joined:
            return None
        passport = getattr(self.agent, "passport", None)
        return str(passport.status) if passport is not None else "unenrolled"

    # -- time and the heartbeat's ctrl section ---------------------------------------------------------
    def _judge_time(self) -> Judgement:
        """What command freshness is judged by: the Mixer's time once the agent learned it."""
        clock = getattr(self.agent, "mixer_clock", None)
        if clock is not None:
            return clock.judge()
        now = time.time()
        return Judgement(now, LOCAL_WINDOW_S, ClockSource.LOCAL if clock_plausible(now) else ClockSource.UNKNOWN)

    def ctrl_status(self) -> dict:
        """The heartbeat's `ctrl`: the kill switch, the clock, and where the passport stands."""
        out = dict(self.killswitch.status()) if self.killswitch is not None else {}
        clock = getattr(self.agent, "mixer_clock", None)
        if clock is not None:
            out["clock"] = clock.status()
        out["passport"] = self._passport_report()
        refusals = getattr(self.agent, "refusals", None)
        if refusals is not None:
            out["passports"] = refusals.status()
        if self.killswitch is not None:
            out["metrics"] = self.killswitch.metrics()
            if refusals is not None:
                out["metrics"]["passports_refused"] = refusals.refused
                out["metrics"].update({f"passports_refused_{k}": v for k, v in refusals.refused_by.items()})
        self._log_passport_state(out["passport"])
        return out

    def _passport_report(self) -> dict:
        """The passport judged by the best time known: the Mixer's, a plausible local clock, or none."""
        clock = getattr(self.agent, "mixer_clock", None)
        if clock is not None:
            now, source = clock.best_now()
        else:
            j = self._judge_time()
            now, source = (None if j.source is ClockSource.UNKNOWN else j.now), j.source
        return validity(getattr(self.agent, "passport", None), now, str(source))

    def _log_passport_state(self, report: dict) -> None:
        state = f"{report.get('state')}/{report.get('clock')}"
        if state == self._passport_state or report.get("state") == "none":
            return
        self._passport_state = state
        serial, st = report.get("serial"), report.get("state")
        if st == "unknown":
            log.warning("passport %s: this Rack's clock is unset (before %s) and the Mixer's time is not known "
                        "yet; running the last verified scenario, re-checked once time is synced", serial,
                        time.strftime("%Y-%m-%d", time.gmtime(CLOCK_FLOOR)))  # fmt: skip
        elif st == "expired":
            log.warning("passport %s expired %.0fs ago (by the %s clock): still running its scenario; the Mixer "
                        "re-signs it when this Rack is heard", serial, -(report.get("expires_in_s") or 0), report.get("clock"))  # fmt: skip
        else:
            log.info("passport %s is %s (by the %s clock)", serial, st, report.get("clock"))

    def _gear_metrics(self) -> dict:
        return self.runtime.metrics() if self.runtime is not None else {}

    async def _watchdog(self) -> None:
        period = systemd.watchdog_interval() or 10.0
        while True:
            systemd.watchdog()
            await asyncio.sleep(period)

    # -- KillTarget (fluxrig.killswitch) ------------------------------------------------------------
    async def kill_gears(self, reason: str) -> None:
        await self.runtime.stop_all()
        log.warning("kill switch: every gear stopped (%s); new traffic is refused until revived",
                    reason or "no reason given")  # fmt: skip

    async def revive_gears(self) -> None:
        """A fresh graph, then the scenario again: the passport's (posted by the agent, handled
        as the next request), else the scenario file."""
        await self.runtime.stop_all()
        log.warning("kill switch: revived; starting the scenario again")
        if self.link is not None and self.link.reapply():
            return
        if self.scenario_path:
            await self.apply_scenario(self.load())

    async def stop_gear(self, name: str) -> bool:
        return await self.runtime.stop_gear(name)

    def request_shutdown(self, reason: str) -> None:
        """A verified shutdown: drain and exit 0 (handled as the next request)."""
        self.requests.post_nowait(Shutdown(reason))

    def set_log_level(self, level: LogLevel) -> None:
        logging.getLogger().setLevel(level.number)
        log.warning("log level set to %s by the Mixer", level)

    def close_connection(self, gear: str, conn_id: str, reason: str) -> int:
        """Relay `conn.close` on the in-Rack control bus; returns how many gears received it."""
        cmd = {"cmd": M.CONN_CLOSE, "args": {"conn_id": conn_id, "reason": reason}}
        names = [gear] if gear else list(self.runtime.gears)
        return sum(self.runtime.control.publish(name, cmd) for name in names)

    async def saf(self, op: str, gear: str, saga: str, why: str) -> dict:
        """The Mixer's `saf` verb on the running conductors (fluxrig/saga/ops.py)."""
        from .saga.ops import answer

        return await answer(self.runtime.gears if self.runtime is not None else {}, op, saga, gear, why)


async def _settle(outcome: asyncio.Future, work) -> None:
    """Run `work` and hand its result, or the exception that refused it, to `outcome`."""
    try:
        result = await work
    except asyncio.CancelledError:
        if not outcome.done():
            outcome.cancel()
        raise
    except Exception as exc:
        if not outcome.done():
            outcome.set_exception(exc)
        else:
            log.error("request failed after its sender stopped waiting: %s", exc)
        return
    if not outcome.done():
        outcome.set_result(result)
