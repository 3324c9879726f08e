"""Things going wrong (issue 10): checkpoints that would run code or were damaged, kills
mid-save, full or unwritable disks, branching a run, bad devices and loggers, and inputs that
would otherwise train nothing or fail with a traceback.

The security and lost-work cases run the real CLIs in subprocesses. Runs use
``experiment=demo`` with small overrides (no batch size set: the demo's 16).
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spark_me import SparK, build_sparse_encoder
from spark_me.checkpoint import (
    FORMAT,
    CheckpointDamagedError,
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    load_file,
    remove_stale_temporaries,
)
from spark_me.data import find_images
from spark_me.export import main as export_main
from spark_me.masking import check_mask_hides_something
from spark_me.preflight import ConfigError, check_wandb, wandb_mode
from spark_me.pretrain import run
from spark_me.reconstruct_cli import main as reconstruct_main
from spark_me.run_config import validate_config

REPO = Path(__file__).resolve().parents[1]
TINY = ["experiment=demo", "model=resnet18", "model.decoder_width=64", "data.image_size=64", "data.num_images=32",
        "data.num_workers=0", "trainer.device=cpu", "trainer.progress_bar=false", "logger.log_every=1",
        "logger.image_every=0", "logger.num_images=2"]


def _env(**extra: str) -> dict:
    return {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **extra}


def _cli(args: list[str], cwd: Path, env: dict | None = None, preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env or _env(), timeout=600,
                          cwd=cwd, preexec_fn=preexec)


def _pretrain(run_dir: Path, *overrides: str, cwd: Path, **kw) -> subprocess.CompletedProcess:
    return _cli(["-m", "spark_me.pretrain", *TINY, f"hydra.run.dir={run_dir}", *overrides], cwd, **kw)


def _compose(*overrides: str):
    import spark_me
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(spark_me.__file__).parent / "configs"), version_base="1.3"):
        return compose("pretrain", overrides=[*TINY, *overrides])


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _names(run_dir: Path) -> list[str]:
    return [p.name for p in list_checkpoints(run_dir / "checkpoints")]


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A CLI run of 4 steps with checkpoints at steps 2 and 4 (read-only: tests copy it)."""
    root = tmp_path_factory.mktemp("trained")
    proc = _pretrain(root / "run", "trainer.max_steps=4", "trainer.checkpoint_every=2", "trainer.keep_checkpoints=5",
                     cwd=root)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert _names(root / "run") == ["step_00000002.pt", "step_00000004.pt"]
    assert (root / "run" / ".hydra" / "config.yaml").is_file()
    return root / "run"


