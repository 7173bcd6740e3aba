"""A real Mixer process under hostile requests keeps answering heartbeats (issue 13 item 4).

The Mixer runs as its own process (`python -m fluxrig_mixer.cli serve`, real nats-server child,
real DuckDB file, real uvicorn on loopback), so its RSS and its event loop are measured apart
from the test's. Five real Rack agents enroll (auto-adopt); a probe process then sends
heartbeats on their subjects with their own bus credentials, as request/reply, 10 a second,
and times each answer while the attacks (from their own niced process) run:

  - scenario imports (dry_run and not): a 446-byte YAML alias bomb, 5000-deep brackets, a
    5000-digit integer, deep TOML, dotted TOML keys: each a 400 naming the line and the limit
    (before: the bomb held the loop 63 s; the others were 500s with a traceback);
  - 200 connections that dribble their request headers: cut off at api.header_timeout, and
    past api.max_connections refused at once (before: all held open, forever);
  - an unauthenticated 150 MB body: answered 401 from its headers, the Mixer's peak RSS grows
    by less than 20 MB (before: 127 -> 570 MB, then the 401).

The heartbeat p99 under attack must stay under 100 ms (the issue's bound, whatever the
baseline). It did not always: the Mixer reads back every audit row it shares (api/
shared_audit.py), one DuckDB INSERT per row on its loop, and each burst of hostile imports cost
40-60 ms stalls (p99 42-120 ms on this 2-core box, shared). With one statement per batch:
p99 6.7-29 ms under attack, baseline 3-4 ms (the worst samples are printed with the figures).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from fluxrig.agent.agent import AgentConfig, RackAgent
from fluxrig.rack_requests import RequestQueue

pytestmark = pytest.mark.timeout(180)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER_TIMEOUT_S = 2.0
MAX_CONNECTIONS = 128
PER_CLIENT = 32
P99_BUDGET_S = 0.100
RSS_BUDGET_KB = 20 * 1024
# The hostile documents are sent this many times over (a longer window of heartbeats).
ROUNDS = 3
# ... and for at least this long (a window of ~80 heartbeats, whatever the box's speed).
ATTACK_MIN_S = 10.0

ALIAS_BOMB = """meta: {version: 1}
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
"""

HOSTILE = [
    # (name, body, format, expected fragment of the first problem's message, location fragment)
    ("alias bomb", ALIAS_BOMB, "yaml", "alias", ":3:"),
    ("deep brackets", "meta: {version: 1}\nx: " + "[" * 5000 + "]" * 5000 + "\n", "yaml", "max_depth", ":2:"),
    (
        "deep block maps",
        "meta: {version: 1}\nx:\n" + "".join(" " * (i + 1) + f"k{i}:\n" for i in range(100)),
        "yaml",
        "max_depth",
        ":",
    ),  # fmt: skip
    ("5000-digit integer", "meta:\n  version: " + "9" * 5000 + "\n", "yaml", "max_int_digits", ":2:"),
    ("deep TOML", "[meta]\nversion = 1\n[x]\ny = " + "[" * 5000 + "]" * 5000 + "\n", "toml", "max_depth", ":4:"),
    ("dotted TOML", "[meta]\nversion = 1\n" + "k." * 3000 + "z = 1\n", "toml", "max_depth", ":3"),
    ("5000-digit TOML integer", "[meta]\nversion = " + "9" * 5000 + "\n", "toml", "digits", ":2"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_kb(pid: int, field: str = "VmHWM") -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


class MixerProcess:
    """`fluxrig-mixer serve` as its own process; `again()` starts another on the same state."""

    def __init__(self, tmp_path, run: int = 0):
        self.tmp_path = tmp_path
        self.state = tmp_path / "state"
        self.api_port, self.snake_port = _free_port(), _free_port()
        self.conf = tmp_path / "fluxrig-mixer.toml"
        if not run:
            self._write_conf()
        else:
            text = self.conf.read_text()
            self.api_port = int(text.split("\nport = ")[1].split()[0])
            self.snake_port = int(text.split("\nport = ")[2].split()[0])
        self.log = open(tmp_path / f"mixer-{run}.log", "wb")
        self.log_path = tmp_path / f"mixer-{run}.log"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "mixer")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fluxrig_mixer.cli", "serve", "-c", str(self.conf)],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.url = f"http://127.0.0.1:{self.api_port}"

    def again(self) -> MixerProcess:
        return MixerProcess(self.tmp_path, run=int(self.log_path.stem.split("-")[1]) + 1)

    def _write_conf(self) -> None:
        self.conf.write_text(
            f"""[base]
