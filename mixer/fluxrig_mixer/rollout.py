"""Scenario roll-out in waves (issue 14 item 6): a fleet is never told all at once, and a wave
that fails too often stops the roll-out and says why.

Job. Activating a scenario writes a *plan* to the shared state (bucket `fluxrig-state`, key
`rollout`): the target digest, the scenario Racks ran before, the Racks in waves of
`rollout.wave_size`, the wave under way, per-wave results, `state` (running, done, stopped)
and `reason`. One node drives it: the holder of the `rollout` lease (lease.py); when it dies
the next holder reads the plan and carries on from the wave under way (a Rack told twice
gets the same passport content again: harmless).

Driving a wave: every Rack of the wave gets a passport with the new scenario and a reload
signal (controller.send_scenario); then the driver waits up to `rollout.wave_timeout` for each
Rack that is active to report the target version `applied` or `rejected` (heartbeats; any node
writes the report to the shared state). Failed + not answered over the Racks judged is the
wave's failure ratio (rejected + not answered over the Racks judged); above `rollout.max_failure_ratio` (default 5 %) the roll-out stops:
`state = stopped`, `reason` names the wave, the counts and the first failing Racks with their
reasons. Racks offline when their wave starts get the passport (they take it at their next
heartbeat) but are not judged. The plan is written by compare-and-set after every wave.

Which scenario a Rack runs during a roll-out (`assigned(rack_id)`): the target once its wave
has started, else the previous one; a Rack in no wave (runnable only after the activation) the
target. A stopped roll-out leaves every Rack where it is: the
operator activates again (a new plan) or activates the previous scenario.

Raises: StateConflict, StateUnavailable (kv.py).
"""

from __future__ import annotations

import asyncio
import logging
import time

from fluxrig.wire.vocab import ApplyState, RackStatus

from .kv import Bucket, Change, StateConflict, follow
from .lease import Lease, LeaseLost

__all__ = [
    "Rollouts",
    "ROLLOUT_KEY",
    "ROLLOUT_DUTY",
    "DEFAULT_WAVE_SIZE",
    "DEFAULT_MAX_FAILURE_RATIO",
    "DEFAULT_WAVE_TIMEOUT_S",
    "MAX_REASONS",
]

log = logging.getLogger("fluxrig.mixer.rollout")

ROLLOUT_KEY = "rollout"
ROLLOUT_DUTY = "rollout"
DEFAULT_WAVE_SIZE = 100  # EFM sends class-wide updates 100 at a time (institutional.md §1.4)
DEFAULT_MAX_FAILURE_RATIO = 0.05
DEFAULT_WAVE_TIMEOUT_S = 120.0
MAX_REASONS = 5  # failing Racks named in a stop reason
POLL_S = 0.2  # how often a waiting wave looks at the registry cache


