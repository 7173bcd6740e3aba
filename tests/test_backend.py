"""The twins' naming and the backend switch (fluxrig/_backend.py) and the build around it (setup.py).

One naming: every twin is `<pkg>/<name>_py.py` + `<pkg>/<name>_c.pxd`, compiled into
`<pkg>.<name>_c` beside the source, bound by `<pkg>/<name>.py` as XxxPy / XxxC / Xxx plus one
BACKEND per package. One variable, FLUXRIG_REQUIRE_ACCELERATED, makes a missing twin an error at
import and a failed compile an error at build; without it both fall back to pure. The trees
without compiled twins are copies of the package in tmp_path, so the checkout is never touched.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import ROOT

from fluxrig import _backend
from fluxrig.cli.cmd_version import version_info

PY = sys.executable

# package key -> (binding module, public name without suffix)
PAIRS = {
    "framing": [("fluxrig.framing.core", n) for n in ("DelimiterFramer", "LengthPrefixFramer", "FixedFramer")],
    "iso8583": [("fluxrig.iso8583.codec", "Codec")],
    "wal": [("fluxrig.wal.crc32c", "crc32c"), ("fluxrig.wal.crc32c", "crc32c_prefix")],
}


def setup_twins() -> tuple[str, ...]:
    """setup.py's TWINS literal, read without running setup.py."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "TWINS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no TWINS")


def test_setup_and_backend_list_the_same_twins_and_the_files_follow_the_naming():
    stems = setup_twins()
    assert sorted(stems) == sorted(m.replace(".", "/") for m in _backend.TWINS.values())
    for stem in stems:
        assert os.path.exists(os.path.join(ROOT, stem + "_py.py")), stem
        assert os.path.exists(os.path.join(ROOT, stem + "_c.pxd")), stem
        assert os.path.exists(os.path.join(ROOT, stem + ".py")), stem  # the binding module
    assert not os.path.exists(os.path.join(ROOT, "fluxrig", "_speedups")), "the old twin folder is back"


def test_one_backend_per_package_and_the_names_it_binds():
    backends = _backend.backends()
    assert set(backends) == set(_backend.TWINS) == {"framing", "iso8583", "wal"}
    for package, backend in backends.items():
        assert importlib.import_module(f"fluxrig.{package}").BACKEND == backend
        if os.environ.get("FLUXRIG_PURE_PYTHON") == "1":
            assert backend == "pure"
        if os.environ.get("FLUXRIG_REQUIRE_ACCELERATED") == "1" and os.environ.get("FLUXRIG_PURE_PYTHON") != "1":
            assert backend == "cython"
        for module, name in PAIRS[package]:
            mod = importlib.import_module(module)
            suffix_py, suffix_c = ("_py", "_c") if name.islower() else ("Py", "C")
            pure, compiled, active = (getattr(mod, name + suffix_py), getattr(mod, name + suffix_c), getattr(mod, name))
            assert name + suffix_py in mod.__all__ and name + suffix_c in mod.__all__ and name in mod.__all__
            if backend == "cython":
                assert active is compiled and compiled is not None and compiled is not pure
            else:
                assert active is pure and compiled is None


def test_version_names_each_twin():
    info = version_info()
    assert info["backends"] == _backend.backends()
    assert info["backend"] == _backend.backend_name()
    assert info["backend"] in ("cython", "pure", "mixed")


# ---------------------------------------------------------------- trees without compiled twins


def source_copy(tmp_path) -> str:
    """The package's sources in tmp_path, without any compiled twin."""
    dest = tmp_path / "tree"
    shutil.copytree(
        os.path.join(ROOT, "fluxrig"),
        dest / "fluxrig",
        ignore=shutil.ignore_patterns("*.so", "*.pyd", "*.c", "__pycache__", "_build_info.py"),
    )
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(os.path.join(ROOT, name), dest / name)
    return str(dest)


def run_in(tree: str, code: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FLUXRIG_")}
    clean.update(env, PYTHONPATH=tree)
    return subprocess.run([PY, "-c", code], cwd=tree, env=clean, capture_output=True, text=True, timeout=60)


SHOW = (
    "import json, fluxrig.framing as f, fluxrig.cli.cmd_version as v; "
    "assert f.__file__.startswith(%r), f.__file__; print(json.dumps(v.version_info()))"
)


def test_without_twins_the_package_runs_pure_unless_required(tmp_path):
    tree = source_copy(tmp_path)
    r = run_in(tree, SHOW % tree)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["backend"] == "pure" and set(info["backends"].values()) == {"pure"}
    required = run_in(tree, SHOW % tree, FLUXRIG_REQUIRE_ACCELERATED="1")
    assert required.returncode != 0
    assert "ImportError" in required.stderr and "FLUXRIG_REQUIRE_ACCELERATED=1" in required.stderr
    # FLUXRIG_PURE_PYTHON wins over the require variable
    both = run_in(tree, SHOW % tree, FLUXRIG_REQUIRE_ACCELERATED="1", FLUXRIG_PURE_PYTHON="1")
    assert both.returncode == 0 and json.loads(both.stdout)["backend"] == "pure", both.stderr


def test_a_py_posing_as_the_twin_does_not_pass_for_it(tmp_path):
    tree = source_copy(tmp_path)
    shutil.copy(
        os.path.join(tree, "fluxrig", "wal", "crc32c_py.py"), os.path.join(tree, "fluxrig", "wal", "crc32c_c.py")
    )
    code = "import fluxrig.wal as w; print(w.BACKEND)"
    r = run_in(tree, code)
    assert r.returncode == 0 and r.stdout.strip() == "pure", r.stderr
    required = run_in(tree, code, FLUXRIG_REQUIRE_ACCELERATED="1")
    assert required.returncode != 0 and "is not a compiled extension" in required.stderr


def test_the_old_build_variable_is_refused_by_name():
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUXRIG_")}
    env["FLUXRIG_REQUIRE_EXTENSIONS"] = "1"
    r = subprocess.run([PY, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "FLUXRIG_REQUIRE_EXTENSIONS is now FLUXRIG_REQUIRE_ACCELERATED" in r.stderr


@pytest.mark.slow
def test_a_missing_compiler_leaves_the_build_pure_unless_required(tmp_path):
    tree = source_copy(tmp_path)
    cached = os.path.join(ROOT, "build", "cysrc")
    if os.path.isdir(cached):  # translated C with its mtimes: Cython need not run again
        shutil.copytree(cached, os.path.join(tree, "build", "cysrc"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUXRIG_")}
    env["CC"] = "false"  # a compiler that fails every compile
    cmd = [PY, "setup.py", "build_ext", "--build-lib", "lib", "--build-temp", "tmp"]
    r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "left pure" in r.stdout + r.stderr
    assert not any(name.endswith(".so") for _d, _s, files in os.walk(os.path.join(tree, "lib")) for name in files)
    env["FLUXRIG_REQUIRE_ACCELERATED"] = "1"
    required = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=600)
    assert required.returncode != 0
