"""Activation memory by part: the bytes each variant's step keeps for its backward.

    python -m kernels_bench.saved_memory [--models resnet50 convnext_tiny] [--batch 8]
        [--size 224] [--mask 0.6] [--amp bf16] [--device cpu] [--out DIR]

A training step's memory peaks where the forward has ended and the backward begins: the
tensors autograd saved for the backward, plus parameters, gradients, optimizer state and
each kernel's workspace. The saved tensors are the part that sparsity can shrink, and
they can be counted exactly on any device: every tensor autograd packs is recorded once
per storage (a tensor saved by two layers counts once; views share their base's bytes),
with parameters left out and autocast's low-precision weight copies counted apart. Each
storage is charged to the innermost module running when it was first saved, and so to a
part of the step: ``encoder``, ``densify``, ``decoder``, or ``loss`` for what is saved
outside any module. Bytes scale linearly with the batch, so a CPU count at batch 8
predicts a GPU's at batch 128 (times 16), without its allocator's workspace and caching.

The sparse variant also holds its batch's neighbour tables for the whole step (built in
the forward, read again in the backward); they are counted apart
(:meth:`spark_me.ops.TableCache.table_bytes`, read after the backward, which may add
inverse tables). MinkowskiEngine's own coordinate maps live outside PyTorch's tensors and
are not counted.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
from pathlib import Path
from typing import Callable, Optional

import MinkowskiEngine as ME
import torch
import torch.nn as nn

from kernels_bench.measure import Case, build_sparse_spark, make_inputs, step_loss
from kernels_bench.variants import build_variant
from spark_me.ops import TableCache
from spark_me.recompute import observe_checkpoints

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("kernels_bench.saved_memory")
MIB = 2.0**20
VARIANTS = ("sparse", "masked_dense")
# The masked-dense variants keep densify's pieces at the top level (norms, projs,
# mask_tokens); the sparse SparK keeps them in ``densify``.
PART_OF_TOP_MODULE = {"norms": "densify", "projs": "densify", "mask_tokens": "densify"}


def part_of(path: str) -> str:
    """The step part of a module path (``model.encoder.layer1.0.conv1`` -> ``encoder``)."""
    names = [n for n in path.split(".") if n]
    if names and names[0] == "model":  # the sparse variant wraps its SparK as ``model``
        names = names[1:]
    if not names:
        return "loss"
    return PART_OF_TOP_MODULE.get(names[0], names[0])


# Autograd nodes of dtype casts and views: a parameter reached through these alone is a
# weight (or a copy or view of one), not an activation.
_CAST_AND_VIEW_NODES = ("ToCopyBackward", "TBackward", "ViewBackward", "PermuteBackward", "ReshapeAliasBackward",
                        "UnsafeViewBackward", "AsStridedBackward", "ExpandBackward", "TransposeBackward")


def _is_weight_cast(t: torch.Tensor, parameters: set[int]) -> bool:
    """Whether ``t`` (or the tensor it views) is a dtype copy of a parameter (storage
    pointers ``parameters``), as autocast and the sparse convs make of weights: its
    autograd history is casts and views of that parameter, with at least one cast."""
    root = t._base if t._base is not None else t
    fn, cast = root.grad_fn, False
    for _ in range(8):
        if fn is None:
            return False
        name = type(fn).__name__
        if name == "AccumulateGrad":
            return cast and fn.variable.untyped_storage().data_ptr() in parameters
        if not name.startswith(_CAST_AND_VIEW_NODES):
            return False
        cast = cast or name.startswith("ToCopyBackward")
        inputs = [f for f, _ in fn.next_functions if f is not None]
        if len(inputs) != 1:
            return False
        fn = inputs[0]
    return False


class SavedTensorAccount:
    """Counts the bytes autograd saves while active, per (part, innermost module type).

    Use as a context manager around a forward pass of ``model``; read :meth:`summary`.
    The blocks run under activation checkpointing (:func:`spark_me.recompute.checkpoint_block`)
    keep their input for the backward outside autograd's saved tensors, to recompute the
    rest; those inputs are counted too, once per storage, as the block's.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: set[int] = set()
        self.by_layer: collections.Counter[tuple[str, str]] = collections.Counter()
        self.weight_casts = 0
        self.table_caches: dict[int, TableCache] = {}  # the batches' managers, by id
        self._stack: list[tuple[str, str]] = []
        self._names: dict[int, tuple[str, str]] = {}  # id(module) -> (path, type name)
        self._handles: list = []
        self._hooks = contextlib.ExitStack()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or ptr in self.parameters or ptr in self.seen:
            return t
        self.seen.add(ptr)
        if _is_weight_cast(t, self.parameters):
            self.weight_casts += nbytes
            return t
        path, layer = self._stack[-1] if self._stack else ("", "(no module)")
        self.by_layer[(part_of(path), layer)] += nbytes
        return t

    def _enter_hook(self, path: str, layer: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            self._stack.append((path, layer))
            for a in args:
                if isinstance(a, ME.SparseTensor) and isinstance(a.coordinate_manager, TableCache):
                    self.table_caches[id(a.coordinate_manager)] = a.coordinate_manager
        return hook

    def _held_by_checkpoint(self, block: nn.Module, x: ME.SparseTensor | torch.Tensor) -> None:
        """Count the input a checkpointed block keeps, as the block's."""
        self._stack.append(self._names.get(id(block), ("", type(block).__name__)))
        self._pack(x.F if isinstance(x, ME.SparseTensor) else x)
        self._stack.pop()

    def _exit_hook(self, *_) -> None:  # returns None: a forward hook's result would replace the output
        self._stack.pop()

    def __enter__(self) -> "SavedTensorAccount":
        for path, module in self.model.named_modules():
            self._names[id(module)] = (path, type(module).__name__)
            self._handles.append(module.register_forward_pre_hook(self._enter_hook(path, type(module).__name__)))
            self._handles.append(module.register_forward_hook(self._exit_hook))
        self._hooks.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t))
        self._hooks.enter_context(observe_checkpoints(self._held_by_checkpoint))
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def summary(self) -> dict:
        """MiB in total, per part, per (part, layer type), in weight copies, and in the
        neighbour tables of the batches seen (as they are when this is called)."""
        parts: collections.Counter[str] = collections.Counter()
        for (part, _), nbytes in self.by_layer.items():
            parts[part] += nbytes
        return {
            "activations_mib": sum(parts.values()) / MIB,
            "parts_mib": {k: v / MIB for k, v in sorted(parts.items())},
            "layers_mib": [{"part": p, "layer": l, "mib": v / MIB} for (p, l), v in self.by_layer.most_common()],
            "weight_casts_mib": self.weight_casts / MIB,
            "tables_mib": sum(cache.table_bytes() for cache in self.table_caches.values()) / MIB,
        }