def _copy(trained: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run", symlinks=True))


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# ----------------------------------------------------------------------------- 1. security


def test_checkpoint_recorded_imports_are_never_imported_by_the_clis(tmp_path):
    """A downloaded folder: model.pt naming encoder_utils.py, which would run a command."""
    marker = tmp_path / "PWNED"
    (tmp_path / "encoder_utils.py").write_text(f"import os\nos.system('touch {marker}')\n")
    (tmp_path / "helper_pkg.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    ckpt = {"format": FORMAT, "step": 1, "model_name": "evil_net", "decoder_width": 64, "mask_ratio": 0.6,
            "image_size": 64, "model": {}, "config": {"model": {"imports": ["encoder_utils.py", "helper_pkg"]}}}
    torch.save(ckpt, tmp_path / "model.pt")
    Image.new("RGB", (64, 64), (10, 200, 30)).save(tmp_path / "img.png")
    cases = {
        "export": ["-m", "spark_me.export", "model.pt", "--out", "x.pth"],
        "reconstruct": ["-m", "spark_me.reconstruct_cli", "model.pt", "img.png", "--out", "grid.png", "--device", "cpu"],
    }
    for name, args in cases.items():
        proc = _cli(args, tmp_path, env=_env(PYTHONPATH=f"{os.environ.get('PYTHONPATH', '')}:{tmp_path}"))
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1, f"{name}:\n{out[-3000:]}"
        assert not marker.exists(), f"{name} imported a module named by the checkpoint"
        assert "'evil_net', which is not registered" in out and "encoder_utils.py" in out, out[-2000:]
        assert "--import encoder_utils.py" in out and "Traceback" not in out, out[-2000:]
    assert not (tmp_path / "x.pth").exists() and not (tmp_path / "grid.png").exists()


# ----------------------------------------------------------------------------- 2-7. lost work


def test_branching_inside_a_run_is_refused_and_destroys_nothing(trained, tmp_path):
    run_dir = _copy(trained, tmp_path)
    before = _bytes(run_dir / "checkpoints")
    proc = _pretrain(run_dir, f"trainer.resume={run_dir / 'checkpoints' / 'step_00000002.pt'}",
                     "trainer.keep_checkpoints=1", "trainer.max_steps=3", cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "would overwrite and prune the later checkpoints step_00000004.pt" in out and "trainer.output_dir=" in out
    assert "Traceback" not in out
    assert _bytes(run_dir / "checkpoints") == before
    # the suggested branch, into a new folder, works and leaves the original alone
    branch = tmp_path / "branch"
    summary = run(_compose(f"trainer.resume={run_dir / 'checkpoints' / 'step_00000002.pt'}",
                           f"trainer.output_dir={branch}", "trainer.max_steps=3", "trainer.keep_checkpoints=1"))
    assert summary["step"] == 3 and _names(branch) == ["step_00000003.pt"]
    assert _bytes(run_dir / "checkpoints") == before


def test_export_refuses_to_overwrite_its_input_even_through_links(trained, tmp_path):
    ckpt = tmp_path / "step.pt"
    shutil.copy(trained / "checkpoints" / "step_00000004.pt", ckpt)
    data = ckpt.read_bytes()
    proc = _cli(["-m", "spark_me.export", str(ckpt), "--out", str(ckpt), "--force"], tmp_path)
    assert proc.returncode == 2 and "is the checkpoint being exported" in proc.stderr, proc.stderr[-2000:]
    (tmp_path / "sym.pt").symlink_to(ckpt)
    os.link(ckpt, tmp_path / "hard.pt")
    for link in ("sym.pt", "hard.pt"):
        with pytest.raises(SystemExit) as exc:
            export_main([str(ckpt), "--out", str(tmp_path / link), "--force"])
        assert exc.value.code == 2
    assert ckpt.read_bytes() == data


def test_unwritable_output_folder_is_found_before_the_first_step(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("a file where the checkpoint folder belongs")
    proc = _pretrain(run_dir, "trainer.max_steps=2", cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert f"ConfigError: the output folder {run_dir / 'checkpoints'} is not writable" in out
    assert "Traceback" not in out and not (run_dir / "metrics.jsonl").exists()
    # the run directory itself, before Hydra writes its log there
    blocked = run_dir / "checkpoints" / "run"
    proc = _pretrain(blocked, "trainer.max_steps=2", cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert f"ConfigError: the output folder {blocked} is not writable" in out and "Traceback" not in out


def _file_size_limit(limit: int):
    def apply() -> None:  # Python ignores SIGXFSZ: a write past the limit fails with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_failed_save_stops_clearly_and_keeps_the_previous_checkpoint(trained, tmp_path):
    run_dir = _copy(trained, tmp_path)
    before = _bytes(run_dir / "checkpoints")
    size = len(before["step_00000004.pt"])
    proc = _pretrain(run_dir, "trainer.max_steps=5", cwd=tmp_path, preexec=_file_size_limit(size // 4))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "could not write" in out and "step_00000005.pt" in out and "Traceback" not in out, out[-3000:]
    assert f"the previous checkpoint {run_dir / 'checkpoints' / 'step_00000004.pt'} is intact" in out
    assert "trainer.resume=auto" in out
    assert _bytes(run_dir / "checkpoints") == before  # nothing lost, no temporary left


def test_restart_after_a_crash_skips_a_damaged_checkpoint_and_removes_stale_temporaries(trained, tmp_path):
    run_dir = _copy(trained, tmp_path)
    ckpts = run_dir / "checkpoints"
    newest = ckpts / "step_00000004.pt"
    data = bytearray(newest.read_bytes())
    mid = len(data) // 2
    data[mid: mid + 2**20] = np.random.default_rng(0).integers(0, 256, 2**20, dtype=np.uint8).tobytes()
    newest.write_bytes(bytes(data))
    with pytest.raises(CheckpointDamagedError, match="do not match the checksum"):
        load_checkpoint(newest)
    stale = ckpts / f".step_00000006.pt.tmp-{_dead_pid()}"  # left by a kill -9 mid-save
    stale.write_bytes(b"\0" * 2**20)
    live = ckpts / f".step_00000006.pt.tmp-{os.getpid()}"  # a save in progress elsewhere
    live.write_bytes(b"\0")
    proc = _pretrain(run_dir, "trainer.max_steps=5", cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "step_00000004.pt: its contents do not match the checksum" in out
    assert "resuming from the newest intact checkpoint step_00000002.pt" in out
    assert "resumed from" in out and "at step 2" in out
    assert (ckpts / "step_00000004.pt.damaged").read_bytes() == bytes(data)  # kept aside, not lost
    assert not stale.exists() and live.exists()
    assert load_checkpoint(ckpts / "step_00000005.pt")["step"] == 5
    assert _steps(run_dir) == [1, 2, 3, 4, 5]  # 3 and 4 once: the lines after step 2 were replaced


def test_resume_auto_stops_at_a_code_running_checkpoint_instead_of_skipping_it(trained, tmp_path):
    run_dir = _copy(trained, tmp_path)
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"format": FORMAT, "step": 6, "evil": Payload()}, run_dir / "checkpoints" / "step_00000006.pt")
    with pytest.raises(CheckpointError, match="refused, loading it would call") as exc:
        run(_compose(f"trainer.output_dir={run_dir}", "trainer.max_steps=7"))
    assert not isinstance(exc.value, CheckpointDamagedError) and "weights_only" not in str(exc.value)
    assert not marker.exists() and _names(run_dir)[-1] == "step_00000006.pt"


def test_all_checkpoints_damaged_stops_and_renames_nothing(tmp_path, trained):
    run_dir = _copy(trained, tmp_path)
    for p in list_checkpoints(run_dir / "checkpoints"):
        p.write_bytes(p.read_bytes()[:5000])
    before = _bytes(run_dir / "checkpoints")
    with pytest.raises(CheckpointDamagedError, match="step_00000004.pt: the file is truncated"):
        run(_compose(f"trainer.output_dir={run_dir}", "trainer.max_steps=6"))
    assert _bytes(run_dir / "checkpoints") == before


def test_stale_temporaries_of_dead_processes_only_are_removed(tmp_path):
    dead = tmp_path / f".step_00000001.pt.tmp-{_dead_pid()}"
    mine = tmp_path / f".step_00000001.pt.tmp-{os.getpid()}"
    other = tmp_path / "notes.tmp-1"
    for p in (dead, mine, other):
        p.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == [dead]
    assert not dead.exists() and mine.exists() and other.exists()


def test_a_rejected_resume_keeps_the_runs_recorded_config(trained, tmp_path):
    run_dir = _copy(trained, tmp_path)
    record = _bytes(run_dir / ".hydra")
    proc = _pretrain(run_dir, "model=resnet34", "trainer.max_steps=6", cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "is for model resnet18" in out, out[-3000:]
    assert _bytes(run_dir / ".hydra") == record
    saved = (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert "model=resnet18" in saved and "resnet34" not in saved


# ----------------------------------------------------------------------------- 8-10. silent wrong results


@pytest.mark.parametrize("ratio", [0.0, 0.1])
def test_a_mask_that_hides_nothing_is_refused(ratio):
    with pytest.raises(ConfigError, match=f"mask.ratio={ratio} masks no patch of a 64px image"):
        validate_config(_compose(f"mask.ratio={ratio}"))
    model = SparK(build_sparse_encoder("resnet18"), decoder_width=64, mask_ratio=ratio)
    with pytest.raises(ValueError, match="hides no patch"):
        model(torch.randn(2, 3, 64, 64))
    active = torch.ones(2, 2, 2, dtype=torch.bool)
    active[0, 0, 0] = False  # the first sample is masked, the second is not
    with pytest.raises(ValueError, match="hides no patch"):
        check_mask_hides_something(active)
    active[1, 1, 1] = False
    check_mask_hides_something(active)


def test_metrics_after_a_resume_hold_each_step_once(trained, tmp_path):
    run_dir = _copy(trained, tmp_path)
    (run_dir / "checkpoints" / "step_00000004.pt").unlink()  # killed after logging steps 3, 4
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "lo')  # and mid-line
    run(_compose(f"trainer.output_dir={run_dir}", "trainer.max_steps=5"))
    assert _steps(run_dir) == [1, 2, 3, 4, 5]


def test_a_symlink_loop_in_the_data_folder_is_followed_once(tmp_path):
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "a" / "x.png")
    Image.new("RGB", (8, 8)).save(root / "y.png")
    (root / "a" / "loop").symlink_to(root)  # a loop: x.png appeared 41 times
    other = tmp_path / "elsewhere"
    other.mkdir()
    Image.new("RGB", (8, 8)).save(other / "z.png")
    (root / "linked").symlink_to(other)  # a real folder reached by a link: followed
    assert sorted(p.name for p in find_images(root)) == ["x.png", "y.png", "z.png"]
    twice = tmp_path / "twice"
    (twice / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(twice / "a" / "x.png")
    (twice / "b").symlink_to(twice / "a")  # a second way into a/
    assert [p.name for p in find_images(twice)] == ["x.png"]


# ----------------------------------------------------------------------------- 11-15. clear errors


def test_a_folder_of_unreadable_images_fails_with_a_clear_error(tmp_path):
    data = tmp_path / "images"
    data.mkdir()
    for i in range(16):  # one batch of the demo preset
        (data / f"broken{i}.jpg").write_bytes(b"\xff\xd8\xff not an image")
    with pytest.raises(ConfigError, match=r"none of the 16 images of data.path=.* could be read"):
        run(_compose("data=folder", f"data.path={data}", f"trainer.output_dir={tmp_path / 'run'}", "trainer.max_steps=1"))


def test_a_missing_gpu_is_a_config_error_with_exit_code_2(tmp_path):
    env = _env(CUDA_VISIBLE_DEVICES="")
    proc = _pretrain(tmp_path / "run", "trainer.device=cuda", cwd=tmp_path, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "ConfigError: trainer.device=cuda but no CUDA GPU is visible" in out and "Traceback" not in out
    assert not (tmp_path / "run" / "checkpoints").exists()
    proc = _cli(["-m", "spark_me.reconstruct_cli", "x.pt", "y.png", "--out", "g.png", "--device", "cuda"], tmp_path,
                env=env)
    assert proc.returncode == 2 and "--device=cuda but no CUDA GPU is visible" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_export_and_reconstruct_report_unwritable_outputs(trained, tmp_path, capsys):
    ckpt = trained / "checkpoints" / "step_00000004.pt"
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for out in (tmp_path / "missing" / "dir" / "enc.safetensors", blocker / "enc.pth"):
        with pytest.raises(SystemExit) as exc:
            export_main([str(ckpt), "--out", str(out)])
        assert exc.value.code == 2 and f"{out.parent}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        reconstruct_main([str(ckpt), str(tmp_path), "--out", str(blocker / "grid.png"), "--device", "cpu"])
    assert exc.value.code == 2 and "cannot write into" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.safetensors")) and not list(tmp_path.rglob("*.pth"))


def test_wandb_without_an_api_key_fails_before_any_work(tmp_path, monkeypatch):
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DISABLED", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"no wandb API key is configured.*`wandb login`.*logger.mode=offline"):
        run(_compose("logger=wandb", f"trainer.output_dir={out}", "trainer.max_steps=1"))
    assert not out.exists()
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    check_wandb(_compose("logger=wandb").logger)


def test_wandb_mode_from_the_environment_wins(monkeypatch):
    cfg = _compose("logger=wandb", "logger.mode=online").logger
    monkeypatch.delenv("WANDB_DISABLED", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode(cfg) == "offline"
    check_wandb(cfg)  # offline needs no key
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ConfigError, match="WANDB_MODE='sometimes'"):
        wandb_mode(cfg)
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_mode(cfg) == "online"


def test_foreign_files_never_get_torchs_weights_only_false_advice(tmp_path):
    png = tmp_path / "photo.png"
    Image.new("RGB", (8, 8)).save(png)
    with pytest.raises(CheckpointError, match="it is not a PyTorch weights file") as exc:
        load_file(png)
    assert "weights_only" not in str(exc.value) and "safe_globals" not in str(exc.value)


def test_optimizer_mismatch_names_the_checkpoints_optimizer(trained, tmp_path):
    run_dir = _copy(trained, tmp_path)
    with pytest.raises(CheckpointError, match=r"does not fit optimizer=adamw: the checkpoint was written by "
                                              r"optimizer=lamb .*Resume with optimizer=lamb"):
        run(_compose(f"trainer.output_dir={run_dir}", "optimizer=adamw", "trainer.max_steps=6"))


def test_resuming_a_finished_run_says_so(trained, tmp_path, caplog):
    run_dir = _copy(trained, tmp_path)
    with caplog.at_level("WARNING"):
        summary = run(_compose(f"trainer.output_dir={run_dir}", "trainer.max_steps=4"))
    assert summary["step"] == 4
    assert "nothing to train: the run is already at step 4 and ends at step 4" in caplog.text


def test_reconstruct_rejects_max_images_0(trained, tmp_path, capsys):
    Image.new("RGB", (64, 64), (90, 20, 200)).save(tmp_path / "fine.png")  # readable: 0 was the problem
    with pytest.raises(SystemExit) as exc:
        reconstruct_main([str(trained / "checkpoints" / "step_00000004.pt"), str(tmp_path), "--out",
                          str(tmp_path / "g.png"), "--max-images", "0"])
    assert exc.value.code == 2 and "--max-images 0 must be at least 1" in capsys.readouterr().err
