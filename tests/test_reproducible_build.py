"""The frozen programs themselves are reproducible (issue 20 item 2, below the packages and
images, which are checked from one build in test_deb.py and test_image.py): two clean
PyInstaller builds of the same tree, with the same SOURCE_DATE_EPOCH, give a byte-identical
one-file Rack and a byte-identical one-folder Mixer (marker `image`: `make image-test`).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
from helpers import ROOT

pytestmark = [pytest.mark.image, pytest.mark.timeout(1800)]


def _tree_digest(path: str) -> dict[str, str]:
    """{relative path: sha256} of every file under `path` (a file: itself), and its modes."""
    if os.path.isfile(path):
        with open(path, "rb") as fh:
            return {".": hashlib.sha256(fh.read()).hexdigest() + f" {os.stat(path).st_mode & 0o777:o}"}
    out = {}
    for d, _dirs, files in os.walk(path):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = (
                    hashlib.sha256(fh.read()).hexdigest() + f" {os.stat(p).st_mode & 0o777:o}"
                )
    return out


def _build(target: str, tmp_path, n: int) -> str:
    dist, work = tmp_path / f"dist-{n}", tmp_path / f"work-{n}"
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        DISTPATH=str(dist),
        WORKPATH=str(work),
        SOURCE_DATE_EPOCH=os.environ.get("SOURCE_DATE_EPOCH") or "1764720000",
    )
    r = subprocess.run(["packaging/build.sh", target], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return str(dist / target)


@pytest.mark.parametrize("target", ["fluxrig", "fluxrig-mixer"])
def test_two_clean_builds_are_byte_identical(tmp_path, target):
    first = _tree_digest(_build(target, tmp_path, 1))
    second = _tree_digest(_build(target, tmp_path, 2))
    assert first, "nothing was built"
    differ = sorted(k for k in first.keys() | second.keys() if first.get(k) != second.get(k))
    assert not differ, f"{len(differ)} of {len(first)} files differ, e.g. {differ[:5]}"
    print(f"{target}: {len(first)} file(s), identical over two clean builds")
