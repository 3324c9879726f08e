"""The install path: the pinned environment and docker/minkowski/build.sh's argument handling.

The cold MinkowskiEngine build itself is exercised by CI (`.ci/run` runs `make demo` with an
empty build cache); these tests cover what can go wrong cheaply: relative paths given from
another directory, a wrong source tarball, and a venv that drifted from the lock file.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILD_SH = REPO / "docker" / "minkowski" / "build.sh"
LOCK = REPO / "requirements" / "lock.txt"
REQUIREMENTS_IN = REPO / "requirements" / "requirements.in"
_PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==(\S+)")


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        if m := _PIN.match(line.strip()):
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def _names(path: Path) -> list[str]:
    names = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(re.split(r"[=<>!~\[; ]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def test_lock_pins_every_requirement_and_torch_with_its_torchvision():
    pins = _pins(LOCK)
    missing = [n for n in _names(REQUIREMENTS_IN) if n not in pins]
    assert not missing, f"{missing} are in requirements.in but not pinned in lock.txt: run `make lock`"
    # requirements.in pins the pair itself; the lock must carry exactly those versions.
    wanted = {n: v for n, v in (l.split("==") for l in REQUIREMENTS_IN.read_text().splitlines() if "==" in l)}
    for name, version in wanted.items():
        assert pins[name] == version, f"lock.txt has {name}=={pins[name]}, requirements.in wants {version}"
    assert {"torch", "torchvision", "timm", "hydra-core", "omegaconf", "wandb", "numpy", "pillow",
            "tqdm", "matplotlib", "pytest", "setuptools", "pip"} <= pins.keys()


@pytest.mark.skipif(not (Path(sys.prefix) / ".spark_me_lock").is_file(),
                    reason="checks a venv made by make install (which marks it); this one was not")
def test_the_project_venv_holds_exactly_the_locked_versions():
    drift = {}
    for name, version in _pins(LOCK).items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = None
        if have != version:
            drift[name] = (have, version)
    assert not drift, f"installed vs locked: {drift}; run `make install`"


def _build_sh(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(BUILD_SH), *args], capture_output=True, text=True, cwd=cwd, timeout=120,
                          env={**os.environ, "SPARK_ME_CACHE": str(cwd / "cache")})


def test_build_sh_takes_relative_paths_from_the_calling_directory(tmp_path):
    """Relative --python and --sdist keep working after the script changes directory."""
    work = tmp_path / "somewhere"
    work.mkdir()
    (work / "fake.tar.gz").write_bytes(b"not MinkowskiEngine")
    python = os.path.relpath(sys.executable, work)
    assert not os.path.isabs(python)
    proc = _build_sh("--python", python, "--sdist", "fake.tar.gz", "--download-source", "out", cwd=work)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    # The check ran on the file named relative to `work`, reported with its absolute path.
    assert f"sha256 of '{work / 'fake.tar.gz'}' does not match MinkowskiEngine 0.5.4" in proc.stderr
    assert not (work / "out").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--python", "no/such/python"], r"--python '.*/no/such/python' is not an executable file"),
        (["--python", "no-such-python-here"], r"--python 'no-such-python-here' is not on PATH"),
        (["--target", "tpu"], r"--target must be 'cpu' or 'cuda', got 'tpu'"),
        (["--frobnicate"], r"unknown argument '--frobnicate'"),
        (["--sdist", "missing.tar.gz", "--download-source", "out"], r"source tarball '/.*/missing.tar.gz' not found"),
    ],
)
def test_build_sh_bad_arguments_fail_with_a_clear_message(tmp_path, args, message):
    if "--python" not in args:
        args = ["--python", sys.executable, *args]
    proc = _build_sh(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert re.search(message, proc.stderr), proc.stderr
