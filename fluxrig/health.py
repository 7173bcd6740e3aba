"""The Rack's liveness socket: a Unix stream socket that the running Rack's event loop answers.

Job: let `fluxrig healthcheck` (a container HEALTHCHECK, a Kubernetes exec probe, a monitoring
agent) ask the Rack process itself whether it is alive, without a shell or curl in the image and
without opening a TCP port. A PID file or a held lock only says the process exists; an answer
on this socket says its event loop turns (a wedged loop answers nothing and the check times
out).

Contract:
  * `HealthServer(path, snapshot)` listens on `path` (normally `<base.state_dir>/health.sock`,
    mode 0600: only the Rack's own user, or root, may ask). Each connection sends one line,
    `health\\n` (at most MAX_REQUEST_BYTES), and gets one JSON line back, `snapshot()` plus
    `"ok": true`; anything else gets `{"ok": false, "error": ...}`. A client that sends nothing
    within REQUEST_TIMEOUT is dropped, so a stuck prober never holds the loop.
  * `check(path, timeout)` is the blocking client: the answer as a dict, or HealthcheckFailed
    saying why (no socket, refused, timed out, garbled answer).
  * `healthy(answer)` is the exit-code rule: the Rack answers and its status is `running` or
    `killed` (a kill-switched Rack is alive and waiting for a revive: restarting it would not
    help and would hide it from the Mixer). `starting` is not yet healthy.

AF_UNIX paths are limited to MAX_SOCKET_PATH bytes: a state directory deeper than that gets no
socket (a warning says so) rather than a socket somewhere else nobody looks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
import time
from collections.abc import Callable

from .errors import HealthcheckFailed

__all__ = [
    "SOCKET_NAME",
    "MAX_SOCKET_PATH",
    "MAX_REQUEST_BYTES",
    "MAX_ANSWER_BYTES",
    "REQUEST_TIMEOUT",
    "DEFAULT_CHECK_TIMEOUT",
    "HEALTHY_STATUSES",
    "HealthcheckFailed",
    "HealthServer",
    "socket_path",
    "check",
    "healthy",
]

log = logging.getLogger("fluxrig.health")

SOCKET_NAME = "health.sock"
# sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 107
MAX_REQUEST_BYTES = 64
MAX_ANSWER_BYTES = 64 * 1024
REQUEST_TIMEOUT = 2.0
DEFAULT_CHECK_TIMEOUT = 3.0
HEALTHY_STATUSES = ("running", "killed")
REQUEST = b"health"


def socket_path(state_dir: str) -> str:
    return os.path.join(state_dir, SOCKET_NAME)


class HealthServer:
    """Answers `health` on a Unix socket with `snapshot()`; start() after the instance lock."""

    def __init__(self, path: str, snapshot: Callable[[], dict], *, request_timeout: float = REQUEST_TIMEOUT):
        self.path = path
        self.snapshot = snapshot
        self.request_timeout = request_timeout
        self.started_at = time.time()
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> bool:
        """Listen; False (with a warning) when the socket cannot be made. Never raises for that:
        a Rack that cannot offer a health socket still runs its traffic."""
        if len(os.fsencode(self.path)) > MAX_SOCKET_PATH:
            log.warning("no health socket: %s is longer than %d bytes (AF_UNIX limit); `fluxrig healthcheck` "
                        "cannot reach this Rack: use a shorter base.state_dir", self.path, MAX_SOCKET_PATH)  # fmt: skip
            return False
        try:
            # Only one Rack runs per state directory (the caller holds the instance lock), so a
            # socket file left here is a dead predecessor's. Anything else is not ours to delete.
            st = os.lstat(self.path)
            if stat.S_ISSOCK(st.st_mode):
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("no health socket at %s: %s", self.path, exc)
            return False
        old = os.umask(0o177)  # the socket is born 0600: no window where others could connect
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=self.path, limit=MAX_REQUEST_BYTES * 2)
        except OSError as exc:
            log.warning("no health socket at %s: %s", self.path, exc)
            return False
        finally:
            os.umask(old)
        return True

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        await server.wait_closed()
        try:
            os.unlink(self.path)
        except OSError:
            pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), self.request_timeout)
            except (TimeoutError, ValueError, ConnectionError):
                return
            request = line.strip()
            if request == REQUEST:
                try:
                    answer = {"ok": True, **self.snapshot(), "uptime_s": round(time.time() - self.started_at, 1)}
                except Exception as exc:  # a broken snapshot is an unhealthy Rack, not a crash
                    log.exception("health snapshot failed")
                    answer = {"ok": False, "error": f"snapshot failed: {exc}"}
            else:
                answer = {"ok": False, "error": f"unknown request {request[:MAX_REQUEST_BYTES]!r}; send 'health'"}
            writer.write(json.dumps(answer, separators=(",", ":")).encode() + b"\n")
            await asyncio.wait_for(writer.drain(), self.request_timeout)
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()


def check(path: str, timeout: float = DEFAULT_CHECK_TIMEOUT) -> dict:
    """Ask the Rack at `path`; its answer, or HealthcheckFailed naming the reason."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise HealthcheckFailed(path, f"path longer than {MAX_SOCKET_PATH} bytes (AF_UNIX limit)")
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            sock.sendall(REQUEST + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
                if len(data) > MAX_ANSWER_BYTES:
                    raise HealthcheckFailed(path, f"answer longer than {MAX_ANSWER_BYTES} bytes")
        except FileNotFoundError:
            raise HealthcheckFailed(path, "no such socket: is the Rack running with this base.state_dir?") from None
        except ConnectionRefusedError:
            raise HealthcheckFailed(path, "connection refused: no Rack is listening (stale socket)") from None
        except PermissionError:
            raise HealthcheckFailed(path, "permission denied: run the check as the Rack's user") from None
        except TimeoutError:
            raise HealthcheckFailed(path, f"no answer within {timeout:g}s: the Rack's event loop is stuck") from None
        except OSError as exc:
            raise HealthcheckFailed(path, str(exc)) from None
    try:
        answer = json.loads(data)
    except ValueError:
        raise HealthcheckFailed(path, f"answer is not JSON: {data[:80]!r}") from None
    if not isinstance(answer, dict):
        raise HealthcheckFailed(path, f"answer is not a JSON object: {data[:80]!r}")
    return answer


def healthy(answer: dict) -> bool:
    return answer.get("ok") is True and answer.get("status") in HEALTHY_STATUSES