class Rollouts:
    def __init__(
        self,
        controller,
        state: Bucket,
        lease: Lease,
        wave_size: int = DEFAULT_WAVE_SIZE,
        max_failure_ratio: float = DEFAULT_MAX_FAILURE_RATIO,
        wave_timeout: float = DEFAULT_WAVE_TIMEOUT_S,
    ):
        self.controller = controller
        self.state = state
        self.lease = lease
        self.wave_size = max(1, int(wave_size))
        self.max_failure_ratio = float(max_failure_ratio)
        self.wave_timeout = float(wave_timeout)
        self.plan: dict | None = None
        self.revision = 0
        self._tasks: list[asyncio.Task] = []
        self._started: set[str] = set()  # rack ids whose wave has started (of self.plan)
        self._planned: set[str] = set()  # rack ids in any wave of a running self.plan
        self._step = asyncio.Lock()  # the driver loop and kick() never run one wave twice

    # -- the plan as every node sees it ------------------------------------------------------------

    async def start(self) -> None:
        ready = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(follow(self.state, self._on_state, ready), name="kv-follow-rollout"),
            loop.create_task(self._drive(), name="rollout-driver"),
        ]
        self.lease.start()
        await asyncio.wait_for(ready.wait(), 30)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        self._tasks = []
        await self.lease.stop()

    async def _on_state(self, changes: list[Change], initial: bool) -> None:
        for c in changes:
            if c.key == ROLLOUT_KEY and isinstance(c.value, dict) and c.revision > self.revision:
                self._set(c.value, c.revision)

    def _set(self, plan: dict, revision: int) -> None:
        self.plan, self.revision = plan, revision
        running = plan["state"] == "running"
        self._started = {r for w in plan["waves"][: plan["wave"] + 1] for r in w} if running else set()
        self._planned = {r for w in plan["waves"] for r in w} if running else set()

    def assigned(self, rack_id: str) -> str | None:
        """The digest a Rack should run now: None = no roll-out opinion (the active one).
        A Rack outside the plan (approved or activated after the activation) is in no wave:
        holding it at the previous scenario would leave it there for good, since no wave ever
        sends it the target and nothing re-sends when the plan ends."""
        p = self.plan
        if p is None or p["state"] != "running" or rack_id in self._started or rack_id not in self._planned:
            return None
        return p.get("previous") or ""

    def progress(self) -> dict | None:
        """The API's view: the plan without the Rack lists, plus counts."""
        p = self.plan
        if p is None:
            return None
        out = {k: v for k, v in p.items() if k != "waves"}
        out["waves_total"] = len(p["waves"])
        out["racks_total"] = sum(len(w) for w in p["waves"])
        out["racks_started"] = (
            sum(len(w) for w in p["waves"][: p["wave"] + 1]) if p["state"] != "done" else out["racks_total"]
        )
        return out

    # -- starting one ------------------------------------------------------------------------------

    async def begin(self, stored, previous_digest: str, rack_ids: list[str]) -> dict:
        """Write a new plan (replacing any other: the last activation wins) and return it. The
        driver (whichever node holds the lease) sends the waves."""
        waves = [rack_ids[i : i + self.wave_size] for i in range(0, len(rack_ids), self.wave_size)] or [[]]
        plan = {
            "digest": stored.digest,
            "version": stored.version,
            "previous": previous_digest,
            "waves": waves,
            "wave": 0,
            "wave_started": 0.0,
            "state": "running",
            "reason": "",
            "results": [],
            "wave_size": self.wave_size,
            "max_failure_ratio": self.max_failure_ratio,
            "started_at": time.time(),
            "node": self.controller.node,
        }
        rev = await self.state.cas(ROLLOUT_KEY, lambda _old: plan)
        self._set(rev.value, rev.revision)
        return plan

    # -- driving -----------------------------------------------------------------------------------

    async def kick(self) -> bool:
        """Start the current wave now when this node holds the lease (the activating node
        does not wait for the driver's next poll). True when it did."""
        if not self.lease.held or self.plan is None or self.plan["state"] != "running":
            return False
        async with self._step:
            if not self.plan["wave_started"]:
                await self._drive_wave()
                return True
        return False

    async def _drive(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            p = self.plan
            if p is None or p["state"] != "running" or not self.lease.held:
                continue
            try:
                async with self._step:
                    await self._drive_wave()
            except (StateConflict, LeaseLost) as exc:
                log.info("roll-out step not taken here: %s", exc)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("roll-out step failed (retried): %s", exc)
                await asyncio.sleep(1.0)

    async def _drive_wave(self) -> None:
        p, rev = self.plan, self.revision
        i = p["wave"]
        wave = p["waves"][i]
        if not p["wave_started"]:
            fence = await self.lease.check()  # renewed and fenced right before the writes
            log.info(
                "roll-out %s: wave %d/%d, %d rack(s) (lease revision %d)",
                p["version"],
                i + 1,
                len(p["waves"]),
                len(wave),
                fence,
            )
            p = dict(p, wave_started=time.time())
            self._set(p, await self.state.update(ROLLOUT_KEY, p, rev))
            rev = self.revision
            await self.controller.send_scenario(wave)
        judged, applied, failed, waiting = self._judge(wave, p["version"])
        timed_out = time.time() - p["wave_started"] > self.wave_timeout
        if waiting and not timed_out:
            return
        bad = failed + waiting
        n = max(1, len(judged))
        ratio = len(bad) / n
        result = {"wave": i + 1, "racks": len(wave), "judged": len(judged), "applied": len(applied),
                  "failed": len(failed), "no_answer": len(waiting), "ratio": round(ratio, 4)}  # fmt: skip
        results = [*p["results"], result]
        if ratio > self.max_failure_ratio:
            names = ", ".join(f"{name}: {why or 'no answer'}" for name, why in (failed + waiting)[:MAX_REASONS])
            reason = (
                f"wave {i + 1} of {len(p['waves'])}: {len(bad)} of {len(judged)} rack(s) failed "
                f"({ratio:.0%} > {self.max_failure_ratio:.0%}): {names}"
            )
            new = dict(p, state="stopped", reason=reason, results=results, stopped_at=time.time())
            log.error("roll-out %s stopped: %s", p["version"], reason)
        elif i + 1 >= len(p["waves"]):
            new = dict(p, state="done", results=results, done_at=time.time())
            log.info("roll-out %s done: %d wave(s)", p["version"], len(p["waves"]))
        else:
            new = dict(p, wave=i + 1, wave_started=0.0, results=results)
        await self.lease.check()
        self._set(new, await self.state.update(ROLLOUT_KEY, new, rev))

    def _judge(self, wave: list[str], version: str):
        """(judged, applied, failed, waiting): Racks active now are judged on their report of
        `version`; failed and waiting are (name, reason) pairs."""
        judged, applied, failed, waiting = [], [], [], []
        for rack_id in wave:
            rack = self.controller.registry.find(rack_id)
            if rack is None or rack.status != RackStatus.ACTIVE:
                continue
            judged.append(rack_id)
            if rack.scenario_version == version and rack.apply_state == ApplyState.APPLIED:
                applied.append(rack_id)
            elif rack.apply_state == ApplyState.REJECTED and rack.target_version == version:
                failed.append((rack.name, rack.apply_reason))  # it kept its last scenario (and says why)
            else:
                waiting.append((rack.name, ""))
        return judged, applied, failed, waiting
