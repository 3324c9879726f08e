"""The pre-training app: config tree, validation at the CLI, a short run, exact resume, failure modes
(each invalid config value: tests/test_run_config.py)."""
from __future__ import annotations

import json
import os
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from PIL import Image

import spark_me
import spark_me.pretrain as pretrain_module
from spark_me.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, load_model
from spark_me.data import build_loader, normalize
from spark_me.distributed import DistInfo
from spark_me.export import export_encoder
from spark_me.pretrain import (
    ConfigError,
    NonFiniteLossError,
    PretrainRun,
    SparKStep,
    accumulate_gradients,
    build_model,
    run,
)
from spark_me.run_config import validate_config

CONFIG_DIR = Path(spark_me.__file__).parent / "configs"
REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model=resnet18", "model.decoder_width=64", "data=demo", "data.num_images=8", "data.image_size=64",
    "data.global_batch_size=2", "data.num_workers=0", "schedule.epochs=2", "schedule.warmup_epochs=1",
    "trainer.device=cpu", "trainer.progress_bar=false", "logger.log_every=1", "logger.image_every=0",
    "logger.num_images=2",
]


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("pretrain", overrides=list(overrides))


def _tiny(out: Path, *overrides: str):
    return _cfg(*TINY, f"trainer.output_dir={out}", *overrides)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _subprocess_env() -> dict:
    return {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONWARNINGS": "ignore"}


# ----------------------------------------------------------------------------- config


def test_config_tree_ships_with_the_package_and_defaults_follow_the_paper(tmp_path):
    assert (REPO / "configs" / "pretrain.yaml").is_file()
    assert (CONFIG_DIR / "pretrain.yaml").resolve() == (REPO / "configs" / "pretrain.yaml").resolve()
    cfg = _cfg()
    assert cfg.model.name == "resnet50" and cfg.model.decoder_width == 768 and cfg.model.drop_path_rate == 0.05
    assert cfg.mask.ratio == 0.6 and cfg.data.image_size == 224 and list(cfg.data.crop_scale) == [0.67, 1.0]
    assert cfg.data.kind == "folder" and cfg.data.global_batch_size == 4096 and cfg.trainer.grad_accum_steps == 1
    assert cfg.optimizer.name == "lamb" and cfg.optimizer.base_lr == 2e-4 and cfg.optimizer.grad_clip == 5.0
    assert list(cfg.optimizer.betas) == [0.9, 0.95]
    assert (cfg.optimizer.weight_decay, cfg.optimizer.weight_decay_end) == (0.04, 0.2)
    assert (cfg.schedule.epochs, cfg.schedule.warmup_epochs) == (1600, 40)
    validate_config(_cfg(f"data.path={tmp_path}"))


def test_default_data_is_a_folder_and_forgetting_its_path_names_the_fix(tmp_path):
    # no silent fall-back to synthetic images
    with pytest.raises(ConfigError, match=r"data.path is not set: .*data.path=/path/to/images.* experiment=demo"):
        validate_config(_cfg("model=resnet50"))
    validate_config(_cfg("model=resnet50", f"data.path={tmp_path}"))  # data=folder is implied
    proc = subprocess.run(
        [sys.executable, "-m", "spark_me.pretrain", "model=resnet50", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, env=_subprocess_env(), timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert "ConfigError: data.path is not set" in out and "data.path=" in out and "experiment=demo" in out
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_every_builtin_encoder_has_a_model_config():
    # A fresh interpreter: other tests register users' encoders in this one.
    proc = subprocess.run([sys.executable, "-c", "import spark_me; print(' '.join(spark_me.list_encoders()))"],
                          capture_output=True, text=True, env=_subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    builtin = proc.stdout.split()
    assert "resnet50" in builtin and "convnext_tiny" in builtin
    files = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))
    assert files == sorted(builtin + ["custom"])
    for name in builtin:
        cfg = _cfg(f"model={name}", "data=demo")
        assert cfg.model.name == name
        validate_config(cfg)


def test_demo_experiment_preset_composes():
    cfg = _cfg("experiment=demo")
    assert (cfg.model.name, cfg.data.kind, cfg.trainer.device) == ("resnet18", "demo", "cpu")
    # what the demo ran with as a per-process batch of 16 on one process (make demo): same
    # images per step, same peak lr 0.32 x 16 / 256 = 2e-2, 512 / 16 x 6 = 192 steps
    assert (cfg.data.global_batch_size, cfg.trainer.grad_accum_steps, cfg.data.num_images) == (16, 1, 512)
    assert cfg.optimizer.base_lr * cfg.data.global_batch_size / 256 == pytest.approx(0.02)
    assert cfg.data.num_images // cfg.data.global_batch_size * cfg.schedule.epochs == 192
    validate_config(cfg)


def test_cli_rejects_a_backend_the_device_cannot_run_before_writing_anything(tmp_path):
    """conv_impl=triton on a CPU run: exit code 2 with the fix, not a traceback at the first
    forward (a fresh process: the Triton kernels are compiled for CUDA, not interpreted)."""
    proc = subprocess.run(
        [sys.executable, "-m", "spark_me.pretrain", "experiment=demo", "model.conv_impl=triton",
         f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, env=_subprocess_env(), timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-2000:]
    # without the triton package the reason differs ("needs the triton package"); the fix is the same
    assert "ConfigError: model.conv_impl=triton: conv_impl='triton' " in out
    assert "use conv_impl='torch'" in out and "Traceback" not in out
    assert not (tmp_path / "checkpoints").exists()


def test_cli_rejects_bad_values_at_start_with_exit_code_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "spark_me.pretrain", "mask.ratio=1.5", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, env=_subprocess_env(), timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "ConfigError: mask.ratio=1.5 must be in [0, 1)" in proc.stdout + proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_cli_trains_a_user_encoder_by_name_and_its_checkpoint_loads_elsewhere(tmp_path):
    example = REPO / "examples" / "custom_encoder.py"
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "spark_me.pretrain", *TINY, "model=custom", "model.name=tiny_convnet",
         "model.decoder_width=64", f"model.imports=[{example}]", "trainer.max_steps=2", f"trainer.output_dir={out}"],
        capture_output=True, text=True, env=_subprocess_env(), timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    ckpt = list_checkpoints(out / "checkpoints")[-1]
    assert load_checkpoint(ckpt)["config"]["model"]["imports"] == [str(example)]
    # Loading never imports the module a checkpoint names: without --import, the error names
    # the recorded module and the flag to pass (a fresh interpreter: nothing registered yet).
    proc = subprocess.run([sys.executable, "-m", "spark_me.export", str(ckpt), "--out", str(tmp_path / "x.pth")],
                          capture_output=True, text=True, env=_subprocess_env(), timeout=600, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "'tiny_convnet', which is not registered" in proc.stderr and f"--import {example}" in proc.stderr
    assert not (tmp_path / "x.pth").exists()
    # The user names the import: loading works anywhere.
    model, meta = load_model(ckpt, imports=[str(example)])
    assert meta["model_name"] == "tiny_convnet" and "tiny_convnet" in spark_me.list_encoders()
    export_encoder(ckpt, tmp_path / "enc.pth", imports=[str(example)])
    assert torch.load(tmp_path / "enc.pth", weights_only=True).keys() == model.encoder.state_dict().keys()


def test_cli_multirun_saves_each_resolved_config(tmp_path):
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "spark_me.pretrain", "--multirun", *TINY, "trainer.max_steps=1",
         "mask.ratio=0.25,0.5", f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, env=_subprocess_env(), timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    ratios = []
    for job in ("0", "1"):
        saved = yaml.safe_load((sweep / job / ".hydra" / "config.yaml").read_text())
        ratios.append(saved["mask"]["ratio"])
        assert saved["model"]["name"] == "resnet18"
        assert [m["step"] for m in _metrics(sweep / job)] == [1]
        assert load_checkpoint(sweep / job / "checkpoints" / "step_00000001.pt")["mask_ratio"] == saved["mask"]["ratio"]
    assert sorted(ratios) == [0.25, 0.5]


# ----------------------------------------------------------------------------- runs


def test_short_run_writes_metrics_checkpoints_and_reconstructions(tmp_path):
    out = tmp_path / "run"
    summary = run(_tiny(out, "trainer.max_steps=5", "trainer.checkpoint_every=2", "trainer.keep_checkpoints=2",
                        "logger.image_every=4"))
    assert summary["step"] == 5
    lines = _metrics(out)
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5]
    assert all(np.isfinite(m["loss"]) and m["images_per_s"] > 0 and m["skipped_images"] == 0 for m in lines)
    assert lines[0]["lr"] < lines[-1]["lr"]  # warming up
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000004.pt", "step_00000005.pt"]
    ckpt = load_checkpoint(out / "checkpoints" / "step_00000005.pt")
    assert ckpt["step"] == 5 and ckpt["model_name"] == "resnet18" and ckpt["config"]["data"]["image_size"] == 64
    pngs = sorted(p.name for p in (out / "reconstructions").glob("*.png"))
    assert pngs == ["step_00000000.png", "step_00000004.png", "step_00000005.png"]
    grid = Image.open(out / "reconstructions" / "step_00000005.png")
    assert grid.size == (4 * 66 - 2, 16 + 2 * 66 - 2)  # 4 views x 2 images of 64 px


@pytest.mark.parametrize("override,attribute,rel", [
    # the same arithmetic, recomputed
    ("trainer.grad_checkpointing=true", "grad_checkpointing", 1e-6),
    # the same features summed in another order: equal to float32 rounding
    ("model.dense_stem=true", "dense_stem", 1e-4),
])
def test_a_run_with_an_exact_option_matches_the_plain_run(tmp_path, override, attribute, rel):
    run(_tiny(tmp_path / "plain", "trainer.max_steps=3"))
    cfg = _tiny(tmp_path / "option", "trainer.max_steps=3", override)
    assert getattr(build_model(cfg).encoder, attribute) and not getattr(build_model(_tiny(tmp_path)).encoder, attribute)
    run(cfg)
    plain, option = _metrics(tmp_path / "plain"), _metrics(tmp_path / "option")
    assert len(plain) == len(option) == 3
    assert [m["loss"] for m in option] == pytest.approx([m["loss"] for m in plain], rel=rel)


def test_bf16_on_a_cpu_with_bf16_instructions_runs_the_step_under_autocast(tmp_path, monkeypatch, caplog):
    """Where the CPU multiplies bf16 natively the run honours trainer.precision=bf16 (the
    probe is forced here, so the test does not depend on the machine): its losses are the
    fp32 run's up to bf16 rounding, and not equal to them (autocast did run)."""
    from spark_me import run_config

    run(_tiny(tmp_path / "fp32", "trainer.max_steps=2"))
    monkeypatch.setattr(run_config, "cpu_has_bf16", lambda: True)
    with caplog.at_level(logging.INFO, logger="spark_me.pretrain"):
        run(_tiny(tmp_path / "bf16", "trainer.max_steps=2", "trainer.precision=bf16"))
    assert any("precision bf16" in r.getMessage() for r in caplog.records)
    plain, bf16 = [m["loss"] for m in _metrics(tmp_path / "fp32")], [m["loss"] for m in _metrics(tmp_path / "bf16")]
    assert len(plain) == len(bf16) == 2
    # bf16 rounds each value by up to 2**-8 (4e-3) relative; the loss, a mean over every
    # masked pixel, moved by 2e-5 when measured: 1e-2 leaves room for other machines' kernels.
    # Not equal, or autocast never ran.
    assert bf16 == pytest.approx(plain, rel=1e-2) and bf16 != plain


def test_a_dense_stem_on_an_encoder_without_one_fails_naming_the_key(tmp_path):
    example = REPO / "examples" / "custom_encoder.py"
    cfg = _tiny(tmp_path, "model=custom", "model.name=tiny_convnet", f"model.imports=[{example}]", "model.dense_stem=true")
    validate_config(cfg)  # imports the example: the name is known, the value a bool
    with pytest.raises(ConfigError, match=r"model.dense_stem=true: SparseTinyConvNet has no dense stem: implement stem_conv_to_sparse"):
        build_model(cfg)


def test_gradient_checkpointing_stages_reach_the_encoder_or_fail_naming_the_keys(tmp_path):
    cfg = _tiny(tmp_path, "trainer.grad_checkpointing=true", "trainer.grad_checkpointing_stages=2")
    encoder = build_model(cfg).encoder
    assert encoder.checkpoint_stages == 2 and encoder.checkpoints_stage(1) and not encoder.checkpoints_stage(2)
    too_many = _tiny(tmp_path, "trainer.grad_checkpointing=true", "trainer.grad_checkpointing_stages=5")
    with pytest.raises(ConfigError, match=r"trainer.grad_checkpointing=true, grad_checkpointing_stages=5: "
                                          r"stages must be a whole number from 1 to 4"):
        build_model(too_many)


def test_cuda_graphs_reach_the_encoder_or_fail_naming_the_key(tmp_path):
    assert build_model(_tiny(tmp_path, "trainer.cuda_graphs=true")).encoder.cuda_graphs
    both = build_model(_tiny(tmp_path, "trainer.cuda_graphs=true", "model.dense_stem=true")).encoder
    assert both.cuda_graphs and both.dense_stem  # the graph starts after the dense stem's conv
    with pytest.raises(ConfigError, match=r"trainer.cuda_graphs=true: CUDA graphs cannot replay MinkowskiEngine's "
                                          r"kernels \(conv_impl='minkowski'\)"):
        build_model(_tiny(tmp_path, "trainer.cuda_graphs=true", "model.conv_impl=minkowski"))


def test_cuda_graphs_refuse_synchronised_batch_norms_across_processes(tmp_path):
    from spark_me.pretrain import check_graphs_and_sync_bn

    trainer = _tiny(tmp_path, "trainer.cuda_graphs=true").trainer
    check_graphs_and_sync_bn(trainer, world_size=1)  # one process: nothing to synchronise
    with pytest.raises(ConfigError, match=r"trainer.cuda_graphs=true with trainer.sync_bn=true on several processes"):
        check_graphs_and_sync_bn(trainer, world_size=2)
    trainer.sync_bn = False
    check_graphs_and_sync_bn(trainer, world_size=2)


def _straight_and_split(base: str, *overrides: str) -> None:
    """6 steps straight; and 3 steps, then resume (trainer.resume=auto) to 6. Run in a subprocess."""
    base = Path(base)
    run(_tiny(base / "straight", "trainer.max_steps=6", "trainer.checkpoint_every=100", *overrides))
    first = run(_tiny(base / "split", "trainer.max_steps=3", "trainer.checkpoint_every=100", *overrides))
    assert first["step"] == 3 and [p.name for p in list_checkpoints(base / "split" / "checkpoints")] == ["step_00000003.pt"]
    second = run(_tiny(base / "split", "trainer.max_steps=6", "trainer.checkpoint_every=100", "trainer.resume=auto", *overrides))
    assert second["step"] == 6


@pytest.mark.parametrize("overrides", [
    (),  # 4 steps per epoch of one batch of 2
    ("data.num_images=16", "data.global_batch_size=4", "trainer.grad_accum_steps=2"),  # 4 steps of 2 x 2
], ids=["plain", "grad_accum"])
def test_resume_continues_bitwise_identically(tmp_path, overrides):
    """Stop at step 3 (mid-epoch 0), resume, reach step 6 (in epoch 1): same bits as never stopping.

    MinkowskiEngine builds coordinate maps with OpenMP threads, so the row order of strided
    maps (and with it the float rounding of BatchNorm sums) varies from run to run unless
    OMP_NUM_THREADS=1; the comparison runs in a subprocess with it.
    """
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import test_pretrain; test_pretrain._straight_and_split({str(tmp_path)!r}, *{list(overrides)!r})")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**_subprocess_env(), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    straight, split = tmp_path / "straight", tmp_path / "split"
    a = load_checkpoint(straight / "checkpoints" / "step_00000006.pt")
    b = load_checkpoint(split / "checkpoints" / "step_00000006.pt")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for i in a["optimizer"]["state"]:
        for k, v in a["optimizer"]["state"][i].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["optimizer"]["state"][i][k])), (i, k)
    assert torch.equal(a["rng"][0]["mask"], b["rng"][0]["mask"])
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])
    # the resumed half of the loss curve is the uninterrupted one
    assert [m["loss"] for m in _metrics(straight)] == [m["loss"] for m in _metrics(split)]
    # and the weights did move between the stop and the end (not two untouched models)
    mid = load_checkpoint(split / "checkpoints" / "step_00000003.pt")
    assert not torch.equal(mid["model"]["encoder.conv1.weight"], b["model"]["encoder.conv1.weight"])