state_dir = "{self.state}"
[api]
host = "127.0.0.1"
port = {self.api_port}
header_timeout = "{HEADER_TIMEOUT_S}s"
max_connections = {MAX_CONNECTIONS}
max_connections_per_client = {PER_CLIENT}
[snake]
host = "127.0.0.1"
port = {self.snake_port}
[enrollment]
auto_adopt = true
# The operator says otherwise than single-use: the probe Racks share the first-start bundle.
first_token_uses = 0
heartbeat_interval = "2s"
"""
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"mixer exited {self.proc.returncode}"
            try:
                if httpx.get(self.url + "/api/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            raise AssertionError("mixer not ready")
        self.token = (self.state / "api-token").read_text().strip()
        self.bundle = str(self.state / "enroll-bundle")  # the first-start bundle (first_token_uses above)

    def stop(self) -> None:
        if self.proc.poll() is not None:
            self.log.close()
            return
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def mixer_proc(tmp_path):
    m = MixerProcess(tmp_path)
    try:
        m.wait_ready()
        yield m
    finally:
        m.stop()


class HeartbeatProbe:
    """heartbeat_probe.py in its own process: heartbeats on the Rack's subject with its own
    credentials, every round trip timed (wall-clock stamped, so windows can be cut)."""

    def __init__(self, url: str, agents: list, period: float = 0.1):
        self.url, self.agents, self.period = url, agents, period
        self.passports = [a.passport for a in agents]
        self.samples: list[tuple[float, float]] = []

    async def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "mixer")]))
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, os.path.join(ROOT, "tests", "heartbeat_probe.py"),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        racks = [
            {
                "seed": a._identity(),
                "ca_pem": a.config.root_ca_pem,
                "rack": a.passport.rack_name,
                "serial": a.passport.serial,
            }
            for a in self.agents
        ]  # fmt: skip (stdin: no secret in argv)
        cfg = {"url": self.url, "period": self.period, "racks": racks}
        self.proc.stdin.write((json.dumps(cfg) + "\n").encode())
        await self.proc.stdin.drain()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        while line := await self.proc.stdout.readline():
            t, rtt = line.split()
            self.samples.append((float(t), float(rtt)))

    async def wait_samples(self, n: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.samples) < n and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        await asyncio.gather(self._reader, return_exceptions=True)

    def window(self, start: float, end: float) -> list[float]:
        """Round trips in [start, end] (wall clock); an unanswered one counts as 5 s."""
        return [5.0 if rtt < 0 else rtt for t, rtt in self.samples if start <= t <= end]


def p99(rtts: list[float]) -> float:
    r = sorted(rtts)
    return r[min(len(r) - 1, int(len(r) * 0.99))]


# Probe Racks: each may beat 4 times per heartbeat interval (the Mixer's per-Rack limit), so
# five of them give 10 round trips a second at HEARTBEAT_S = 2 s. The interval stays that long
# because the Mixer persists liveness every interval/2 in a DuckDB commit on its loop (a 0.2 s
# interval showed 265 ms stalls with no attack at all: the registry's business, not the guard's).
PROBE_RACKS = 5
HEARTBEAT_S = 2.0


async def _enrolled_probe(mixer: MixerProcess, tmp_path, racks: int = PROBE_RACKS) -> tuple[list, HeartbeatProbe]:
    agents = []
    for i in range(racks):
        cfg = AgentConfig(
            snake_url="",
            enrollment_bundle=mixer.bundle,
            state_dir=str(tmp_path / f"rack{i}"),
            name=f"probe{i}",
            heartbeat_interval=HEARTBEAT_S,
            enrollment_interval=0.5,
            enrollment_timeout=10.0,
            reconnect_wait=0.2,
        )
        agent = RackAgent(cfg, RequestQueue())
        agents.append(agent)
        await agent.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not all(a.passport and a.passport.bus_user for a in agents):
        await asyncio.sleep(0.1)
    assert all(a.passport and a.passport.bus_user for a in agents), "the probe Racks did not enroll"
    probe = HeartbeatProbe(agents[0].config.snake_url, agents)
    await probe.start()
    return agents, probe


async def _attack(mode: str, port: int, *args) -> dict:
    """guard_attacks.py in its own niced process: attackers would be on other machines, so here
    they must not take the CPU the measured Mixer needs (a 2-core box shared with other suites)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "mixer")]))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, os.path.join(ROOT, "tests", "guard_attacks.py"), mode, str(port), *map(str, args),
        stdout=asyncio.subprocess.PIPE, env=env, preexec_fn=lambda: os.nice(10),
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, (mode, proc.returncode, out[-500:])
    return json.loads(out)


