"""Files whose unpickling would run code are refused by every entry point that reads one.

Each payload's ``__reduce__`` asks the unpickler to call a function with a side effect
(``os.system`` creating a marker file, ``builtins.exec``, ``subprocess.call``). Every loader
and every CLI that reads a checkpoint must refuse it with ``CheckpointError``, and the
marker must never appear. The assertion is on the side effect itself, so it holds on any
torch version: it does not depend on which harmless objects a given ``weights_only``
loader happens to accept.
"""
from __future__ import annotations

import builtins
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from spark_me.checkpoint import FORMAT, CheckpointError, load_checkpoint, load_file, load_model
from spark_me.export import export_encoder
from spark_me.pretrain import load_init_weights

REPO = Path(__file__).resolve().parents[1]


class _SystemCall:
    """Unpickles as ``os.system(command)``."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _Exec:
    """Unpickles as ``exec(source)``."""

    def __init__(self, source: str):
        self.source = source

    def __reduce__(self):
        return builtins.exec, (self.source,)


class _Subprocess:
    """Unpickles as ``subprocess.call(argv)``."""

    def __init__(self, argv: list[str]):
        self.argv = argv

    def __reduce__(self):
        return subprocess.call, (self.argv,)


def _payloads(marker: Path) -> dict[str, object]:
    return {
        "os.system": _SystemCall(f"touch {marker}"),
        "exec": _Exec(f"open({str(marker)!r}, 'w').close()"),
        "subprocess.call": _Subprocess(["touch", str(marker)]),
    }


def _write(path: Path, payload: object, how: str) -> Path:
    """A checkpoint-shaped dict (right format key, real tensors) with the payload inside."""
    obj = {"format": FORMAT, "step": 1, "model_name": "resnet18", "decoder_width": 64,
           "model": {"w": torch.zeros(2)}, "config": {"model": {"imports": []}}, "evil": payload}
    if how == "zip":  # torch.save's default format
        torch.save(obj, path)
    elif how == "legacy":  # torch.save's pre-1.6 format
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:  # a bare pickle
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    return path


def _marker(tmp_path: Path) -> Path:
    marker = tmp_path / "PWNED"
    assert not marker.exists()
    return marker


def test_payloads_do_run_code_when_unpickled_without_restriction(tmp_path):
    """The payloads are real: plain ``pickle.load`` (never used by spark_me) runs them."""
    for name, payload in _payloads(tmp_path / "ran").items():
        marker = tmp_path / "ran"
        path = _write(tmp_path / f"{name}.pkl", payload, "pickle")
        with open(path, "rb") as f:
            pickle.load(f)  # noqa: S301 (the point of this test)
        assert marker.exists(), name
        marker.unlink()


@pytest.mark.parametrize("how", ["zip", "legacy", "pickle"])
@pytest.mark.parametrize("kind", ["os.system", "exec", "subprocess.call"])
def test_every_loader_refuses_code_running_pickles(tmp_path, kind, how):
    marker = _marker(tmp_path)
    path = _write(tmp_path / "evil.pt", _payloads(marker)[kind], how)
    loaders = {
        "load_file": lambda: load_file(path),
        "load_checkpoint (resume)": lambda: load_checkpoint(path),
        "load_model (export, reconstruct)": lambda: load_model(path),
        "export_encoder": lambda: export_encoder(path, tmp_path / "out.pth"),
        "load_init_weights (model.init)": lambda: load_init_weights(None, path),  # type: ignore[arg-type]
    }
    for name, load in loaders.items():
        with pytest.raises(CheckpointError, match="cannot read checkpoint"):
            load()
        assert not marker.exists(), f"{name} ran the payload of a {how} {kind} pickle"
    assert not (tmp_path / "out.pth").exists()


def _run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600, cwd=cwd)


def test_cli_entry_points_refuse_code_running_checkpoints(tmp_path):
    """End to end: resume (a file and auto), model.init, spark-me-export, spark-me-reconstruct."""
    marker = _marker(tmp_path)
    evil = _write(tmp_path / "evil.pt", _payloads(marker)["os.system"], "zip")
    Image.new("RGB", (64, 64), (120, 30, 200)).save(tmp_path / "img.png")
    tiny = ["model=resnet18", "model.decoder_width=64", "data.image_size=64", "data.num_workers=0",
            "trainer.device=cpu", "trainer.progress_bar=false", "trainer.max_steps=1"]
    # Auto-resume finds a planted newest checkpoint in the run's own folder.
    planted = tmp_path / "auto" / "checkpoints"
    planted.mkdir(parents=True)
    _write(planted / "step_00000009.pt", _payloads(marker)["os.system"], "zip")
    pretrain = ["-m", "spark_me.pretrain", "experiment=demo", *tiny]
    cases = {
        "resume": [*pretrain, f"trainer.resume={evil}", f"trainer.output_dir={tmp_path / 'resume'}",
                   f"hydra.run.dir={tmp_path / 'resume'}"],
        "resume=auto": [*pretrain, "trainer.resume=auto", f"trainer.output_dir={tmp_path / 'auto'}",
                        f"hydra.run.dir={tmp_path / 'auto'}"],
        "model.init": [*pretrain, f"model.init={evil}", f"trainer.output_dir={tmp_path / 'init'}",
                       f"hydra.run.dir={tmp_path / 'init'}"],
        "export": ["-m", "spark_me.export", str(evil), "--out", str(tmp_path / "enc.pth")],
        "reconstruct": ["-m", "spark_me.reconstruct_cli", str(evil), str(tmp_path / "img.png"),
                        "--out", str(tmp_path / "grid.png"), "--device", "cpu"],
    }
    for name, args in cases.items():
        proc = _run_cli(args, tmp_path)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0, f"{name} accepted a code-running checkpoint:\n{out[-3000:]}"
        assert "cannot read checkpoint" in out and "Traceback" not in out, f"{name}:\n{out[-3000:]}"
        assert not marker.exists(), f"{name} ran the payload"
    assert not (tmp_path / "enc.pth").exists() and not (tmp_path / "grid.png").exists()
