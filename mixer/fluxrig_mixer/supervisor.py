"""One supervised child process: start it, restart it with backoff when it dies, stop it in order.

Job. The Mixer runs two kinds of children: the Snake (nats-server, snake.py) and, under
`fluxrig-mixer up`, a local Rack (`fluxrig run`, up.py). Both need the same lifecycle, kept
here once: spawn in its own session, watch, restart with exponential backoff, stop with
SIGTERM then SIGKILL. What differs is passed in, typed: a `prepare` step before every spawn
(the Snake rewrites its config), a `ready` check after it (the Snake waits for INFO on its
port), exit codes that mean "do not retry" (a Rack exiting 2 has a wrong configuration).

Contract.
  - `start()`: prepare, spawn, ready. Raises what they raise (OSError when the binary cannot
    be started, whatever `ready` raises); the caller then calls `stop()`, which is always safe.
  - The watcher restarts a child that exits while not stopping: after `backoff` seconds,
    doubled per failure up to `backoff_max`, back to `backoff` once a child has run
    `stable_after` seconds. `restarts` counts children that came back (spawned and ready).
    An exit code in `give_up_codes` ends supervision: `on_give_up(code)`, no restart.
  - A restart that fails: a child that does not get ready is killed and retried with the next
    backoff step. A spawn that fails (OSError) is retried the same way if `retry_spawn`, else
    supervision ends with `on_give_up(GAVE_UP_SPAWN)`.
  - `stop()`: no more restarts, SIGTERM, SIGKILL after `stop_timeout`; returns the child's exit
    code (None if none ran). Output still buffered is forwarded for at most `OUTPUT_DRAIN_S`.
  - The child: stdin /dev/null, its own session (a Ctrl-C on the terminal reaches the Mixer,
    which stops children in order), SIGTERM if the Mixer dies (_PR_SET_PDEATHSIG, Linux), so a
    crashed Mixer never leaves an orphan holding a port. Its output is dropped, or forwarded
    line by line to `output` with the prefix `[<label>] ` (escaped: no control sequence of the
    child reaches the operator's terminal).
  - `survive_parent=True` (the Snake): no death signal. The bus is what the Racks' guaranteed
    lanes run on; a Mixer killed by the OOM killer (or by anything) must not take it along, so
    the server keeps serving Racks until a Mixer comes back. The child's pid goes to `pidfile`;
    the next `start()` finds a survivor there (same pid, same command line, so never a stranger
    that reused the pid). With an `adopt(pid)` callback that returns True (the Snake rewrites
    its config for the new Mixer and the survivor applies it on SIGHUP), the survivor is
    *adopted*: supervised as if spawned (watched through a pidfd, signalled, stopped, restarted
    when it dies), so Racks keep their connections across the Mixer's restart; `adopted` holds
    its pid. Otherwise (no callback, or it returns False) the survivor is stopped cleanly
    (SIGTERM, its stop_timeout, SIGKILL) before a new child starts from a freshly written
    configuration: one ERROR names it. `stop()` removes the pidfile.
  - `oom_score_adj`: written for the child after each spawn (best effort: lowering it needs
    CAP_SYS_RESOURCE; without, a DEBUG line and the inherited value).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Collection
from typing import TextIO

from fluxrig.aiotools import cancel_and_wait
from fluxrig.textsafe import escape_text

__all__ = [
    "ProcessSupervisor",
    "DEFAULT_BACKOFF_S",
    "DEFAULT_BACKOFF_MAX_S",
    "DEFAULT_STABLE_AFTER_S",
    "GAVE_UP_SPAWN",
    "OUTPUT_DRAIN_S",
    "Process",
    "AdoptedProcess",
]

log = logging.getLogger("fluxrig.mixer.supervisor")

DEFAULT_BACKOFF_S = 0.5
DEFAULT_BACKOFF_MAX_S = 30.0
# A child that stays up this long resets the restart backoff to its first step.
DEFAULT_STABLE_AFTER_S = 10.0
# The code `on_give_up` gets when a restart could not even spawn the binary.
GAVE_UP_SPAWN = 1
# How long stop() waits for the last lines of a forwarded child's output.
OUTPUT_DRAIN_S = 2.0
# How often an adopted survivor is checked when no pidfd can be opened for it.
ADOPTED_POLL_S = 0.2
_PR_SET_PDEATHSIG = 1

Process = asyncio.subprocess.Process


def _pdeathsig_preexec() -> None:  # pragma: no cover - runs in the child
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class ProcessSupervisor:
    """Owns one child process (see the module docstring for the contract)."""

    def __init__(
        self,
        argv: list[str],
        *,
        label: str,
        stop_timeout: float,
        env: dict[str, str] | None = None,
        backoff: float = DEFAULT_BACKOFF_S,
        backoff_max: float = DEFAULT_BACKOFF_MAX_S,
        stable_after: float = DEFAULT_STABLE_AFTER_S,
        prepare: Callable[[], None] | None = None,
        ready: Callable[[Process], Awaitable[None]] | None = None,
        give_up_codes: Collection[int] = (),
        on_give_up: Callable[[int], None] | None = None,
        retry_spawn: bool = True,
        output: TextIO | None = None,
        survive_parent: bool = False,
        pidfile: str | None = None,
        oom_score_adj: int | None = None,
        adopt: Callable[[int], Awaitable[bool]] | None = None,
    ):
        self.argv = list(argv)
        self.label = label
        self.env = env
        self.stop_timeout = stop_timeout
        self.backoff, self.backoff_max, self.stable_after = backoff, backoff_max, stable_after
        self._prepare = prepare
        self._ready_check = ready
        self.give_up_codes = frozenset(give_up_codes)
        self._on_give_up = on_give_up
        self.retry_spawn = retry_spawn
        self.output = output
        self.survive_parent = survive_parent
        self.pidfile = pidfile
        self.oom_score_adj = oom_score_adj
        self.reclaimed: int | None = None  # pid of a survivor of a previous parent, stopped by start()
        self.adopted: int | None = None  # pid of a survivor of a previous parent, adopted by start()
        self._adopt = adopt
        self.restarts = 0
        self.started_at = 0.0
        self.proc: Process | None = None
        self._ready = asyncio.Event()
        self._stopping = False
        self._watcher: asyncio.Task | None = None
        self._pump: asyncio.Task | None = None

    # -- state ----------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The running child's pid, else None."""
        return self.proc.pid if self.proc and self.proc.returncode is None else None

    @property
    def ready(self) -> bool:
        """A child is running and passed the ready check."""
        return self.pid is not None and self._ready.is_set()

    async def wait_ready(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
            return True
        except TimeoutError:
            return False

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        self._stopping = False
        if not (self.pidfile and await self._adopt_survivor()):
            if self.pidfile:
                await self._reclaim()
            await self._launch()
        self._watcher = asyncio.get_running_loop().create_task(self._watch(), name=f"watch {self.label}")

    async def _launch(self) -> None:
        """prepare, spawn, ready: one attempt."""
        self._ready.clear()
        if self._prepare is not None:
            self._prepare()
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL if self.output is None else asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL if self.output is None else asyncio.subprocess.STDOUT,
            preexec_fn=_pdeathsig_preexec if sys.platform.startswith("linux") and not self.survive_parent else None,
            start_new_session=True,
        )
        self.started_at = time.monotonic()
        log.info("%s: pid %s", self.label, self.proc.pid)
        if self.pidfile:
            _write_pidfile(self.pidfile, self.proc.pid)
        if self.oom_score_adj is not None:
            _set_oom_score_adj(self.proc.pid, self.oom_score_adj)
        if self.output is not None:
            self._pump = asyncio.get_running_loop().create_task(
                self._forward(self.proc.stdout), name=f"output {self.label}"
            )
        if self._ready_check is not None:
            await self._ready_check(self.proc)
        self._ready.set()

    async def _forward(self, stream: asyncio.StreamReader) -> None:
        prefix = f"[{self.label}] "
        while line := await stream.readline():
            try:
                # The child's text (a Rack's log lines) is shown escaped: no control sequence
                # of its reaches the operator's terminal (fluxrig.textsafe).
                self.output.write(prefix + escape_text(line.decode("utf-8", "replace"), keep="\n"))
                self.output.flush()
            except (OSError, ValueError):  # our own stderr is gone: keep draining the pipe
                pass

    def _give_up(self, code: int) -> None:
        if self._on_give_up is not None:
            self._on_give_up(code)

    async def _watch(self) -> None:
        backoff = self.backoff
        while not self._stopping:
            code = await self.proc.wait()
            if self._pump is not None:
                await asyncio.gather(self._pump, return_exceptions=True)
            if self._stopping:
                return
            self._ready.clear()
            uptime = time.monotonic() - self.started_at
            if code in self.give_up_codes:
                log.error("%s exited with code %s; not restarting it", self.label, code)
                self._give_up(code)
                return
            if uptime > self.stable_after:
                backoff = self.backoff
            log.error("%s exited (code %s) after %.1fs; restarting in %.1fs", self.label, code, uptime, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.backoff_max)
            if self._stopping:
                return
            try:
                await self._launch()
            except OSError as exc:
                log.error("%s: cannot restart: %s", self.label, exc)
                if not self.retry_spawn:
                    self._give_up(GAVE_UP_SPAWN)
                    return
                # self.proc is still the dead child: its wait() returns at once, so the next
                # round waits out the next backoff step (not reset: nothing ran) and retries.
                self.started_at = time.monotonic()
                continue
            except Exception as exc:  # not ready: kill it and try again after the next step
                log.error("%s: restart failed: %s", self.label, exc)
                self.kill_now()
                continue
            self.restarts += 1
            log.warning("%s restarted (restart #%d)", self.label, self.restarts)

    def kill_now(self) -> None:
        """SIGKILL the child at once (a second Ctrl-C; a test killing the Snake)."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()

    def signal(self, sig: int) -> bool:
        """Send `sig` to a running child (nats-server reloads on SIGHUP); False when none runs."""
        if self.proc is None or self.proc.returncode is not None:
            return False
        self.proc.send_signal(sig)
        return True

    async def stop(self) -> int | None:
        """No more restarts; SIGTERM, SIGKILL after stop_timeout; the child's exit code."""
        self._stopping = True
        if self._watcher is not None:
            # Cancelled first, so no restart can start behind our back; a spawn cut short
            # by the cancellation is killed by asyncio itself.
            await cancel_and_wait(self._watcher)
            self._watcher = None
        proc = self.proc
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), self.stop_timeout)
            except TimeoutError:
                log.error("%s ignored SIGTERM for %.0fs; killing it", self.label, self.stop_timeout)
                proc.kill()
                await proc.wait()
        if self._pump is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._pump), OUTPUT_DRAIN_S)
            except (TimeoutError, asyncio.CancelledError, Exception):
                self._pump.cancel()
            self._pump = None
        self._ready.clear()
        if self.pidfile:
            with contextlib.suppress(OSError):
                os.unlink(self.pidfile)
        return proc.returncode if proc is not None else None

    # -- a survivor of a previous parent --------------------------------------------------------

    async def _adopt_survivor(self) -> bool:
        """Adopt the child a previous parent left running, if `adopt` accepts it."""
        pid = _read_pidfile(self.pidfile) if self._adopt is not None else None
        if pid is None or not _is_our_child(pid, self.argv):
            return False
        try:
            accepted = await self._adopt(pid)
        except Exception as exc:
            log.warning("%s: pid %d could not be adopted (%s)", self.label, pid, exc)
            accepted = False
        if not accepted or not _alive(pid):
            return False
        self.proc = AdoptedProcess(pid)
        self.adopted = pid
        self.started_at = time.monotonic()
        if self.oom_score_adj is not None:
            _set_oom_score_adj(pid, self.oom_score_adj)
        self._ready.set()
        log.warning("%s: adopted pid %d left running by a previous Mixer (its clients stay connected)", self.label, pid)
        return True

    async def _reclaim(self) -> None:
        """Stop the child a previous parent left running (its pid in `pidfile`), if it is one."""
        pid = _read_pidfile(self.pidfile)
        if pid is None or not _is_our_child(pid, self.argv):
            return
        log.error(
            "%s: pid %d is still running from a previous Mixer (which died without stopping it); "
            "stopping it cleanly before starting a new one",
            self.label,
            pid,
        )
        self.reclaimed = pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        while time.monotonic() < deadline and _alive(pid):
            await asyncio.sleep(0.05)
        if _alive(pid):
            log.error("%s: pid %d ignored SIGTERM for %.0fs; killing it", self.label, pid, self.stop_timeout)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            while _alive(pid):
                await asyncio.sleep(0.02)


