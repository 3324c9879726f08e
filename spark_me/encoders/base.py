"""The sparse-encoder contract that SparK, the CLI and the benchmarks rely on.

A sparse encoder is an ``nn.Module`` with

* ``downsample_ratio``: total stride of its last feature map (the mask patch size, 32);
* ``feature_channels``: channels of its feature maps, finest first;
* ``forward(images, active)``: images float (B, 3, H, W), active bool (B, H/r, W/r)
  with True = visible; returns one ``ME.SparseTensor`` per scale, finest first, with
  coordinates ``[b, y, x]`` in input pixels and features only at visible sites;
* ``densify_norm(channels)``: the normalisation SparK applies to a feature map before
  filling masked sites with the mask embedding (BN over visible sites for BN networks,
  LayerNorm per site for LN networks).

Subclass :class:`SparseEncoder` and implement ``forward_sparse`` to get input checks,
gathering and the timm state-dict helpers for free; register the class or a factory
with :func:`spark_me.register_encoder` to use it by name.
"""
from __future__ import annotations

from typing import Optional

import MinkowskiEngine as ME
import torch
import torch.nn as nn

from spark_me.cuda_graphs import EncoderGraphs, check_graphable
from spark_me.gather import check_inputs, to_sparse
from spark_me.layers import SparseBatchNorm2d

# Keys of timm classifier heads, dropped when loading a full timm state dict.
CLASSIFIER_PREFIXES = ("fc.", "head.fc.", "classifier.")


