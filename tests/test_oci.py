"""packaging/oci.py, the OCI layout writer behind `make image` (fast: a tiny layer, no builds).

* Reproducible: the same declared entries give the same tar, gzip, config, manifest and index
  bytes, in two fresh layouts; one changed byte or mode changes the digest.
* The tar holds exactly what was declared: sorted paths, parents implied as root 0755, owners,
  modes and times as declared (never the builder's), hard links after their targets.
* The layout verifies: index.json -> index -> manifest -> config and layers, every blob named by
  its sha256 and of its declared size, diff_ids the sha256 of the uncompressed layers.
* Bad declarations are typed errors naming the path.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import sys
import tarfile

import pytest
from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "packaging"))
import oci  # noqa: E402

EPOCH = 1_700_000_000


def tiny_layer() -> oci.Layer:
    layer = oci.Layer()
    layer.file("usr/bin/tool", b"#!binary\n", 0o755)
    layer.file("etc/app/app.conf", b"key = 1\n", 0o640, 0, 65532)
    layer.dir("var/lib/app", 0o750, 65532, 65532)
    layer.symlink("usr/local/bin/tool", "/usr/bin/tool")
    layer.hardlink("usr/bin/alias", "usr/bin/tool")
    layer.dir("tmp", 0o1777)
    return layer


def config() -> dict:
    return {"architecture": "amd64", "os": "linux", "created": "2023-11-14T22:13:20Z",
            "config": {"User": "65532:65532", "Entrypoint": ["/usr/bin/tool"]}}  # fmt: skip


def write(path, layer=None) -> tuple[dict, bytes]:
    layout = oci.Layout(str(path))
    raw = (layer or tiny_layer()).tar(EPOCH)
    desc = layout.image([raw], config(), {"org.opencontainers.image.version": "1"})
    index = layout.index([desc])
    layout.finish([("1", index)])
    return index, raw


def blob(layout, digest) -> bytes:
    data = open(os.path.join(layout, "blobs", "sha256", digest.split(":")[1]), "rb").read()
    assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
    return data


def test_same_inputs_same_digests(tmp_path):
    a, raw_a = write(tmp_path / "a")
    b, raw_b = write(tmp_path / "b")
    assert raw_a == raw_b and a["digest"] == b["digest"]
    assert open(tmp_path / "a" / "index.json", "rb").read() == open(tmp_path / "b" / "index.json", "rb").read()
    assert sorted(os.listdir(tmp_path / "a" / "blobs" / "sha256")) == sorted(
        os.listdir(tmp_path / "b" / "blobs" / "sha256")
    )
    assert oci.gzip_bytes(raw_a) == oci.gzip_bytes(raw_b)
    # one byte, or one mode bit, is a different image
    changed = tiny_layer()
    changed.entries.pop("etc/app/app.conf")
    changed.file("etc/app/app.conf", b"key = 2\n", 0o640, 0, 65532)
    assert write(tmp_path / "c", changed)[0]["digest"] != a["digest"]
    moded = tiny_layer()
    moded.entries.pop("etc/app/app.conf")
    moded.file("etc/app/app.conf", b"key = 1\n", 0o644, 0, 65532)
    assert write(tmp_path / "d", moded)[0]["digest"] != a["digest"]
    # archives of equal layouts are equal
    la, lb = oci.Layout(str(tmp_path / "a")), oci.Layout(str(tmp_path / "b"))
    assert (
        open(la.archive(str(tmp_path / "a.tar"), EPOCH), "rb").read()
        == open(lb.archive(str(tmp_path / "b.tar"), EPOCH), "rb").read()
    )


def test_tar_holds_exactly_what_was_declared():
    raw = tiny_layer().tar(EPOCH)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    regular = [n for n, m in zip(names, members) if not m.islnk()]
    assert regular == sorted(regular)
    assert names[-1] == "usr/bin/alias" and members[-1].islnk() and members[-1].linkname == "usr/bin/tool"
    by = {m.name: m for m in members}
    assert set(by) == {"etc", "etc/app", "etc/app/app.conf", "tmp", "usr", "usr/bin", "usr/bin/tool", "usr/bin/alias",
                       "usr/local", "usr/local/bin", "usr/local/bin/tool", "var", "var/lib", "var/lib/app"}  # fmt: skip
    assert all(m.mtime == EPOCH and m.uname == "" and m.gname == "" and not m.pax_headers for m in members)
    assert (by["usr"].mode, by["usr"].uid, by["usr"].gid) == (0o755, 0, 0)  # implied parent
    assert (by["var/lib/app"].mode, by["var/lib/app"].uid, by["var/lib/app"].gid) == (0o750, 65532, 65532)
    assert (by["etc/app/app.conf"].mode, by["etc/app/app.conf"].gid) == (0o640, 65532)
    assert by["tmp"].mode == 0o1777 and by["usr/bin/tool"].mode == 0o755
    assert by["usr/local/bin/tool"].issym() and by["usr/local/bin/tool"].linkname == "/usr/bin/tool"


def test_layout_verifies(tmp_path):
    index_desc, raw = write(tmp_path / "l")
    layout = str(tmp_path / "l")
    assert json.load(open(os.path.join(layout, "oci-layout"))) == {"imageLayoutVersion": "1.0.0"}
    top = json.load(open(os.path.join(layout, "index.json")))
    (entry,) = top["manifests"]
    assert entry["mediaType"] == oci.MEDIA_INDEX and entry["annotations"]["org.opencontainers.image.ref.name"] == "1"
    index = json.loads(blob(layout, entry["digest"]))
    (mdesc,) = index["manifests"]
    assert mdesc["platform"] == {"architecture": "amd64", "os": "linux"}
    mbytes = blob(layout, mdesc["digest"])
    assert len(mbytes) == mdesc["size"]
    manifest = json.loads(mbytes)
    assert manifest["mediaType"] == oci.MEDIA_MANIFEST and manifest["config"]["mediaType"] == oci.MEDIA_CONFIG
    cfg = json.loads(blob(layout, manifest["config"]["digest"]))
    (layer,) = manifest["layers"]
    gz = blob(layout, layer["digest"])
    assert layer["mediaType"] == oci.MEDIA_LAYER_GZIP and len(gz) == layer["size"]
    assert gzip.decompress(gz) == raw
    assert cfg["rootfs"] == {"type": "layers", "diff_ids": [oci.sha256(raw)]}
    assert cfg["config"]["User"] == "65532:65532"


def test_docker_archive_matches_the_oci_config(tmp_path):
    raw = tiny_layer().tar(EPOCH)
    path = oci.docker_archive(str(tmp_path / "d.tar"), "tool:1", [raw], config(), EPOCH)
    with tarfile.open(path) as tar:
        (m,) = json.load(tar.extractfile("manifest.json"))
        cfg = tar.extractfile(m["Config"]).read()
        assert tar.extractfile(m["Layers"][0]).read() == raw
    assert m["RepoTags"] == ["tool:1"]
    assert m["Config"] == oci.sha256(oci.config_blob(config(), [raw])).split(":")[1] + ".json"
    assert json.loads(cfg)["rootfs"]["diff_ids"] == [oci.sha256(raw)]


def test_tree_takes_content_and_exec_bit_only(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "run").write_bytes(b"x")
    (src / "sub" / "secret").write_bytes(b"y")
    os.chmod(src / "run", 0o700)
    os.chmod(src / "sub" / "secret", 0o600)
    os.symlink("run", src / "link")
    layer = oci.Layer()
    layer.tree(str(src), "opt/app")
    e = layer.entries
    assert (e["opt/app/run"].mode, e["opt/app/run"].uid) == (0o755, 0)
    assert e["opt/app/sub/secret"].mode == 0o644
    assert e["opt/app/link"].kind == oci.SYMLINK and e["opt/app/link"].target == "run"


@pytest.mark.parametrize(
    "build, path",
    [
        (lambda layer: (layer.file("a", b"1"), layer.file("a", b"2")), "a"),
        (lambda layer: layer.file("../etc/passwd", b""), "../etc/passwd"),
        (lambda layer: layer.file("/", b""), "/"),
        (lambda layer: layer.file("a", b"", 0o100644), "a"),
    ],
)
def test_bad_declarations_name_the_path(build, path):
    with pytest.raises(oci.LayerError) as exc:
        build(oci.Layer())
    assert exc.value.path == path


def test_bad_trees_are_refused_at_tar_time():
    layer = oci.Layer()
    layer.hardlink("b", "missing")
    with pytest.raises(oci.LayerError, match="hard link"):
        layer.tar(EPOCH)
    layer = oci.Layer()
    layer.file("a", b"")
    layer.file("a/b", b"")
    with pytest.raises(oci.LayerError, match="not a directory"):
        layer.tar(EPOCH)
