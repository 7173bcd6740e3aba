"""Shared test helpers: free ports, in-process runtimes, Rack subprocesses (import from tests)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

from fluxrig.scenario import build_scenario, parse_scenario

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scenario_from_yaml(text: str, env: dict | None = None):
    return build_scenario(parse_scenario(text), env=env if env is not None else os.environ)


@contextlib.asynccontextmanager
async def running(text: str, env: dict | None = None, rack_config=None):
    """Build and start a scenario in this event loop; shut it down on exit."""
    from fluxrig.runtime import Runtime

    rt = Runtime(scenario_from_yaml(text, env), rack_config=rack_config)
    await rt.start()
    try:
        yield rt
    finally:
        await rt.shutdown(2.0)


def wait_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


class RackProcess:
    """`fluxrig run` in a subprocess with its own state dir; stop() sends SIGTERM."""

    def __init__(self, args: list[str], env: dict, cmd: list[str] | None = None):
        self.proc = subprocess.Popen(
            (cmd or [sys.executable, "-m", "fluxrig.cli.main"]) + args,
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def stop(self, timeout: float = 15.0) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        return self.proc.returncode, out, err


async def tcp_lines(port: int, lines: list[bytes], host: str = "127.0.0.1", timeout: float = 5.0) -> list[bytes]:
    """Send newline-terminated lines, read as many lines back."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"".join(line + b"\n" for line in lines))
        await writer.drain()
        out = []
        for _ in lines:
            out.append((await asyncio.wait_for(reader.readline(), timeout)).rstrip(b"\n"))
        return out
    finally:
        writer.close()
