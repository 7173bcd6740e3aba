"""The [cluster] section and the nats-server config a cluster member gets (issue 14 items 1, 8),
without a server: keys, checks, the rendered `cluster {}` block, and that a single node renders
exactly what it did before. Also the Rack's snake.url as a list (item 4)."""

from __future__ import annotations

import os
import re

import pytest
from fluxrig_mixer.cluster import ROUTE_USER, build_spec, read_route_password, render_cluster_block, seed_node
from fluxrig_mixer.config import load_config
from fluxrig_mixer.snake import BusUser, render_config
from fluxrig_mixer.streams import msg_stream_config, replicas_for, telemetry_stream_config

from fluxrig.config import load_config as load_rack_config
from fluxrig.errors import ConfigError

pytestmark = pytest.mark.mixer

PEERS = "nats-route://10.0.0.2:6222,nats-route://10.0.0.3:6222"


def _cfg(tmp_path, **cluster):
    over = {"base.state_dir": str(tmp_path / "state")}
    over.update({f"cluster.{k}": v for k, v in cluster.items()})
    return load_config(None, environ={}, overrides=over)


def _password_file(tmp_path, mode=0o600, value="a" * 32):
    path = tmp_path / "route-password"
    path.write_text(value + "\n")
    os.chmod(path, mode)
    return str(path)


def test_defaults_are_a_single_node(tmp_path):
    cfg = _cfg(tmp_path)
    assert not cfg.clustered
    assert cfg.cluster.replicas == 3 and cfg.cluster.port == 6222 and cfg.cluster.route_tls
    assert replicas_for(cfg) == 1
    assert msg_stream_config(cfg.snake).num_replicas == 1


def test_routes_as_a_toml_list_or_a_comma_list(tmp_path):
    conf = tmp_path / "m.toml"
    conf.write_text('[cluster]\nroutes = ["nats-route://10.0.0.2:6222", "nats-route://10.0.0.3:6222"]\n')
    cfg = load_config(str(conf), environ={})
    assert cfg.clustered and cfg.cluster.routes == PEERS
    env = load_config(None, environ={"FLUXRIG_MIXER_CLUSTER_ROUTES": PEERS + ", "})
    assert env.cluster.routes == PEERS
    assert replicas_for(cfg) == 3
    assert msg_stream_config(cfg.snake, replicas_for(cfg)).num_replicas == 3
    assert telemetry_stream_config(cfg.snake, 3).num_replicas == 3


@pytest.mark.parametrize(
    "routes, key, words",
    [
        ("http://10.0.0.2:6222", "cluster.routes", "scheme"),
        ("nats-route://user:pw@10.0.0.2:6222", "cluster.routes", "route_password_file"),
        ("nats-route://10.0.0.2", "cluster.routes", "port"),
        ("nats-route://10.0.0.2:6222/x", "cluster.routes", "nothing after"),
    ],
)
def test_bad_route_urls_are_refused(tmp_path, routes, key, words):
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, routes=routes)
    assert e.value.key == key and words in str(e.value)


def test_more_replicas_than_nodes_is_refused(tmp_path):
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, routes="nats-route://10.0.0.2:6222", replicas=3)
    assert e.value.key == "cluster.replicas" and "names 2" in str(e.value)
    # A list copied to every node names this node too: three distinct nodes.
    cfg = _cfg(tmp_path, routes="nats-route://127.0.0.1:6222," + PEERS, port=6222)
    assert cfg.cluster.replicas == 3
    with pytest.raises(ConfigError):
        _cfg(tmp_path, routes=PEERS, replicas=6)


def test_routes_must_be_authenticated(tmp_path):
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, routes=PEERS, route_tls=False)
    assert e.value.key == "cluster.route_tls" and "authenticated" in str(e.value)
    _cfg(tmp_path, routes=PEERS, route_tls=False, route_password_file=_password_file(tmp_path))


def test_route_password_file_must_be_private_and_strong(tmp_path):
    assert read_route_password(_password_file(tmp_path)) == "a" * 32
    with pytest.raises(ConfigError, match="group or others"):
        read_route_password(_password_file(tmp_path, 0o644))
    with pytest.raises(ConfigError, match="16"):
        read_route_password(_password_file(tmp_path, 0o600, "short"))
    with pytest.raises(ConfigError, match="cannot read"):
        read_route_password(str(tmp_path / "missing"))


