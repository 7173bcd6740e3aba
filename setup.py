"""Build script for the `fluxrig` distribution: compiles the Cython twins in fluxrig/_speedups/.

Each twin is compiled from the *same source* as its pure-Python original (plain typed Python
plus a .pxd declaring C types), or from a hand-written .pyx where C buffers are needed. The
build says aloud whether it is accelerated or pure.

Environment:
  FLUXRIG_PURE_PYTHON=1          build nothing, install the pure-Python package only.
  FLUXRIG_REQUIRE_EXTENSIONS=1   a failed or impossible compile is an error (CI, `make test`,
                                 `make binary`), never a silent slow path.
"""

import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

# (compiled module name, source compiled, .pxd augmenting a .py source or None)
SPEEDUPS = [
    ("fluxrig._speedups.framing", "fluxrig/framing/core.py", "fluxrig/_speedups/framing.pxd"),
    ("fluxrig._speedups.iso8583", "fluxrig/iso8583/codec_py.py", "fluxrig/_speedups/iso8583.pxd"),
    ("fluxrig._speedups.crc32c", "fluxrig/wal/crc32c.py", "fluxrig/_speedups/crc32c.pxd"),
]

HERE = os.path.dirname(os.path.abspath(__file__))
STAGE = os.path.join("build", "cysrc")


def _truthy(name):
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _stage_source(module, source, pxd):
    """Copy a .py original (and its .pxd) under the twin's module name, so Cython compiles
    one source twice without symlinks or generated files in the tree."""
    if source.endswith(".pyx"):
        return source
    parts = module.split(".")
    target_dir = os.path.join(STAGE, *parts[:-1])
    os.makedirs(target_dir, exist_ok=True)
    for i in range(1, len(parts)):
        init = os.path.join(STAGE, *parts[:i], "__init__.py")
        if not os.path.exists(init):
            open(init, "w").close()
    target = os.path.join(target_dir, parts[-1] + ".py")
    shutil.copyfile(source, target)
    if pxd:
        shutil.copyfile(pxd, os.path.join(target_dir, parts[-1] + ".pxd"))
    return target


def _extensions():
    if _truthy("FLUXRIG_PURE_PYTHON"):
        print("fluxrig build: pure (FLUXRIG_PURE_PYTHON set, no extension compiled)")
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        if _truthy("FLUXRIG_REQUIRE_EXTENSIONS"):
            raise SystemExit("fluxrig build: Cython is missing and FLUXRIG_REQUIRE_EXTENSIONS=1")
        print("fluxrig build: pure (Cython not installed)")
        return []
    from setuptools import Extension

    exts = []
    for module, source, pxd in SPEEDUPS:
        if not os.path.exists(source):
            if _truthy("FLUXRIG_REQUIRE_EXTENSIONS"):
                raise SystemExit(f"fluxrig build: source {source} for {module} is missing")
            print(f"fluxrig build: skipping {module}: {source} not present")
            continue
        staged = _stage_source(module, source, pxd)
        exts.append(Extension(module, [staged], extra_compile_args=["-O2"]))
    return cythonize(
        exts,
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
        quiet=True,
    )


class BuildExt(build_ext):
    """Reports the backend; in required mode a compile failure stops the build."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # compiler missing or broken
            if _truthy("FLUXRIG_REQUIRE_EXTENSIONS"):
                raise
            print(f"fluxrig build: pure (compiling the speedups failed: {exc})")
            return
        if self.extensions:
            names = ", ".join(e.name for e in self.extensions)
            print(f"fluxrig build: accelerated ({names})")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            if _truthy("FLUXRIG_REQUIRE_EXTENSIONS"):
                raise
            print(f"fluxrig build: {ext.name} left pure ({exc})", file=sys.stderr)


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExt})
