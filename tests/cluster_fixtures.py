"""A real Mixer cluster on loopback for the cluster suites (issue 14): N `fluxrig-mixer serve`
processes, each supervising its own nats-server, routed together on free ports.

    with MixerCluster(tmp_path, nodes=3) as c:   # started, every node's API answers
        c.nodes[0].api_url, c.snake_urls, c.nodes[1].kill()   # SIGKILL Mixer and nats-server
        c.nodes[1].start(); c.nodes[1].wait_ready()          # the same node again

or the `cluster3` fixture. Before the first start the fixture makes what every node of one
cluster shares (fluxrig_mixer.cluster.seed_node): node 0's cluster key and CA, copied into the
others' state dirs, so each node issues its own server and route certificates from one CA
(route TLS with verify, the default) and a Rack pins one Mixer key. `route_password=True` adds a
shared route password file (0600). `extra_toml` is appended to every node's config (its own
sections only: [cluster], [snake] and [enrollment] are written here; pass `cluster_toml` /
`snake_toml` / `enrollment_toml` lines to add keys to those).

Every node listens on 127.0.0.1 only: API, Snake and routes. `kill()` is the whole node: the
Mixer process and the nats-server it supervises (a Snake outlives its Mixer by design,
supervisor.py). `pause()`/`resume()` SIGSTOP/SIGCONT both. Everything is stopped at exit.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import httpx
import pytest

if TYPE_CHECKING:
    from fluxrig.agent.agent import RackAgent

__all__ = [
    "ClusterNode",
    "MixerCluster",
    "cluster3",
    "free_port",
    "ROOT",
    "NODE_READY_S",
    "SHARED_STATE",
    "needs_shared_state",
    "GuaranteedSender",
    "cluster_status",
    "streams_ready",
    "enroll_rack",
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A node's first start: nats-server, the JetStream meta group's election, R3 streams.
NODE_READY_S = 90.0
STOP_S = 20.0


def _shared_state() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("fluxrig_mixer.kv") is not None
    except (ImportError, ValueError):
        return False


# Issue 14 item 2 (helper kvstate): the registry, tokens and bus users in replicated KV, so a Rack
# enrolled through one node is known to every node's nats-server, and Hello/heartbeats served by
# any node (a queue group across the cluster) find it. Until fluxrig_mixer.kv exists, a Rack can
# only use the node whose Mixer enrolled it: tests of a Rack moving between nodes are skipped.
SHARED_STATE = _shared_state()
needs_shared_state = pytest.mark.skipif(
    not SHARED_STATE, reason="needs the registry in replicated KV (issue 14 item 2, fluxrig_mixer.kv): not landed yet"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ClusterNode:
    """One Mixer node: its state dir, ports, config file and process."""

    def __init__(self, cluster: MixerCluster, index: int):
        self.cluster = cluster
        self.index = index
        self.name = f"node{index + 1}"
        self.dir = cluster.root / self.name
        self.state = self.dir / "state"
        self.conf = self.dir / "fluxrig-mixer.toml"
        self.api_port, self.snake_port, self.route_port = free_port(), free_port(), free_port()
        self.proc: subprocess.Popen | None = None
        self.runs = 0
        self.token = ""

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def snake_url(self) -> str:
        return f"tls://127.0.0.1:{self.snake_port}"

    @property
    def route_url(self) -> str:
        return f"nats-route://127.0.0.1:{self.route_port}"

    @property
    def log_path(self):
        return self.dir / f"mixer-{self.runs}.log"

    @property
    def nats_log(self):
        return self.state / "snake" / "nats-server.log"

    def write_conf(self) -> None:
        c = self.cluster
        routes = ", ".join(f'"{n.route_url}"' for n in c.nodes if n is not self)
        password = f'route_password_file = "{c.password_file}"\n' if c.password_file else ""
        if c.client_urls:
            password += "client_urls = [" + ", ".join(f'"{n.snake_url}"' for n in c.nodes) + "]\n"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            f"""[base]
