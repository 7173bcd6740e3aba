"""Helpers for the Rack-group suites and bench/cluster.py (issue 17): Rack processes enrolled in
a group, a real HAProxy in front of them (Debian's haproxy, systemd/install-test-tools.sh), and
its stats socket. Nothing here is a fake: every part is the real program on loopback ports."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

from fluxrig.balancer import HaproxyMember, haproxy_config
from fluxrig.framing.config import make_framer
from fluxrig.iso8583 import load_spec

__all__ = [
    "HAPROXY",
    "free_port",
    "RackProcess",
    "Haproxy",
    "http_get",
    "line_roundtrip",
    "CrossLegIssuer",
    "Ledger",
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RackProcess:
    """`fluxrig run -c <conf>` as a child process with its log in a file (never a pipe that
    could fill and stall it). `kill()` is SIGKILL; `stop()` is SIGTERM (the drain path)."""

    def __init__(self, tmp_path, name: str, snake_toml: str, env: dict | None = None, extra_rack: str = ""):
        self.name = name
        self.service_port = free_port()
        self.health_port = free_port()
        self.state = tmp_path / f"rack-{name}"
        self.conf = tmp_path / f"{name}.toml"
        self.log_path = tmp_path / f"{name}.log"
        self.conf.write_text(
            f'[base]\nname = "{name}"\nstate_dir = "{self.state}"\n'
            f'[rack]\nheartbeat_interval = "200ms"\ndrain_timeout = "2s"\n'
            f'health_listen = "127.0.0.1:{self.health_port}"\n{extra_rack}'
            f"[telemetry]\ndisabled = true\n" + snake_toml + 'reconnect_wait = "200ms"\n'
        )
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "mixer")]),
                        MEMBER=name, POS_BIND=f"127.0.0.1:{self.service_port}", **(env or {}))  # fmt: skip
        self.proc: subprocess.Popen | None = None

    def start(self) -> RackProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fluxrig.cli.main", "run", "-c", str(self.conf)],
            env=self.env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
        log.close()
        return self

    def member(self) -> HaproxyMember:
        return HaproxyMember(self.name, "127.0.0.1", self.service_port, self.health_port)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


async def http_get(port: int, path: str, timeout: float = 1.0) -> tuple[int, bytes]:
    """(status, body) of GET `path` on 127.0.0.1:`port`; (0, b"") when nothing answers."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    except (OSError, TimeoutError):
        return 0, b""
    try:
        writer.write(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(65536), timeout)
    except (OSError, TimeoutError):
        return 0, b""
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    try:
        return int(head.split(b" ", 2)[1]), body
    except (IndexError, ValueError):
        return 0, b""