def count_saved(model_name: str, batch: int, size: int, mask_ratio: float, device: str = "cpu",
                amp: Optional[str] = None, decoder_width: int = 768, conv_impl: str = "auto",
                grad_checkpointing: bool = False, checkpoint_stages: Optional[int] = None,
                dense_stem: bool = False) -> dict:
    """The saved-tensor account of one step's forward for the sparse and masked-dense variants
    (same weights, images and mask); ``amp``: None, ``"bf16"`` or ``"fp16"``;
    ``grad_checkpointing``: the sparse encoder recomputes its blocks in the backward (the
    emulation keeps its own activations: its masking context lives for one forward only),
    those of its first ``checkpoint_stages`` stages only where given; ``dense_stem``: its
    first conv runs densely on the zero-filled image (no full-resolution table)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[amp]
    out: dict = {"model": model_name, "batch": batch, "size": size, "mask_ratio": mask_ratio, "amp": amp,
                 "device": device, "conv_impl": conv_impl, "grad_checkpointing": grad_checkpointing,
                 "checkpoint_stages": checkpoint_stages, "dense_stem": dense_stem, "variants": {}}
    for variant in VARIANTS:
        case = Case(model=model_name, batch=batch, size=size, mask_ratio=mask_ratio, variant=variant, part="step",
                    device=device, decoder_width=decoder_width, conv_impl=conv_impl)
        sparse = build_sparse_spark(case, torch.device(device))
        model = build_variant(sparse, variant).to(device).train()
        if grad_checkpointing and variant == "sparse":
            model.model.encoder.set_grad_checkpointing(True, stages=checkpoint_stages)
        if variant == "sparse":
            model.model.encoder.set_dense_stem(dense_stem)
        images, active = make_inputs(case, torch.device(device))
        forward = step_loss(model, images, active, variant, dtype)
        with SavedTensorAccount(model) as account:
            loss = forward()
        loss.backward()  # the graph runs once, as in a step (and its saved tensors are freed)
        out["variants"][variant] = account.summary()  # after the backward: its inverse tables too
        out["visible_fraction"] = float(active.float().mean())
    return out


def ratios(result: dict) -> dict:
    """Sparse / masked-dense, in total and per part."""
    s, d = result["variants"]["sparse"], result["variants"]["masked_dense"]
    parts = sorted(set(s["parts_mib"]) | set(d["parts_mib"]))
    per_part = {p: s["parts_mib"].get(p, 0.0) / d["parts_mib"][p] for p in parts if d["parts_mib"].get(p)}
    with_tables = (s["activations_mib"] + s.get("tables_mib", 0.0)) / (d["activations_mib"] + d.get("tables_mib", 0.0))
    return {"total": s["activations_mib"] / d["activations_mib"], "parts": per_part, "with_tables": with_tables}


def _options_note(r: dict) -> str:
    """The heading's note on the sparse encoder's options: its dense stem, what it recomputed."""
    options = ["a dense stem"] if r.get("dense_stem") else []
    if r.get("grad_checkpointing"):
        stages = r.get("checkpoint_stages")
        options.append("gradient checkpointing" + ("" if stages is None else f" of its first {stages} stage(s)"))
    return ", sparse encoder with " + " and ".join(options) if options else ""


def markdown(results: list[dict]) -> str:
    """A table per model: MiB saved per part by each variant, and their ratio."""
    lines = []
    for r in results:
        s, d = r["variants"]["sparse"], r["variants"]["masked_dense"]
        q = ratios(r)
        lines += [f"### {r['model']}, batch {r['batch']}, {r['size']} px, mask {r['mask_ratio']}, "
                  f"{r['amp'] or 'fp32'} ({r['visible_fraction']:.2f} visible, {r['device']})"
                  + _options_note(r), "",
                  "| part | sparse MiB | masked-dense MiB | sparse / masked-dense |", "|---|---|---|---|"]
        for p in sorted(set(s["parts_mib"]) | set(d["parts_mib"])):
            ratio = f"{q['parts'][p]:.2f}" if p in q["parts"] else "-"
            lines.append(f"| {p} | {s['parts_mib'].get(p, 0.0):.1f} | {d['parts_mib'].get(p, 0.0):.1f} | {ratio} |")
        lines.append(f"| **all activations** | {s['activations_mib']:.1f} | {d['activations_mib']:.1f} | "
                     f"**{q['total']:.2f}** |")
        if "tables_mib" in s:
            lines.append(f"| neighbour tables | {s['tables_mib']:.1f} | {d.get('tables_mib', 0.0):.1f} | |")
            lines.append(f"| **activations + tables** | {s['activations_mib'] + s['tables_mib']:.1f} | "
                         f"{d['activations_mib'] + d.get('tables_mib', 0.0):.1f} | **{q['with_tables']:.2f}** |")
        lines.append(f"| weight copies | {s['weight_casts_mib']:.1f} | {d['weight_casts_mib']:.1f} | |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m kernels_bench.saved_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet50", "convnext_tiny"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--mask", type=float, default=0.6)
    p.add_argument("--amp", choices=("bf16", "fp16", "none"), default="bf16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--conv-impl", default="auto", choices=("auto", "torch", "triton", "minkowski"))
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="the sparse encoder recomputes its blocks in the backward (the emulation does not)")
    p.add_argument("--checkpoint-stages", type=int, default=None, metavar="N",
                   help="with --grad-checkpointing: recompute only the blocks of the first N stages")
    p.add_argument("--dense-stem", action="store_true",
                   help="the sparse encoder's first conv runs densely on the zero-filled image")
    p.add_argument("--out", type=Path, default=None,
                   help="default kernels_bench/results/saved-memory[-dense-stem][-grad-checkpointing[-stages-N]]")
    args = p.parse_args(argv)
    if not 0.0 <= args.mask < 1.0:
        p.error(f"--mask must be in [0, 1), got {args.mask}")
    if args.size % 32:
        p.error(f"--size must be a multiple of 32, got {args.size}")
    if args.batch < 1:
        p.error(f"--batch must be at least 1, got {args.batch}")
    if args.checkpoint_stages is not None and (not args.grad_checkpointing or args.checkpoint_stages < 1):
        p.error(f"--checkpoint-stages {args.checkpoint_stages} needs --grad-checkpointing and at least 1 stage")
    from spark_me import list_encoders

    unknown = [m for m in args.models if m not in list_encoders()]
    if unknown:
        p.error(f"unknown encoder(s) {', '.join(unknown)}; registered: {', '.join(list_encoders())}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    amp = None if args.amp == "none" else args.amp
    default_name = "saved-memory" + ("-dense-stem" if args.dense_stem else "")
    default_name += "-grad-checkpointing" if args.grad_checkpointing else ""
    default_name += f"-stages-{args.checkpoint_stages}" if args.checkpoint_stages is not None else ""
    out = args.out or REPO / "kernels_bench" / "results" / default_name
    results = []
    for name in args.models:
        log.info("saved_memory: %s, batch %d, %d px, mask %.2f, %s", name, args.batch, args.size, args.mask, amp or "fp32")
        results.append(count_saved(name, args.batch, args.size, args.mask, args.device, amp, conv_impl=args.conv_impl,
                                   grad_checkpointing=args.grad_checkpointing, checkpoint_stages=args.checkpoint_stages,
                                   dense_stem=args.dense_stem))
        q = ratios(results[-1])
        log.info("  sparse / masked-dense activations: %.2f (%s); with the neighbour tables %.2f", q["total"],
                 ", ".join(f"{k} {v:.2f}" for k, v in q["parts"].items()), q["with_tables"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "saved_memory.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "saved_memory.md").write_text(markdown(results))
    log.info("saved_memory: wrote %s", out / "saved_memory.md")


if __name__ == "__main__":
    main()
