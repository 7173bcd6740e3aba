"""Build script for the `fluxrig` distribution: compiles the Cython twins, beside their sources.

One naming for every twin (see fluxrig/_backend.py): the pure-Python original
`<pkg>/<name>_py.py` is compiled a second time, with the C declarations of `<pkg>/<name>_c.pxd`,
into the extension module `<pkg>.<name>_c`, which lands beside the source
(`fluxrig/framing/core_c.cpython-311-x86_64-linux-gnu.so`). A hand-written `<pkg>/<name>_c.pyx`
(where C buffers are needed) is compiled instead when it exists. The build says aloud whether it
is accelerated or pure.

Environment (the same two names the import-time switch in fluxrig/_backend.py reads):
  FLUXRIG_PURE_PYTHON=1          build nothing, install the pure-Python package only.
  FLUXRIG_REQUIRE_ACCELERATED=1  a failed or impossible compile is an error (CI, `make test`,
                                 `make binary`, packaging/build.sh), never a silent slow path.
Without the second, a machine without Cython or a C compiler still installs (pure).
"""

import os
import shutil
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# Every twin, as its path stem: "<stem>_py.py" + "<stem>_c.pxd" -> extension "<stem>_c".
# Keep in step with fluxrig._backend.TWINS (tests/test_backend.py checks).
TWINS = (
    "fluxrig/framing/core",
    "fluxrig/iso8583/codec",
    "fluxrig/wal/crc32c",
)

REQUIRE_ENV = "FLUXRIG_REQUIRE_ACCELERATED"
PURE_ENV = "FLUXRIG_PURE_PYTHON"
# The build-time name before the two were made one; refused so a script still setting it does
# not silently lose the guarantee it asked for.
_RENAMED_ENV = "FLUXRIG_REQUIRE_EXTENSIONS"

STAGE = os.path.join("build", "cysrc")


def _truthy(name):
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


if _truthy(_RENAMED_ENV) and not _truthy(REQUIRE_ENV):
    raise SystemExit(f"fluxrig build: {_RENAMED_ENV} is now {REQUIRE_ENV}; set {REQUIRE_ENV}=1 instead")

REQUIRED = _truthy(REQUIRE_ENV) and not _truthy(PURE_ENV)


def _not_built(reason):
    """A twin that cannot be built: an error in required mode, else a loud note."""
    if REQUIRED:
        raise SystemExit(f"fluxrig build: {reason} and {REQUIRE_ENV}=1")
    print(f"fluxrig build: {reason}; that twin stays pure", file=sys.stderr)


def _stage(stem):
    """The file Cython compiles for `stem`: the hand-written .pyx, or a copy of the .py original
    (with its .pxd) under the twin's module name, so one source is compiled twice without
    symlinks or generated files in the tree. copy2 keeps the mtimes, so an unchanged source is
    not translated again."""
    pyx = stem + "_c.pyx"
    if os.path.exists(pyx):
        return pyx
    source, pxd = stem + "_py.py", stem + "_c.pxd"
    for path in (source, pxd):
        if not os.path.exists(path):
            _not_built(f"{path} is missing")
            return None
    target_dir = os.path.join(STAGE, os.path.dirname(stem))
    os.makedirs(target_dir, exist_ok=True)
    parts = os.path.dirname(stem).split("/")
    for i in range(1, len(parts) + 1):
        init = os.path.join(STAGE, *parts[:i], "__init__.py")
        if not os.path.exists(init):
            open(init, "w").close()
    name = os.path.basename(stem) + "_c"
    shutil.copy2(source, os.path.join(target_dir, name + ".py"))
    shutil.copy2(pxd, os.path.join(target_dir, name + ".pxd"))
    return os.path.join(target_dir, name + ".py")


def _extensions():
    if _truthy(PURE_ENV):
        print(f"fluxrig build: pure ({PURE_ENV} set, no extension compiled)")
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        if REQUIRED:
            raise SystemExit(f"fluxrig build: Cython is missing and {REQUIRE_ENV}=1") from None
        print("fluxrig build: pure (Cython not installed)")
        return []
    exts = []
    for stem in TWINS:
        staged = _stage(stem)
        if staged is not None:
            exts.append(Extension(stem.replace("/", ".") + "_c", [staged], extra_compile_args=["-O2"]))
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
            if REQUIRED:
                raise
            print(f"fluxrig build: pure (compiling the twins failed: {exc})")
            return
        built = [e.name for e in self.extensions if e.name not in self._left_pure]
        if built:
            print(f"fluxrig build: accelerated ({', '.join(built)})")
        if self._left_pure:
            print(f"fluxrig build: left pure: {', '.join(self._left_pure)}")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            if REQUIRED:
                raise
            self._left_pure.append(ext.name)
            print(f"fluxrig build: {ext.name} left pure ({exc})", file=sys.stderr)

    def initialize_options(self):
        super().initialize_options()
        self._left_pure = []


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExt})