def test_names_are_checked(tmp_path):
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, routes=PEERS, node_name="node 1")
    assert e.value.key == "cluster.node_name"
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, routes=PEERS, name="")
    assert e.value.key == "cluster.name"


def _single_node_text(**kw):
    return render_config(
        host="127.0.0.1", port=4222, store_dir="/s", users=[BusUser("UABC", (">",), (">",))], no_auth_user="", **kw
    )


def test_a_single_node_renders_exactly_as_before():
    text = _single_node_text()
    assert 'server_name: "fluxrig-snake"' in text
    for word in ("cluster", "routes", "client_advertise", "leafnodes", "gateway"):
        assert word not in text


def _member_spec(tmp_path, **cluster):
    from fluxrig_mixer.certs import init_certs

    init_certs(str(tmp_path / "state" / "certs"), ["127.0.0.1"])
    cfg = _cfg(tmp_path, routes=PEERS, node_name="n1", **cluster)
    return cfg, build_spec(cfg, str(tmp_path / "state"))


def test_a_member_renders_routes_tls_verify_and_its_server_name(tmp_path):
    cfg, spec = _member_spec(tmp_path, route_password_file=_password_file(tmp_path), advertise="n1.example:6222")
    assert spec.node_name == "n1" and spec.replicas == 3 and spec.tls is not None
    # The route certificate was issued from the Snake's CA, for server and client use.
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    cert = x509.load_pem_x509_certificate(open(spec.tls["cert_file"], "rb").read())
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku and ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert oct(os.stat(spec.tls["key_file"]).st_mode & 0o777) == "0o600"
    text = _single_node_text(cluster=spec, client_advertise="n1.example:4222")
    assert 'server_name: "n1"' in text and "sync_interval: always" in text
    block = "\n".join(render_cluster_block(spec))
    assert block in text
    assert "verify: true" in block and f'user: "{ROUTE_USER}"' in block
    assert f"nats-route://{ROUTE_USER}:{'a' * 32}@10.0.0.2:6222" in block
    assert 'advertise: "n1.example:6222"' in block and 'client_advertise: "n1.example:4222"' in text


def test_the_generated_config_dials_only_the_configured_peers(tmp_path):
    """Air-gapped (item 8): the only outbound address in a member's nats-server.conf is a
    configured route; no leaf node, gateway, resolver, MQTT, websocket or monitoring port."""
    _cfg_, spec = _member_spec(tmp_path, route_password_file=_password_file(tmp_path))
    text = _single_node_text(cluster=spec, log_file="/s/log")
    for word in ("leafnodes", "gateway", "resolver", "operator", "mqtt", "websocket", "http:", "https:",
                 "http_port", "monitor_port", "system_account", "accounts"):  # fmt: skip
        assert word not in text, word
    dialled = set(re.findall(r"[a-z-]+://(?:[^@\s\"]+@)?([^\s\"/]+)", text))
    assert dialled == {"10.0.0.2:6222", "10.0.0.3:6222"}, dialled
    listens = re.findall(r"listen: \"([^\"]+)\"", text)
    assert listens == ["127.0.0.1:4222", "0.0.0.0:6222"]


def test_seed_node_copies_what_the_cluster_shares(tmp_path):
    from fluxrig_mixer.certs import init_certs

    from fluxrig.passport import ClusterKey

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    ClusterKey.load_or_create(str(a / "cluster.key"))
    init_certs(str(a / "certs"), [])
    written = seed_node(str(a), str(b))
    assert sorted(os.path.relpath(p, b) for p in written) == ["certs/ca-key.pem", "certs/ca.pem", "cluster.key"]
    for p in written:
        assert os.stat(p).st_mode & 0o077 == 0
    assert seed_node(str(a), str(b)) == []  # idempotent
    (b / "cluster.key").write_bytes(b"another key")
    with pytest.raises(Exception, match="differs"):
        seed_node(str(a), str(b))


