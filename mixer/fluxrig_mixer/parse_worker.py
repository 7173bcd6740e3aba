"""Scenario parsing and validation in a child process with a hard time and memory budget.

Job. The control API accepts scenario documents from anyone holding a token. Parsing YAML is
pure-Python CPU work (1-2 s per MiB), and validating a large document against every Rack's
projection is more; run on the Mixer's event loop, one such request stops heartbeats, Hellos
and kill commands for as long as it runs (a 446-byte alias bomb held the loop 63 s). So the
Mixer never parses an API-supplied document itself: `ScenarioChecker.check()` hands the text
to a child process and awaits its answer.

Why a process, not a thread: a thread cannot be killed, so a thread's "time limit" is only a
wish, and a thread parsing pure Python holds the GIL in 5 ms slices against the event loop.
A child can be SIGKILLed at the deadline, gets its own address space (RLIMIT_AS caps it: an
expansion that slipped past the limits dies there, not in the Mixer's heap, where the OOM
killer would take the Mixer) and its own CPU cap (RLIMIT_CPU, a backstop if the Mixer itself
were too starved to kill it on time). It runs niced, so the Mixer's loop comes first.

Memory, watched from outside first. The child's address space is read from /proc/<pid>/statm
every MEMORY_POLL_S while it works; past `memory_bytes` it is SIGKILLed and the check refused
naming api.scenario_check_memory_mb. RLIMIT_AS is set MEMORY_BACKSTOP_RATIO above that, a
backstop only: CPython that meets its address-space limit inside PyYAML's composer does not
always die of the MemoryError; 2 runs in 8 spun in the interpreter's exception path at 100 %
CPU until the time budget killed them (then refused naming the wrong limit, the flake of
tests/test_mixer_parse_limits.py under load). Without /proc the backstop is the limit.

Children are kept warm and reused: spawning one is a fork+exec of the Mixer (10-30 ms of its
loop on a loaded box, plus 0.3 s of imports), so they are spawned and driven from pool threads,
and each serves up to RECYCLE_AFTER checks (a single large document retires it at once) before
it exits. A killed child is replaced on the next check. Measured (bench box shared, load ~13):
14 hostile documents checked in 1.6 s with the loop's worst lag 26 ms (a fresh process per
check: 20 s, worst lag 66 ms).

Contract.
  - `await checker.check(text, fmt, racks)` -> `Checked(doc, warnings)`: `doc` the parsed
    document (through JSON, so keys are strings: what the store keeps and digests), `warnings`
    the projection problems for the registered `racks` [(name, labels)].
  - Raises ScenarioError listing every problem (parse, limits, validation) exactly as the Rack's
    validator reports them, or ScenarioCheckFailed (a ScenarioError, so a 400) when the child ran
    past `timeout`, past its memory, or died: the message says which limit.
  - At most `concurrency` children at once; further checks wait their turn (the API's own
    concurrency limit bounds how many wait).
  - Protocol with the child: frames (8-byte big-endian length, JSON) on stdin and stdout, one
    answer per request; EOF on its stdin ends it.
    The child is `python -m fluxrig_mixer.parse_worker`, or the frozen binary with the argument
    WORKER_ARG (cli.py hands that to `main`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import select
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fluxrig.errors import ScenarioError, ScenarioProblem
from fluxrig.scenario.limits import MAX_DOCUMENT_BYTES, Limits

__all__ = [
    "ScenarioChecker",
    "Checked",
    "ScenarioCheckFailed",
    "worker_argv",
    "main",
    "WORKER_ARG",
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_MEMORY_BYTES",
    "DEFAULT_CONCURRENCY",
    "MAX_ANSWER_BYTES",
]

log = logging.getLogger("fluxrig.mixer.parse_worker")

WORKER_ARG = "__scenario-parse-worker"
DEFAULT_TIMEOUT_S = 10.0
# Address space of the child: the interpreter (~40 MiB), PyYAML's node tree of a 2 MiB document
# (~20x the text) and room to spare.
DEFAULT_MEMORY_BYTES = 512 * 1024 * 1024
DEFAULT_CONCURRENCY = 2
# The answer holds the document once more as JSON plus the problems.
MAX_ANSWER_BYTES = 64 * 1024 * 1024
# A child serves this many checks, or one request larger than RECYCLE_LARGE_BYTES, then exits.
RECYCLE_AFTER = 50
RECYCLE_LARGE_BYTES = 256 * 1024
# The parent reads a working child's address space this often (see the module docstring) ...
MEMORY_POLL_S = 0.02
# ... and the child's own RLIMIT_AS sits this far above memory_bytes, a backstop.
MEMORY_BACKSTOP_RATIO = 1.25
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
# How much of a dead child's stderr is read for why it died.
STDERR_TAIL_BYTES = 8192
# Requests and answers on the pipes: an 8-byte big-endian length, then JSON.
_FRAME = struct.Struct(">Q")


class ScenarioCheckFailed(ScenarioError):
    """The parse child hit its time or memory budget, or died; `limit` names which."""

    def __init__(self, message: str, limit: str):
        self.limit = limit
        super().__init__([ScenarioProblem("<scenario>", message)], "import")


@dataclass(frozen=True, slots=True)
class Checked:
    doc: dict
    warnings: list[ScenarioProblem]


def worker_argv() -> list[str]:
    """How to start the child: the frozen binary with WORKER_ARG, else this Python with -m."""
    if getattr(sys, "frozen", False):
        return [sys.executable, WORKER_ARG]
    return [sys.executable, "-m", "fluxrig_mixer.parse_worker"]


class _Worker:
    """One child process and its pipes, driven from a pool thread (blocking I/O, a deadline)."""

    def __init__(self, argv: list[str], memory_bytes: int = 0):
        env = dict(os.environ)
        env["FLUXRIG_PARSE_WORKER"] = "1"
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        self.served = 0
        self.memory_bytes = memory_bytes
        self.over_memory = False  # killed for its address space (see the module docstring)
        try:
            self._statm = os.open(f"/proc/{self.proc.pid}/statm", os.O_RDONLY) if memory_bytes else None
        except OSError:  # no /proc: RLIMIT_AS alone
            self._statm = None

    def _address_space(self) -> int:
        try:
            return int(os.pread(self._statm, 64, 0).split()[0]) * _PAGE
        except (OSError, ValueError, IndexError):
            return 0

    def exchange(self, request: bytes, timeout: float) -> tuple[int | None, bytes, bytes]:
        """(0, answer, b"") or, the child being dead, (its code or None when killed at the
        deadline, b"", its stderr); `over_memory` says it was killed past memory_bytes."""
        deadline = time.monotonic() + timeout
        try:
            self.proc.stdin.write(_FRAME.pack(len(request)) + request)
            self.proc.stdin.flush()
            head = self._read(_FRAME.size, deadline)
            answer = self._read(_FRAME.unpack(head)[0], deadline) if head is not None else None
        except (BrokenPipeError, OSError, struct.error):
            answer = None
        if answer is not None:
            self.served += 1
            return 0, answer, b""
        timed_out = time.monotonic() >= deadline and not self.over_memory
        self.kill()
        err = self.proc.stderr.read() if self.proc.stderr else b""
        return (None if timed_out else self.proc.returncode), b"", err

    def _read(self, n: int, deadline: float) -> bytes | None:
        if n > MAX_ANSWER_BYTES:
            return None
        fd = self.proc.stdout.fileno()
        chunks, got = [], 0
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if self._statm is None:
                if not select.select([fd], [], [], left)[0]:
                    return None
            elif not select.select([fd], [], [], min(left, MEMORY_POLL_S))[0]:
                if self._address_space() > self.memory_bytes:
                    self.over_memory = True
                    return None
                continue
            chunk = os.read(fd, min(n - got, 1 << 20))
            if not chunk:
                return None
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._close_statm()

    def _close_statm(self) -> None:
        if self._statm is not None:
            os.close(self._statm)
            self._statm = None

    def retire(self) -> None:
        """Close its stdin: the child ends after its current request."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(1.0)
        except subprocess.TimeoutExpired:
            self.kill()
        self._close_statm()