name = "fluxrig-test-cluster"
state_dir = "{self.state}"
[api]
host = "127.0.0.1"
port = {self.api_port}
[snake]
host = "127.0.0.1"
port = {self.snake_port}
advertise_host = "127.0.0.1"
restart_backoff = "200ms"
{c.snake_toml}
[cluster]
name = "fluxrig-test"
node_name = "{self.name}"
host = "127.0.0.1"
port = {self.route_port}
routes = [{routes}]
replicas = {c.replicas}
ready_timeout = "{NODE_READY_S:.0f}s"
{password}{c.cluster_toml}
[enrollment]
heartbeat_interval = "1s"
{c.enrollment_toml}
{c.extra_toml}
"""
        )

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is running"
        self.runs += 1
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "mixer")]))
        env.update(self.cluster.env)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fluxrig_mixer.cli", "serve", "-c", str(self.conf)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def healthy(self) -> bool:
        try:
            return httpx.get(self.api_url + "/api/v1/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout: float = NODE_READY_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.proc.returncode}:\n{self.log_tail()}")
            if self.healthy():
                self.token = (self.state / "api-token").read_text().strip()
                return
            time.sleep(0.1)
        raise AssertionError(f"{self.name} not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        out = []
        for path in (self.log_path, self.nats_log):
            try:
                out.append(f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
            except OSError:
                pass
        return "\n".join(out)

    def nats_pid(self) -> int | None:
        try:
            return int((self.state / "snake" / "nats-server.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def pids(self) -> list[int]:
        pids = [self.proc.pid] if self.proc is not None and self.proc.poll() is None else []
        nats = self.nats_pid()
        if nats and _alive(nats):
            pids.append(nats)
        return pids

    def kill(self) -> None:
        """SIGKILL the whole node: the Mixer and its nats-server, at once."""
        for pid in self.pids():
            _signal(pid, signal.SIGKILL)
        self._reap()

    def pause(self) -> None:
        for pid in self.pids():
            _signal(pid, signal.SIGSTOP)

    def resume(self) -> None:
        for pid in self.pids():
            _signal(pid, signal.SIGCONT)

    def stop(self) -> None:
        """SIGTERM (the Mixer stops its nats-server), SIGKILL whatever is left after STOP_S."""
        if self.proc is not None and self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(STOP_S)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def _reap(self) -> None:
        if self.proc is not None:
            try:
                self.proc.wait(STOP_S)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + STOP_S
        nats = self.nats_pid()
        while nats and _alive(nats) and time.monotonic() < deadline:
            time.sleep(0.02)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def enrollment_bundle(self, uses: int = 0) -> str:
        """A new enrollment token made on this node the operator's way (`fluxrig-mixer tokens
        create --bundle`, on its token file), its bundle's path. With the shared state (issue 14
        item 2) the node pushes it to every node within a second or two; each node's first-start
        token is its own (one id, different secrets: only one of them is kept cluster-wide)."""
        self.bundles = getattr(self, "bundles", 0) + 1
        path = self.dir / f"rack-{self.bundles}.bundle"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "mixer")]))
        argv = [sys.executable, "-m", "fluxrig_mixer.cli", "tokens", "create", "-c", str(self.conf)]
        subprocess.run(argv + ["--uses", str(uses), "--bundle", str(path)], check=True, env=env, timeout=60,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        return str(path)

    def client(self, timeout: float = 10.0) -> httpx.Client:
        return httpx.Client(base_url=self.api_url, headers={"Authorization": f"Bearer {self.token}"}, timeout=timeout)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


class MixerCluster:
    """N Mixer nodes routed together (see the module docstring)."""

    def __init__(
        self,
        root,
        nodes: int = 3,
        *,
        replicas: int = 3,
        route_password: bool = False,
        client_urls: bool = False,
        cluster_toml: str = "",
        snake_toml: str = "",
        enrollment_toml: str = "",
        extra_toml: str = "",
        env: dict | None = None,
    ):
        from pathlib import Path

        self.root = Path(root)
        self.replicas = replicas
        self.cluster_toml, self.enrollment_toml, self.extra_toml = cluster_toml, enrollment_toml, extra_toml
        self.snake_toml = snake_toml
        self.client_urls = client_urls  # cluster.client_urls: every node's Snake URL in bundles
        self.env = dict(env or {})
        self.password_file = ""
        self.nodes = [ClusterNode(self, i) for i in range(nodes)]
        if route_password:
            import secrets

            path = self.root / "route-password"
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(24) + "\n")
            self.password_file = str(path)
        self._seed()
        for n in self.nodes:
            n.write_conf()

    def _seed(self) -> None:
        """What every node shares, made once (node 0) and copied (cluster.seed_node)."""
        from fluxrig_mixer.certs import init_certs
        from fluxrig_mixer.cluster import seed_node

        from fluxrig.passport import ClusterKey

        first = self.nodes[0].state
        first.mkdir(parents=True, exist_ok=True, mode=0o700)
        ClusterKey.load_or_create(str(first / "cluster.key"))
        init_certs(str(first / "certs"), ["127.0.0.1"], cluster_name="fluxrig-test")
        for n in self.nodes[1:]:
            seed_node(str(first), str(n.state))

    @property
    def ca_file(self) -> str:
        return str(self.nodes[0].state / "certs" / "ca.pem")

    @property
    def snake_urls(self) -> list[str]:
        return [n.snake_url for n in self.nodes]

    @property
    def api_urls(self) -> list[str]:
        return [n.api_url for n in self.nodes]

    def start(self, timeout: float = NODE_READY_S) -> MixerCluster:
        for n in self.nodes:
            n.start()
        for n in self.nodes:
            n.wait_ready(timeout)
        return self

    def stop(self) -> None:
        for n in self.nodes:
            try:
                n.stop()
            except Exception:
                n.kill()

    def __enter__(self) -> MixerCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


# -- helpers of the cluster suites and bench/failover.py -------------------------------------------


def cluster_status(node) -> dict:
    with node.client(timeout=5) as c:
        r = c.get("/api/v1/cluster")
        assert r.status_code == 200, r.text
        return r.json()


def streams_ready(node, nodes: int = 3) -> bool:
    try:
        st = cluster_status(node)
    except Exception:
        return False
    for s in st["streams"].values():
        if not s.get("available") or len(s["peers"]) != nodes or not all(p["current"] for p in s["peers"]):
            return False
    return True


async def enroll_rack(tmp_path, bundle: str, name: str = "r1") -> RackAgent:
    """A RackAgent (in this process) enrolled from `bundle` and usable (auto-adopted)."""
    from mixer_fixtures import Applied, wait_for

    from fluxrig.agent.agent import AgentConfig, RackAgent

    cfg = AgentConfig(
        snake_url="",
        enrollment_bundle=bundle,
        state_dir=str(tmp_path / f"rack-{name}"),
        name=name,
        heartbeat_interval=0.5,
        enrollment_interval=0.5,
        enrollment_timeout=5.0,
        reconnect_wait=0.2,
    )
    applied = Applied().start()
    agent = RackAgent(cfg, applied.requests)
    agent.applied = applied
    await agent.start()
    await wait_for(lambda: agent.state == "usable", 60, what="rack usable (enrolled and active)")
    return agent


class GuaranteedSender:
    """Publishes numbered messages to one guaranteed-lane subject, one at a time, each retried
    under its Nats-Msg-Id until acknowledged (what the Rack's lane pump does): `acks` holds the
    PubAck sequence of every message, in sending order; `gaps` the longest wait for an ack."""

    def __init__(self, agent: RackAgent, subject: str):
        self.agent, self.subject = agent, subject
        self.acks: list[int] = []
        self.ack_times: list[float] = []  # time.monotonic() of each ack
        self.sent_times: list[float] = []  # ... and of its first publish attempt
        self.duplicates = 0
        self.longest_wait = 0.0
        self.stopping = False
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        n = 0
        while not self.stopping:
            n += 1
            started = time.monotonic()
            while True:
                try:
                    ack = await self.agent.publish(
                        self.subject, b"m%08d" % n, headers={"Nats-Msg-Id": f"cluster-test-{n}"}, timeout=1.0
                    )
                    break
                except Exception:
                    await asyncio.sleep(0.05)
            self.longest_wait = max(self.longest_wait, time.monotonic() - started)
            self.duplicates += bool(ack.duplicate)
            self.acks.append(ack.seq)
            self.ack_times.append(time.monotonic())
            self.sent_times.append(started)
            await asyncio.sleep(0.005)

    def next_ack_after(self, t0: float) -> float | None:
        """When the first message whose publish started at or after `t0` was acknowledged
        (call it on the event loop that runs the sender: the two lists grow together there)."""
        found = None
        for sent, acked in zip(reversed(self.sent_times), reversed(self.ack_times)):
            if sent < t0:
                break
            found = acked
        return found

    async def stop(self) -> None:
        self.stopping = True
        await asyncio.wait_for(self.task, 30)

    async def wait_more(self, count: int, timeout: float) -> float:
        """Seconds until `count` more messages were acknowledged."""
        from mixer_fixtures import wait_for

        target, t0 = len(self.acks) + count, time.monotonic()
        await wait_for(lambda: len(self.acks) >= target, timeout, what=f"{count} more guaranteed acks")
        return time.monotonic() - t0


@pytest.fixture
def cluster3(tmp_path):
    """Three routed Mixer nodes, R3, every API answering."""
    with MixerCluster(tmp_path / "cluster", 3) as c:
        yield c
