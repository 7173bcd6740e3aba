"""Distroless-style OCI images of the Rack and the Mixer, from Debian's own packages, no daemon.

    python packaging/image.py [fluxrig] [fluxrig-mixer] [--out build/images] [--epoch N]

writes, per program, an OCI image layout `build/images/<name>/` (ref name = the version) and the
same layout as one tar, `build/images/<name>-<version>.oci.tar` (an oci-archive):
`podman load -i build/images/fluxrig-0.1.0.oci.tar`, `skopeo copy oci-archive:... docker://...`.

What is inside (packaging/README.md has the table and the sizes):
  * Layer 1, the base, the same bytes for both programs: the files of Debian's libc6, zlib1g,
    ca-certificates, tzdata and netbase (`apt-get download`, read with `dpkg-deb --fsys-tarfile`),
    without their executables, maintainer scripts, manuals, locales or gconv modules; the CA
    bundle that update-ca-certificates would have generated; /etc/nsswitch.conf, os-release,
    localtime (UTC), OpenSSL's default paths pointed at the bundle; dpkg status entries under
    /var/lib/dpkg/status.d/ so image scanners see the package versions. No shell, no package
    manager, no setuid file.
    The frozen programs need nothing else: PyInstaller bundles libpython, OpenSSL, libffi, zlib,
    libstdc++ ...; what is left outside the bundle is glibc and zlib, which the PyInstaller
    bootloader itself links before it can read its bundle (checked with ldd over every ELF of
    both builds, and by running the entrypoint from the unpacked image); nats-server is a
    static Go binary.
  * Layer 2, the program: the one-folder PyInstaller build under /opt/<name>/ (root-owned, not
    writable by the user it runs as), /usr/bin/<name> linked to it, /etc/passwd and /etc/group
    with the user 65532, the state directory /var/lib/<name> (65532:65532, 0750, a declared
    volume) and the SBOM (SPDX 2.3 JSON) at /usr/share/doc/<name>/sbom.spdx.json.
  * The config: user 65532:65532, entrypoint the program, cmd `run` / `serve`, working directory
    the state directory, HEALTHCHECK `<program> healthcheck` (Docker's field; podman reads it
    too), labels and manifest annotations with version, revision (commit), created (=epoch),
    licenses, the package list and the SBOM's path and digest.

Why the one-folder Rack in the image (measured, packaging/README.md): it runs in place from a
read-only root file system, where the one-file build must first unpack itself (22 MB on every
start) into a writable directory that allows exec, which a read-only container gives only
through an extra exec-able tmpfs (Docker mounts --tmpfs noexec by default). It also starts
faster and compresses better inside a gzip layer than the one-file's already-zlib'd payload.

Reproducible: times are SOURCE_DATE_EPOCH (default: the commit time of HEAD), owners and modes
are declared (packaging/oci.py), the .deb files are cached under build/debs/<arch>/ and the
frozen builds under build/frozen/ (packaging/frozen.py), so two runs give the same digests. A
new Debian point release changes the base layer (and says so in the SBOM): delete
build/debs/ to take it.

Architectures: amd64 from the host build; arm64 and armhf Rack images when `make firmware-test`
has left its binaries in firmware-tests/cache/bin-<arch>/fluxrig (one-file builds: that image
sets TMPDIR to an exec-able folder of the state volume) and apt can download that architecture
(`dpkg --add-architecture arm64 && apt-get update`). The Mixer is amd64 only. An arm binary
built from another source than this tree's (its bin-<arch>/src.sha256 is not what
firmware-tests/src-hash.sh prints now) is refused, naming both hashes and commits, before
anything is written: `make firmware-test` rebuilds it; `--allow-stale-arm` (or
FLUXRIG_ALLOW_STALE_ARM=1) packs it anyway with a WARNING and the label
io.fluxrig.binary.stale=true. Each arm image labels the binary's own source hash and commit
(io.fluxrig.binary.source-sha256, io.fluxrig.binary.commit): the commit can be older than the
revision when only files outside the Rack's build inputs changed since.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import frozen  # noqa: E402
import oci  # noqa: E402

__all__ = ["PROGRAMS", "BASE_PACKAGES", "UID", "build", "base_layer", "main"]

ROOT = frozen.ROOT
UID = GID = 65532
BASE_PACKAGES = ("libc6", "zlib1g", "ca-certificates", "tzdata", "netbase")
# Paths of the base packages left out (prefixes inside the package's tree).
DEB_EXCLUDE = (
    "usr/share/doc/",
    "usr/share/man/",
    "usr/share/info/",
    "usr/share/lintian/",
    "usr/share/locale/",
    "usr/share/zoneinfo/right/",  # leap-second variants; nothing here reads them
    "usr/sbin/",
    "usr/bin/",
    "sbin/",
    "bin/",
    "usr/libexec/",
)
DEB_KEEP = re.compile(r"^usr/share/doc/[^/]+/copyright$")  # licences stay with what they cover
GCONV = re.compile(r"^(usr/)?lib/[^/]+/gconv/")
DEBIAN_ARCH = {"amd64": ("amd64", ""), "arm64": ("arm64", "v8"), "armhf": ("arm", "v7")}
HEALTH = {"Interval": 30, "Timeout": 5, "StartPeriod": 60, "Retries": 3}  # seconds


class ImageError(RuntimeError):
    pass


PROGRAMS = {
    "fluxrig": {
        "frozen": "fluxrig-onedir",
        "exe": "fluxrig",
        "title": "fluxrig Rack",
        "description": "fluxrig Rack: protocol patchbay edge agent (ISO 8583, TCP, serial)",
        "cmd": ["run"],
        "state": "var/lib/fluxrig",
        "env": {"FLUXRIG_BASE_STATE_DIR": "/var/lib/fluxrig"},
        "ports": [],
        "gecos": "fluxrig Rack",
        "archs": ("amd64", "arm64", "armhf"),
    },
    "fluxrig-mixer": {
        "frozen": "fluxrig-mixer",
        "exe": "fluxrig-mixer",
        "title": "fluxrig Mixer",
        "description": "fluxrig Mixer: control plane (registry, passports, scenarios, telemetry, API) and the Snake",
        "cmd": ["serve"],
        "state": "var/lib/fluxrig-mixer",
        "env": {"FLUXRIG_MIXER_BASE_STATE_DIR": "/var/lib/fluxrig-mixer"},
        "ports": ["8090/tcp", "4222/tcp"],
        "gecos": "fluxrig Mixer",
        "archs": ("amd64",),
    },
}


def _run(cmd: list[str], **kw) -> bytes:
    try:
        return subprocess.run(cmd, check=True, capture_output=True, **kw).stdout
    except FileNotFoundError:
        raise ImageError(f"{cmd[0]} not found (Debian's dpkg/apt are needed to build the base)") from None
    except subprocess.CalledProcessError as exc:
        raise ImageError(f"{' '.join(cmd)} failed: {exc.stderr.decode(errors='replace').strip()}") from None


def git(*args: str) -> str:
    return _run(["git", "-C", ROOT, *args]).decode().strip()


def default_epoch() -> int:
    env = os.environ.get("SOURCE_DATE_EPOCH")
    if env:
        return int(env)
    return int(git("log", "-1", "--format=%ct"))


def iso(epoch: int) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- Debian packages ------------------------------------------------------------------------------
def fetch_debs(arch: str, cache: str) -> list[str]:
    """The base packages' .deb files for `arch`, downloaded once into `cache`."""
    os.makedirs(cache, exist_ok=True)
    out = []
    for pkg in BASE_PACKAGES:
        found = sorted(f for f in os.listdir(cache) if f.startswith(pkg + "_") and f.endswith(".deb"))
        if not found:
            try:
                _run(["apt-get", "download", "-q", _apt_name(pkg, arch)], cwd=cache)
            except ImageError as exc:
                hint = (
                    ""
                    if arch == _host_arch()
                    else f" (foreign architecture: dpkg --add-architecture {arch}; apt-get update)"
                )
                raise ImageError(f"cannot download {pkg}:{arch}{hint}: {exc}") from None
            found = sorted(f for f in os.listdir(cache) if f.startswith(pkg + "_") and f.endswith(".deb"))
        if len(found) != 1:
            raise ImageError(f"{cache} holds {len(found)} versions of {pkg}: {found}; delete the old ones")
        out.append(os.path.join(cache, found[0]))
    return out


