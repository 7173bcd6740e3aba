"""Fixtures shared by the suites; plain helpers live in helpers.py."""

from __future__ import annotations

import os

import pytest
from helpers import ROOT, RackProcess


@pytest.fixture
def rack_env(tmp_path):
    env = dict(os.environ)
    env["FLUXRIG_BASE_STATE_DIR"] = str(tmp_path / "state")
    env.setdefault("PYTHONPATH", ROOT)
    return env


@pytest.fixture
def start_rack(rack_env):
    procs: list[RackProcess] = []

    def start(*args: str, env: dict | None = None, cmd: list[str] | None = None) -> RackProcess:
        p = RackProcess(list(args), env or rack_env, cmd)
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.communicate()


def pytest_collection_modifyitems(config, items):
    """Mixer suites are marked `mixer`: the pure-Python pass of `make test` skips them (the
    Mixer has no Cython twins), the compiled pass runs them."""
    for item in items:
        if item.fspath.basename.startswith("test_mixer_"):
            item.add_marker(pytest.mark.mixer)


# -- archive: one real ClickHouse server per session (tests/clickhouse_server.py) --------------
@pytest.fixture(scope="session")
def clickhouse(tmp_path_factory):
    """A running clickhouse-server on free loopback ports, shared by the session; skips loudly
    when Debian's clickhouse-server is not installed (CI installs it)."""
    from clickhouse_server import MISSING, ClickHouseServer, clickhouse_binary

    if not clickhouse_binary():
        import warnings

        warnings.warn(MISSING, stacklevel=1)
        pytest.skip(MISSING)
    server = ClickHouseServer(str(tmp_path_factory.mktemp("clickhouse")))
    server.start()
    try:
        yield server
    finally:
        server.stop()
