"""The OCI images of `make image` (packaging/image.py), built for real: frozen programs, Debian's
own packages for the base (marker `image`: `make image-test`, minutes; not in `make test`).

* Reproducible: two builds of the same tree into fresh folders give the same index digest
  and byte-identical archives.
* The layout verifies from index.json down: every blob named by its sha256 and of its declared
  size, the config's diff_ids the sha256 of the uncompressed layers; user 65532, labels with
  version, commit and the SBOM's digest (checked against the file in the image), a HEALTHCHECK
  that runs `<program> healthcheck`; no shell, no package manager, no setuid file inside.
* Sizes, compressed: the Rack image <= 20 MB, the Mixer image <= 120 MB.
* Unpacked (the layers applied in order into a folder) the entrypoint runs from that root with
  no container runtime (chroot, as uid 65532): `version`, then the Rack serves tcp-echo and
  answers, and its `healthcheck` (the image's) exits 0; the Mixer's `version` runs.
* podman loads the image with its user, labels and HEALTHCHECK, and runs it read-only where its
  runtime can start containers here (skipped with podman's reason where it cannot).
* The arm Racks `make firmware-test` leaves are packed only when built from this tree's source
  (firmware-tests/src-hash.sh, the one definition run.sh records): a binary with another or no
  recorded hash is refused before anything is written, naming the arch, both hashes and
  commits and `make firmware-test`; `--allow-stale-arm` / FLUXRIG_ALLOW_STALE_ARM=1 packs it
  with a WARNING and the label io.fluxrig.binary.stale=true. src-hash.sh changes with the
  Rack's sources and not with the tests or the image writer.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
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

pytestmark = [pytest.mark.image, pytest.mark.timeout(1800)]

RACK_MAX_BYTES = 20_000_000
MIXER_MAX_BYTES = 120_000_000
UID = 65532
SHELLS = ("bin/sh", "bin/bash", "bin/dash", "usr/bin/sh", "usr/bin/bash", "usr/bin/dash", "bin/busybox")
PACKAGE_MANAGERS = ("usr/bin/dpkg", "usr/bin/apt", "usr/bin/apt-get", "sbin/apk", "usr/bin/apk")


class Builds:
    """Each program's image built twice into fresh folders, on first use (a test of the Rack
    alone does not wait for the Mixer's frozen build)."""

    def __init__(self, base):
        self.base = base
        self.epoch = image.default_epoch()
        self.done: dict[str, tuple[dict, dict]] = {}

    def pair(self, prog: str) -> tuple[dict, dict]:
        if prog not in self.done:
            t0 = time.monotonic()
            a = image.build([prog], str(self.base.mktemp(f"{prog}-a")), self.epoch, ["amd64"], log=print)[prog]
            print(f"{prog}: first build {time.monotonic() - t0:.0f} s (frozen build cached or made)")
            b = image.build([prog], str(self.base.mktemp(f"{prog}-b")), self.epoch, ["amd64"], log=print)[prog]
            self.done[prog] = (a, b)
        return self.done[prog]

    def __getitem__(self, prog: str) -> dict:
        return self.pair(prog)[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return Builds(tmp_path_factory)


def blob(layout: str, digest: str) -> bytes:
    with open(os.path.join(layout, "blobs", "sha256", digest.split(":", 1)[1]), "rb") as fh:
        data = fh.read()
    assert "sha256:" + hashlib.sha256(data).hexdigest() == digest, digest
    return data


def manifest_of(layout: str, arch: str = "amd64") -> tuple[dict, dict, list[bytes]]:
    """(manifest, config, uncompressed layers) of the `arch` image in `layout`, every step checked."""
    top = json.load(open(os.path.join(layout, "index.json")))
    assert json.load(open(os.path.join(layout, "oci-layout"))) == {"imageLayoutVersion": "1.0.0"}
    (ref,) = top["manifests"]
    index = json.loads(blob(layout, ref["digest"]))
    assert len(blob(layout, ref["digest"])) == ref["size"]
    oci_arch = image.DEBIAN_ARCH[arch][0]
    (desc,) = [m for m in index["manifests"] if m["platform"]["architecture"] == oci_arch]
    assert desc["platform"].get("variant", "") == image.DEBIAN_ARCH[arch][1], desc["platform"]
    raw = blob(layout, desc["digest"])
    assert len(raw) == desc["size"]
    manifest = json.loads(raw)
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    config_raw = blob(layout, manifest["config"]["digest"])
    assert len(config_raw) == manifest["config"]["size"]
    config = json.loads(config_raw)
    layers = []
    for layer in manifest["layers"]:
        data = blob(layout, layer["digest"])
        assert len(data) == layer["size"] and layer["mediaType"].endswith("tar+gzip")
        layers.append(gzip.decompress(data))
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(x).hexdigest() for x in layers]
    return manifest, config, layers