async def line_roundtrip(port: int, line: bytes, timeout: float = 1.0) -> bytes | None:
    """A new connection, one line out, one line back; None when it fails or times out."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    except (OSError, TimeoutError):
        return None
    try:
        writer.write(line + b"\n")
        return (await asyncio.wait_for(reader.readline(), timeout)).rstrip(b"\n") or None
    except (OSError, TimeoutError):
        return None
    finally:
        writer.close()


class Haproxy:
    """A foreground haproxy with the configuration `haproxy_config` renders, and its stats socket."""

    def __init__(self, tmp_path, group: str, members: list[HaproxyMember], **kw):
        self.port = free_port()
        self.sock = str(tmp_path / "haproxy.sock")
        self.cfg = tmp_path / "haproxy.cfg"
        self.cfg.write_text(haproxy_config(group, f"127.0.0.1:{self.port}", members, stats_socket=self.sock, **kw))
        self.log_path = tmp_path / "haproxy.log"
        self.group = group
        self.proc: subprocess.Popen | None = None

    def start(self) -> Haproxy:
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(self.cfg)], stdout=log, stderr=log)
        log.close()
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def stats(self) -> dict[str, dict]:
        """server name -> its `show stat` row (status UP/DOWN, stot sessions, ...)."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(2)
                s.connect(self.sock)
                s.sendall(b"show stat\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
        except OSError:
            return {}
        lines = data.decode(errors="replace").splitlines()
        if not lines or not lines[0].startswith("# "):
            return {}
        cols = lines[0][2:].split(",")
        out = {}
        for line in lines[1:]:
            row = dict(zip(cols, line.split(","), strict=False))
            if row.get("pxname") == f"fluxrig-{self.group}-members" and row.get("svname") not in ("BACKEND", None):
                out[row["svname"]] = row
        return out

    def status(self) -> dict[str, str]:
        return {name: row.get("status", "") for name, row in self.stats().items()}

    async def wait_status(self, want: dict[str, str], timeout: float = 15.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.status()
            if all(got.get(k, "").startswith(v) for k, v in want.items()):
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"haproxy servers {got}, wanted {want} within {timeout}s")
            await asyncio.sleep(0.05)


class Ledger:
    """An issuer host's books, shared by its links: every approval by (terminal DE 41, STAN
    DE 11), and every reversal by the original it names (DE 90: original MTI, STAN). `window`
    (a set, while not None) collects the approvals given meanwhile: a run's own. `collisions`
    lists a reversal STAN used for two different originals of one terminal (the group's
    members must never share one)."""

    def __init__(self):
        self.approved: set[tuple[str, str]] = set()
        self.reversed: dict[tuple[str, str], set[str]] = {}  # original -> the reversals' own STANs
        self.reversal_stans: dict[tuple[str, str], tuple[str, str]] = {}
        self.collisions: list[tuple] = []
        self.window: set | None = None

    def approve(self, terminal: str, stan: str) -> None:
        self.approved.add((terminal, stan))
        if self.window is not None:
            self.window.add((terminal, stan))

    def reverse(self, terminal: str, stan: str, de90: str) -> bool:
        """Book a reversal (`stan` its own STAN); True when it names an approval on the books."""
        original = (terminal, de90[4:10])
        self.reversed.setdefault(original, set()).add(stan)
        seen = self.reversal_stans.setdefault((terminal, stan), original)
        if seen != original:
            self.collisions.append((terminal, stan, seen, original))
        return original in self.approved

    def reversed_only_under_own_stan(self, keys) -> int:
        """How many of `keys` were reversed only by reversals carrying the original's STAN (an
        acquirer's own; a switch's reversals carry a STAN of its own range)."""
        return sum(1 for k in keys if self.reversed.get(k) == {k[1]})


class CrossLegIssuer:
    """An issuer host that approves every request and answers it on the next leg (another
    connection than the one it came on, when there is one); `same_leg` answers on the same.
    Network management (08xx: sign-on, echo, sign-off) is the link's own and is always answered
    on the leg it came on; `sign_ons` counts the legs that signed on (DE 70 = 001). With a
    `ledger`, approvals and reversals (04xx, answered 39=00 when the original is on the books,
    else 25) are booked there: two hosts given one ledger are two links to one issuer."""

    def __init__(self, ledger: Ledger | None = None, same_leg: bool = False):
        self.spec = load_spec("moov:spec87ascii")
        self.legs: list[asyncio.StreamWriter] = []
        self.requests = 0
        self.crossed = 0
        self.sign_ons = 0
        self.network = 0  # 08xx answered on their own leg
        self.same_leg = same_leg
        self.ledger = ledger
        self.server = None
        self.port = 0

    async def start(self):
        self.server = await asyncio.start_server(self._leg, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self):
        self.server.close()
        for w in self.legs:
            w.close()

    async def _leg(self, reader, writer):
        self.legs.append(writer)
        framer = make_framer({"framing": "len2_be"})
        try:
            while data := await reader.read(65536):
                for frame in framer.feed(data):
                    req = self.spec.decode(frame)
                    self.requests += 1
                    rsp = dict(req)
                    mti = str(req[0])
                    rsp[0] = mti[:2] + str(int(mti[2]) + 1) + mti[3]
                    rsp[39] = "00"
                    if self.ledger is not None and mti.startswith("04"):
                        found = self.ledger.reverse(str(req.get(41, "")), str(req.get(11, "")), str(req.get(90, "")))
                        rsp[39] = "00" if found else "25"
                    elif self.ledger is not None and not mti.startswith("08"):
                        self.ledger.approve(str(req.get(41, "")), str(req.get(11, "")))
                    live = [w for w in self.legs if not w.is_closing()]
                    out = writer
                    if mti.startswith("08"):
                        self.network += 1
                        self.sign_ons += str(req.get(70, "")) == "001"
                    elif not self.same_leg and len(live) > 1:
                        out = live[(live.index(writer) + 1) % len(live)] if writer in live else live[0]
                    if out is not writer:
                        self.crossed += 1
                    out.write(framer.encode(self.spec.encode(rsp)))
        except (ConnectionError, OSError):
            pass
        finally:
            if writer in self.legs:
                self.legs.remove(writer)