class SparseEncoder(nn.Module):
    """Base class: input checks, gathering, and timm-compatible (de)serialisation."""

    downsample_ratio: int = 32
    feature_channels: list[int]
    timm_name: Optional[str] = None
    # Encoders that run their blocks through spark_me.recompute.run_blocks set this True;
    # those that also ask :meth:`checkpoints_stage` per stage set supports_stage_checkpointing.
    supports_grad_checkpointing: bool = False
    supports_stage_checkpointing: bool = False
    grad_checkpointing: bool = False
    checkpoint_stages: Optional[int] = None  # recompute only the first N stages (None: all)
    # Encoders whose first conv can run densely on the zero-filled image
    # (spark_me.gather.conv_to_sparse) implement stem_conv_to_sparse and
    # forward_after_stem_conv, and set this True.
    supports_dense_stem: bool = False
    dense_stem: bool = False
    # Encoders whose forward_sparse reads per-batch data only through the batch's neighbour
    # tables and batch indices can be replayed from CUDA graphs (spark_me.cuda_graphs).
    supports_cuda_graphs: bool = False
    cuda_graphs: bool = False
    encoder_graphs: Optional[EncoderGraphs] = None  # made on the first graphed batch: captures, replay counts

    def set_grad_checkpointing(self, enable: bool = True, stages: Optional[int] = None) -> None:
        """timm's switch: recompute each block in the backward instead of keeping its
        activations (less memory, one more forward of the blocks per step).

        ``stages``: recompute only the blocks of the first ``stages`` stages. Their maps
        are the largest, so they hold most of the activations for a smaller share of the
        forward's time (``None``: every stage).
        """
        if enable and not self.supports_grad_checkpointing:
            raise ValueError(
                f"{type(self).__name__} does not support gradient checkpointing: run its blocks through "
                "spark_me.recompute.run_blocks and set supports_grad_checkpointing = True, or leave it off"
            )
        if stages is not None:
            num_stages = len(self.feature_channels)
            if not enable:
                raise ValueError(f"stages={stages} recomputes part of the encoder: it needs enable=True")
            if not self.supports_stage_checkpointing:
                raise ValueError(
                    f"{type(self).__name__} recomputes all its blocks or none (stages=None): to recompute the "
                    "first stages only, run stage i's blocks with run_blocks(..., self.checkpoints_stage(i)) "
                    "and set supports_stage_checkpointing = True"
                )
            if isinstance(stages, bool) or not isinstance(stages, int) or not 1 <= stages <= num_stages:
                raise ValueError(f"stages must be a whole number from 1 to {num_stages} (this encoder's stages), "
                                 f"or None for all, got {stages!r}")
        for m in self.modules():
            if hasattr(m, "grad_checkpointing"):
                m.grad_checkpointing = enable
        self.checkpoint_stages = stages if enable else None

    def checkpoints_stage(self, index: int) -> bool:
        """Whether the blocks of stage ``index`` (0 = finest) are recomputed in the backward."""
        return self.grad_checkpointing and (self.checkpoint_stages is None or index < self.checkpoint_stages)

    def forward(self, images: torch.Tensor, active: torch.Tensor) -> list[ME.SparseTensor]:
        check_inputs(images, active, self.downsample_ratio)
        x = self.gather(images, active)
        if self.cuda_graphs and x.F.is_cuda and self.training and torch.is_grad_enabled():
            if self.encoder_graphs is None:
                self.encoder_graphs = EncoderGraphs(self)
            return self.encoder_graphs.forward_gathered(x)
        return self.forward_gathered(x)

    def gather(self, images: torch.Tensor, active: torch.Tensor) -> ME.SparseTensor:
        """The batch as the encoder's sparse layers first read it: the visible pixels at
        tensor stride 1, or with the dense stem the first conv's output at its visible
        sites (inputs already checked). Its coordinate manager keeps the batch's tables."""
        if self.dense_stem:
            return self.stem_conv_to_sparse(images, active)
        return to_sparse(images, active, self.downsample_ratio)

    def forward_gathered(self, x: ME.SparseTensor) -> list[ME.SparseTensor]:
        """Encode a batch from :meth:`gather` into per-scale features: the part of the
        forward that CUDA graphs capture."""
        return self.forward_after_stem_conv(x) if self.dense_stem else self.forward_sparse(x)

    def set_cuda_graphs(self, enable: bool = True) -> None:
        """Replay the training forward+backward on CUDA from captured graphs (one capture
        per batch shape; :mod:`spark_me.cuda_graphs`): the host no longer issues each of the
        encoder's kernels. Evaluation and CPU batches run as before."""
        if enable:
            check_graphable(self)
        self.cuda_graphs = enable
        self.encoder_graphs = None  # captured again on the next training batch

    def capture_cuda_graph(self, images: torch.Tensor, active: torch.Tensor) -> bool:
        """Capture the training forward+backward for batches shaped like ``(images,
        active)`` now, instead of on the first such training batch. Only the shapes count
        (zero images will do); parameters, gradients and buffers are left as they were.
        Run it under the training step's autocast state, which is part of the shape. The
        trainer calls this before its data loader starts: a capture must not overlap
        another thread's CUDA calls (the loader's pin-memory thread). Returns whether the
        graph exists (False, with a warning, where the capture failed)."""
        if not self.cuda_graphs:
            raise ValueError("capture_cuda_graph needs CUDA graphs switched on: call set_cuda_graphs() first")
        if not (images.is_cuda and self.training and torch.is_grad_enabled()):
            raise ValueError("CUDA graphs replay the training forward+backward on CUDA: capture with CUDA images, "
                             "the encoder in train() mode and gradients enabled")
        check_inputs(images, active, self.downsample_ratio)
        if self.encoder_graphs is None:
            self.encoder_graphs = EncoderGraphs(self)
        return self.encoder_graphs.capture(self.gather(images, active))

    def forward_sparse(self, x: ME.SparseTensor) -> list[ME.SparseTensor]:
        """Encode the gathered visible pixels (tensor stride 1) into per-scale features."""
        raise NotImplementedError

    def set_dense_stem(self, enable: bool = True) -> None:
        """Run the first conv as a dense conv of the zero-filled image, gathered at its
        output sites, instead of a sparse conv of the gathered pixels: the same features
        (exact, see :func:`spark_me.gather.conv_to_sparse`) without full-resolution
        coordinates and tables. With CUDA graphs the dense conv and its gathering run
        eagerly and the graph starts after them."""
        if enable and not self.supports_dense_stem:
            raise ValueError(f"{type(self).__name__} has no dense stem: implement stem_conv_to_sparse(images, active) "
                             "with spark_me.gather.conv_to_sparse and forward_after_stem_conv(x), and set "
                             "supports_dense_stem = True")
        self.dense_stem = enable
        self.encoder_graphs = None  # a captured graph starts at the other stem's output

    def stem_conv_to_sparse(self, images: torch.Tensor, active: torch.Tensor) -> ME.SparseTensor:
        """The first conv run by :func:`~spark_me.gather.conv_to_sparse` on the zero-filled
        image: its output at the visible sites (inputs already checked)."""
        raise NotImplementedError(f"{type(self).__name__} sets supports_dense_stem but does not implement "
                                  "stem_conv_to_sparse(images, active): return spark_me.gather.conv_to_sparse(...) "
                                  "of its first conv")

    def forward_after_stem_conv(self, x: ME.SparseTensor) -> list[ME.SparseTensor]:
        """:meth:`forward_sparse` from the first conv's output (:meth:`stem_conv_to_sparse`) on."""
        raise NotImplementedError(f"{type(self).__name__} sets supports_dense_stem but does not implement "
                                  "forward_after_stem_conv(x): forward_sparse from its first conv's output on")

    def densify_norm(self, channels: int) -> nn.Module:
        """Norm applied by SparK's densify step to a feature map of ``channels``."""
        return SparseBatchNorm2d(channels)

    @property
    def feature_info(self) -> list[dict]:
        """timm-style description of the feature maps."""
        n = len(self.feature_channels)
        return [
            dict(num_chs=c, reduction=self.downsample_ratio // 2 ** (n - 1 - i))
            for i, c in enumerate(self.feature_channels)
        ]

    def load_timm_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Strictly load ``timm.create_model(timm_name).state_dict()`` (classifier ignored)."""
        sd = {k: v for k, v in state_dict.items() if not k.startswith(CLASSIFIER_PREFIXES)}
        own = self.state_dict()
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        shape_errors = [
            f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
            for k in set(own) & set(sd)
            if sd[k].shape != own[k].shape
        ]
        if missing or unexpected or shape_errors:
            raise ValueError(
                f"state dict does not fit sparse encoder '{self.timm_name}': "
                f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys "
                f"{unexpected[:5]}, shape mismatches {shape_errors[:5]}. Is it from another "
                "model? Build the encoder with the timm name the weights were made for."
            )
        self.load_state_dict(sd, strict=True)

    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights that load with strict=True into ``timm.create_model(timm_name, num_classes=0)``."""
        return {k: v.detach().clone() for k, v in self.state_dict().items()}