def unpack(layers: list[bytes], dest: str) -> dict[str, tarfile.TarInfo]:
    """Apply the layers in order (as a runtime would: later entries replace earlier ones)."""
    seen: dict[str, tarfile.TarInfo] = {}
    for raw in layers:
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            for m in tar.getmembers():
                assert not os.path.basename(m.name).startswith(".wh."), m.name  # no whiteouts expected
                seen[m.name.rstrip("/")] = m
            tar.extractall(dest, numeric_owner=True, filter="fully_trusted")
    return seen


@pytest.mark.parametrize("prog", list(image.PROGRAMS))
def test_two_builds_give_the_same_digests(images, prog):
    first, second = images.pair(prog)
    assert first["index_digest"] == second["index_digest"]
    assert first["manifests"] == second["manifests"]
    with open(first["archive"], "rb") as fa, open(second["archive"], "rb") as fb:
        assert hashlib.sha256(fa.read()).digest() == hashlib.sha256(fb.read()).digest()
    print(f"{prog}: index {first['index_digest']} compressed {first['compressed_bytes']}")


@pytest.mark.parametrize("prog,limit", [("fluxrig", RACK_MAX_BYTES), ("fluxrig-mixer", MIXER_MAX_BYTES)])
def test_layout_config_labels_and_contents(images, prog, limit, tmp_path):
    res = images[prog]
    manifest, config, layers = manifest_of(res["layout"])
    size = res["compressed_bytes"]["amd64"]
    print(f"{prog}: {size / 1e6:.1f} MB compressed (limit {limit / 1e6:.0f} MB)")
    assert size <= limit, size
    c = config["config"]
    assert c["User"] == f"{UID}:{UID}"
    exe = f"/opt/{prog}/{prog}"
    assert c["Entrypoint"] == [exe] and c["Healthcheck"]["Test"] == ["CMD", exe, "healthcheck"]
    labels = c["Labels"]
    commit = _commit()
    assert labels["org.opencontainers.image.revision"] == commit
    assert labels["org.opencontainers.image.version"] == image._version()
    assert manifest["annotations"]["org.opencontainers.image.revision"] == commit
    root = tmp_path / "root"
    members = unpack(layers, str(root))
    sbom = (root / labels["io.fluxrig.sbom.path"].lstrip("/")).read_bytes()
    assert "sha256:" + hashlib.sha256(sbom).hexdigest() == labels["io.fluxrig.sbom.digest"]
    doc = json.loads(sbom)
    names = {p["name"] for p in doc["packages"]}
    assert {"libc6", "ca-certificates", "tzdata", prog}.issubset(names), names
    assert doc["spdxVersion"] == "SPDX-2.3"
    if prog == "fluxrig-mixer":
        assert {"duckdb", "fastapi", "nats-server"}.issubset(names), names
    # distroless: no shell, no package manager, no setuid/setgid file
    for path in SHELLS + PACKAGE_MANAGERS:
        assert path not in members, path
    assert not [n for n, m in members.items() if m.mode & 0o6000], "setuid/setgid files in the image"
    state = members[c["WorkingDir"].lstrip("/")]
    assert (state.uid, state.gid) == (UID, UID) and c["WorkingDir"].lstrip("/") + "" in members
    # the program is root's, not writable by the user it runs as
    assert members[exe.lstrip("/")].uid == 0 and not members[exe.lstrip("/")].mode & 0o022
    passwd = (root / "etc/passwd").read_text()
    assert f"{prog}:x:{UID}:{UID}:" in passwd and "/bin/sh" not in passwd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_image_user():
    def enter(root: str):
        os.chroot(root)
        os.chdir("/")
        os.setgroups([])
        os.setgid(UID)
        os.setuid(UID)

    return enter