class ScenarioChecker:
    """Runs checks in child processes (see the module docstring)."""

    def __init__(
        self,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        memory_bytes: int = DEFAULT_MEMORY_BYTES,
        concurrency: int = DEFAULT_CONCURRENCY,
        max_bytes: int = MAX_DOCUMENT_BYTES,
        argv: list[str] | None = None,
    ):
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.memory_bytes = memory_bytes
        self.argv = (argv or worker_argv()) + [
            "--memory-bytes",
            str(int(memory_bytes * MEMORY_BACKSTOP_RATIO)),  # the parent kills at memory_bytes
            "--cpu-seconds",
            str(int(timeout) + 2),
        ]
        self._concurrency = max(1, concurrency)
        self._slots: asyncio.Semaphore | None = None
        # Children are spawned and driven from these threads, never on the loop: a fork+exec of
        # the Mixer costs 10-30 ms on a loaded box. A child serves RECYCLE_AFTER checks (or one
        # large document) and is then retired, so no parse inherits another's heap.
        self._pool = ThreadPoolExecutor(max_workers=self._concurrency, thread_name_prefix="scenario-check")
        self._idle: list[_Worker] = []
        self.checks = 0
        self.killed = 0
        self.spawned = 0

    def _run(self, request: bytes, large: bool) -> tuple[int | None, bytes, bytes]:
        """In a pool thread: an idle child (or a new one), the exchange, the child kept or retired."""
        try:
            worker = self._idle.pop()
        except IndexError:
            worker = _Worker(self.argv, self.memory_bytes)
            self.spawned += 1
        code, out, err = worker.exchange(request, self.timeout)
        if worker.over_memory:
            code = -9  # SIGKILLed by us, for its address space: reported as the memory limit
        if code == 0 and not large and worker.served < RECYCLE_AFTER:
            self._idle.append(worker)
        elif code == 0:
            worker.retire()
        return code, out, err

    async def check(self, text: str, fmt: str, racks: list[tuple[str, dict]]) -> Checked:
        request = json.dumps(
            {
                "text": text,
                "fmt": fmt,
                "racks": [[name, dict(labels or {})] for name, labels in racks],
                "max_bytes": self.max_bytes,
            }
        ).encode()
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._concurrency)
        async with self._slots:
            self.checks += 1
            loop = asyncio.get_running_loop()
            # Shielded: a request that goes away leaves its thread to finish within the deadline.
            job = loop.run_in_executor(self._pool, self._run, request, len(request) > RECYCLE_LARGE_BYTES)
            code, out, err = await asyncio.shield(job)
            return self._result(code, out, err)

    def _result(self, code: int | None, out: bytes, err: bytes) -> Checked:
        if code is None:
            self.killed += 1
            log.warning("scenario check killed after %.1fs (api.scenario_check_timeout)", self.timeout)
            raise ScenarioCheckFailed(
                f"parsing and validating took longer than {self.timeout:g}s (limit api.scenario_check_timeout); "
                "the document is too large or too complex",
                "api.scenario_check_timeout",
            )
        if code != 0 or len(out) > MAX_ANSWER_BYTES:
            text = err[-STDERR_TAIL_BYTES:].decode("utf-8", "replace") if err else ""
            tail = text.strip().splitlines()[-1:]
            # Out of memory, the child's last line is often not the MemoryError itself but
            # "Exception ignored in ..." from a finaliser that could not allocate either.
            memory = code in (-9, 137) or "MemoryError" in text
            log.warning("scenario check child failed (code %s): %s", code, tail[0][:200] if tail else "")
            if memory:
                raise ScenarioCheckFailed(
                    f"parsing needed more than {self.memory_bytes // (1024 * 1024)} MiB "
                    "(limit api.scenario_check_memory_mb)",
                    "api.scenario_check_memory_mb",
                )
            raise ScenarioCheckFailed(f"the scenario checker failed (exit code {code}); see the Mixer's log", "worker")
        answer = json.loads(out)
        if answer.get("problems"):
            raise ScenarioError([ScenarioProblem(p[0], p[1]) for p in answer["problems"]], "import")
        return Checked(answer["doc"], [ScenarioProblem(p[0], p[1]) for p in answer.get("warnings", ())])

    def close(self) -> None:
        """Retire the idle children (each would also exit on its own at EOF on its stdin)."""
        idle, self._idle = self._idle, []
        for worker in idle:
            worker.retire()
        self._pool.shutdown(wait=False, cancel_futures=True)


