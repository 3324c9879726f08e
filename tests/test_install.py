"""The install path: the pinned environment and docker/minkowski/build.sh's argument handling.

The cold MinkowskiEngine build itself is exercised by CI (`.ci/run` runs `make demo` with an
empty build cache); these tests cover what can go wrong cheaply: relative paths given from
another directory, a wrong source tarball, a venv that drifted from the lock file, and the
prebuilt-wheel path a GPU node installs from (key, match, no match, manifest).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Optional

import pytest
import torch

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


def _build_sh(*args: str, cwd: Path, env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(BUILD_SH), *args], capture_output=True, text=True, cwd=cwd, timeout=120,
                          env={**os.environ, "SPARK_ME_CACHE": str(cwd / "cache"), **(env or {})})


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


def _key(tmp_path: Path) -> str:
    proc = _build_sh("--python", sys.executable, "--target", "cpu", "--print-key", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.strip()


def test_build_sh_prints_the_key_of_this_python_torch_and_target(tmp_path):
    key = _key(tmp_path)
    py_tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    assert key.startswith(f"me0.5.4-torch{torch.__version__.replace('+', '_')}-{py_tag}-cpu-p"), key
    assert not (tmp_path / "cache").exists(), "--print-key must not create the cache"


def test_build_sh_uses_a_prebuilt_wheel_whose_key_matches_without_compiling(tmp_path):
    """A GPU node's wheel compiled elsewhere (tools/prebuild_minkowski.sh) is taken as is:
    nothing is unpacked or compiled (the bogus --sdist would fail the compile's sha256
    check), and the cache stays empty, so a rerun without --prebuilt compiles."""
    key = _key(tmp_path)
    wheel = tmp_path / "prebuilt" / key / "MinkowskiEngine-0.5.4-cp3-cp3-linux_x86_64.whl"
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(b"a wheel")
    (tmp_path / "fake.tar.gz").write_bytes(b"not MinkowskiEngine")
    proc = _build_sh("--python", sys.executable, "--target", "cpu", "--sdist", "fake.tar.gz", "--prebuilt", "prebuilt",
                     "--no-install", "--wheel-dir", "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"using the prebuilt wheel {wheel}" in proc.stdout
    assert (tmp_path / "out" / wheel.name).read_bytes() == b"a wheel"
    assert not list((tmp_path / "cache").rglob("*.whl"))


def test_build_sh_says_which_prebuilt_keys_it_found_when_none_matches(tmp_path):
    key = _key(tmp_path)
    other = tmp_path / "prebuilt" / (key + "-nvcc99.9-sm90") / "MinkowskiEngine-0.5.4-x.whl"
    other.parent.mkdir(parents=True)
    other.write_bytes(b"another machine's wheel")
    (tmp_path / "fake.tar.gz").write_bytes(b"not MinkowskiEngine")
    proc = _build_sh("--python", sys.executable, "--target", "cpu", "--sdist", "fake.tar.gz", "--prebuilt", "prebuilt",
                     "--no-install", cwd=tmp_path)
    # No match: it goes on to compile, which here stops at the bogus source's sha256 check.
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"no prebuilt wheel for {key} in {tmp_path / 'prebuilt'} (it has: {other.parent.name} ); compiling" in proc.stdout
    assert "does not match MinkowskiEngine 0.5.4's source" in proc.stderr


def test_build_sh_keys_an_architecture_specific_target_as_the_plain_one(tmp_path):
    """A node whose environment asks for 9.0a must find the wheel prebuilt for 9.0 (the
    same MinkowskiEngine code); other architectures still get keys of their own. The
    toolkit is a stand-in nvcc that only reports its release."""
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text('#!/bin/sh\necho "Cuda compilation tools, release 13.0, V13.0.48"\n')
    nvcc.chmod(0o755)

    def key(archs: str) -> str:
        proc = _build_sh("--python", sys.executable, "--target", "cuda", "--print-key", cwd=tmp_path,
                         env={"CUDA_HOME": str(nvcc.parents[1]), "TORCH_CUDA_ARCH_LIST": archs})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout.strip()

    assert key("9.0a").endswith("-nvcc13.0-sm90")
    assert key("9.0a") == key("9.0")
    assert key("8.0;9.0a;10.0f") == key("8.0;9.0;10.0") != key("9.0")
    assert key("9.0a+PTX") == key("9.0+PTX") != key("9.0")


def test_build_sh_copies_its_wheel_under_its_key_for_another_machine(tmp_path):
    key = _key(tmp_path)
    cached = tmp_path / "cache" / "wheels" / key / "MinkowskiEngine-0.5.4-y.whl"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"built here")
    proc = _build_sh("--python", sys.executable, "--target", "cpu", "--no-install", "--prebuilt-out", "wh/prebuilt",
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"using cached wheel {cached}" in proc.stdout
    assert (tmp_path / "wh" / "prebuilt" / key / cached.name).read_bytes() == b"built here"


def test_the_wheelhouse_manifest_lists_and_checks_prebuilt_wheels(tmp_path):
    (tmp_path / "a.whl").write_bytes(b"a")
    (tmp_path / "prebuilt" / "k").mkdir(parents=True)
    (tmp_path / "prebuilt" / "k" / "me.whl").write_bytes(b"me")
    script = REPO / "tools" / "wheelhouse_manifest.sh"
    proc = subprocess.run(["bash", str(script), str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    listed = [line.split()[-1] for line in (tmp_path / "MANIFEST.txt").read_text().splitlines()]
    assert listed == ["a.whl", "prebuilt/k/me.whl"]
    assert "1 prebuilt MinkowskiEngine wheels" in proc.stdout
    # the size limit (the GPU node's carry) is enforced
    proc = subprocess.run(["bash", str(script), str(tmp_path)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "WHEELHOUSE_MAX_MIB": "0"})
    assert proc.returncode == 2 and "over the 0 MiB limit" in proc.stderr
