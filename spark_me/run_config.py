"""The pre-training config's values, each checked before any heavy work
(:func:`validate_config`: a :class:`ConfigError` naming the key and the fix), and the split
of one optimizer step's images over processes and micro-batches (:func:`plan_batches`)."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig
from omegaconf.errors import InterpolationResolutionError

from spark_me import import_encoder_modules, list_encoders
from spark_me.masking import num_visible
from spark_me.ops import CONV_IMPLS
from spark_me.optim import OPTIMIZERS
from spark_me.preflight import WANDB_MODES, ConfigError

log = logging.getLogger(__name__)

PATCH_SIZE = 32  # total stride of every built-in encoder = mask patch size
PRECISIONS: dict[str, Optional[torch.dtype]] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LOGGERS = ("jsonl", "wandb")
# torch.cpu's probes for native bf16 products (AMX tiles, AVX512-BF16); private, so looked up
# by name, and a torch without them counts as a CPU without.
CPU_BF16_PROBES = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AMX or AVX512-BF16), so that oneDNN's bf16
    kernels can beat fp32; without, bf16 is emulated (13x fp32's time on an AVX2 CPU)."""
    return any(getattr(torch.cpu, name, lambda: False)() for name in CPU_BF16_PROBES)


def amp_dtype(precision: str, device: torch.device, cpu_bf16: Optional[bool] = None) -> Optional[torch.dtype]:
    """The autocast dtype of a run in ``trainer.precision`` on ``device`` (None: fp32).

    CUDA runs every precision. A CPU runs bf16 where it multiplies bf16 natively
    (``cpu_bf16``, default :func:`cpu_has_bf16`): on a CPU with AMX it took 0.45x (ResNet-50)
    and 0.57x (ConvNeXt-T) of a step's fp32 time (docs/training.md). Elsewhere, and for
    fp16 on any CPU, the run is fp32, with a warning naming why."""
    dtype = PRECISIONS[precision]
    if dtype is None or device.type == "cuda":
        return dtype
    if dtype is torch.bfloat16 and (cpu_has_bf16() if cpu_bf16 is None else cpu_bf16):
        return dtype
    why = ("this CPU has no bf16 instructions (AMX or AVX512-BF16), so bf16 would be emulated at several times "
           "fp32's time" if dtype is torch.bfloat16 else "fp16 applies on CUDA only")
    log.warning("trainer.precision=%s: %s; running fp32 on %s", precision, why, device)
    return None


def _number(value: Any, key: str, low: float = -math.inf, high: float = math.inf, closed_high: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}={value!r} must be a number")
    if not (low <= value <= high if closed_high else low <= value < high):
        bound = "]" if closed_high else ")"
        raise ConfigError(f"{key}={value!r} must be in [{low}, {high}{bound}")
    return float(value)


