"""spark-me-pretrain: SparK pre-training as a Hydra app, on one process or under torchrun.

    spark-me-pretrain data.path=/datasets/imagenet/train                 # one GPU
    torchrun --nproc_per_node 8 -m spark_me.pretrain data.path=...
    spark-me-pretrain experiment=demo                                     # CPU demo
    spark-me-pretrain --cfg job                                           # print the config

The config tree is ``configs/`` at the repository root, shipped in the package as
``spark_me/configs`` (a symlink in the source tree; real files in a wheel). A run writes
to its output directory: ``.hydra/`` (the resolved config), ``pretrain.log``,
``metrics.jsonl``, ``checkpoints/step_*.pt`` and ``reconstructions/step_*.png``.

``data.global_batch_size`` images make one optimizer step, whatever the number of
processes: each process reads ``global / world size`` of them, in
``trainer.grad_accum_steps`` micro-batches whose gradients are accumulated.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import hydra
import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from spark_me import SparK, build_sparse_encoder, random_patch_mask
from spark_me.encoders.plugins import is_file_spec
from spark_me.checkpoint import (
    EXPORT_FORMAT,
    FORMAT,
    CheckpointError,
    CheckpointWriteError,
    capture_rng_state,
    check_model,
    latest_checkpoint,
    later_checkpoints,
    list_checkpoints,
    load_checkpoint,
    load_file,
    load_latest_intact,
    load_model_state,
    remove_stale_temporaries,
    restore_rng_state,
    save_checkpoint,
)
from spark_me.data import (
    PretrainImages,
    ResumableSampler,
    SparKAugment,
    build_loader,
    build_source,
    center_view,
    normalize,
)
from spark_me.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_mean,
    broadcast_object,
    cleanup_distributed,
    convert_sync_batchnorm,
    init_distributed,
)
from spark_me.loss import masked_reconstruction_loss
from spark_me.ops import resolve_conv_impl
from spark_me.optim import build_optimizer, clip_gradients, peak_lr
from spark_me import preflight
from spark_me.preflight import ConfigError
from spark_me import run_config
from spark_me.run_config import PATCH_SIZE, plan_batches, validate_config
from spark_me.run_log import RunLogger
from spark_me.schedule import CosineSchedule
from spark_me.visualize import save_reconstruction_grid

log = logging.getLogger(__name__)

# Absolute, so Hydra reads the files whether it runs as `python -m`, a console script or
# from an installed wheel (a relative path makes Hydra import `spark_me.configs` as a package).
CONFIG_DIR = str(Path(__file__).resolve().parent / "configs")
# Warn (once) when the step waited for images this share of its time, over at least this
# many steps; the first batch of each epoch's loader (its workers starting) is not counted.
DATA_BOUND_SHARE = 0.2
DATA_BOUND_MIN_STEPS = 20


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient became NaN/inf: the run stops, checkpoints stay intact."""


# ----------------------------------------------------------------------------- model


def check_conv_impl(cfg: DictConfig, device: torch.device) -> None:
    """ConfigError unless ``model.conv_impl`` can run on the run's ``device`` (triton: CUDA
    and the triton package), before the run writes anything."""
    conv_impl = str(cfg.model.get("conv_impl") or "auto")
    try:
        resolve_conv_impl(conv_impl, device)
    except (ValueError, ImportError) as e:
        raise ConfigError(f"model.conv_impl={conv_impl}: {e}") from e


def check_graphs_and_sync_bn(trainer: DictConfig, world_size: int) -> None:
    """ConfigError where CUDA graphs would capture synchronised batch norms' collectives
    (several processes with ``trainer.sync_bn``): not supported."""
    if trainer.get("cuda_graphs", False) and world_size > 1 and trainer.sync_bn:
        raise ConfigError("trainer.cuda_graphs=true with trainer.sync_bn=true on several processes is not supported "
                          "(the synchronised batch norms' collectives would be captured): set one of them to false")