async def test_hostile_requests_answered_while_heartbeats_flow(mixer_proc, tmp_path):
    agents, probe = await _enrolled_probe(mixer_proc, tmp_path)
    headers = {"Authorization": f"Bearer {mixer_proc.token}"}
    try:
        # A baseline of round trips before any attack: the same box, the same moment.
        base_start = time.time()
        await probe.wait_samples(60)
        base_end = attack_start = time.time()
        # The operator's client comes from another address than the attackers (127.0.0.1):
        # the per-client connection cap keeps a slot for it.
        transport = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
        async with httpx.AsyncClient(base_url=mixer_proc.url, headers=headers, timeout=60, transport=transport) as api:
            loop = asyncio.get_running_loop()
            slow_task = loop.create_task(_attack("slow", mixer_proc.api_port, 200))
            rss_before = _rss_kb(mixer_proc.proc.pid)
            big = loop.create_task(_attack("big", mixer_proc.api_port, 150 * 1024 * 1024))
            answers = {}
            rounds = 0
            while rounds < ROUNDS or time.time() < attack_start + ATTACK_MIN_S:
                rounds += 1
                for (name, body, fmt, _msg, _loc), dry in itertools.product(HOSTILE, ("true", "false")):
                    answers[(name, dry)] = await api.post(
                        f"/api/v1/scenarios/import?dry_run={dry}&format={fmt}", content=body.encode()
                    )
                    assert answers[(name, dry)].status_code == 400, (name, dry, answers[(name, dry)].text[:300])
            big_response = (await big)["response"].encode("latin-1")
            rss_after = _rss_kb(mixer_proc.proc.pid)
            slow = await slow_task
            attack_end = time.time()
            # The Mixer still serves an ordinary import afterwards.
            ok = await api.post(
                "/api/v1/scenarios/import?dry_run=true", content=b"meta: {name: fine, version: 1}\ngears: []\n"
            )
        # The same box after the attacks, as long as they lasted (capped): the baseline is
        # before + after, so a spike of the shared box weighs on both sides alike.
        after_start = time.time()
        await asyncio.sleep(min(attack_end - attack_start, 15.0))
        after_end = time.time()
    finally:
        await probe.stop()
        for agent in agents:
            await agent.stop()

    for name, _body, _fmt, msg, loc in HOSTILE:
        for dry in ("true", "false"):
            r = answers[(name, dry)]
            assert r.status_code == 400, (name, dry, r.status_code, r.text[:300])
            problem = r.json()["problems"][0]
            assert msg in problem["message"], (name, problem)
            assert loc in problem["location"], (name, problem)
            assert "Traceback" not in r.text
    assert ok.status_code == 200, ok.text

    assert big_response.startswith(b"HTTP/1.1 401"), big_response[:200]
    assert rss_after - rss_before < RSS_BUDGET_KB, f"mixer peak RSS grew {rss_before} -> {rss_after} kB"

    # Every slow-header connection ended: cut at the deadline or refused past the cap.
    assert slow["survived"] == 0 and slow["other"] == 0, slow
    assert slow["busy"] + slow["refused"] > 0, slow
    assert slow["timed_out"] + slow["reset"] > 0, slow
    assert slow["held_s"] < HEADER_TIMEOUT_S + 3.0, slow

    baseline = probe.window(base_start, base_end) + probe.window(after_start, after_end)
    attacked = probe.window(attack_start, attack_end)
    figures = (
        f"heartbeat p99 {p99(attacked) * 1000:.1f} ms over {len(attacked)} under attack "
        f"(baseline p99 {p99(baseline) * 1000:.1f} ms over {len(baseline)}; attack {attack_end - attack_start:.1f} s)"
    )
    worst = sorted(
        ((rtt, t - attack_start) for t, rtt in probe.samples if attack_start <= t <= attack_end), reverse=True
    )
    figures += "; worst " + ", ".join(f"{rtt * 1000:.0f} ms at +{at:.1f} s" for rtt, at in worst[:5])
    print(figures)
    assert len(attacked) >= 50, figures
    # Never a stall: the old code held the loop 63 s on the alias bomb alone.
    assert max(attacked) < max(1.0, 2 * max(baseline)), "a heartbeat waited a second or more: " + figures
    # The budget, 100 ms, without an allowance for a slow baseline: the old code failed
    # it on the alias bomb (the loop held a minute) and on the audit read-back (40-60 ms stalls
    # per burst of imports, p99 up to 120 ms).
    assert p99(attacked) < P99_BUDGET_S, figures