def _in_root(root: str, argv: list[str], env: dict, **kw) -> subprocess.Popen:
    """Run `argv` inside the unpacked image root as uid 65532 (chroot: no container runtime)."""
    enter = _as_image_user()
    return subprocess.Popen(argv, preexec_fn=lambda: enter(root), env=env, cwd="/", **kw)


def _image_env(config: dict) -> dict:
    return dict(e.split("=", 1) for e in config["config"]["Env"])


def test_unpacked_rack_image_runs_tcp_echo(images, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("running from the unpacked root needs chroot (root); run make image-test as root")
    _, config, layers = manifest_of(images["fluxrig"]["layout"])
    root = str(tmp_path / "root")
    unpack(layers, root)
    env = _image_env(config)
    exe = config["config"]["Entrypoint"][0]
    out = subprocess.run(
        [exe, "version"], preexec_fn=lambda: _as_image_user()(root), env=env, capture_output=True, timeout=120
    )
    assert out.returncode == 0 and b"fluxrig" in out.stdout, out
    port = _free_port()
    state = os.path.join(root, "var/lib/fluxrig")
    shutil.copy(os.path.join(ROOT, "scenarios", "tcp-echo.yaml"), os.path.join(state, "tcp-echo.yaml"))
    os.chown(os.path.join(state, "tcp-echo.yaml"), UID, UID)
    env = dict(env, FLUXRIG_ECHO_BIND=f"127.0.0.1:{port}")
    err = open(tmp_path / "rack.err", "wb")
    proc = _in_root(root, [exe, "run", "--scenario", "/var/lib/fluxrig/tcp-echo.yaml"], env, stderr=err)
    try:
        deadline, answer = time.monotonic() + 60, b""
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
                    s.sendall(b"from the image\n")
                    answer = s.recv(100)
                    break
            except OSError:
                time.sleep(0.3)
        assert answer == b"FROM THE IMAGE\n", (answer, open(tmp_path / "rack.err", "rb").read()[-2000:])
        hc = config["config"]["Healthcheck"]["Test"][1:]
        check = subprocess.run(hc, preexec_fn=lambda: _as_image_user()(root), env=env, capture_output=True, timeout=60)
        assert check.returncode == 0, check
    finally:
        proc.terminate()
        proc.wait(60)
        err.close()


def test_unpacked_mixer_image_runs(images, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("running from the unpacked root needs chroot (root); run make image-test as root")
    _, config, layers = manifest_of(images["fluxrig-mixer"]["layout"])
    root = str(tmp_path / "root")
    unpack(layers, root)
    exe = config["config"]["Entrypoint"][0]
    env = _image_env(config)
    out = subprocess.run(
        [exe, "version"], preexec_fn=lambda: _as_image_user()(root), env=env, capture_output=True, timeout=120
    )
    assert out.returncode == 0 and b"fluxrig" in out.stdout + out.stderr, out
    nats = subprocess.run(
        ["/opt/fluxrig-mixer/nats-server", "--version"],
        preexec_fn=lambda: _as_image_user()(root),
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert nats.returncode == 0, nats


def _podman_reason() -> str | None:
    podman = shutil.which("podman")
    if not podman:
        return "podman is not installed here"
    r = subprocess.run([podman, "info"], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        return f"podman cannot run here: {(r.stderr or r.stdout).strip().splitlines()[-1:]}"
    return None


# podman's defaults ask for rlimits above what a VM or CI box may grant (RLIMIT_NOFILE 1048576).
PODMAN_LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]
RUNTIME_ERROR = re.compile(r"OCI runtime|OCI permission|crun:|runc:")


def _podman_runtimes() -> list[list[str]]:
    """podman's default OCI runtime, then runc when installed (crun refuses cgroup v1 hybrid hosts)."""
    return [[]] + ([["--runtime", shutil.which("runc")]] if shutil.which("runc") else [])


def test_podman_loads_and_runs_the_rack_image(images, tmp_path):
    """podman reads the image (the docker-save form, where it keeps the HEALTHCHECK) with the
    user, labels and health check as built, runs it with a read-only root: `version`, then
    tcp-echo answers on the host network and `podman healthcheck run` passes. Where no OCI
    runtime podman has can start a container on this machine, the run is skipped with
    podman's own words."""
    reason = _podman_reason()
    if reason:
        print(f"SKIP podman: {reason}")
        pytest.skip(reason)
    res = images["fluxrig"]
    tag = f"localhost/fluxrig:{image._version()}"
    load = subprocess.run(
        ["podman", "load", "-i", res["docker_archives"]["amd64"]], capture_output=True, text=True, timeout=600
    )
    assert load.returncode == 0 and tag in load.stdout + load.stderr, load
    name = f"fluxrig-test-{os.getpid()}"
    try:
        fmt = '{{json .HealthCheck.Test}}|{{.User}}|{{index .Labels "org.opencontainers.image.revision"}}'
        seen = subprocess.run(["podman", "image", "inspect", tag, "--format", fmt], capture_output=True, text=True)
        test, user, revision = seen.stdout.strip().split("|")
        assert json.loads(test) == ["CMD", "/opt/fluxrig/fluxrig", "healthcheck"] and user == f"{UID}:{UID}"
        assert revision == _commit()
        runtime, why = None, ""
        for rt in _podman_runtimes():
            r = subprocess.run(
                ["podman", *rt, "run", "--rm", "--read-only", "--network=none", *PODMAN_LIMITS, tag, "version"],
                capture_output=True,
                text=True,
                timeout=600,
            )
            if r.returncode == 0:
                assert "fluxrig" in r.stdout, r
                runtime = rt
                break
            errors = [ln for ln in r.stderr.splitlines() if RUNTIME_ERROR.search(ln)]
            assert errors, r  # anything but the runtime refusing to start is a failure of the image
            why = errors[-1]
        if runtime is None:
            print(f"SKIP podman run: {why}")
            pytest.skip(f"no OCI runtime podman has can start containers here: {why}")
        port = _free_port()
        scen = tmp_path / "tcp-echo.yaml"
        shutil.copy(os.path.join(ROOT, "scenarios", "tcp-echo.yaml"), scen)
        scen.chmod(0o644)
        run = subprocess.run(
            ["podman", *runtime, "run", "-d", "--name", name, "--read-only", "--network=host", *PODMAN_LIMITS,
             "-v", f"{scen}:/etc/fluxrig/tcp-echo.yaml:ro", "-e", f"FLUXRIG_ECHO_BIND=127.0.0.1:{port}",
             tag, "run", "--scenario", "/etc/fluxrig/tcp-echo.yaml"],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert run.returncode == 0, run
        deadline, answer = time.monotonic() + 60, b""
        while time.monotonic() < deadline and not answer:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
                    s.sendall(b"in podman\n")
                    answer = s.recv(100)
            except OSError:
                time.sleep(0.5)
        logs = subprocess.run(["podman", *runtime, "logs", name], capture_output=True, text=True).stderr[-2000:]
        assert answer == b"IN PODMAN\n", logs
        hc = subprocess.run(["podman", *runtime, "healthcheck", "run", name], capture_output=True, text=True)
        assert hc.returncode == 0, (hc, logs)
        print(f"podman {' '.join(runtime) or '(default runtime)'}: read-only run answered, healthcheck passed")
    finally:
        subprocess.run(["podman", "rm", "-f", name], capture_output=True)
        subprocess.run(["podman", "rmi", "-f", tag], capture_output=True)


def _commit() -> str:
    return subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


ARM = ("arm64", "armhf")


def test_arm_rack_images_verify_are_reproducible_and_run_under_qemu(tmp_path):
    """The multi-architecture index (issue 20 item 1): where `make firmware-test` left the arm
    Racks, the Rack image carries an arm64 and an armhf manifest beside amd64's; each layout
    verifies, its platform, user, labels and size are right, two builds give the same index,
    and each arm image's entrypoint answers `version` from its unpacked root under QEMU."""
    have = [a for a in ARM if os.path.exists(os.path.join(frozen.firmware_cache(), f"bin-{a}", "fluxrig"))]
    if not have:
        pytest.skip("no arm Rack binary: make firmware-test builds firmware-tests/cache/bin-<arch>/fluxrig")
    epoch = image.default_epoch()
    try:
        a = image.build(["fluxrig"], str(tmp_path / "a"), epoch, ["amd64", *have], log=print)["fluxrig"]
    except image.ImageError as exc:
        pytest.skip(f"the arm base packages cannot be fetched here: {exc}")
    b = image.build(["fluxrig"], str(tmp_path / "b"), epoch, ["amd64", *have], log=print)["fluxrig"]
    assert a["index_digest"] == b["index_digest"] and set(a["manifests"]) == {"amd64", *have}
    for arch in have:
        manifest, config, layers = manifest_of(a["layout"], arch)
        size = a["compressed_bytes"][arch]
        print(f"fluxrig {arch}: {size / 1e6:.1f} MB compressed (limit {RACK_MAX_BYTES / 1e6:.0f} MB)")
        assert size <= RACK_MAX_BYTES, size
        c = config["config"]
        assert config["architecture"] == image.DEBIAN_ARCH[arch][0] and c["User"] == f"{UID}:{UID}"
        assert c["Labels"]["org.opencontainers.image.revision"] == _commit()
        # built from this tree's source (image.build refuses a stale one; this says it was checked)
        assert c["Labels"]["io.fluxrig.binary.source-sha256"] == frozen.firmware_source_hash()
        assert "io.fluxrig.binary.stale" not in c["Labels"]
        print(f"fluxrig {arch}: binary built at commit {c['Labels']['io.fluxrig.binary.commit']}")
        if os.geteuid() != 0:
            continue
        root = str(tmp_path / f"root-{arch}")
        unpack(layers, root)
        proc = _in_root(root, [c["Entrypoint"][0], "version"], _image_env(config), stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE)  # fmt: skip
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and b"fluxrig" in out, (out, err[-2000:])
        print(f"fluxrig {arch} image: {out.decode().splitlines()[0]}")


# -- stale arm binaries ---------------------------------------------------------------------------
SRC_HASH = os.path.join(ROOT, "firmware-tests", "src-hash.sh")
OLD_HASH = "0" * 63 + "1"
OLD_COMMIT = "0123456789ab"


def _src_hash(root: str = ROOT, *args: str) -> str:
    r = subprocess.run([os.path.join(root, "firmware-tests", "src-hash.sh"), *args], capture_output=True, text=True)
    assert r.returncode == 0 and re.fullmatch(r"[0-9a-f]{64}\n", r.stdout), r
    return r.stdout.strip()


def _arm_binary_bytes() -> bytes:
    """A real arm64 Rack when make firmware-test left one (its own hash is not used here),
    else this interpreter's ELF: the check refuses before it reads the binary."""
    real = os.path.join(frozen.firmware_cache(), "bin-arm64", "fluxrig")
    with open(real if os.path.exists(real) else sys.executable, "rb") as fh:
        return fh.read()


@pytest.fixture
def arm_cache(tmp_path, monkeypatch):
    """A firmware cache (FIRMWARE_CACHE) holding an arm64 binary; the test writes its src.sha256."""
    cache = tmp_path / "cache"
    (cache / "bin-arm64").mkdir(parents=True)
    exe = cache / "bin-arm64" / "fluxrig"
    exe.write_bytes(_arm_binary_bytes())
    exe.chmod(0o755)
    (cache / "bin-arm64" / "commit").write_text(OLD_COMMIT + "\n")
    monkeypatch.setenv("FIRMWARE_CACHE", str(cache))
    monkeypatch.delenv(frozen.ALLOW_STALE_ENV, raising=False)
    return cache / "bin-arm64"


def test_src_hash_follows_the_rack_sources_only(tmp_path):
    """One definition of the source: the same hash twice and with --tar (what run.sh builds
    from, holding the Rack's sources and not the tests); in a clone of HEAD the same hash as
    this tree when clean, another after a change to fluxrig/, the same after a change to the
    tests or to packaging/image.py."""
    first = _src_hash()
    assert _src_hash() == first
    tar = tmp_path / "src.tar"
    assert _src_hash(ROOT, "--tar", str(tar)) == first == hashlib.sha256(tar.read_bytes()).hexdigest()
    names = tarfile.open(tar).getnames()
    assert "fluxrig/__init__.py" in names and "packaging/fluxrig.spec" in names, names[:20]
    assert not [n for n in names if n.startswith(("tests/", "mixer/"))] and "packaging/image.py" not in names
    clone = str(tmp_path / "clone")
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", ROOT, clone], check=True, capture_output=True)
    shutil.copy2(SRC_HASH, os.path.join(clone, "firmware-tests", "src-hash.sh"))  # this tree's script on HEAD's files
    base = _src_hash(clone)
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "fluxrig", "setup.py", "pyproject.toml",
                            "README.md", "packaging", "firmware-tests"], capture_output=True, text=True).stdout  # fmt: skip
    if not dirty:  # a committed tree: the clone's hash is this tree's
        assert base == first
    with open(os.path.join(clone, "tests", "test_image.py"), "a") as fh:
        fh.write("# a test change\n")
    with open(os.path.join(clone, "packaging", "image.py"), "a") as fh:
        fh.write("# an image writer change\n")
    assert _src_hash(clone) == base
    with open(os.path.join(clone, "fluxrig", "__init__.py"), "a") as fh:
        fh.write("# a Rack change\n")
    assert _src_hash(clone) != base


def _assert_refusal(text: str, built_hash: str) -> None:
    for part in ("arm64", built_hash, OLD_COMMIT, frozen.firmware_source_hash(), "make firmware-test",
                 "--allow-stale-arm", frozen.ALLOW_STALE_ENV):  # fmt: skip
        assert part in text, (part, text)
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    assert head.stdout.strip() in text, text


@pytest.mark.parametrize("recorded", ["other source", "no src.sha256"])
def test_stale_arm_binary_is_refused(arm_cache, tmp_path, recorded):
    """A binary of another source (or whose source was never recorded) is refused by
    image.build and deb.build, before any layout or package is written, and by the command
    (exit 1, the same words); the previous output stays."""
    built = OLD_HASH if recorded == "other source" else ""
    if built:
        (arm_cache / "src.sha256").write_text(built + "\n")
    out = tmp_path / "out"
    (out / "fluxrig").mkdir(parents=True)
    (out / "fluxrig" / "index.json").write_text("{}")  # what an earlier build left
    with pytest.raises(frozen.StaleBinaryError) as exc:
        image.build(["fluxrig"], str(out), image.default_epoch(), ["arm64"], log=print)
    _assert_refusal(str(exc.value), built or "(no src.sha256)")
    assert exc.value.arch == "arm64" and exc.value.built_hash == built
    assert (out / "fluxrig" / "index.json").read_text() == "{}" and sorted(os.listdir(out)) == ["fluxrig"]
    with pytest.raises(frozen.StaleBinaryError) as exc:
        deb.build(["fluxrig"], str(tmp_path / "debs"), image.default_epoch(), ["arm64"], log=print)
    _assert_refusal(str(exc.value), built or "(no src.sha256)")
    assert not os.path.exists(tmp_path / "debs")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "packaging", "image.py"), "fluxrig", "--arch", "arm64",
                        "--out", str(out)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 1, r
    _assert_refusal(r.stderr, built or "(no src.sha256)")
    print(r.stderr.strip())


def _arm64_base_or_skip() -> None:
    try:
        image.fetch_debs("arm64", os.path.join(ROOT, "build", "debs", "arm64"))
    except image.ImageError as exc:
        pytest.skip(f"the arm64 base packages cannot be fetched here: {exc}")


def _arm64_labels(layout: str) -> dict:
    _, config, _ = manifest_of(layout, "arm64")
    return config["config"]["Labels"]


def test_fresh_arm_binary_is_packed_and_a_stale_one_only_when_asked_loudly(arm_cache, tmp_path, monkeypatch):
    """The hash src-hash.sh gives for this tree: packed, with that hash and the recorded commit
    in its labels and no WARNING. Another hash with allow_stale: packed, one WARNING naming the
    arch and both hashes, labelled stale; the same through the command with
    FLUXRIG_ALLOW_STALE_ARM=1 (and with --allow-stale-arm)."""
    _arm64_base_or_skip()
    epoch = image.default_epoch()
    tree = frozen.firmware_source_hash()
    (arm_cache / "src.sha256").write_text(tree + "\n")
    lines: list[str] = []
    res = image.build(["fluxrig"], str(tmp_path / "fresh"), epoch, ["arm64"], log=lines.append)["fluxrig"]
    labels = _arm64_labels(res["layout"])
    assert labels["io.fluxrig.binary.source-sha256"] == tree and labels["io.fluxrig.binary.commit"] == OLD_COMMIT
    assert "io.fluxrig.binary.stale" not in labels and not [ln for ln in lines if "WARNING" in ln], lines

    (arm_cache / "src.sha256").write_text(OLD_HASH + "\n")
    lines.clear()
    res = image.build(["fluxrig"], str(tmp_path / "stale"), epoch, ["arm64"], log=lines.append, allow_stale=True)
    warnings = [ln for ln in lines if ln.startswith("WARNING")]
    assert len(warnings) == 1 and "STALE" in warnings[0], lines
    _assert_refusal(warnings[0], OLD_HASH)
    labels = _arm64_labels(res["fluxrig"]["layout"])
    assert labels["io.fluxrig.binary.stale"] == "true" and labels["io.fluxrig.binary.source-sha256"] == OLD_HASH

    cmd = [sys.executable, os.path.join(ROOT, "packaging", "image.py"), "fluxrig", "--arch", "arm64"]
    for extra, env in (([], {frozen.ALLOW_STALE_ENV: "1"}), (["--allow-stale-arm"], {})):
        r = subprocess.run([*cmd, *extra, "--out", str(tmp_path / "cli")], capture_output=True, text=True,
                           timeout=600, env=dict(os.environ, **env))  # fmt: skip
        assert r.returncode == 0 and "WARNING: packing a STALE binary" in r.stderr and "arm64" in r.stderr, r
        assert _arm64_labels(str(tmp_path / "cli" / "fluxrig"))["io.fluxrig.binary.stale"] == "true"