def test_gradient_accumulation_gives_the_gradient_of_the_whole_batch():
    """Two micro-batches of 2 accumulate the gradient of one batch of 4 (float64).

    In eval mode BatchNorm uses its running statistics, so the model has no batch-dependent
    part and the two must agree to rounding; in training mode they differ only through
    BatchNorm's per-micro-batch statistics.
    """
    torch.manual_seed(0)
    model = build_model(_cfg(*TINY)).double().eval()
    step_fn = SparKStep(model)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    active = model.random_mask(x, torch.Generator().manual_seed(0))

    def grads(micro_batches) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = accumulate_gradients(step_fn, micro_batches, len(micro_batches), scaler)
        return float(loss), {n: p.grad.clone() for n, p in model.named_parameters()}

    whole_loss, whole = grads([(x, active)])
    split_loss, split = grads([(x[:2], active[:2]), (x[2:], active[2:])])
    assert split_loss == pytest.approx(whole_loss, rel=1e-12)
    assert whole.keys() == split.keys() and len(whole) > 50
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-9, atol=1e-14, msg=name)
    # not an empty comparison: one micro-batch alone has a different gradient
    _, half = grads([(x[:2], active[:2])])
    assert not torch.allclose(half["decoder.proj.weight"], whole["decoder.proj.weight"], rtol=1e-3)
    with pytest.raises(ValueError, match="expected 3 micro-batches, got 2"):
        accumulate_gradients(step_fn, [(x[:2], active[:2])] * 2, 3, scaler)