def _write_pidfile(path: str, pid: int) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{pid}\n")
    os.replace(tmp, path)


def _read_pidfile(path: str) -> int | None:
    try:
        with open(path) as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """Running and not a zombie (a survivor reparented to init is reaped by it; in a container
    whose init does not reap, a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _is_our_child(pid: int, argv: list[str]) -> bool:
    """`pid` runs exactly `argv` (a pid reused by another program is left alone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = fh.read().rstrip(b"\0").split(b"\0")
    except OSError:
        return False
    return _alive(pid) and [c.decode("utf-8", "surrogateescape") for c in cmdline] == list(argv)


def _set_oom_score_adj(pid: int, value: int) -> None:
    try:
        with open(f"/proc/{pid}/oom_score_adj", "w") as fh:
            fh.write(str(value))
    except OSError as exc:
        log.debug("oom_score_adj %d for pid %d not set: %s", value, pid, exc)


class AdoptedProcess:
    """A survivor adopted by start(): not our child, so it is watched through a pidfd (Linux
    5.3+; else polled every ADOPTED_POLL_S) instead of waitpid. Offers what the supervisor uses
    of asyncio.subprocess.Process: pid, returncode (None while it runs, -1 once gone: its real
    exit code went to init), wait(), send_signal(), terminate(), kill()."""

    def __init__(self, pid: int):
        self.pid = pid
        self._code: int | None = None
        self._fd: int | None = None
        with contextlib.suppress(AttributeError, OSError):
            self._fd = os.pidfd_open(pid)

    @property
    def returncode(self) -> int | None:
        if self._code is None and not _alive(self.pid):
            self._code = -1
        return self._code

    async def wait(self) -> int:
        if self._code is None:
            if self._fd is not None:
                loop = asyncio.get_running_loop()
                gone = loop.create_future()
                loop.add_reader(self._fd, lambda: gone.done() or gone.set_result(None))
                try:
                    if _alive(self.pid):
                        await gone
                finally:
                    loop.remove_reader(self._fd)
            while _alive(self.pid):
                await asyncio.sleep(ADOPTED_POLL_S)
            self._code = -1
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)
