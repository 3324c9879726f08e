"""The pre-training config's checks (every invalid value fails naming the key and the fix),
and the precision a run takes on its device."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

import spark_me
from spark_me import run_config
from spark_me.preflight import ConfigError
from spark_me.run_config import validate_config

CONFIG_DIR = Path(spark_me.__file__).parent / "configs"


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("pretrain", overrides=list(overrides))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.name=resnet5"], r"model.name='resnet5' is not a known encoder; use model=<name> with one of: .*resnet50"),
        (["mask.ratio=1.0"], r"mask.ratio=1.0 must be in \[0, 1\)"),
        (["mask.ratio=-0.1"], r"mask.ratio=-0.1 must be in \[0, 1\)"),
        (["data.image_size=100"], r"data.image_size=100 is not a multiple of the mask patch size 32; use e.g. data.image_size=96 or 128"),
        (["data=folder"], r"data.path is not set: .*data.path=/path/to/images.*experiment=demo"),
        (["data=folder", "data.path=/nonexistent/imagenet"], r"data.path='/nonexistent/imagenet' does not exist"),
        (["data=demo", "data.path=/some/folder"], r"data=demo ignores it: add data=folder"),
        (["data.global_batch_size=0"], r"data.global_batch_size=0 must be an integer >= 1"),
        (["+data.batch_size=128"], r"data.batch_size=128 \(a per-process batch\) is gone: .*data.global_batch_size="),
        (["trainer.grad_accum_steps=0"], r"trainer.grad_accum_steps=0 must be an integer >= 1"),
        (["trainer.grad_checkpointing=sometimes"], r"trainer.grad_checkpointing='sometimes' must be true or false"),
        (["model.dense_stem=sometimes"], r"model.dense_stem='sometimes' must be true or false"),
        (["trainer.cuda_graphs=1"], r"trainer.cuda_graphs=1 must be true or false"),
        (["trainer.grad_checkpointing_stages=2"], r"trainer.grad_checkpointing_stages=2 chooses .* needs trainer.grad_checkpointing=true"),
        (["trainer.grad_checkpointing=true", "trainer.grad_checkpointing_stages=0"], r"trainer.grad_checkpointing_stages=0 must be an integer >= 1"),
        (["data.global_batch_size=4096", "trainer.grad_accum_steps=3"], r"does not split into 1 process\(es\) x trainer.grad_accum_steps=3"),
        (["optimizer.betas=[0.9,1.0]"], r"optimizer.betas\[1\]=1.0 must be in \[0.0, 1.0\)"),
        (["model.decoder_width=100"], r"model.decoder_width=100 must be a multiple of 32"),
        (["model.conv_impl=fast"], r"model.conv_impl='fast' is unknown: use one of auto, torch, triton, minkowski"),
        (["trainer.precision=fp8"], r"trainer.precision='fp8' is unknown: use fp32, bf16 or fp16"),
        (["optimizer.base_lr=abc"], r"optimizer.base_lr='abc' must be a number"),
        (["trainer.resume=/no/such/ckpt.pt"], r"trainer.resume='/no/such/ckpt.pt' is not a file"),
        (["logger=wandb", "logger.mode=sometimes"], r"logger.mode='sometimes' is unknown"),
        (["data.image_size=32", "mask.ratio=0.9"], r"leaves no visible patch"),
    ],
)
def test_invalid_values_fail_naming_the_key_and_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(_cfg("data=demo", *overrides))  # the last data= wins


def test_a_model_config_without_optimizer_beta2_gets_a_clear_error():
    cfg = _cfg("data=demo")  # e.g. a user's model config written before optimizer_beta2 existed
    with open_dict(cfg):
        del cfg.model.optimizer_beta2
    with pytest.raises(ConfigError, match=r"optimizer.betas: .*add optimizer_beta2: 0.95 \(ResNet-like\) or 0.999"):
        validate_config(cfg)


def test_user_encoder_errors_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="model.imports: encoder module file .* does not exist"):
        validate_config(_cfg("model=custom", "model.name=x", f"model.imports=[{tmp_path}/none.py]"))
    with pytest.raises(ConfigError, match="cannot import encoder module 'no_such_pkg_xyz'"):
        validate_config(_cfg("model=custom", "model.name=x", "model.imports=[no_such_pkg_xyz]"))
    with pytest.raises(ConfigError, match="model=custom model.name=<registered name>"):
        validate_config(_cfg("model=custom", "model.name=not_registered_net"))


def test_precision_resolves_per_device_and_says_why_a_cpu_runs_fp32(caplog):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert [run_config.amp_dtype(p, cuda) for p in ("fp32", "bf16", "fp16")] == [None, torch.bfloat16, torch.float16]
    assert run_config.amp_dtype("fp32", cpu, cpu_bf16=True) is None
    assert run_config.amp_dtype("bf16", cpu, cpu_bf16=True) is torch.bfloat16
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="spark_me.run_config"):
        assert run_config.amp_dtype("bf16", cpu, cpu_bf16=False) is None
        assert run_config.amp_dtype("fp16", cpu, cpu_bf16=True) is None
    assert [r.getMessage() for r in caplog.records] == [
        "trainer.precision=bf16: this CPU has no bf16 instructions (AMX or AVX512-BF16), so bf16 would be emulated "
        "at several times fp32's time; running fp32 on cpu",
        "trainer.precision=fp16: fp16 applies on CUDA only; running fp32 on cpu",
    ]


def test_the_cpu_bf16_probe_reads_torch_and_counts_a_missing_probe_as_no(monkeypatch):
    expected = any(getattr(torch.cpu, name)() for name in run_config.CPU_BF16_PROBES)
    assert run_config.cpu_has_bf16() == expected
    for name in run_config.CPU_BF16_PROBES:
        monkeypatch.delattr(torch.cpu, name)
    assert run_config.cpu_has_bf16() is False