# -- the child -----------------------------------------------------------------------------------


def _limit(kind: int, value: int) -> None:
    try:
        _soft, hard = resource.getrlimit(kind)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(kind, (value, hard))
    except (ValueError, OSError):  # a container that forbids it: the parent's deadline still holds
        pass


def _answer(req: dict) -> dict:
    from fluxrig.scenario import parse_scenario, validate_scenario

    from .scenarios import ScenarioStore

    try:
        limits = Limits(max_bytes=int(req.get("max_bytes", MAX_DOCUMENT_BYTES)))
        doc = parse_scenario(req["text"], req["fmt"], limits=limits)
        problems = validate_scenario(doc)
        if problems:
            return {"problems": [[p.location, p.message] for p in problems]}
        racks = [(name, labels) for name, labels in req.get("racks", ())]
        warnings = ScenarioStore.projection_problems(doc, racks) if racks else []
        # Through JSON as the store keeps it: keys become strings, dates their ISO text.
        doc = json.loads(json.dumps(doc, default=str))
    except ScenarioError as exc:
        return {"problems": [[p.location, p.message] for p in exc.problems]}
    except RecursionError:
        return {"problems": [["<scenario>", "nested too deeply (limit max_depth)"]]}
    except (TypeError, ValueError) as exc:  # e.g. keys of mixed types json cannot sort
        return {"problems": [["<scenario>", f"cannot be stored: {exc}"]]}
    return {"doc": doc, "warnings": [[p.location, p.message] for p in warnings]}


