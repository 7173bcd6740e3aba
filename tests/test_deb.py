"""The Debian packages of `make deb` (packaging/deb.py), built from the real frozen programs
(marker `image`: `make image-test`; minutes, root for the install tests; not in `make test`).

* Reproducible: two builds give byte-identical .deb files.
* lintian reports no error (warnings are printed); the control fields, the conffile, the
  maintainer scripts (valid sh), the unit starting /usr/bin/fluxrig are what the package says.
* Installed with dpkg into a Debian 12 rootfs with systemd in it (debootstrap, cached under
  build/deb-rootfs/amd64): the postinst made the fluxrig user from the sysusers.d entry, the
  state folders from the tmpfiles entry, gave the configuration to root:fluxrig 0640 and
  enabled the unit (the multi-user.target.wants link); the binary the unit starts (its
  ExecStart, Environment and User) serves the conffile's tcp-echo and answers; a purge removes
  the files and the enablement and keeps the state folder.
* arm64 / armhf: the same install and echo in the QEMU rootfs `make firmware-test` keeps
  (firmware-tests/cache/rootfs-<arch>, a minbase without systemd: the useradd path), when that
  rootfs and the arch's binary exist; skipped with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time

import pytest
from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "packaging"))
import deb  # noqa: E402
import frozen  # noqa: E402
import image  # noqa: E402

pytestmark = [pytest.mark.image, pytest.mark.timeout(2400)]

ROOTFS_CACHE = os.path.join(ROOT, "build", "deb-rootfs")
ROOTFS_PACKAGES = "systemd,systemd-sysv,init-system-helpers,passwd,zlib1g"
CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"
ECHO_TIMEOUT_S = 90.0  # QEMU on a shared box: the first start of an emulated Python is slow


class DebBuilds:
    """Each package built twice into fresh folders, on first use (a test of the Rack's package
    alone does not wait for the Mixer's): {arch: path} of the first build."""

    def __init__(self, base):
        self.base = base
        self.epoch = image.default_epoch()
        self.done: dict[str, tuple[dict, dict]] = {}

    def pair(self, name: str) -> tuple[dict, dict]:
        if name not in self.done:
            a = deb.build([name], str(self.base.mktemp(f"{name}-a")), self.epoch, log=print).get(name, {})
            b = deb.build([name], str(self.base.mktemp(f"{name}-b")), self.epoch, log=print).get(name, {})
            self.done[name] = (a, b)
        return self.done[name]

    def __getitem__(self, name: str) -> dict:
        return self.pair(name)[0]

    def items(self):
        return [(name, self[name]) for name in deb.PACKAGES]


@pytest.fixture(scope="module")
def debs(tmp_path_factory):
    return DebBuilds(tmp_path_factory)


def _sha(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


@pytest.mark.parametrize("name", list(deb.PACKAGES))
def test_two_builds_are_byte_identical(debs, name):
    first, second = debs.pair(name)
    assert "amd64" in first
    for arch, path in first.items():
        assert os.path.basename(path) == f"{name}_{image._version()}_{arch}.deb"
        assert _sha(path) == _sha(second[arch]), arch
        print(f"{os.path.basename(path)}: {os.path.getsize(path) / 1e6:.1f} MB sha256 {_sha(path)}")


def test_lintian_reports_no_errors(debs):
    lintian = shutil.which("lintian")
    if not lintian:
        pytest.fail("lintian is missing: packaging/install-dist-tools.sh installs it (make image-test does)")
    for _name, archs in debs.items():
        for path in archs.values():
            r = subprocess.run([lintian, "--fail-on", "error", path], capture_output=True, text=True, timeout=900)
            print(f"lintian {os.path.basename(path)}:\n{r.stdout}{r.stderr}")
            assert r.returncode == 0, r.stdout
            assert not [ln for ln in r.stdout.splitlines() if ln.startswith("E:")], r.stdout


def _field(path: str, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", path, name], capture_output=True, text=True, check=True).stdout.strip()


def _member(path: str, member: str) -> str:
    """A file of the package's control area."""
    raw = subprocess.run(["dpkg-deb", "--ctrl-tarfile", path], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return tar.extractfile(f"./{member}").read().decode()


def test_control_conffile_scripts_and_unit(debs, tmp_path):
    for name, archs in debs.items():
        p = deb.PACKAGES[name]
        for arch, path in archs.items():
            assert _field(path, "Package") == name and _field(path, "Architecture") == arch
            assert _member(path, "conffiles").split() == [f"/{p['conf']}"]
            for script in ("postinst", "prerm", "postrm"):
                text = _member(path, script)
                assert text.startswith("#!/bin/sh\nset -e\n"), script
                check = subprocess.run(["sh", "-n"], input=text, capture_output=True, text=True)
                assert check.returncode == 0, (script, check.stderr)
            assert "deb-systemd-helper enable" in _member(path, "postinst")
            out = tmp_path / f"{name}-{arch}"
            subprocess.run(["dpkg-deb", "-x", path, str(out)], check=True)
            unit = (out / "lib/systemd/system" / p["unit"]).read_text()
            assert re.search(rf"^ExecStart={re.escape(p['exec_to'])} ", unit, re.M), unit
            assert os.access(out / p["exec_to"].lstrip("/"), os.X_OK)
            assert (out / "usr/lib/sysusers.d" / f"{p['user']}.conf").read_text().count("\nu ") == 1
            assert (out / p["conf"]).stat().st_mode & 0o777 == 0o640


# -- installing -----------------------------------------------------------------------------------
def _need_root():
    if os.geteuid() != 0:
        pytest.skip("installing into a rootfs needs root (chroot, mounts)")


def amd64_rootfs() -> str:
    """A Debian 12 minbase rootfs with systemd, made once by debootstrap and copied per test."""
    base = os.path.join(ROOTFS_CACHE, "amd64")
    if not os.path.exists(os.path.join(base, ".complete")):
        if not shutil.which("debootstrap"):
            pytest.fail("debootstrap is missing: packaging/install-dist-tools.sh installs it")
        shutil.rmtree(base, ignore_errors=True)
        os.makedirs(ROOTFS_CACHE, exist_ok=True)
        t0 = time.monotonic()
        r = subprocess.run(
            ["nice", "-n", "10", "debootstrap", "--variant=minbase", f"--include={ROOTFS_PACKAGES}", "bookworm", base],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        open(os.path.join(base, ".complete"), "w").close()
        print(f"debootstrap amd64: {time.monotonic() - t0:.0f} s")
    return base


@contextlib.contextmanager
def mounted(root: str):
    """/proc and /dev inside `root` for the time of a test (what a booted system would have)."""
    done = []
    try:
        for src, kind in (("/proc", "proc"), ("/dev", "bind")):
            dest = os.path.join(root, src.lstrip("/"))
            os.makedirs(dest, exist_ok=True)
            cmd = ["mount", "-t", "proc", "proc", dest] if kind == "proc" else ["mount", "--bind", src, dest]
            subprocess.run(cmd, check=True, capture_output=True)
            done.append(dest)
        yield root
    finally:
        for dest in reversed(done):
            subprocess.run(["umount", "-l", dest], capture_output=True)


def _chroot(root: str, *argv: str, **kw) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run([CHROOT, root, *argv], capture_output=True, text=True, env=env, **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _echo(port: int, deadline: float, proc: subprocess.Popen) -> bytes:
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"from the package\n")
                return s.recv(100)
        except OSError:
            time.sleep(0.5)
    return b""


def install_and_echo(root: str, path: str, tmp_path, expect_enabled: bool) -> None:
    """dpkg -i into `root`; check what postinst did; run what the unit runs; get an echo; purge."""
    shutil.copy(path, os.path.join(root, "tmp", os.path.basename(path)))
    r = _chroot(root, "dpkg", "-i", f"/tmp/{os.path.basename(path)}", timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    r = _chroot(root, "getent", "passwd", "fluxrig")
    assert r.returncode == 0 and "/var/lib/fluxrig" in r.stdout, r
    uid = int(r.stdout.split(":")[2])
    assert uid < 1000, r.stdout  # a system user
    gid = int(_chroot(root, "getent", "group", "fluxrig").stdout.split(":")[2])
    st = os.stat(os.path.join(root, "etc/fluxrig/fluxrig.toml"))
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, gid, 0o640)
    for d in ("var/lib/fluxrig", "var/lib/fluxrig/tmp"):
        st = os.stat(os.path.join(root, d))
        assert (st.st_uid, st.st_mode & 0o777) == (uid, 0o750), d
    wants = os.path.join(root, "etc/systemd/system/multi-user.target.wants/fluxrig.service")
    assert os.path.islink(wants) == expect_enabled, wants
    # What the unit starts, as the unit starts it.
    unit = open(os.path.join(root, "lib/systemd/system/fluxrig.service")).read()
    argv = re.search(r"^ExecStart=(.+)$", unit, re.M).group(1).split()
    env = {k: v for k, v in (e.split("=", 1) for e in re.findall(r"^Environment=(\S+)$", unit, re.M))}
    port = _free_port()
    env.update(PATH="/usr/bin:/bin", FLUXRIG_ECHO_BIND=f"127.0.0.1:{port}")
    user = re.search(r"^User=(\S+)$", unit, re.M).group(1)
    err = open(tmp_path / "rack.err", "wb")
    proc = subprocess.Popen([CHROOT, f"--userspec={user}:{user}", root, *argv], env=env, stderr=err, cwd="/")
    try:
        answer = _echo(port, time.monotonic() + ECHO_TIMEOUT_S, proc)
        assert answer == b"FROM THE PACKAGE\n", (answer, open(tmp_path / "rack.err", "rb").read()[-3000:])
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        err.close()
    r = _chroot(root, "dpkg", "--purge", "fluxrig", timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not os.path.exists(os.path.join(root, "usr/bin/fluxrig"))
    assert not os.path.exists(os.path.join(root, "etc/fluxrig/fluxrig.toml"))
    assert not os.path.lexists(wants)
    assert os.path.isdir(os.path.join(root, "var/lib/fluxrig"))  # state kept, and said so
    assert "left in place" in r.stderr


def test_amd64_package_installs_and_echoes(debs, tmp_path):
    _need_root()
    base = amd64_rootfs()
    root = str(tmp_path / "rootfs")
    subprocess.run(["cp", "-a", base, root], check=True)
    with mounted(root):
        install_and_echo(root, debs["fluxrig"]["amd64"], tmp_path, expect_enabled=True)


@pytest.mark.parametrize("arch", ["arm64", "armhf"])
def test_arm_package_installs_and_echoes_under_qemu(debs, tmp_path, arch):
    _need_root()
    path = debs["fluxrig"].get(arch)
    rootfs = os.path.join(frozen.firmware_cache(), f"rootfs-{arch}")
    if path is None:
        pytest.skip(f"no {arch} Rack binary: make firmware-test builds firmware-tests/cache/bin-{arch}/fluxrig")
    if not os.path.exists(os.path.join(rootfs, "usr/bin/dpkg")):
        pytest.skip(f"no {arch} rootfs: make firmware-test keeps it in {rootfs}")
    root = str(tmp_path / "rootfs")
    subprocess.run(["cp", "-a", rootfs, root], check=True)
    with mounted(root):
        install_and_echo(
            root, path, tmp_path, expect_enabled=os.path.exists(os.path.join(root, "usr/bin/deb-systemd-helper"))
        )


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            out += [int(c) for c in open(f"/proc/{pid}/task/{task}/children").read().split()]
        except OSError:
            pass
    return out


def _nsenter(leader: int, *argv: str, ns: str = "-a", **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["nsenter", "-t", str(leader), ns, *argv], capture_output=True, text=True, **kw)


def test_amd64_package_under_systemd_nspawn_boot(debs, tmp_path):
    """dpkg -i inside a booted Debian 12 (systemd-nspawn -b, own network): the unit comes up
    active with the scenario in its status line and echoes on the container's loopback.
    Where nspawn is missing or cannot boot a container here, skipped with its words printed;
    every step is bounded (boot 120 s, dpkg 600 s, active 90 s, poweroff 60 s, then kill)."""
    _need_root()
    nspawn = shutil.which("systemd-nspawn")
    if not nspawn:
        print("SKIP nspawn: systemd-nspawn is missing (Debian's systemd-container)")
        pytest.skip("systemd-nspawn is missing (Debian's systemd-container)")
    root = str(tmp_path / "rootfs")
    subprocess.run(["cp", "-a", amd64_rootfs(), root], check=True)
    path = debs["fluxrig"]["amd64"]
    # not /tmp: the booted system mounts a fresh tmpfs over it
    shutil.copy(path, os.path.join(root, "root", os.path.basename(path)))
    console = open(tmp_path / "boot.log", "wb")
    name = f"fxdeb{os.getpid()}"
    boot = subprocess.Popen(
        [nspawn, "-q", "-D", root, "-M", name, "--register=no", "--keep-unit", "--private-network", "-b"],
        stdin=subprocess.DEVNULL,
        stdout=console,
        stderr=subprocess.STDOUT,
    )
    try:
        t0 = time.monotonic()
        leader, deadline = None, t0 + 120
        while time.monotonic() < deadline and boot.poll() is None:
            kids = [k for k in _children(boot.pid) if open(f"/proc/{k}/comm").read().strip() == "systemd"]
            if kids:
                state = _nsenter(kids[0], "systemctl", "is-system-running", timeout=30).stdout.strip()
                if state in ("running", "degraded"):
                    leader = kids[0]
                    booted_s = time.monotonic() - t0
                    break
            time.sleep(1)
        if leader is None:
            log = open(tmp_path / "boot.log", "rb").read()[-2000:].decode(errors="replace")
            if boot.poll() is not None:
                why = f"systemd-nspawn cannot boot a container here: {log.strip().splitlines()[-1:]}"
                print(f"SKIP nspawn: {why}")
                pytest.skip(why)
            raise AssertionError(f"the container did not finish booting in 120 s: {log}")
        t1 = time.monotonic()
        r = _nsenter(leader, "dpkg", "-i", f"/root/{os.path.basename(path)}", timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        deadline, active = time.monotonic() + 90, ""
        while time.monotonic() < deadline:
            active = _nsenter(leader, "systemctl", "is-active", "fluxrig.service", timeout=30).stdout.strip()
            if active == "active":
                active_s = time.monotonic() - t1
                break
            time.sleep(1)
        status = _nsenter(leader, "systemctl", "status", "--no-pager", "fluxrig.service", timeout=30).stdout
        assert active == "active", status
        assert _nsenter(leader, "systemctl", "is-enabled", "fluxrig.service").stdout.strip() == "enabled"
        text = _nsenter(leader, "systemctl", "show", "-p", "StatusText", "--value", "fluxrig.service").stdout
        assert "tcp-echo" in text, (text, status)
        probe = (
            "import socket; s = socket.create_connection(('127.0.0.1', 9000), timeout=10); "
            "s.sendall(b'under systemd\\n'); print(s.recv(100))"
        )
        echo = _nsenter(leader, sys.executable, "-c", probe, ns="-n", timeout=60)
        assert "UNDER SYSTEMD" in echo.stdout, echo
        print(f"nspawn: booted ({state}) in {booted_s:.1f} s; dpkg -i to fluxrig.service {active} in "
              f"{active_s:.1f} s, status {text.strip()!r}, echo {echo.stdout.strip()}")  # fmt: skip
    finally:
        if boot.poll() is None:
            if leader:
                _nsenter(leader, "systemctl", "poweroff", timeout=30)
            else:  # not booted (yet): nspawn turns SIGTERM into the container's shutdown
                boot.terminate()
            try:
                boot.wait(60)
            except subprocess.TimeoutExpired:
                boot.kill()
                boot.wait(30)
        console.close()