def build_model(cfg: DictConfig) -> SparK:
    """The SparK model of a run config (encoder by timm name, LightDecoder, mask ratio)."""
    kwargs = {"drop_path_rate": float(cfg.model.drop_path_rate)} if cfg.model.drop_path_rate else {}
    encoder = build_sparse_encoder(cfg.model.name, conv_impl=str(cfg.model.get("conv_impl") or "auto"), **kwargs)
    if cfg.trainer.get("grad_checkpointing", False):
        stages = cfg.trainer.get("grad_checkpointing_stages", None)
        try:
            encoder.set_grad_checkpointing(True, stages=None if stages is None else int(stages))
        except ValueError as e:
            what = "trainer.grad_checkpointing=true" + ("" if stages is None else f", grad_checkpointing_stages={stages}")
            raise ConfigError(f"{what}: {e}") from e
    if cfg.model.get("dense_stem", False):
        try:
            encoder.set_dense_stem(True)
        except ValueError as e:
            raise ConfigError(f"model.dense_stem=true: {e}") from e
    if cfg.trainer.get("cuda_graphs", False):
        try:
            encoder.set_cuda_graphs(True)
        except ValueError as e:
            raise ConfigError(f"trainer.cuda_graphs=true: {e}") from e
    return SparK(encoder, decoder_width=int(cfg.model.decoder_width), mask_ratio=float(cfg.mask.ratio))


def load_init_weights(model: SparK, path: str | os.PathLike) -> None:
    """Initialise from a spark_me checkpoint / ``--full`` export, or a timm state dict (encoder)."""
    obj = load_file(path)
    if obj.get("format") in (FORMAT, EXPORT_FORMAT):
        check_model(obj, path, model.encoder.timm_name, model.decoder.width)
        load_model_state(model, obj["model"], path)
        log.info("initialised SparK (encoder + decoder) from %s", path)
        return
    state = obj.get("state_dict", obj.get("model", obj))
    try:
        model.encoder.load_timm_state_dict(state)
    except ValueError as e:
        raise CheckpointError(f"model.init={path}: {e}") from e
    log.info("initialised the encoder from timm weights %s", path)


