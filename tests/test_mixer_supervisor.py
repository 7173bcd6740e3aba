"""fluxrig_mixer.supervisor.ProcessSupervisor with real child processes (Python one-liners):
restart with backoff, give up on a declared exit code or a binary that vanished, a ready check
that fails once, output forwarded with the label, SIGKILL after the stop timeout."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import stat
import sys

from fluxrig_mixer.supervisor import GAVE_UP_SPAWN, ProcessSupervisor
from mixer_fixtures import wait_for

from fluxrig.errors import FluxError

BACKOFF_S = 0.05
SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def _supervisor(argv, **kw) -> ProcessSupervisor:
    kw.setdefault("stop_timeout", 5.0)
    return ProcessSupervisor(argv, label="child", backoff=BACKOFF_S, backoff_max=BACKOFF_S * 4, **kw)


async def test_a_dead_child_is_restarted_and_stop_ends_it():
    sup = _supervisor(SLEEPER)
    await sup.start()
    try:
        first = sup.pid
        assert first and sup.ready
        sup.kill_now()
        await wait_for(lambda: sup.restarts == 1 and sup.ready, timeout=10, what="restart")
        assert sup.pid != first
    finally:
        code = await sup.stop()
    assert code == -signal.SIGTERM
    assert sup.pid is None and not sup.ready
    await asyncio.sleep(BACKOFF_S * 3)
    assert sup.restarts == 1  # stopped means stopped: no restart behind our back


async def test_a_declared_exit_code_ends_supervision():
    gave_up: list[int] = []
    sup = _supervisor([sys.executable, "-c", "raise SystemExit(2)"], give_up_codes=(2,), on_give_up=gave_up.append)
    await sup.start()
    try:
        await wait_for(lambda: gave_up, timeout=10, what="give up")
        await asyncio.sleep(BACKOFF_S * 3)
    finally:
        assert await sup.stop() == 2
    assert gave_up == [2] and sup.restarts == 0


async def test_a_binary_that_vanished_gives_up_without_retry_spawn(tmp_path):
    script = tmp_path / "child.sh"
    script.write_text("#!/bin/sh\nexit 3\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    gave_up: list[int] = []
    sup = _supervisor([str(script)], on_give_up=gave_up.append, retry_spawn=False)
    await sup.start()
    os.unlink(script)
    try:
        await wait_for(lambda: gave_up, timeout=10, what="give up after a failed spawn")
    finally:
        await sup.stop()
    assert gave_up == [GAVE_UP_SPAWN] and sup.restarts == 0


async def test_a_child_that_is_not_ready_is_killed_and_tried_again():
    launches: list[int] = []

    async def ready(proc) -> None:
        launches.append(proc.pid)
        if len(launches) == 2:
            raise FluxError("not listening")

    sup = _supervisor(SLEEPER, ready=ready)
    await sup.start()
    try:
        sup.kill_now()
        await wait_for(lambda: sup.restarts == 1 and sup.ready, timeout=10, what="restart after a failed ready")
        assert len(launches) == 3 and len(set(launches)) == 3
    finally:
        await sup.stop()


async def test_output_is_forwarded_with_the_label_and_prepare_runs_before_each_spawn():
    out = io.StringIO()
    prepared: list[int] = []
    sup = _supervisor(
        [sys.executable, "-c", "import sys, time; print('hello', flush=True); time.sleep(60)"],
        output=out,
        prepare=lambda: prepared.append(1),
    )
    await sup.start()
    try:
        await wait_for(lambda: "[child] hello\n" in out.getvalue(), timeout=10, what="forwarded output")
        sup.kill_now()
        await wait_for(lambda: out.getvalue().count("[child] hello\n") == 2, timeout=10, what="second child")
    finally:
        await sup.stop()
    assert len(prepared) == 2


async def test_a_child_that_ignores_sigterm_is_killed_after_the_stop_timeout():
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('armed', flush=True); time.sleep(60)"
    )
    out = io.StringIO()
    sup = _supervisor([sys.executable, "-c", code], stop_timeout=0.3, output=out)
    await sup.start()
    await wait_for(lambda: "armed" in out.getvalue(), timeout=10, what="SIGTERM ignored")
    assert await sup.stop() == -signal.SIGKILL
