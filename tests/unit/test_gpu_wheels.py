"""The wheel list for a lent GPU machine stays in step with pyproject.toml."""

from __future__ import annotations

import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]


def _pinned() -> dict[str, str]:
    pins = {}
    for line in (REPO / "scripts" / "gpu_wheels.txt").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, version = line.strip().partition("==")
            assert version, f"scripts/gpu_wheels.txt: '{line}' is not name==version"
            pins[canonicalize_name(name)] = version
    return pins


def test_every_carried_wheel_satisfies_pyproject() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    required = {canonicalize_name(r.name): r for r in map(Requirement, project["dependencies"])}
    pins = _pinned()
    # What dist_lora imports that the GPU machine lacks: each must be carried.
    for name in ("diffusers", "webdataset", "bitsandbytes", "deepspeed"):
        assert name in pins, f"scripts/gpu_wheels.txt must carry {name}"
    for name, version in pins.items():
        if name in required:
            assert required[name].specifier.contains(version, prereleases=True), \
                f"scripts/gpu_wheels.txt pins {name}=={version}, outside pyproject.toml's '{required[name]}'"