async def test_body_caps(mixer_proc):
    token = {"Authorization": f"Bearer {mixer_proc.token}"}
    async with httpx.AsyncClient(base_url=mixer_proc.url, timeout=30) as api:
        # With credentials, past api.max_import_bytes (10 MiB): refused from Content-Length.
        r = await api.post("/api/v1/scenarios/import", content=b"#" * (11 * 1024 * 1024), headers=token)
        assert r.status_code == 413, r.text
        # Chunked (no Content-Length), counted as it arrives and cut at the cap.

        async def chunks():
            for _ in range(12):
                yield b"#" * (1024 * 1024)

        r = await api.post("/api/v1/scenarios/import", content=chunks(), headers=token)
        assert r.status_code == 413, r.text
        # Without credentials, a chunked body is refused before it is read.
        r = await api.post("/api/v1/scenarios/import", content=chunks())
        assert r.status_code == 401, r.text
        # A small unauthenticated body still reaches its route, which refuses it (401).
        r = await api.post("/api/v1/scenarios/import", content=b"meta: {version: 1}\n")
        assert r.status_code == 401, r.text
        # The health probe stays open.
        assert (await api.get("/api/v1/health")).status_code == 200


@pytest.mark.parametrize("keepalive", [0.5, 5.0])
async def test_an_idle_keep_alive_connection_is_closed_after_api_keepalive_timeout(tmp_path, keepalive):
    """One request on an HTTP/1.1 connection, then silence: at api.keepalive_timeout the Mixer
    closes it (a stranger cannot hold connections open for free); before it, it stays open."""
    from urllib.parse import urlsplit

    from mixer_fixtures import make_mixer

    mixer = await make_mixer(tmp_path / "mixer", **{"api.keepalive_timeout": keepalive})
    try:
        url = urlsplit(mixer.api_url)
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        writer.write(b"GET /api/v1/health HTTP/1.1\r\nHost: mixer\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200"), head
        length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")).split(b":")[1])
        await reader.readexactly(length)
        try:
            rest = await asyncio.wait_for(reader.read(1), 1.5)
            closed = rest == b""
        except TimeoutError:
            closed = False
        assert closed == (keepalive < 1.5), f"keepalive_timeout {keepalive}s: closed after 1.5 s idle = {closed}"
        writer.close()
    finally:
        await mixer.stop()