def _apt_name(pkg: str, arch: str) -> str:
    """`pkg:arch`, or `pkg` alone for a package of Architecture: all (ca-certificates, tzdata):
    apt has no `ca-certificates:arm64` candidate, so the foreign-architecture images never got
    their base."""
    r = subprocess.run(["apt-cache", "show", "--no-all-versions", pkg], capture_output=True, text=True)
    if r.returncode == 0 and re.search(r"^Architecture: all$", r.stdout, re.M):
        return pkg
    return f"{pkg}:{arch}"


def _host_arch() -> str:
    return _run(["dpkg", "--print-architecture"]).decode().strip()


def deb_info(path: str) -> dict:
    control = _run(["dpkg-deb", "-f", path]).decode()
    fields = dict(re.findall(r"^([A-Za-z-]+): ?(.*)$", control, re.M))
    with open(path, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    return {"control": control, "fields": fields, "sha256": digest, "file": os.path.basename(path)}


def _deb_members(path: str):
    data = _run(["dpkg-deb", "--fsys-tarfile", path])
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for m in tar.getmembers():
            yield m, (tar.extractfile(m).read() if m.isreg() else b"")


def _excluded(name: str) -> bool:
    if DEB_KEEP.match(name):
        return False
    return name.startswith(DEB_EXCLUDE) or bool(GCONV.match(name))


def base_layer(debs: list[str]) -> tuple[oci.Layer, list[dict]]:
    layer, infos, certs = oci.Layer(), [], {}
    for path in debs:
        info = deb_info(path)
        infos.append(info)
        for m, data in _deb_members(path):
            name = m.name.removeprefix("./").rstrip("/")
            if name in ("", ".") or _excluded(name + ("/" if m.isdir() else "")):
                continue
            mode = m.mode & 0o1777  # never setuid/setgid in the image
            if m.isdir():
                if name not in layer.entries:
                    layer.dir(name, mode)
            elif m.issym():
                layer.symlink(name, m.linkname)
            elif m.islnk():
                layer.hardlink(name, m.linkname.removeprefix("./"))
            elif m.isreg():
                layer.file(name, data, mode)
                if name.startswith("usr/share/ca-certificates/") and name.endswith(".crt"):
                    certs[name] = data
    # What update-ca-certificates generates at install time (its ca-certificates.conf lists
    # every shipped certificate, sorted): one PEM bundle.
    bundle = b"".join(certs[k] if certs[k].endswith(b"\n") else certs[k] + b"\n" for k in sorted(certs))
    if not bundle:
        raise ImageError("no CA certificates found in the ca-certificates package")
    layer.file("etc/ssl/certs/ca-certificates.crt", bundle)
    layer.symlink("usr/lib/ssl/cert.pem", "/etc/ssl/certs/ca-certificates.crt")
    layer.symlink("usr/lib/ssl/certs", "/etc/ssl/certs")
    layer.dir("usr/lib/ssl/private", 0o700)
    layer.symlink("etc/localtime", "/usr/share/zoneinfo/Etc/UTC")
    layer.file("etc/timezone", b"Etc/UTC\n")
    layer.file("etc/nsswitch.conf", b"passwd: files\ngroup: files\nshadow: files\nhosts: files dns\nnetworks: files\n"
                                    b"protocols: files\nservices: files\n")  # fmt: skip
    libc = next(i for i in infos if i["fields"]["Package"] == "libc6")["fields"]["Version"]
    layer.file("etc/os-release", (
        'PRETTY_NAME="fluxrig distroless (Debian GNU/Linux 12 packages)"\nNAME="fluxrig distroless"\nID=fluxrig-distroless\n'
        f'ID_LIKE=debian\nVERSION_ID="12"\nVERSION_CODENAME=bookworm\nHOME_URL="https://www.debian.org/"\n'
        f'# glibc from Debian libc6 {libc}\n'
    ).encode())  # fmt: skip
    for info in infos:
        layer.file(f"var/lib/dpkg/status.d/{info['fields']['Package']}", info["control"].encode())
    layer.dir("tmp", 0o1777)
    layer.dir("root", 0o700)
    return layer, infos


# -- the program ----------------------------------------------------------------------------------
def python_distributions(bundle: str) -> list[dict]:
    """The Python distributions frozen into `bundle`: every build-venv distribution one of whose
    top-level import names is in the bundle (its PYZ archive or its _internal folder)."""
    from importlib.metadata import packages_distributions, version

    from PyInstaller.archive.readers import CArchiveReader

    names: set[str] = set()
    for exe in sorted(os.listdir(bundle)):
        full = os.path.join(bundle, exe)
        if not (os.path.isfile(full) and os.access(full, os.X_OK)):
            continue
        try:
            carchive = CArchiveReader(full)
        except Exception:  # not a PyInstaller executable (nats-server)
            continue
        if "PYZ.pyz" in carchive.toc:
            names |= {n.split(".")[0] for n in carchive.open_embedded_archive("PYZ.pyz").toc}
    internal = os.path.join(bundle, "_internal")
    if os.path.isdir(internal):
        names |= {n.split(".")[0] for n in os.listdir(internal)}
    found = {}
    for top, dists in packages_distributions().items():
        if top in names:
            for d in dists:
                found[d.lower()] = {"name": d, "version": version(d)}
    return [found[k] for k in sorted(found)]


def nats_server_version(bundle: str) -> str | None:
    path = os.path.join(bundle, "nats-server")
    if not os.path.exists(path):
        return None
    out = _run([path, "--version"]).decode()
    m = re.search(r"v(\d+\.\d+\.\d+)", out)
    return m.group(1) if m else "NOASSERTION"


def sbom(name: str, version: str, commit: str, arch: str, epoch: int, infos, pydists, nats) -> bytes:
    pkgs, rels = [], []

    def add(spdx_id, pname, pversion, supplier, purl, extra=None):
        p = {
            "SPDXID": spdx_id,
            "name": pname,
            "versionInfo": pversion,
            "supplier": supplier,
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": False,
            "licenseConcluded": "NOASSERTION",
            "licenseDeclared": "NOASSERTION",
            "copyrightText": "NOASSERTION",
            "externalRefs": [
                {"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl", "referenceLocator": purl}
            ],
        }
        p.update(extra or {})
        pkgs.append(p)
        rels.append(
            {"spdxElementId": "SPDXRef-Package-" + name, "relationshipType": "CONTAINS", "relatedSpdxElement": spdx_id}
        )

    main = {
        "SPDXID": "SPDXRef-Package-" + name,
        "name": name,
        "versionInfo": version,
        "supplier": "Organization: fluxrig",
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": False,
        "licenseConcluded": "Apache-2.0",
        "licenseDeclared": "Apache-2.0",
        "copyrightText": "NOASSERTION",
        "sourceInfo": f"git commit {commit}",
    }
    pkgs.append(main)
    for info in infos:
        f = info["fields"]
        add(
            f"SPDXRef-deb-{f['Package']}",
            f["Package"],
            f["Version"],
            "Organization: Debian",
            f"pkg:deb/debian/{f['Package']}@{f['Version'].replace('+', '%2B')}?arch={f['Architecture']}&distro=debian-12",
            {"checksums": [{"algorithm": "SHA256", "checksumValue": info["sha256"]}], "sourceInfo": info["file"]},
        )
    for d in pydists:
        norm = re.sub(r"[-_.]+", "-", d["name"]).lower()
        add(f"SPDXRef-pypi-{norm}", d["name"], d["version"], "NOASSERTION", f"pkg:pypi/{norm}@{d['version']}")
    if nats:
        add(
            "SPDXRef-nats-server",
            "nats-server",
            nats,
            "Organization: Synadia",
            f"pkg:golang/github.com/nats-io/nats-server/v2@v{nats}",
        )
    rels.insert(
        0, {"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES", "relatedSpdxElement": main["SPDXID"]}
    )
    body = {"packages": pkgs, "relationships": rels}
    namespace = hashlib.sha256(oci.canonical_json(body)).hexdigest()[:32]
    doc = {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": f"{name}-{version}-{arch}",
        "documentNamespace": f"https://spdx.fluxrig.invalid/{name}/{version}/{arch}/{namespace}",
        "creationInfo": {"created": iso(epoch), "creators": ["Tool: fluxrig packaging/image.py"]},
        **body,
    }
    return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"


def app_layer(prog: str, spec: dict, bundle: str, onefile: bool, sbom_bytes: bytes) -> oci.Layer:
    layer = oci.Layer()
    opt = f"opt/{prog}"
    if onefile:
        layer.dir(opt)
        layer.file(f"{opt}/{spec['exe']}", open(bundle, "rb").read(), 0o755)
    else:
        layer.tree(bundle, opt)
    layer.symlink(f"usr/bin/{spec['exe']}", f"/{opt}/{spec['exe']}")
    layer.file("etc/passwd", (
        "root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n"
        f"{prog}:x:{UID}:{GID}:{spec['gecos']}:/{spec['state']}:/sbin/nologin\n"
    ).encode())  # fmt: skip
    layer.file("etc/group", f"root:x:0:\nnogroup:x:65534:\n{prog}:x:{GID}:\n".encode())
    layer.dir(f"etc/{prog}")
    layer.dir(spec["state"], 0o750, UID, GID)
    layer.file(f"usr/share/doc/{prog}/sbom.spdx.json", sbom_bytes)
    return layer


def image_config(prog, spec, arch, epoch, version, commit, labels, onefile) -> dict:
    goarch, variant = DEBIAN_ARCH[arch]
    exe = f"/opt/{prog}/{spec['exe']}"
    env = {
        "PATH": f"/opt/{prog}:/usr/bin",
        "SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt",
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        **spec["env"],
    }
    if onefile:  # the one-file bundle unpacks on every start: an exec-able folder of the volume
        env["TMPDIR"] = f"/{spec['state']}/tmp"
    ns = 1_000_000_000
    config = {
        "User": f"{UID}:{GID}",
        "Entrypoint": [exe],
        "Cmd": list(spec["cmd"]),
        "Env": [f"{k}={v}" for k, v in env.items()],
        "WorkingDir": f"/{spec['state']}",
        "Volumes": {f"/{spec['state']}": {}},
        "StopSignal": "SIGTERM",
        "Labels": labels,
        "Healthcheck": {
            "Test": ["CMD", exe, "healthcheck"],
            **{k: v * ns for k, v in HEALTH.items() if k != "Retries"},
            "Retries": HEALTH["Retries"],
        },  # fmt: skip
    }
    if spec["ports"]:
        config["ExposedPorts"] = {p: {} for p in spec["ports"]}
    doc = {
        "created": iso(epoch),
        "architecture": goarch,
        "os": "linux",
        "config": config,
        "history": [
            {"created": iso(epoch), "created_by": "packaging/image.py: base from Debian " + ", ".join(BASE_PACKAGES)},
            {"created": iso(epoch), "created_by": f"packaging/image.py: {prog} {version} ({commit[:12]})"},
        ],
    }
    if variant:
        doc["variant"] = variant
    return doc


def _binary_for(prog: str, spec: dict, arch: str, allow_stale: bool | None, log) -> tuple[str, bool, dict] | None:
    """(path, onefile, extra labels) of the program for `arch`, or None when no build exists
    here; frozen.StaleBinaryError for an arm Rack of another source than this tree's."""
    if arch == _host_arch():
        return frozen.ensure(spec["frozen"]), False, {}
    if prog == "fluxrig":
        found = frozen.firmware_binary(arch, allow_stale=allow_stale, log=log)
        if found is not None:
            # What the binary was built from, beside the index's revision (HEAD): the same source
            # hash as this tree unless packed with --allow-stale-arm, and then it says so.
            labels = {"io.fluxrig.binary.source-sha256": found.source_sha256, "io.fluxrig.binary.commit": found.commit}
            if found.stale:
                labels["io.fluxrig.binary.stale"] = "true"
            return found.path, True, labels
    return None


def build(
    progs: list[str], out: str, epoch: int, archs: list[str] | None = None, log=print, allow_stale: bool | None = None
) -> dict:
    """Build the images; {prog: {"layout", "archive", "index_digest", "manifests": {arch: digest}}}.
    An arm Rack binary of another source than this tree's raises frozen.StaleBinaryError before
    anything is written, unless `allow_stale` (default: FLUXRIG_ALLOW_STALE_ARM=1)."""
    version = _version()
    commit = git("rev-parse", "HEAD")
    results = {}
    bases: dict[str, tuple[bytes, list[dict]]] = {}
    # Every binary is found (and the arm ones checked against this tree) before any layout is
    # touched: a refused stale binary leaves the previous images in place.
    binaries = {}
    for prog in progs:
        for arch in archs or PROGRAMS[prog]["archs"]:
            binaries[prog, arch] = _binary_for(prog, PROGRAMS[prog], arch, allow_stale, log)
    for prog in progs:
        spec = PROGRAMS[prog]
        layout_dir = os.path.join(out, prog)
        shutil.rmtree(layout_dir, ignore_errors=True)  # a fresh layout: no blob of an older build
        layout = oci.Layout(layout_dir)
        manifests, dockers = {}, {}
        for arch in archs or spec["archs"]:
            found = binaries[prog, arch]
            if found is None:
                log(f"{prog}: no {arch} build here (make firmware-test builds the arm Racks): skipped")
                continue
            bundle, onefile, binary_labels = found
            if arch not in bases:
                layer, infos = base_layer(fetch_debs(arch, os.path.join(ROOT, "build", "debs", arch)))
                bases[arch] = (layer.tar(epoch), infos)
            base_tar, infos = bases[arch]
            pydists = python_distributions(os.path.dirname(bundle) if onefile else bundle)
            sbom_bytes = sbom(prog, version, commit, arch, epoch, infos, pydists, nats_server_version(bundle))
            sbom_path = f"/usr/share/doc/{prog}/sbom.spdx.json"
            labels = {
                "org.opencontainers.image.title": spec["title"],
                "org.opencontainers.image.description": spec["description"],
                "org.opencontainers.image.version": version,
                "org.opencontainers.image.revision": commit,
                "org.opencontainers.image.created": iso(epoch),
                "org.opencontainers.image.licenses": "Apache-2.0",
                "org.opencontainers.image.vendor": "fluxrig",
                "io.fluxrig.base.packages": ",".join(
                    f"{i['fields']['Package']}={i['fields']['Version']}" for i in infos
                ),
                "io.fluxrig.sbom.path": sbom_path,
                "io.fluxrig.sbom.format": "SPDX-2.3+json",
                "io.fluxrig.sbom.digest": oci.sha256(sbom_bytes),
                "io.fluxrig.build": "onefile" if onefile else "onedir",
                **binary_labels,
            }
            app_tar = app_layer(prog, spec, bundle, onefile, sbom_bytes).tar(epoch)
            config = image_config(prog, spec, arch, epoch, version, commit, labels, onefile)
            annotations = {k: v for k, v in labels.items() if k.startswith("org.opencontainers.")}
            desc = layout.image([base_tar, app_tar], config, annotations)
            manifests[arch] = desc
            dockers[arch] = oci.docker_archive(
                os.path.join(out, f"{prog}-{version}-{arch}.docker.tar"),
                f"{prog}:{version}",
                [base_tar, app_tar],
                config,
                epoch,
            )
            log(f"{prog} {arch}: manifest {desc['digest']}")
        if not manifests:
            raise ImageError(f"{prog}: no architecture could be built")
        index = layout.index(list(manifests.values()), {"org.opencontainers.image.version": version})
        layout.finish([(version, index)])
        archive = layout.archive(os.path.join(out, f"{prog}-{version}.oci.tar"), epoch)
        results[prog] = {
            "layout": layout_dir,
            "archive": archive,
            "docker_archives": dockers,
            "ref": version,
            "index_digest": index["digest"],
            "manifests": {a: d["digest"] for a, d in manifests.items()},
            "compressed_bytes": {a: _compressed_size(layout_dir, d) for a, d in manifests.items()},
        }
    return results


def _compressed_size(layout_dir: str, desc: dict) -> int:
    with open(os.path.join(layout_dir, "blobs", "sha256", desc["digest"].split(":")[1]), "rb") as fh:
        manifest = json.load(fh)
    return sum(layer["size"] for layer in manifest["layers"]) + manifest["config"]["size"] + desc["size"]


def _version() -> str:
    text = open(os.path.join(ROOT, "fluxrig", "_version.py"), encoding="utf-8").read()
    return re.search(r"__version__\s*=\s*['\"]([^'\"]+)", text).group(1)


def parse_dist_args(argv, *, prog: str, doc: str, noun: str, names, archs, out_dir: str, json_help: str):
    """The command line shared by image.py and deb.py: which programs (default all), --out,
    --epoch (default SOURCE_DATE_EPOCH or the commit time), --arch, --json. Exit 2 naming an
    unknown program."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    p.add_argument("names", nargs="*", metavar=noun.upper(), help=f"{', '.join(names)} (default: all)")
    p.add_argument(
        "--out", default=os.path.join(ROOT, "build", out_dir), help=f"output folder (default build/{out_dir})"
    )
    p.add_argument("--epoch", type=int, help="timestamp of every file (default SOURCE_DATE_EPOCH or the commit time)")
    p.add_argument("--arch", action="append", choices=list(archs), help="only these architectures")
    p.add_argument("--json", action="store_true", help=json_help)
    p.add_argument(
        "--allow-stale-arm",
        action="store_true",
        default=os.environ.get(frozen.ALLOW_STALE_ENV, "") == "1",
        help="pack an arm64/armhf Rack from firmware-tests/cache/bin-<arch>/ even when it was built from another "
        "source than this tree's (refused by default: `make firmware-test` rebuilds it); logged as a WARNING and "
        f"labelled io.fluxrig.binary.stale=true. Also {frozen.ALLOW_STALE_ENV}=1",
    )
    args = p.parse_args(argv)
    args.names = args.names or list(names)
    unknown = [x for x in args.names if x not in names]
    if unknown:
        p.error(f"unknown {noun} {', '.join(unknown)}: one of {', '.join(names)}")
    if args.epoch is None:
        args.epoch = default_epoch()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_dist_args(argv, prog="packaging/image.py", doc=__doc__, noun="program", names=PROGRAMS,
                           archs=DEBIAN_ARCH, out_dir="images", json_help="print the result as one JSON object")  # fmt: skip
    progs = args.names
    try:
        res = build(progs, args.out, args.epoch, args.arch, log=lambda m: print(m, file=sys.stderr),
                    allow_stale=args.allow_stale_arm)  # fmt: skip
    except (ImageError, oci.LayerError, frozen.FirmwareError) as exc:
        print(f"image: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(res, sort_keys=True))
    else:
        for prog, r in res.items():
            sizes = ", ".join(f"{a} {n / 1e6:.1f} MB" for a, n in r["compressed_bytes"].items())
            print(f"{prog}: {r['archive']} index {r['index_digest']} (compressed {sizes})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