def test_the_rack_takes_several_snake_urls(tmp_path):
    conf = tmp_path / "fluxrig.toml"
    conf.write_text('[snake]\nurl = ["tls://n1:4222", "tls://n2:4222", "tls://n3:4222"]\n')
    cfg = load_rack_config(str(conf), environ={})
    assert cfg.snake.url == "tls://n1:4222,tls://n2:4222,tls://n3:4222"
    from fluxrig.agent.agent import AgentConfig

    assert AgentConfig(snake_url=cfg.snake.url).urls == ["tls://n1:4222", "tls://n2:4222", "tls://n3:4222"]
    conf.write_text('[snake]\nurl = "tls://n1:4222, tls://n2:4222"\n')
    assert load_rack_config(str(conf), environ={}).snake.url == "tls://n1:4222,tls://n2:4222"
    conf.write_text("[snake]\nurl = [1, 2]\n")
    with pytest.raises(ConfigError) as e:
        load_rack_config(str(conf), environ={})
    assert e.value.key == "snake.url"


async def test_a_single_node_says_it_is_not_clustered(tmp_path):
    import httpx
    from mixer_fixtures import make_mixer

    m = await make_mixer(tmp_path / "mixer")
    try:
        assert m.snake.cluster is None
        assert 'server_name: "fluxrig-snake"' in open(m.snake.conf_path).read()
        assert "cluster" not in open(m.snake.conf_path).read()
        headers = {"Authorization": f"Bearer {m.api_token}"}
        async with httpx.AsyncClient(base_url=m.api_url, headers=headers, timeout=10) as api:
            assert (await api.get("/api/v1/cluster")).json() == {"clustered": False, "node": "fluxrig-snake"}
            assert (await api.post("/api/v1/cluster/streams/flux-msg/step-down")).status_code == 409
        info = await m.js.stream_info("flux-msg")
        assert info.config.num_replicas == 1
    finally:
        await m.stop()


def test_up_cluster_node_configs_are_valid_members(tmp_path):
    from fluxrig_mixer.up_cluster import cluster_overrides, node_ports, node_toml

    ports = node_ports(18090, 14222, 3)
    assert ports == [(18090, 14222, 6222), (18091, 14223, 6223), (18092, 14224, 6224)]
    base = load_config(None, environ={})
    for k in range(3):
        conf = tmp_path / f"node{k}.toml"
        conf.write_text(node_toml(ports, k, str(tmp_path / f"node-{k + 1}"), base))
        cfg = load_config(str(conf), environ={})
        assert cfg.clustered and cfg.cluster.node_name == f"node-{k + 1}" and cfg.cluster.replicas == 3
        assert cfg.cluster.port == ports[k][2] and f":{ports[k][2]}" not in cfg.cluster.routes
        assert cluster_overrides(ports, k, "x")["cluster.routes"] == cfg.cluster.routes
    assert cfg.cluster.client_urls == "tls://127.0.0.1:14222,tls://127.0.0.1:14223,tls://127.0.0.1:14224"
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, routes=PEERS, client_urls="http://x:4222")
    assert e.value.key == "cluster.client_urls"
    free = node_ports(0, 0, 3)
    assert len({p for n in free for p in n}) == 9


def test_up_cluster_refuses_a_node_count_outside_3_to_5(tmp_path):
    import subprocess
    import sys

    from cluster_fixtures import ROOT

    proc = subprocess.run(
        [sys.executable, "-m", "fluxrig_mixer.cli", "up", "--cluster", "2", "--state-dir", str(tmp_path / "s")],
        capture_output=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "mixer")])),
    )
    assert proc.returncode == 2 and b"--cluster" in proc.stderr and b"3..5" in proc.stderr, proc.stderr


async def test_a_stream_without_a_leader_yet_is_waited_for_at_start():
    """A stream or bucket just created on a forming cluster answers "no response from stream"
    until its replicas elect a leader: the start retries it (as a 503), other errors pass."""
    import nats.js.errors
    from fluxrig_mixer.cluster import retry_while_forming

    calls = []

    async def op():
        calls.append(1)
        if len(calls) < 3:
            raise nats.js.errors.NoStreamResponseError()
        return "ok"

    assert await retry_while_forming(op, 10, "ingest") == "ok" and len(calls) == 3

    async def bad():
        raise ValueError("not a cluster answer")

    with pytest.raises(ValueError):
        await retry_while_forming(bad, 10, "ingest")