def test_run_with_gradient_accumulation_steps_once_per_global_batch(tmp_path, monkeypatch):
    shapes: list[int] = []
    forward = SparKStep.forward

    def counted(self, images, active):
        shapes.append(images.shape[0])
        return forward(self, images, active)

    monkeypatch.setattr(SparKStep, "forward", counted)
    accum = run(_tiny(tmp_path / "accum", "data.global_batch_size=4", "trainer.grad_accum_steps=2", "trainer.max_steps=3"))
    assert accum["step"] == 3 and shapes == [2] * 6  # 3 steps x 2 micro-batches of 2 (one process)
    ckpt = load_checkpoint(tmp_path / "accum" / "checkpoints" / "step_00000003.pt")
    assert ckpt["global_batch"] == 4 and ckpt["steps_per_epoch"] == 2  # 8 images / 4
    shapes.clear()
    plain = run(_tiny(tmp_path / "plain", "data.global_batch_size=4", "trainer.max_steps=3"))
    assert plain["step"] == 3 and shapes == [4] * 3
    # the schedules advance per optimizer step, at the lr of the global batch
    a, b = _metrics(tmp_path / "accum"), _metrics(tmp_path / "plain")
    assert [m["lr"] for m in a] == [m["lr"] for m in b] and [m["step"] for m in a] == [1, 2, 3]
    assert a[0]["lr"] == pytest.approx(2e-4 * 4 / 256 * 0.005)  # warm-up start at the global batch's peak lr
    assert [m["weight_decay"] for m in a] == [m["weight_decay"] for m in b]
    assert all(np.isfinite(m["loss"]) for m in a)


