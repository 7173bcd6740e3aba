"""`fluxrig-mixer up` as an operator runs it: a real Mixer (nats-server child, DuckDB file), a
real `fluxrig run` child, real sockets on free loopback ports.

The process is started from an empty directory (so it finds the scenarios through the
checkout), we wait for its printed readiness, then: the echo port answers upper-cased, ISO 8583
0800/0200 get 0810/0210 with 39=00, the API shows the local Rack active with the merged
scenario applied, the Rack's logs are queryable, a killed Rack comes back by itself, and
SIGTERM stops everything with exit 0 and no child left behind."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from fluxrig_mixer.up import SCENARIO_FILES, load_standard_tier, merge_scenarios

from fluxrig.errors import ScenarioError
from fluxrig.framing.config import make_framer
from fluxrig.iso8583 import load_spec
from fluxrig.tools.iso_load import build_request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCENARIOS = os.path.join(ROOT, "scenarios")
READY_LINE = "fluxrig-mixer up: ready"
READY_TIMEOUT_S = 30
STOP_TIMEOUT_S = 25


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> dict[int, str]:
    """pid -> command line of the direct children of `pid` (from /proc)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    out[int(entry)] = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
    return out


def _procs_mentioning(text: str) -> dict[int, str]:
    """Live processes whose command line contains `text` (e.g. a state dir)."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd and _alive(int(entry)):
                out[int(entry)] = cmd
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def _echo(port: int, line: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(line + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return data


def _iso_exchange(port: int, requests: list[dict]) -> list[dict]:
    spec = load_spec("moov:spec87ascii")
    framer = make_framer({"framing": "len2_be"})
    replies: list[dict] = []
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"".join(framer.encode(spec.encode(r)) for r in requests))
        while len(replies) < len(requests):
            chunk = s.recv(65536)
            assert chunk, "the authorizer closed the connection"
            replies += [spec.decode(frame) for frame in framer.feed(chunk)]
    return replies


class UpProcess:
    def __init__(self, args: list[str], cwd: str, stderr_path: str):
        self.stderr = open(stderr_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fluxrig_mixer.cli", "up", *args],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            env=dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "mixer")])),
        )
        self.lines: queue.Queue = queue.Queue()
        self.out: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            self.lines.put(raw.decode(errors="replace"))
        self.lines.put(None)

    def wait_ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                break
            self.out.append(line)
            if line.strip() == READY_LINE:
                return "".join(self.out)
        raise AssertionError(f"no readiness line; stdout so far:\n{''.join(self.out)}\nstderr:\n{self.stderr_text()}")

    def stderr_text(self) -> str:
        self.stderr.flush()
        with open(self.stderr.name, "rb") as fh:
            return fh.read().decode(errors="replace")[-4000:]


def test_up_standard_tier(tmp_path):
    api_port, snake_port, echo_port, iso_port = (_free_port() for _ in range(4))
    state = tmp_path / "state"
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    up = UpProcess(
        [
            "--state-dir",
            str(state),
            "--api-port",
            str(api_port),
            "--snake-port",
            str(snake_port),
            "--echo-port",
            str(echo_port),
            "--iso-port",
            str(iso_port),
        ],
        str(cwd),
        str(tmp_path / "up.err"),
    )
    known: dict[int, str] = {}
    try:
        banner = up.wait_ready(READY_TIMEOUT_S)
        # The banner names the token's file, never the token (issue 12 item 6).
        token_file = re.search(r"API token\s+FLUXRIG_API_TOKEN_FILE=(\S+)", banner).group(1)
        assert token_file == str(state / "api-token")
        token = (state / "api-token").read_text().strip()
        assert token not in banner and token not in up.stderr_text()
        assert f"http://127.0.0.1:{api_port}" in banner and f"tls://127.0.0.1:{snake_port}" in banner
        assert f"127.0.0.1:{echo_port}" in banner and f":{iso_port}" in banner
        assert f"iso8583 load --target 127.0.0.1:{iso_port}" in banner and "admin racks list" in banner
        assert f"FLUXRIG_API_TOKEN_FILE={token_file}" in banner
        known = _children(up.proc.pid)
        assert any("nats-server" in c for c in known.values()), known
        assert any("fluxrig.cli.main run" in c for c in known.values()), known
        # No secret in any process's argv (what `ps` shows): neither the API token, nor the
        # enrollment tokens of the bundles, nor an NKey seed.
        from fluxrig.wire.bundle import read_bundle

        secrets_ = [token, (state / "rack" / "identity.nkey").read_text().strip()]
        secrets_ += [read_bundle(str(p)).token for p in (state / "enroll-bundle", state / "rack" / "enroll-bundle")]
        argvs = [*known.values(), " ".join(up.proc.args)]
        for secret in filter(None, secrets_):
            assert not [a for a in argvs if secret in a], "a secret is in a command line"
        bad = [p for p in state.rglob("*") if not p.is_symlink() and p.stat().st_mode & 0o077]
        assert bad == [], bad  # nothing under either state dir is group/other-readable

        # The Rack's config is private (it names its enrollment bundle, which holds a token).
        assert (os.stat(state / "rack" / "fluxrig.toml").st_mode & 0o777) == 0o600

        assert _echo(echo_port, b"hello standard tier") == b"HELLO STANDARD TIER\n"

        replies = _iso_exchange(
            iso_port,
            [
                build_request("0800", 1, "UPTEST01", ""),
                build_request("0200", 2, "UPTEST01", "000000000002", amount=1234),
            ],
        )
        by_mti = {r.get(0): r for r in replies}
        assert set(by_mti) == {"0810", "0210"}, replies
        assert by_mti["0810"].get(39) == "00" and by_mti["0210"].get(39) == "00", replies
        assert by_mti["0210"].get(11) == "000002"

        with httpx.Client(
            base_url=f"http://127.0.0.1:{api_port}", headers={"Authorization": f"Bearer {token}"}, timeout=10
        ) as api:
            assert httpx.get(f"http://127.0.0.1:{api_port}/api/v1/racks", timeout=10).status_code == 401
            racks = api.get("/api/v1/racks").json()
            local = [r for r in racks if r["name"] == "local"]
            assert local and local[0]["status"] == "active", racks
            active = api.get("/api/v1/scenarios/active").json()
            assert "standard-tier" in str(active), active
            assert local[0]["scenario"]["apply_state"] == "applied", local
            version = local[0]["scenario"]["version"]
            assert version.startswith("1.0.0@") and version in str(active), (version, active)

            def rack_logs():
                return api.get("/api/v1/telemetry/logs", params={"rack": "local", "limit": 200}).json()

            def listening_logs():
                # The Rack's first lines (passport, apply) may ship in a batch before the gears' own.
                return [row for row in rack_logs() if "listening" in (row.get("body") or "")]

            try:
                _wait(listening_logs, 30, "the local Rack's 'listening' logs in DuckDB")
            except AssertionError as exc:
                raise AssertionError(f"{exc}; logs seen: {[row.get('body') for row in rack_logs()][:20]}") from None

            # Supervised: a Rack killed outright is started again and serves again.
            rack_pid = next(p for p, c in known.items() if "fluxrig.cli.main run" in c)
            os.kill(rack_pid, signal.SIGKILL)

            def restarted():
                pids = [p for p, c in _children(up.proc.pid).items() if "fluxrig.cli.main run" in c and p != rack_pid]
                return pids[0] if pids else None

            new_pid = _wait(restarted, 10, "the Rack restarted by up")
            known[new_pid] = "rack (restarted)"

            def echo_again():
                try:
                    return _echo(echo_port, b"back") == b"BACK\n"
                except OSError:
                    return False

            _wait(echo_again, 15, "echo served by the restarted Rack")

        up.proc.send_signal(signal.SIGTERM)
        assert up.proc.wait(STOP_TIMEOUT_S) == 0, up.stderr_text()
        err = up.stderr_text()
        assert err.index("stopping the local Rack") < err.index("stopping the Mixer"), err
        leftovers = {p: c for p, c in known.items() if _alive(p)}
        assert not leftovers, leftovers
        assert not _procs_mentioning(str(state)), _procs_mentioning(str(state))
        for port in (api_port, snake_port, echo_port, iso_port):
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", port))
    finally:
        if up.proc.poll() is None:
            up.proc.kill()
            up.proc.wait(10)
        for pid in list(known) + list(_children(up.proc.pid)):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        up.stderr.close()


def test_up_refuses_a_busy_port(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "fluxrig_mixer.cli",
                "up",
                "--state-dir",
                str(tmp_path / "s"),
                "--api-port",
                str(_free_port()),
                "--snake-port",
                str(_free_port()),
                "--iso-port",
                str(_free_port()),
                "--echo-port",
                str(port),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=str(tmp_path),
            env=dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "mixer")])),
        )
    assert r.returncode == 2, r.stderr
    assert f"127.0.0.1:{port}" in r.stderr and "--echo-port" in r.stderr
    assert not (tmp_path / "s" / "snake").exists()  # nothing was started


def test_merged_scenario_is_generated_from_the_two_files():
    doc, text = load_standard_tier(SCENARIOS)
    names = [g["name"] for g in doc["gears"]]
    assert len(names) == len(set(names))
    assert {"gateway", "upper", "acquirer", "decode", "authorizer", "encode"} == set(names)
    assert "${FLUXRIG_ECHO_BIND:-" in text and "${FLUXRIG_ISO_BIND:-" in text
    assert all(f in text for f in SCENARIO_FILES)


def test_merge_names_a_clash():
    with open(os.path.join(SCENARIOS, "tcp-echo.yaml")) as fh:
        echo = fh.read()
    clash = echo.replace("echo-port", "x")
    with pytest.raises(ScenarioError) as err:
        merge_scenarios([("a/tcp-echo.yaml", echo), ("b/again.yaml", clash)])
    text = str(err.value)
    assert "'gateway' is also defined in tcp-echo.yaml" in text and "again.yaml" in text


def test_up_gives_up_cleanly_when_the_rack_is_not_ready(tmp_path):
    state = tmp_path / "state"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fluxrig_mixer.cli",
            "up",
            "--state-dir",
            str(state),
            "--ready-timeout",
            "1ms",
            *[
                a
                for flag in ("--api-port", "--snake-port", "--echo-port", "--iso-port")
                for a in (flag, str(_free_port()))
            ],
        ],
        capture_output=True,
        text=True,
        timeout=40,
        cwd=str(tmp_path),
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "mixer")])),
    )
    assert r.returncode == 1, r.stderr[-3000:]
    assert "not ready after" in r.stderr and "ready" not in r.stdout
    assert r.stderr.index("stopping the local Rack") < r.stderr.index("stopping the Mixer")
    assert not _procs_mentioning(str(state)), _procs_mentioning(str(state))
