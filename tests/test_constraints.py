"""constraints.txt pins every runtime dependency of both distributions, each pin satisfies its
floor, and the security floors (cbor2, h11) are where the CVEs put them."""

from __future__ import annotations

import os
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pins() -> dict[str, Version]:
    pins = {}
    with open(os.path.join(ROOT, "constraints.txt")) as fh:
        for line in fh:
            line = line.split("#", 1)[0].strip()
            if line:
                name, _, version = line.partition("==")
                pins[canonicalize_name(name)] = Version(version)
    return pins


def _requirements() -> list[Requirement]:
    reqs = []
    for path in ("pyproject.toml", "mixer/pyproject.toml"):
        with open(os.path.join(ROOT, path), "rb") as fh:
            project = tomllib.load(fh)["project"]
        deps = list(project["dependencies"])
        deps += project.get("optional-dependencies", {}).get("archive", [])
        deps += project.get("optional-dependencies", {}).get("speed", [])
        reqs += [Requirement(d) for d in deps if not d.startswith("fluxrig")]
    return reqs


def test_every_dependency_pinned_within_its_floor():
    pins = _pins()
    for req in _requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} violates {req}"


def test_security_floors():
    floors = {canonicalize_name(r.name): r.specifier for r in _requirements()}
    assert not floors["cbor2"].contains("5.8.0") and floors["cbor2"].contains("5.9.0")
    assert not floors["h11"].contains("0.15.0") and floors["h11"].contains("0.16.0")


def test_the_gateway_builds_respect_the_security_floors():
    """firmware-tests/target-build.sh installs its own requirements inside the ARM build roots:
    each cbor2 it asks for refuses the versions below the floor, and none comes from Debian
    (python3-cbor2 is 5.4 there)."""
    import re

    with open(os.path.join(ROOT, "firmware-tests", "target-build.sh")) as fh:
        script = fh.read()
    asked = [Requirement(w) for w in re.findall(r'"(cbor2\s*[<>=!~][^"]*)"', script)]
    assert len(asked) >= 2, asked  # arm64 and armhf
    for req in asked:
        assert not req.specifier.contains("5.8.0") and req.specifier.contains("5.9.0"), req
    assert not re.search(r"DEBIAN=\([^)]*python3-cbor2", script)