def test_resume_protects_saved_work(tmp_path):
    out = tmp_path / "run"
    run(_tiny(out, "trainer.max_steps=2"))
    ckpt = out / "checkpoints" / "step_00000002.pt"
    saved = ckpt.read_bytes()
    with pytest.raises(ConfigError, match="already holds checkpoints.*trainer.resume=auto"):
        run(_tiny(out, "trainer.max_steps=4", "trainer.resume=never"))
    with pytest.raises(CheckpointError, match=r"is for model resnet18 .* builds resnet34"):
        run(_tiny(out, "trainer.max_steps=4", "model=resnet34", "model.decoder_width=64"))
    ckpt.write_bytes(saved[: len(saved) // 3])  # a damaged newest checkpoint
    with pytest.raises(CheckpointError, match="truncated"):
        run(_tiny(out, "trainer.max_steps=4"))
    assert ckpt.read_bytes() == saved[: len(saved) // 3]  # nothing was overwritten
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000002.pt"]


def test_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    forward = SparKStep.forward

    def poisoned(self, images, active):
        calls["n"] += 1
        loss = forward(self, images, active)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(SparKStep, "forward", poisoned)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"the loss is nan at step 3 .*step_00000002.pt"):
        run(_tiny(out, "trainer.max_steps=6", "trainer.checkpoint_every=2"))
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000002.pt"]
    good = load_checkpoint(out / "checkpoints" / "step_00000002.pt")
    assert good["step"] == 2 and all(torch.isfinite(v).all() for v in good["model"].values() if v.is_floating_point())


def test_folder_data_with_unreadable_files_trains_and_counts_them(tmp_path):
    data = tmp_path / "images" / "class_a"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(data / f"ok{i}.png")
    Image.fromarray(rng.integers(0, 256, (70, 90), dtype=np.uint8)).save(data / "gray.png")
    (data / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    out = tmp_path / "run"
    overrides = [o for o in TINY if not o.startswith("data.num_images")]
    summary = run(_cfg(*overrides, "data=folder", f"data.path={tmp_path / 'images'}", f"trainer.output_dir={out}",
                       "trainer.max_steps=2"))
    assert summary["step"] == 2
    assert _metrics(out)[-1]["skipped_images"] >= 1  # the epoch visits every file once


class _DelayedSource:
    """An image source whose every read takes ``delay`` seconds longer (a slow disk or decoder)."""

    def __init__(self, source, delay: float) -> None:
        self.source, self.delay = source, delay

    def __len__(self) -> int:
        return len(self.source)

    def name(self, index: int) -> str:
        return self.source.name(index)

    def load(self, index: int):
        time.sleep(self.delay)
        return self.source.load(index)


@pytest.mark.parametrize("delay, warned", [(0.2, True), (0.0, False)])
def test_a_run_waiting_for_its_loader_says_so_once(tmp_path, monkeypatch, caplog, delay, warned):
    monkeypatch.setattr(pretrain_module, "DATA_BOUND_MIN_STEPS", 4)
    build_source = pretrain_module.build_source
    monkeypatch.setattr(pretrain_module, "build_source", lambda cfg: _DelayedSource(build_source(cfg), delay))
    with caplog.at_level(logging.WARNING, logger="spark_me.pretrain"):
        run(_tiny(tmp_path / "run", "data.num_images=16", "trainer.max_steps=8"))
    warnings = [r.getMessage() for r in caplog.records if "the data loader is the bottleneck" in r.getMessage()]
    assert len(warnings) == (1 if warned else 0)
    if warned:
        assert "data.num_workers (now 0" in warnings[0] and "over 4 steps" in warnings[0]
        assert min(m["data_time"] for m in _metrics(tmp_path / "run")) >= 2 * delay  # two reads per batch


def test_wandb_offline_logs_scalars_and_images_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    run(_tiny(out, "logger=wandb", "logger.mode=offline", "logger.log_every=1", "logger.image_every=0",
              "trainer.max_steps=2"))
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert list(runs[0].rglob("media/images/*.png"))  # reconstruction grids
    assert load_checkpoint(out / "checkpoints" / "step_00000002.pt")["wandb_id"] in runs[0].name


def test_spark_step_fp32_is_the_model_loss():
    torch.manual_seed(0)
    model = build_model(_cfg(*TINY))
    x = torch.randn(2, 3, 64, 64)
    active = model.random_mask(x, torch.Generator().manual_seed(0))
    assert torch.equal(SparKStep(model)(x, active), model(x, active))


def test_the_loader_yields_bytes_and_the_step_sees_them_normalised(tmp_path):
    cfg = _tiny(tmp_path / "run")
    pretrain_run = PretrainRun(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    loader = build_loader(pretrain_run.dataset, pretrain_run.sampler, 0, 0, pretrain_run.seed)
    images, _ = next(iter(loader))
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 64, 64)
    inputs, active = pretrain_run._masked(images)
    assert torch.equal(inputs, normalize(images)) and active.shape == (2, 2, 2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_run_on_cuda(tmp_path, precision):
    summary = run(_tiny(tmp_path / precision, "trainer.device=cuda", f"trainer.precision={precision}",
                        "trainer.max_steps=3"))
    assert summary["step"] == 3 and np.isfinite(summary["loss"])
    model = build_model(_cfg(*TINY)).cuda()
    x = torch.randn(2, 3, 64, 64, device="cuda")
    active = model.random_mask(x)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    features = model.encoder(x, active)
    assert all(f.F.dtype == torch.float32 for f in features)  # the sparse encoder stays fp32
    loss = SparKStep(model, dtype)(x, active)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
