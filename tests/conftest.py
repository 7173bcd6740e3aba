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


# Suites that run code with a Cython twin (framers, the ISO 8583 codec, the WAL and its CRC)
# directly or through the gears built on it: `backend`, run again by the pure-Python pass.
BACKEND_SUITES = (
    "test_backend",
    "test_framing",
    "test_iso8583_",
    "test_iso_",
    "test_io_",
    "test_wal_",
    "test_msg",
    "test_tcp_abuse",
    "test_lanes_units",
    "test_shipper",
)


# End-to-end failure runs over 8 s each (quiet 2-core box): marker `long`, run by
# `make test-long`, kept out of `make test` so it stays under its 15 minutes.
LONG_TESTS = (
    "test_rack_crash.py::test_rack_process_killed_50_times_keeps_every_durable_record",
    "test_reload_handover.py::test_bench_rebuild_io_hands_every_connection_over_and_loses_nothing",
    "test_mixer_continuity.py::test_mixer_down_60s_under_load_then_drains",
    "test_mixer_continuity.py::test_snake_sigkilled_three_times_under_load",
    "test_cluster_nodes.py::test_a_rack_whose_node_dies_reconnects_to_another_and_carries_on",
    "test_cluster_nodes.py::test_sigkill_of_the_stream_leader_under_guaranteed_traffic",
    "test_mixer_guard.py::test_hostile_requests_answered_while_heartbeats_flow",
    # 8-21 s each; moved in session 4 to keep make test under 15 minutes on 2 cores
    # 20-24 s each; moved in session 5 (the CI run at 52d1d7e took 15 min 24 s)
    "test_console_browser.py::test_console_against_up",
    "test_cluster_up.py::test_up_cluster_3",
    "test_mixer_ingest_outage.py::test_clickhouse_stopped_under_load_loses_and_doubles_nothing",
    "test_mixer_shared_state.py::test_a_partitioned_node_cannot_write_and_converges_on_rejoin",
    "test_cluster_nodes.py::test_three_nodes_form_one_cluster_with_r3_streams_and_open_nothing_else",
    "test_mixer_ingest_cluster.py::test_every_mixer_node_of_a_cluster_answers_every_telemetry_query",
    "test_rack_group_inputs.py::test_a_suspended_members_share_moves_to_the_others_and_comes_back",
    "test_rack_group_inputs.py::test_a_message_delivered_too_often_is_parked_as_poison_never_retried",
    "test_rack_group_inputs.py::test_only_members_may_pull_the_group_consumer_or_use_its_relay",
    "test_rack_group_switch.py::test_switch_group_behind_haproxy_survives_a_sigkill",
    "test_mixer_wal_enospc.py::test_lane_wal_full_disk_holds_the_emitter_heals_and_delivers_everything_once",
    "test_mixer_wal_enospc.py::test_a_lane_wal_that_cannot_open_does_not_stop_the_rack",
    "test_mixer_lane_quota.py::",
    "test_rack_groups.py::test_group_gears_run_on_every_member_and_membership_changes_touch_no_other",
    "test_reload.py::test_100_sighup_reloads_at_1000_msgs_per_s_lose_nothing",
    "test_wal_crash.py::test_sigkill_during_appends_loses_nothing_acknowledged",
    "test_io_serial.py::test_115200_baud_stream_for_10_seconds_without_loss",
    # The four give-back runs of test_mixer_lanes (7-10 s each) are back in make test since
    # session 7: they guard the order of what a stopped or killed receiver gives back.
    # issue 13: a Rack renamed while cut off (~11 s) / while connected, by the CLI (~8.5 s)
    "test_mixer_rename.py::",
)


def pytest_collection_modifyitems(config, items):
    """Mixer suites are marked `mixer`: the pure-Python pass of `make test` skips them (the
    Mixer has no Cython twins), the compiled pass runs them. Suites exercising a twin are
    marked `backend`: the pure-Python pass runs those."""
    for item in items:
        name = item.fspath.basename
        if name.startswith("test_mixer_"):
            item.add_marker(pytest.mark.mixer)
        if name.startswith(BACKEND_SUITES):
            item.add_marker(pytest.mark.backend)
        if f"{name}::{item.name}".startswith(LONG_TESTS):
            item.add_marker(pytest.mark.long)


# -- a timed-out async test says where each of its tasks waits ----------------------------------
# pytest-timeout dumps the threads; an asyncio test that hangs is one thread idle in poll, so
# its dump alone does not say which await never returned. Its SIGALRM handler runs on the
# loop's thread, where the tasks can be read safely: one line each, innermost awaits last.
def _await_chain(coro) -> str:
    where = []
    while coro is not None and len(where) < 32:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            break
        where.append(f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno} {frame.f_code.co_name}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return " > ".join(where[-5:])


def _dump_stacks_and_tasks(terminal) -> None:
    _dump_thread_stacks(terminal)
    import asyncio

    try:
        tasks = asyncio.all_tasks()
    except RuntimeError:  # no loop running on this thread
        return
    terminal.sep("~", title=f"{len(tasks)} asyncio tasks")
    for task in sorted(tasks, key=lambda t: t.get_name()):
        terminal.write(f"{task.get_name()}: {_await_chain(task.get_coro())}\n")


try:
    import pytest_timeout

    _dump_thread_stacks = pytest_timeout.dump_stacks
    pytest_timeout.dump_stacks = _dump_stacks_and_tasks
except (ImportError, AttributeError):  # another pytest-timeout: its own dump only
    pass


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
