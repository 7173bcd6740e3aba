"""A small writer of OCI image layouts (image-spec v1.1) using only the standard library.

Job: turn a declared file tree into image layers, an image config, manifests and an index on
disk, byte for byte the same every time for the same inputs, with no daemon, no root and no
container tooling. packaging/image.py builds the fluxrig images on it.

Why a writer of our own rather than buildah or umoci (both are in Debian): the one property the
issue asks for that those tools make hard is reproducibility we control. buildah needs a
storage driver and user namespaces, and stamps history and creation times; umoci needs an
unpacked bundle on disk whose file owners it takes from the file system (root on the builder)
and writes its own history entries. Here every entry is declared (path, type, mode, uid:gid,
content) and written in a fixed way: entries sorted by path, parents implied, owners and modes
as declared (never the builder's), every mtime SOURCE_DATE_EPOCH, PAX format without
per-file extended headers, gzip with mtime 0 and no file name, JSON with sorted keys. The same
inputs give the same layer, config, manifest and index digests; an independent client (skopeo,
podman) reads the result (tests/test_image.py).

Contract:
  * `Layer`: `dir()`, `file()`, `symlink()`, `hardlink()`; `tar(epoch)` -> bytes (uncompressed:
    its sha256 is the config's diff_id), entries in path order, every missing parent directory
    added as root:root 0755. A path declared twice is an error (LayerError), not a silent overwrite.
  * `Layout(path)`: `blob(bytes, media_type)` -> descriptor dict, written once under
    blobs/sha256/; `image(layers, config, epoch)` writes gzip layers, config and manifest and
    returns the manifest descriptor; `index(descriptors)` writes an image index blob;
    `finish(refs)` writes oci-layout and index.json. `archive(path, epoch)` tars the layout
    (oci-archive) deterministically.
  * `docker_archive(dest, tag, layers, config, epoch)`: the same image in `docker save` form,
    the format in which Docker and podman honour the HEALTHCHECK (same config bytes, same
    image ID as the OCI config digest).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
from dataclasses import dataclass

__all__ = [
    "MEDIA_INDEX",
    "MEDIA_MANIFEST",
    "MEDIA_CONFIG",
    "MEDIA_LAYER_GZIP",
    "LayerError",
    "Entry",
    "Layer",
    "Layout",
    "canonical_json",
    "sha256",
]

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
GZIP_LEVEL = 9
DIR, FILE, SYMLINK, HARDLINK = "dir", "file", "symlink", "hardlink"


class LayerError(ValueError):
    """A layer entry is wrong; `path` names it."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}")


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _norm(path: str) -> str:
    parts = [p for p in path.strip("/").split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise LayerError(path, "must be a path inside the image (no '..', not the root)")
    return "/".join(parts)


@dataclass(frozen=True)
class Entry:
    path: str  # relative, normalized ("usr/bin/x")
    kind: str
    mode: int
    uid: int = 0
    gid: int = 0
    data: bytes = b""
    target: str = ""  # symlink target, or the hard link's path (normalized)


class Layer:
    """A set of declared entries; nothing is read from the builder's metadata unless asked."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}

    def _add(self, entry: Entry) -> None:
        old = self.entries.get(entry.path)
        if old is not None and not (old.kind == DIR and entry.kind == DIR and old == entry):
            raise LayerError(entry.path, "declared twice in one layer")
        if entry.mode & ~0o7777:
            raise LayerError(entry.path, f"mode {entry.mode:o} has bits beyond 07777")
        self.entries[entry.path] = entry

    def dir(self, path: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> None:
        self._add(Entry(_norm(path), DIR, mode, uid, gid))

    def file(self, path: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> None:
        self._add(Entry(_norm(path), FILE, mode, uid, gid, bytes(data)))

    def symlink(self, path: str, target: str, uid: int = 0, gid: int = 0) -> None:
        if not target:
            raise LayerError(path, "symlink without a target")
        self._add(Entry(_norm(path), SYMLINK, 0o777, uid, gid, target=target))

    def hardlink(self, path: str, to: str) -> None:
        self._add(Entry(_norm(path), HARDLINK, 0o644, target=_norm(to)))

    def tree(self, src: str, dest: str, *, uid: int = 0, gid: int = 0, dir_mode: int = 0o755) -> None:
        """Copy a builder directory in: contents and the executable bit are taken from it, owners
        and the other mode bits are not (files 0644 or 0755, directories `dir_mode`)."""
        dest = _norm(dest)
        self.dir(dest, dir_mode, uid, gid)
        for here, dirs, files in os.walk(src):
            dirs.sort()
            rel = os.path.relpath(here, src)
            base = dest if rel == "." else f"{dest}/{rel}"
            for d in dirs:
                full = os.path.join(here, d)
                if os.path.islink(full):
                    self.symlink(f"{base}/{d}", os.readlink(full), uid, gid)
                else:
                    self.dir(f"{base}/{d}", dir_mode, uid, gid)
            for f in sorted(files):
                full = os.path.join(here, f)
                if os.path.islink(full):
                    self.symlink(f"{base}/{f}", os.readlink(full), uid, gid)
                    continue
                st = os.stat(full)
                if not stat.S_ISREG(st.st_mode):
                    raise LayerError(full, "only regular files, directories and symlinks can be copied")
                with open(full, "rb") as fh:
                    data = fh.read()
                self.file(f"{base}/{f}", data, 0o755 if st.st_mode & 0o111 else 0o644, uid, gid)

    def _complete(self) -> dict[str, Entry]:
        out = dict(self.entries)
        for path in list(self.entries):
            parts = path.split("/")
            for i in range(1, len(parts)):
                parent = "/".join(parts[:i])
                cur = out.get(parent)
                if cur is None:
                    out[parent] = Entry(parent, DIR, 0o755)
                elif cur.kind != DIR:
                    raise LayerError(path, f"parent {parent} is a {cur.kind}, not a directory")
        for e in out.values():
            if e.kind == HARDLINK and out.get(e.target, Entry("", DIR, 0)).kind != FILE:
                raise LayerError(e.path, f"hard link to {e.target}, which is not a file of this layer")
        return out

    def tar(self, epoch: int) -> bytes:
        entries = self._complete()
        buf = io.BytesIO()
        # Hard links must follow their target in the archive: targets first, links after.
        order = sorted(entries.values(), key=lambda e: (e.kind == HARDLINK, e.path))
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for e in order:
                info = tarfile.TarInfo(e.path + ("/" if e.kind == DIR else ""))
                info.mtime = int(epoch)
                info.mode = e.mode
                info.uid, info.gid = e.uid, e.gid
                info.uname = info.gname = ""
                if e.kind == DIR:
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                elif e.kind == SYMLINK:
                    info.type, info.linkname = tarfile.SYMTYPE, e.target
                    tar.addfile(info)
                elif e.kind == HARDLINK:
                    target = entries[e.target]
                    info.type, info.linkname = tarfile.LNKTYPE, e.target
                    info.mode, info.uid, info.gid = target.mode, target.uid, target.gid
                    tar.addfile(info)
                else:
                    info.size = len(e.data)
                    tar.addfile(info, io.BytesIO(e.data))
        return buf.getvalue()


def config_blob(config: dict, layers: list[bytes]) -> bytes:
    """The image config as written: `config` with rootfs.diff_ids of the uncompressed layers."""
    return canonical_json(dict(config, rootfs={"type": "layers", "diff_ids": [sha256(raw) for raw in layers]}))


def docker_archive(dest: str, tag: str, layers: list[bytes], config: dict, epoch: int) -> str:
    """The same image as a `docker save` tar (manifest.json, config, uncompressed layers), for
    `docker load` / `podman load`: Docker and podman honour the config's Healthcheck only in this
    format (an OCI config has no such field and podman drops it)."""
    blob = config_blob(config, layers)
    layer = Layer()
    config_name = sha256(blob).split(":")[1] + ".json"
    layer.file(config_name, blob)
    names = []
    for raw in layers:
        name = sha256(raw).split(":")[1] + "/layer.tar"
        if name not in layer.entries:
            layer.file(name, raw)
        names.append(name)
    layer.file("manifest.json", canonical_json([{"Config": config_name, "RepoTags": [tag], "Layers": names}]))
    tmp = dest + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(layer.tar(epoch))
    os.replace(tmp, dest)
    return dest


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0)


class Layout:
    """An OCI image layout directory being written."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.join(path, "blobs", "sha256"), exist_ok=True)

    def blob(self, data: bytes, media_type: str, **extra) -> dict:
        digest = sha256(data)
        dest = os.path.join(self.path, "blobs", "sha256", digest.split(":", 1)[1])
        if not os.path.exists(dest):
            tmp = dest + ".tmp"
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, dest)
        return {"mediaType": media_type, "digest": digest, "size": len(data), **extra}

    def image(self, layers: list[bytes], config: dict, annotations: dict | None = None) -> dict:
        """Write the (uncompressed tar) `layers` gzipped, the config (rootfs filled in here) and
        the manifest; returns the manifest's descriptor."""
        descriptors = [self.blob(gzip_bytes(raw), MEDIA_LAYER_GZIP) for raw in layers]
        manifest = {
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": self.blob(config_blob(config, layers), MEDIA_CONFIG),
            "layers": descriptors,
        }
        if annotations:
            manifest["annotations"] = dict(annotations)
        platform = {"architecture": config["architecture"], "os": config["os"]}
        if config.get("variant"):
            platform["variant"] = config["variant"]
        return self.blob(canonical_json(manifest), MEDIA_MANIFEST, platform=platform)

    def index(self, manifests: list[dict], annotations: dict | None = None) -> dict:
        doc = {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": list(manifests)}
        if annotations:
            doc["annotations"] = dict(annotations)
        return self.blob(canonical_json(doc), MEDIA_INDEX)

    def finish(self, refs: list[tuple[str, dict]]) -> dict:
        """index.json naming each descriptor by `org.opencontainers.image.ref.name`."""
        manifests = []
        for name, desc in refs:
            d = {k: v for k, v in desc.items()}
            d["annotations"] = {**d.get("annotations", {}), "org.opencontainers.image.ref.name": name}
            manifests.append(d)
        doc = {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": manifests}
        with open(os.path.join(self.path, "oci-layout"), "wb") as fh:
            fh.write(canonical_json({"imageLayoutVersion": "1.0.0"}))
        with open(os.path.join(self.path, "index.json"), "wb") as fh:
            fh.write(canonical_json(doc))
        return doc

    def archive(self, dest: str, epoch: int) -> str:
        """The layout as one tar (an oci-archive), entries sorted, owners 0, times `epoch`."""
        layer = Layer()
        for here, dirs, files in os.walk(self.path):
            dirs.sort()
            for f in sorted(files):
                full = os.path.join(here, f)
                with open(full, "rb") as fh:
                    layer.file(os.path.relpath(full, self.path), fh.read())
        tmp = dest + ".tmp"
        with open(tmp, "wb") as fh:
            fh.write(layer.tar(epoch))
        os.replace(tmp, dest)
        return dest
