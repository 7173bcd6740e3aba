"""Routes are authenticated (issue 14 item 1): real nats-server processes started from the config
snake.py renders for cluster members. Two members with route certificates from one CA route
together (a message crosses); a server whose route certificate comes from another CA, or one
with the wrong route password, never joins (nothing crosses, the member logs the refusal)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time

import nats
import pytest
from fluxrig_mixer.certs import ensure_route_leaf, init_certs
from fluxrig_mixer.cluster import ClusterSpec
from fluxrig_mixer.snake import BusUser, find_nats_server, free_port, render_config

from fluxrig.wire import identity as I

pytestmark = [pytest.mark.mixer, pytest.mark.timeout(120)]

SEED = I.new_user_seed()
USER = BusUser(I.public_key(SEED), (">",), (">",))


class _Server:
    def __init__(self, root, name: str, ca_dir, route_port: int, peers: list[int], *, tls=True, password=""):
        self.dir = root / name
        self.dir.mkdir(parents=True)
        self.port, self.route_port = free_port(), route_port
        tls_files = None
        if tls:
            files = ensure_route_leaf(str(ca_dir), ["127.0.0.1"]) if name != "rogue" else None
            if files is None:  # another CA altogether
                init_certs(str(self.dir / "certs"), ["127.0.0.1"])
                files = ensure_route_leaf(str(self.dir / "certs"), ["127.0.0.1"])
                ca = str(self.dir / "certs" / "ca.pem")
            else:
                # each member its own route certificate from the shared CA
                own = self.dir / "certs"
                own.mkdir()
                for f in ("ca.pem", "ca-key.pem"):
                    (own / f).write_bytes((ca_dir / f).read_bytes())
                files = ensure_route_leaf(str(own), ["127.0.0.1"])
                ca = str(own / "ca.pem")
            tls_files = dict(files, ca_file=ca)
        spec = ClusterSpec(
            name="t",
            node_name=name,
            host="127.0.0.1",
            port=route_port,
            routes=tuple(f"nats-route://127.0.0.1:{p}" for p in peers),
            replicas=1,
            tls=tls_files,
            password=password,
        )
        self.log = self.dir / "nats.log"
        conf = self.dir / "nats.conf"
        conf.write_text(
            render_config(
                host="127.0.0.1",
                port=self.port,
                store_dir=str(self.dir / "js"),
                users=[USER],
                log_file=str(self.log),
                cluster=spec,
            )
        )
        os.chmod(conf, 0o600)
        self.proc = subprocess.Popen(
            [find_nats_server(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def _crosses(a: _Server, b: _Server, timeout: float) -> bool:
    """A message published on b reaches a subscriber on a within `timeout`."""
    na = await nats.connect(f"nats://127.0.0.1:{a.port}", nkeys_seed_str=SEED, connect_timeout=2)
    nb = await nats.connect(f"nats://127.0.0.1:{b.port}", nkeys_seed_str=SEED, connect_timeout=2)
    try:
        sub = await na.subscribe("route.check")
        await na.flush()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await nb.publish("route.check", b"x")
            await nb.flush()
            try:
                await sub.next_msg(timeout=0.3)
                return True
            except nats.errors.TimeoutError:
                pass
        return False
    finally:
        await na.close()
        await nb.close()


async def _ready(*servers: _Server) -> None:
    for s in servers:
        for _ in range(200):
            try:
                _r, w = await asyncio.open_connection("127.0.0.1", s.port)
                w.close()
                break
            except OSError:
                await asyncio.sleep(0.05)


@pytest.fixture
def ca_dir(tmp_path):
    d = tmp_path / "ca"
    init_certs(str(d), ["127.0.0.1"])
    return d


async def test_members_with_one_ca_route_and_a_stranger_ca_is_refused(tmp_path, ca_dir):
    p1, p2, p3 = free_port(), free_port(), free_port()
    servers = []
    try:
        a = _Server(tmp_path, "a", ca_dir, p1, [p2, p3])
        b = _Server(tmp_path, "b", ca_dir, p2, [p1])
        rogue = _Server(tmp_path, "rogue", ca_dir, p3, [p1, p2])
        servers = [a, b, rogue]
        await _ready(*servers)
        assert await _crosses(a, b, 15), "members with route certificates from one CA did not route"
        assert not await _crosses(a, rogue, 4), "a route certificate from another CA was accepted"
        text = a.log.read_text()
        assert "tls" in text.lower() and ("certificate" in text.lower() or "handshake" in text.lower()), text[-2000:]
    finally:
        for s in servers:
            s.stop()


async def test_a_wrong_route_password_is_refused(tmp_path, ca_dir):
    p1, p2, p3 = free_port(), free_port(), free_port()
    good, bad = "g" * 32, "b" * 32
    servers = []
    try:
        a = _Server(tmp_path, "a", ca_dir, p1, [p2, p3], tls=False, password=good)
        b = _Server(tmp_path, "b", ca_dir, p2, [p1], tls=False, password=good)
        intruder = _Server(tmp_path, "c", ca_dir, p3, [p1, p2], tls=False, password=bad)
        servers = [a, b, intruder]
        await _ready(*servers)
        assert await _crosses(a, b, 15), "members with the route password did not route"
        assert not await _crosses(a, intruder, 4), "a wrong route password was accepted"
        assert "authorization" in a.log.read_text().lower()
    finally:
        for s in servers:
            s.stop()