def _int(value: Any, key: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{key}={value!r} must be an integer >= {low}")
    return value


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's images are split: ``global_batch = world_size x grad_accum_steps x micro_batch``."""

    global_batch: int
    world_size: int
    grad_accum_steps: int
    micro_batch: int  # images in one forward/backward of one process

    @property
    def per_process(self) -> int:
        """Images one process contributes to a step (over its micro-batches)."""
        return self.micro_batch * self.grad_accum_steps

    def describe(self) -> str:
        return (f"global batch {self.global_batch} = {self.world_size} process(es) x {self.grad_accum_steps} "
                f"micro-batch(es) x {self.micro_batch} images")


def plan_batches(global_batch: int, world_size: int, grad_accum_steps: int) -> BatchPlan:
    """Split ``data.global_batch_size`` over processes and accumulation steps; ConfigError if it does not divide."""
    parts = world_size * grad_accum_steps
    if global_batch % parts:
        lower = max(parts, global_batch // parts * parts)
        raise ConfigError(
            f"data.global_batch_size={global_batch} does not split into {world_size} process(es) x "
            f"trainer.grad_accum_steps={grad_accum_steps} equal micro-batches: use a multiple of {parts}, e.g. "
            f"data.global_batch_size={lower} or {lower + parts}, or change trainer.grad_accum_steps"
        )
    return BatchPlan(global_batch, world_size, grad_accum_steps, global_batch // parts)


def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError naming the key and the fix for the first invalid value."""
    m, d, o, s, t, lg = cfg.model, cfg.data, cfg.optimizer, cfg.schedule, cfg.trainer, cfg.logger
    try:
        import_encoder_modules(m.get("imports") or [])
    except ValueError as e:
        raise ConfigError(f"model.imports: {e}") from e
    names = list_encoders()
    if m.name not in names:
        raise ConfigError(
            f"model.name={m.name!r} is not a known encoder; use model=<name> with one of: {', '.join(names)}; "
            "for your own encoder: model=custom model.name=<registered name> model.imports=[<module or .py file>]"
        )
    conv_impl = str(m.get("conv_impl") or "auto")
    if conv_impl not in CONV_IMPLS:
        raise ConfigError(f"model.conv_impl={conv_impl!r} is unknown: use one of {', '.join(CONV_IMPLS)} (auto: the "
                          "best tested backend for the device)")
    if _int(m.decoder_width, "model.decoder_width") % PATCH_SIZE:
        raise ConfigError(f"model.decoder_width={m.decoder_width} must be a multiple of 32 (it halves 5 times), e.g. 768 or 128")
    _number(m.drop_path_rate, "model.drop_path_rate", 0.0, 1.0, closed_high=False)
    if m.init is not None and not Path(str(m.init)).expanduser().is_file():
        raise ConfigError(f"model.init={m.init!r} is not a file: pass a timm state dict or a spark_me checkpoint, or model.init=null")

    ratio = cfg.mask.ratio
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise ConfigError(f"mask.ratio={ratio!r} must be in [0, 1): the fraction of 32x32 patches hidden from the encoder, e.g. mask.ratio=0.6")

    size = _int(d.image_size, "data.image_size")
    if size % PATCH_SIZE:
        lower = max(PATCH_SIZE, size // PATCH_SIZE * PATCH_SIZE)
        raise ConfigError(f"data.image_size={size} is not a multiple of the mask patch size 32; use e.g. data.image_size={lower} or {lower + PATCH_SIZE}")
    if num_visible((size // PATCH_SIZE) ** 2, float(ratio)) < 1:
        raise ConfigError(f"mask.ratio={ratio} leaves no visible patch on a {size}px image: lower mask.ratio or raise data.image_size")
    if num_visible((size // PATCH_SIZE) ** 2, float(ratio)) >= (size // PATCH_SIZE) ** 2:
        raise ConfigError(
            f"mask.ratio={ratio} masks no patch of a {size}px image ({(size // PATCH_SIZE) ** 2} patches of 32px): "
            "nothing would be reconstructed and the loss would be 0; raise mask.ratio (e.g. 0.6) or data.image_size"
        )
    if "batch_size" in d:
        raise ConfigError(
            f"data.batch_size={d.batch_size} (a per-process batch) is gone: set the batch of one optimizer step "
            "over all processes, data.global_batch_size=... (default 4096, the paper's); each process then reads "
            "global / world size images, in trainer.grad_accum_steps micro-batches"
        )
    global_batch = _int(d.global_batch_size, "data.global_batch_size")
    plan_batches(global_batch, 1, _int(t.grad_accum_steps, "trainer.grad_accum_steps"))
    if not isinstance(t.get("grad_checkpointing", False), bool):
        raise ConfigError(f"trainer.grad_checkpointing={t.grad_checkpointing!r} must be true or false")
    if not isinstance(m.get("dense_stem", False), bool):
        raise ConfigError(f"model.dense_stem={m.dense_stem!r} must be true or false")
    if not isinstance(t.get("cuda_graphs", False), bool):
        raise ConfigError(f"trainer.cuda_graphs={t.cuda_graphs!r} must be true or false")
    stages = t.get("grad_checkpointing_stages", None)
    if stages is not None:
        _int(stages, "trainer.grad_checkpointing_stages")
        if not t.get("grad_checkpointing", False):
            raise ConfigError(f"trainer.grad_checkpointing_stages={stages} chooses which stages are recomputed: "
                              "it needs trainer.grad_checkpointing=true")
    _int(d.num_workers, "data.num_workers", low=0)
    scale = list(d.crop_scale)
    if len(scale) != 2 or not 0 < _number(scale[0], "data.crop_scale[0]") <= _number(scale[1], "data.crop_scale[1]") <= 1:
        raise ConfigError(f"data.crop_scale={scale} must be [low, high] with 0 < low <= high <= 1, e.g. [0.67, 1.0]")
    if d.kind == "demo":
        if d.path is not None:
            raise ConfigError(f"data.path={d.path!r} is set but data=demo ignores it: add data=folder to read that folder")
        _int(d.num_images, "data.num_images")
    elif d.kind == "folder":
        if d.path is None:
            raise ConfigError(
                "data.path is not set: pre-training reads a folder of images (data=folder, the default); pass "
                "data.path=/path/to/images (ImageNet's train/ or any folder of images, searched recursively). "
                "For the built-in synthetic images use experiment=demo (the CPU demo) or data=demo"
            )
        if not Path(str(d.path)).expanduser().is_dir():
            raise ConfigError(f"data.path={d.path!r} does not exist or is not a directory: fix the path")
    else:
        raise ConfigError(f"data.kind={d.kind!r} is unknown: use data=folder or data=demo")

    if o.name not in OPTIMIZERS:
        raise ConfigError(f"optimizer.name={o.name!r} is unknown: use optimizer=lamb or optimizer=adamw")
    _number(o.base_lr, "optimizer.base_lr", 0.0)
    try:
        betas = list(o.betas)
    except InterpolationResolutionError as e:
        raise ConfigError(
            f"optimizer.betas: {e}. The optimizer takes beta2 from model.optimizer_beta2: add "
            "optimizer_beta2: 0.95 (ResNet-like) or 0.999 (ConvNeXt-like) to your model config, or pass "
            "model.optimizer_beta2=... or optimizer.betas=[0.9,0.95]"
        ) from e
    if len(betas) != 2:
        raise ConfigError(f"optimizer.betas={betas} must be [beta1, beta2], e.g. [0.9, 0.95]")
    for i, beta in enumerate(betas):
        _number(beta, f"optimizer.betas[{i}]", 0.0, 1.0, closed_high=False)
    _number(o.weight_decay, "optimizer.weight_decay", 0.0)
    _number(o.weight_decay_end, "optimizer.weight_decay_end", 0.0)
    if o.grad_clip is not None:
        _number(o.grad_clip, "optimizer.grad_clip", 1e-12)
    _int(s.epochs, "schedule.epochs")
    _number(s.warmup_epochs, "schedule.warmup_epochs", 0.0)
    _number(s.warmup_start_ratio, "schedule.warmup_start_ratio", 0.0, 1.0)
    _number(s.final_lr_ratio, "schedule.final_lr_ratio", 0.0, 1.0)

    if t.precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={t.precision!r} is unknown: use fp32, bf16 or fp16")
    if not (t.device in ("auto", "cpu", "cuda") or str(t.device).startswith("cuda:")):
        raise ConfigError(f"trainer.device={t.device!r} is unknown: use auto, cpu or cuda")
    if t.resume not in (None, "auto", "never") and not Path(str(t.resume)).expanduser().is_file():
        raise ConfigError(f"trainer.resume={t.resume!r} is not a file: use auto, never, or the path of a checkpoint")
    _int(t.checkpoint_every, "trainer.checkpoint_every")
    _int(t.keep_checkpoints, "trainer.keep_checkpoints")
    if t.max_steps is not None:
        _int(t.max_steps, "trainer.max_steps")

    if lg.name not in LOGGERS:
        raise ConfigError(f"logger.name={lg.name!r} is unknown: use logger=jsonl or logger=wandb")
    _int(lg.log_every, "logger.log_every")
    _int(lg.image_every, "logger.image_every", low=0)
    _int(lg.num_images, "logger.num_images")
    if lg.name == "wandb" and lg.mode not in WANDB_MODES:
        raise ConfigError(f"logger.mode={lg.mode!r} is unknown: use online, offline or disabled")