def main(argv: list[str] | None = None) -> int:
    """The child: limits, imports, then length-prefixed JSON requests on stdin, one answer each
    on stdout, until EOF on stdin (retired, or the Mixer went away)."""
    import argparse

    ap = argparse.ArgumentParser(prog="fluxrig-mixer " + WORKER_ARG)
    ap.add_argument("--memory-bytes", type=int, default=DEFAULT_MEMORY_BYTES)
    ap.add_argument("--cpu-seconds", type=int, default=int(DEFAULT_TIMEOUT_S) + 2)
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    # Niced: on a small box the Mixer's event loop (heartbeats, Hellos, kills) comes first.
    try:
        os.nice(10)
    except OSError:
        pass
    _limit(resource.RLIMIT_AS, args.memory_bytes)
    _limit(resource.RLIMIT_CPU, args.cpu_seconds)
    import fluxrig.scenario  # noqa: F401  warm before the request arrives

    from . import scenarios  # noqa: F401

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        head = stdin.read(_FRAME.size)
        if len(head) < _FRAME.size:  # EOF: retired, or the Mixer went away
            return 0
        req = json.loads(stdin.read(_FRAME.unpack(head)[0]))
        answer = json.dumps(_answer(req)).encode()
        del req
        stdout.write(_FRAME.pack(len(answer)) + answer)
        stdout.flush()


if __name__ == "__main__":  # pragma: no cover - the child process
    sys.exit(main())