class SparKStep(nn.Module):
    """SparK's loss with mixed precision.

    With ``amp_dtype`` None this is ``model(images, active)``. Otherwise the whole forward
    (sparse encoder, densify, decoder) runs in one autocast region (sparse convs in the
    autocast dtype, norms in fp32) and the loss is computed in fp32.
    """

    def __init__(self, model: SparK, amp_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.model = model
        self.amp_dtype = amp_dtype

    def forward(self, images: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        if self.amp_dtype is None:
            return self.model(images, active)
        with torch.autocast(images.device.type, dtype=self.amp_dtype):
            reconstruction = self.model.forward_reconstruction(images, active)
        return masked_reconstruction_loss(reconstruction.float(), images, active, self.model.patch_size)


def accumulate_gradients(
    step_fn: nn.Module,
    micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_micro_batches: int,
    scaler: torch.amp.GradScaler,
) -> torch.Tensor:
    """Forward and backward of one optimizer step's ``(images, active)`` micro-batches.

    Each micro-batch's loss is divided by ``num_micro_batches`` before its backward, so the
    accumulated gradient is that of the mean loss over the step's images: every image has
    the same number of masked patches, so the mean of equal micro-batch means is the mean
    over all of them. What accumulation does change is BatchNorm: its statistics are those
    of each micro-batch. Under DDP the gradients are all-reduced once, in the last
    micro-batch's backward (``no_sync`` before it). Returns the mean loss, detached.
    """
    total: Optional[torch.Tensor] = None
    done = 0
    for images, active in micro_batches:
        done += 1
        last = done == num_micro_batches
        sync = contextlib.nullcontext() if last or not isinstance(step_fn, DistributedDataParallel) else step_fn.no_sync()
        with sync:
            loss = step_fn(images, active)
            scaler.scale(loss / num_micro_batches).backward()
        total = loss.detach().float() if total is None else total + loss.detach().float()
    if total is None or done != num_micro_batches:
        raise ValueError(f"expected {num_micro_batches} micro-batches, got {done}")
    return total / num_micro_batches


def _chunks(items: Iterable, n: int) -> Iterator[list]:
    """Consecutive lists of ``n`` items (a shorter last list is dropped)."""
    it = iter(items)
    while len(chunk := list(itertools.islice(it, n))) == n:
        yield chunk


# ----------------------------------------------------------------------------- training


def resolve_output_dir(cfg: DictConfig) -> Path:
    if cfg.trainer.output_dir:
        return Path(str(cfg.trainer.output_dir)).expanduser()
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    raise ConfigError("trainer.output_dir is not set and there is no Hydra run directory: set trainer.output_dir=...")


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class PretrainRun:
    """One pre-training run: set-up in the constructor, the loop in :meth:`fit`."""

    def __init__(self, cfg: DictConfig, dist_info: DistInfo) -> None:
        self.cfg = cfg
        self.info = dist_info
        self.device = dist_info.device
        self.is_main = dist_info.is_main
        t = cfg.trainer
        self.seed = int(t.seed)
        self.out = Path(broadcast_object(str(resolve_output_dir(cfg))))
        self.ckpt_dir = self.out / "checkpoints"
        self.plan = plan_batches(int(cfg.data.global_batch_size), dist_info.world_size, int(t.grad_accum_steps))
        self.global_batch = self.plan.global_batch
        if self.is_main:
            preflight.check_writable([self.out, self.ckpt_dir, self.out / "reconstructions"])
            remove_stale_temporaries(self.ckpt_dir)

        try:
            source = build_source(cfg.data)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        self.source = source
        self.dataset = PretrainImages(source, SparKAugment(int(cfg.data.image_size), tuple(cfg.data.crop_scale)), self.seed)
        if len(self.dataset) < self.global_batch:
            raise ConfigError(
                f"{len(self.dataset)} images are fewer than one global batch: lower data.global_batch_size="
                f"{self.global_batch} to at most {len(self.dataset)}"
            )
        self.sampler = ResumableSampler(self.dataset, self.plan.micro_batch, dist_info.world_size, dist_info.rank,
                                        self.seed, micro_batches_per_step=self.plan.grad_accum_steps)
        self.steps_per_epoch = self.sampler.steps_per_epoch  # the last global batch is padded (official sampler)

        seed_everything(self.seed)  # same initial weights on every rank
        self.model = build_model(cfg)
        if cfg.model.init:
            load_init_weights(self.model, cfg.model.init)
        self.model.to(self.device)
        check_graphs_and_sync_bn(t, dist_info.world_size)
        if dist_info.world_size > 1 and t.sync_bn:
            convert_sync_batchnorm(self.model)
        seed_everything(_derived_seed(self.seed, dist_info.rank, 1))  # per-rank stochastic depth
        self.mask_generator = torch.Generator().manual_seed(_derived_seed(self.seed, dist_info.rank, 2))

        lr = peak_lr(float(cfg.optimizer.base_lr), self.global_batch)
        self.optimizer = build_optimizer(cfg.optimizer, self.model, lr)
        s = cfg.schedule
        self.schedule = CosineSchedule(
            peak_lr=lr,
            total_steps=int(s.epochs) * self.steps_per_epoch,
            warmup_steps=round(float(s.warmup_epochs) * self.steps_per_epoch),
            weight_decay=float(cfg.optimizer.weight_decay),
            weight_decay_end=float(cfg.optimizer.weight_decay_end),
            warmup_start_ratio=float(s.warmup_start_ratio),
            final_lr_ratio=float(s.final_lr_ratio),
        )
        self.amp_dtype = run_config.amp_dtype(t.precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype is torch.float16)

        self.step = 0
        self.wandb_id: Optional[str] = None
        self._resume()

        step_module = SparKStep(self.model, self.amp_dtype)
        if dist_info.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.step_fn: nn.Module = DistributedDataParallel(step_module, device_ids=ids)
        else:
            self.step_fn = step_module
        self.logger = RunLogger(cfg, self.out, self.wandb_id, self.step) if self.is_main else None
        self._vis: Optional[tuple[torch.Tensor, torch.Tensor]] = None

        n_params = sum(p.numel() for p in self.model.parameters())
        log.info(
            "SparK %s (%.1fM params, decoder %d, drop path %g), %d images of %dpx from %s, %s, %d steps/epoch "
            "x %d epochs, %s betas (%g, %g), peak lr %.3g = %g x %d / 256, device %s, precision %s, output %s",
            cfg.model.name, n_params / 1e6, cfg.model.decoder_width, float(cfg.model.drop_path_rate),
            len(self.dataset), cfg.data.image_size, cfg.data.kind if cfg.data.kind == "demo" else cfg.data.path,
            self.plan.describe(), self.steps_per_epoch, s.epochs, cfg.optimizer.name, *cfg.optimizer.betas, lr,
            cfg.optimizer.base_lr, self.global_batch, self.device, t.precision if self.amp_dtype else "fp32", self.out,
        )
        conv_impl = str(cfg.model.get("conv_impl") or "auto")
        backend = resolve_conv_impl(conv_impl, self.device, self.amp_dtype or torch.float32)
        log.info("sparse convs: the %s backend%s", backend, " (model.conv_impl=auto)" if conv_impl == "auto" else "")
        if cfg.model.get("dense_stem", False):
            log.info("dense stem: the encoder's first conv runs on the zero-filled image, gathered at its output sites")
        if t.get("cuda_graphs", False):
            if self.device.type == "cuda":
                log.info("CUDA graphs: the encoder's forward+backward is captured before the first batch and replayed per batch")
            else:
                log.warning("trainer.cuda_graphs=true applies on CUDA only: running without graphs on %s", self.device)
        if t.get("grad_checkpointing", False):
            stages = t.get("grad_checkpointing_stages", None)
            which = "each encoder block is" if stages is None else f"the blocks of the encoder's first {stages} stage(s) are"
            log.info("gradient checkpointing: %s recomputed in the backward (less memory, more time)", which)
        if self.plan.grad_accum_steps > 1:
            log.info(
                "gradient accumulation: %d micro-batches of %d images per process and step; BatchNorm statistics "
                "are those of each micro-batch%s", self.plan.grad_accum_steps, self.plan.micro_batch,
                " (synchronised over the processes)" if dist_info.world_size > 1 and t.sync_bn else "",
            )

    # -- checkpoints

    def _resume(self) -> None:
        mode = self.cfg.trainer.resume
        existing = list_checkpoints(self.ckpt_dir)
        if mode in (None, "never"):
            if existing:
                raise ConfigError(
                    f"{self.ckpt_dir} already holds checkpoints (newest {existing[-1].name}) that a fresh run "
                    "would overwrite: pass trainer.resume=auto to continue it, or use a new output directory"
                )
            return
        if mode == "auto":  # rank 0 picks (and sets damaged files aside), the others follow
            found = load_latest_intact(self.ckpt_dir) if self.is_main else None
            chosen = broadcast_object(str(found[0]) if found else None)
            if chosen is None:
                log.info("no checkpoint in %s: starting a fresh run", self.ckpt_dir)
                return
            path = Path(chosen)
            ckpt = found[1] if found else load_checkpoint(path)
        else:
            path = Path(str(mode)).expanduser()
            if existing and path.resolve().parent != self.ckpt_dir.resolve():
                raise ConfigError(
                    f"{self.ckpt_dir} already holds checkpoints of another run; resume from {path} into a new output directory"
                )
            ckpt = load_checkpoint(path)
            later = later_checkpoints(self.ckpt_dir, int(ckpt["step"])) if existing else []
            if later:
                raise ConfigError(
                    f"resuming from {path.name} (step {ckpt['step']}) inside its own run would overwrite and prune "
                    f"the later checkpoints {', '.join(p.name for p in later)} of that run. To branch, write the new "
                    f"line of training elsewhere: trainer.resume={path} trainer.output_dir=<new folder> "
                    "hydra.run.dir=<new folder>; to continue the run itself use trainer.resume=auto"
                )
        check_model(ckpt, path, self.cfg.model.name, int(self.cfg.model.decoder_width))
        load_model_state(self.model, ckpt["model"], path)
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as e:
            theirs = ((ckpt.get("config") or {}).get("optimizer") or {}).get("name", "unknown")
            raise CheckpointError(
                f"the optimizer state in {path} does not fit optimizer={self.cfg.optimizer.name}: the checkpoint was "
                f"written by optimizer={theirs} ({type(e).__name__}: {e}). Resume with optimizer={theirs}, or start "
                "a new run in another output directory (model.init=<checkpoint> keeps its weights)"
            ) from e
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        rng = ckpt["rng"]
        if len(rng) == self.info.world_size:
            restore_rng_state(rng[self.info.rank], self.mask_generator)
        else:
            log.warning("checkpoint written by %d processes, resuming on %d: random streams are re-seeded", len(rng), self.info.world_size)
            seed_everything(_derived_seed(self.seed, self.info.rank, 1, self.step))
            self.mask_generator.manual_seed(_derived_seed(self.seed, self.info.rank, 2, self.step))
        if (ckpt.get("global_batch"), ckpt.get("steps_per_epoch")) != (self.global_batch, self.steps_per_epoch):
            log.warning(
                "checkpoint was written with global batch %s and %s steps/epoch, now %d and %d: the data order "
                "and the schedule differ from the original run", ckpt.get("global_batch"), ckpt.get("steps_per_epoch"),
                self.global_batch, self.steps_per_epoch,
            )
        self.wandb_id = ckpt.get("wandb_id")
        log.info("resumed from %s at step %d (epoch %d)", path, self.step, self.step // self.steps_per_epoch)

    def save(self) -> Optional[Path]:
        """Checkpoint the run (collective: every rank contributes its RNG state)."""
        rng = all_gather_objects(capture_rng_state(self.mask_generator))
        if not self.is_main:
            return None
        state = {
            "format": FORMAT,
            "model_name": self.cfg.model.name,
            "decoder_width": int(self.cfg.model.decoder_width),
            "mask_ratio": float(self.cfg.mask.ratio),
            "image_size": int(self.cfg.data.image_size),
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "global_batch": self.global_batch,
            "steps_per_epoch": self.steps_per_epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "rng": rng,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "wandb_id": self.logger.wandb_id if self.logger else None,
        }
        try:
            path = save_checkpoint(state, self.ckpt_dir, int(self.cfg.trainer.keep_checkpoints))
        except CheckpointWriteError as e:
            last = latest_checkpoint(self.ckpt_dir)
            raise CheckpointWriteError(
                f"{e}. Stopping at step {self.step}; {f'the previous checkpoint {last} is intact' if last else 'no earlier checkpoint exists'}. "
                "Free space (or fix the folder), then continue with trainer.resume=auto"
            ) from e
        log.info("saved checkpoint %s", path)
        return path

    # -- visualisation

    def save_reconstructions(self) -> Path:
        """Grid of fixed images with fixed masks (main process; no RNG or BN state touched)."""
        if self._vis is None:
            size, n = int(self.cfg.data.image_size), int(self.cfg.logger.num_images)
            views = []
            for i in range(len(self.source)):
                try:
                    views.append(center_view(self.source.load(i), size))
                except Exception:  # noqa: BLE001 (unreadable: take the next one)
                    continue
                if len(views) == n:
                    break
            if not views:
                raise ConfigError(
                    f"none of the {len(self.source)} images of data.path={self.cfg.data.path} could be read "
                    "(see the warnings above): check the dataset or point data.path elsewhere"
                )
            images = normalize(torch.stack(views).to(self.device))
            grid = (size // PATCH_SIZE, size // PATCH_SIZE)
            g = torch.Generator().manual_seed(self.seed)
            self._vis = images, random_patch_mask(len(views), grid, self.model.mask_ratio, g, self.device)
        was_training = self.model.training
        self.model.eval()
        views = self.model.reconstruct(*self._vis)
        self.model.train(was_training)
        path = save_reconstruction_grid(views, self.out / "reconstructions" / f"step_{self.step:08d}.png")
        if self.logger:
            self.logger.log_image(self.step, path)
        return path

    # -- the loop

    def _capture_encoder_graph(self) -> None:
        """With ``trainer.cuda_graphs`` on CUDA: capture the encoder for this run's batch
        shape before the data loader starts. Its pin-memory thread allocates pinned memory,
        and under CUDA's default capture mode such a call from any thread during a capture
        invalidates it (torch 2.11's ``make_graphed_callables`` cannot choose another
        mode). The template is zero images under a mask from a generator of its own, so
        the training batches' masks are unchanged."""
        encoder = self.model.encoder
        if not (getattr(encoder, "cuda_graphs", False) and self.device.type == "cuda"):
            return
        size, batch = int(self.cfg.data.image_size), self.plan.micro_batch
        images = torch.zeros(batch, 3, size, size, device=self.device)
        active = random_patch_mask(batch, (size // PATCH_SIZE, size // PATCH_SIZE), self.model.mask_ratio,
                                   torch.Generator().manual_seed(0), self.device)
        start = time.perf_counter()
        autocast = torch.autocast("cuda", dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()
        self.model.train()
        with autocast:
            captured = encoder.capture_cuda_graph(images, active)
        if captured:
            log.info("CUDA graphs: captured the encoder for batches of %d images in %.1f s, before the data loader "
                     "started", batch, time.perf_counter() - start)

    def _masked(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = normalize(images.to(self.device, non_blocking=True))
        b, _, h, w = images.shape
        active = random_patch_mask(b, (h // PATCH_SIZE, w // PATCH_SIZE), self.model.mask_ratio, self.mask_generator, self.device)
        return images, active

    def train_step(self, micro_batches: Sequence[tuple[torch.Tensor, int]]) -> dict[str, float]:
        """One optimizer step over this process's ``trainer.grad_accum_steps`` micro-batches ``(images, skipped)``."""
        lr, wd = self.schedule.apply(self.optimizer, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss = accumulate_gradients(
            self.step_fn, (self._masked(images) for images, _ in micro_batches), len(micro_batches), self.scaler
        )
        skipped = sum(int(s) for _, s in micro_batches)
        loss_mean, skipped_mean = all_reduce_mean(torch.stack([loss, loss.new_tensor(float(skipped))])).tolist()
        if not math.isfinite(loss_mean):
            self._non_finite(f"the loss is {loss_mean}")
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.optimizer.grad_clip
        grad_norm = float(clip_gradients(self.model, float(clip) if clip is not None else None))
        if not math.isfinite(grad_norm) and not self.scaler.is_enabled():
            self._non_finite(f"the gradient norm is {grad_norm}")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        return {"loss": loss_mean, "lr": lr, "weight_decay": wd, "grad_norm": grad_norm,
                "skipped": skipped_mean * self.info.world_size}

    def _non_finite(self, what: str) -> None:
        last = latest_checkpoint(self.ckpt_dir)
        raise NonFiniteLossError(
            f"{what} at step {self.step} (epoch {self.step // self.steps_per_epoch}); stopping. The last good "
            f"checkpoint is {last if last else '(none yet)'}. Lower optimizer.base_lr, check the data or use "
            "trainer.precision=fp32, then continue with trainer.resume=auto"
        )

    def fit(self) -> dict[str, Any]:
        t, lg = self.cfg.trainer, self.cfg.logger
        end = self.schedule.total_steps if t.max_steps is None else min(int(t.max_steps), self.schedule.total_steps)
        losses: list[float] = []
        window: dict[str, float] = {"loss": 0.0, "n": 0, "images": 0, "data": 0.0, "compute": 0.0}
        skipped_total = skipped_reported = 0.0
        steady = {"data": 0.0, "compute": 0.0, "n": 0}  # waits for data once each loader runs
        warned_data_bound = False
        last_metrics: dict[str, float] = {}
        start = time.perf_counter()
        window_start = start
        saved_at = self.step  # a resumed state is already on disk
        if self.step >= end:
            log.warning(
                "nothing to train: the run is already at step %d and ends at step %d (trainer.max_steps=%s, "
                "schedule %d steps); raise trainer.max_steps or schedule.epochs to train further, or start a new "
                "output directory", self.step, end, t.max_steps, self.schedule.total_steps,
            )
        if self.is_main and self.step == 0 and end > 0:
            self.save_reconstructions()
        if self.step < end:
            self._capture_encoder_graph()
        bar = tqdm(total=end, initial=self.step, unit="step", dynamic_ncols=True, desc=f"pretrain {self.cfg.model.name}",
                   disable=not (self.is_main and t.progress_bar))
        try:
            with logging_redirect_tqdm():
                while self.step < end:
                    epoch, skip = divmod(self.step, self.steps_per_epoch)
                    self.sampler.set_position(epoch, skip * self.plan.grad_accum_steps)
                    self.dataset.set_epoch(epoch)
                    loader = build_loader(self.dataset, self.sampler, int(self.cfg.data.num_workers), epoch, self.seed)
                    t_data = time.perf_counter()
                    for batch_index, micro_batches in enumerate(_chunks(loader, self.plan.grad_accum_steps)):
                        t_compute = time.perf_counter()
                        metrics = self.train_step(micro_batches)
                        now = time.perf_counter()
                        window["data"] += t_compute - t_data
                        window["compute"] += now - t_compute
                        if batch_index > 0:
                            steady["data"] += t_compute - t_data
                            steady["compute"] += now - t_compute
                            steady["n"] += 1
                        window["loss"] += metrics["loss"]
                        window["n"] += 1
                        window["images"] += self.global_batch
                        skipped_total += metrics["skipped"]
                        losses.append(metrics["loss"])
                        last_metrics = metrics
                        bar.update(1)
                        rate = window["images"] / max(now - window_start, 1e-9)
                        bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}", img_s=f"{rate:.1f}")
                        if self.step % int(lg.log_every) == 0 or self.step == end:
                            self._log_window(window, metrics, skipped_total, now - window_start, now - start)
                            if not warned_data_bound and self.is_main:
                                warned_data_bound = self._warn_if_data_bound(steady)
                            if skipped_total > skipped_reported and self.is_main:
                                log.warning("%d unreadable image(s) skipped so far", int(skipped_total))
                                skipped_reported = skipped_total
                            window = {"loss": 0.0, "n": 0, "images": 0, "data": 0.0, "compute": 0.0}
                            window_start = now
                        if self.step % int(t.checkpoint_every) == 0 or self.step == end:
                            self.save()
                            saved_at = self.step
                        if self.is_main and (self.step == end or (int(lg.image_every) and self.step % int(lg.image_every) == 0)):
                            self.save_reconstructions()
                        if self.step >= end:
                            break
                        t_data = time.perf_counter()
            if saved_at != self.step:
                self.save()
        finally:
            bar.close()
            if self.logger:
                self.logger.close()
        elapsed = time.perf_counter() - start
        summary = self._summary(losses, elapsed, last_metrics)
        if losses:
            log.info(
                "done: step %d/%d in %.0fs; loss %.4f (first %d steps) -> %.4f (last %d steps); "
                "metrics %s, reconstructions %s", self.step, self.schedule.total_steps, elapsed,
                summary["first_loss"], summary["window"], summary["loss"], summary["window"],
                self.out / "metrics.jsonl", self.out / "reconstructions" / f"step_{self.step:08d}.png",
            )
        return summary

    def _log_window(self, window: dict, metrics: dict, skipped_total: float, window_time: float, total_time: float) -> None:
        n = max(window["n"], 1)
        record = {
            "step": self.step,
            "epoch": round(self.step / self.steps_per_epoch, 4),
            "loss": window["loss"] / n,
            "lr": metrics["lr"],
            "weight_decay": metrics["weight_decay"],
            "grad_norm": metrics["grad_norm"],
            "images_per_s": window["images"] / max(window_time, 1e-9),
            "data_time": window["data"] / n,
            "step_time": window["compute"] / n,
            "skipped_images": int(skipped_total),
            "time": round(total_time, 3),
        }
        if self.logger:
            self.logger.log(record)

    def _warn_if_data_bound(self, steady: dict) -> bool:
        """Say so (and return True) when the step has been waiting for the loader."""
        busy = steady["data"] + steady["compute"]
        if steady["n"] < DATA_BOUND_MIN_STEPS or steady["data"] < DATA_BOUND_SHARE * busy:
            return False
        log.warning(
            "the step waited for images %.0f%% of the time over %d steps (%.3f s of %.3f s per step): the data loader "
            "is the bottleneck. Raise data.num_workers (now %d; at most the cores per process), store the images "
            "smaller, or measure the loader alone with `python -m kernels_bench.data_throughput --workers N` in a "
            "spark_me checkout",
            100 * steady["data"] / busy, steady["n"], steady["data"] / steady["n"], busy / steady["n"],
            int(self.cfg.data.num_workers),
        )
        return True

    def _summary(self, losses: list[float], elapsed: float, last: dict) -> dict[str, Any]:
        k = max(1, min(10, len(losses) // 4)) if losses else 0
        return {
            "step": self.step,
            "output_dir": str(self.out),
            "checkpoint": str(latest_checkpoint(self.ckpt_dir)) if self.is_main else None,
            "first_loss": float(np.mean(losses[:k])) if losses else math.nan,
            "loss": float(np.mean(losses[-k:])) if losses else math.nan,
            "window": k,
            "elapsed_s": elapsed,
            **{f"last_{key}": v for key, v in last.items()},
        }


def run(cfg: DictConfig) -> dict[str, Any]:
    """Validate ``cfg``, join the process group (torchrun), train, and return a summary."""
    imports = cfg.model.get("imports") or []
    if imports:  # absolute file paths, so checkpoints load from any working directory
        cfg.model.imports = [str(Path(i).expanduser().resolve()) if is_file_spec(str(i)) else str(i) for i in imports]
    validate_config(cfg)
    preflight.check_device(str(cfg.trainer.device))
    preflight.check_wandb(cfg.logger)
    info = init_distributed(str(cfg.trainer.device))
    if not info.is_main:  # only rank 0 reports progress (root: this module is __main__ under -m)
        logging.getLogger().setLevel(logging.WARNING)
    try:
        check_conv_impl(cfg, info.device)
        pretrain_run = PretrainRun(cfg, info)
        if info.is_main:
            preflight.write_hydra_record(cfg)
        return pretrain_run.fit()
    finally:
        cleanup_distributed()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="pretrain")
def _hydra_main(cfg: DictConfig) -> float:
    try:
        summary = run(cfg)
    except (ConfigError, CheckpointError, NonFiniteLossError) as e:
        log.error("%s: %s", type(e).__name__, e)
        sys.exit(2 if isinstance(e, ConfigError) else 1)
    return summary["loss"]  # the objective for Hydra sweepers


def main() -> None:
    """Console entry point ``spark-me-pretrain`` (also ``python -m spark_me.pretrain``)."""
    if int(os.environ.get("RANK", "0")) > 0:
        sys.argv.append("hydra.output_subdir=null")  # only rank 0 writes .hydra/
    elif not any(a.startswith(("hydra.output_subdir=", "--cfg", "-c", "--info", "--help", "-h", "--hydra-help")) for a in sys.argv[1:]):
        # .hydra/ is written once the run has started, so a rejected start (wrong model or
        # optimizer for the run's checkpoints) does not rewrite the record of that run.
        os.environ[preflight.DEFERRED_SUBDIR_ENV] = ".hydra"
        sys.argv += ["hydra.output_subdir=null", f"+hydra.callbacks.spark_me_run_dir._target_={preflight.RUN_DIR_CALLBACK}"]
    _hydra_main()


if __name__ == "__main__":
    main()
