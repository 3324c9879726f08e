"""spark-me-export: turn a pre-training checkpoint into weights for fine-tuning.

    spark-me-export CKPT --out resnet50_spark.pth            # timm encoder state dict
    spark-me-export CKPT --out resnet50_spark.safetensors    # the same, as safetensors
    spark-me-export CKPT --out resnet50_in1k_init.pth --num-classes 1000   # + a fresh head
    spark-me-export CKPT --out spark_full.pt --full          # encoder + decoder (model.init=)

The encoder file loads with ``strict=True`` into ``timm.create_model(name, num_classes=0)``
(checked before the command returns). With ``--num-classes N`` it also carries a freshly
initialised classifier, so it loads strictly into ``timm.create_model(name, num_classes=N)``
(e.g. timm's ``train.py --initial-checkpoint``).
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from spark_me.checkpoint import EXPORT_FORMAT, CheckpointError, load_model, save_atomic, with_checksum

log = logging.getLogger(__name__)


def verify_timm(name: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Raise unless ``state_dict`` loads strictly into ``timm.create_model(name, num_classes=0)``.

    Users' encoders without a timm twin are written unverified (with a warning)."""
    import timm

    if not timm.is_model(name):
        log.warning("%s is not a timm model: its encoder weights are written without a timm load check", name)
        return
    timm.create_model(name, num_classes=0, pretrained=False).load_state_dict(state_dict, strict=True)


def with_new_head(name: str, state_dict: dict[str, torch.Tensor], num_classes: int) -> dict[str, torch.Tensor]:
    """``state_dict`` plus timm's freshly initialised classifier for ``num_classes``."""
    import timm

    model = timm.create_model(name, num_classes=num_classes, pretrained=False)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    head = {k for k in missing}
    if unexpected or not head or not all(k.startswith(("fc.", "head.fc.", "classifier.")) for k in head):
        raise ValueError(f"cannot add a classifier to {name}: missing {sorted(head)}, unexpected {unexpected}")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def check_output(checkpoint: str | os.PathLike, out: str | os.PathLike) -> None:
    """Raise ValueError when ``out`` is the input file (same file, through links too) or
    cannot be written (missing or read-only folder)."""
    out, checkpoint = Path(out), Path(checkpoint)
    if out.exists() and checkpoint.exists() and os.path.samefile(out, checkpoint):
        raise ValueError(f"--out {out} is the checkpoint being exported ({checkpoint}): choose another output file")
    folder = out.parent
    if not folder.is_dir():
        raise ValueError(f"the folder of --out {out} does not exist: create {folder} first, or write elsewhere")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder: give a file name, e.g. {out / 'encoder.pth'}")
    probe = folder / f".{out.name}.write-test-{os.getpid()}"
    try:
        probe.touch()
    except OSError as e:
        raise ValueError(f"cannot write into {folder} ({e.strerror or e}): pick a writable --out folder") from e
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass


def export_encoder(
    checkpoint: str | os.PathLike, out: str | os.PathLike, num_classes: int = 0, imports: Sequence[str] = (),
) -> Path:
    """Write the encoder of ``checkpoint`` as a timm state dict (``.safetensors`` or torch),
    with a fresh ``num_classes`` classifier when ``num_classes`` > 0. ``imports``: modules or
    ``.py`` files that register a user encoder (never taken from the checkpoint)."""
    model, ckpt = load_model(checkpoint, imports=imports)
    check_output(checkpoint, out)
    state = model.encoder.timm_state_dict()
    verify_timm(ckpt["model_name"], state)
    if num_classes > 0:
        state = with_new_head(ckpt["model_name"], state, num_classes)
    out = Path(out)
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        try:
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"timm_name": ckpt["model_name"]})
            os.replace(tmp, out)
        except Exception as e:  # safetensors raises its own error type for OS failures
            raise CheckpointError(f"could not write {out}: {e}") from e
        finally:
            tmp.unlink(missing_ok=True)
    else:
        save_atomic(state, out)
    log.info("wrote %s encoder weights (step %s) to %s", ckpt["model_name"], ckpt.get("step"), out)
    return out


def export_full(checkpoint: str | os.PathLike, out: str | os.PathLike, imports: Sequence[str] = ()) -> Path:
    """Write encoder + densify + decoder weights (no optimizer) for continued pre-training."""
    model, ckpt = load_model(checkpoint, imports=imports)
    check_output(checkpoint, out)
    state = {
        "format": EXPORT_FORMAT,
        "model_name": ckpt["model_name"],
        "decoder_width": int(ckpt["decoder_width"]),
        "mask_ratio": float(ckpt["mask_ratio"]),
        "image_size": ckpt.get("image_size"),
        "step": ckpt.get("step"),
        "model": model.state_dict(),
        "config": ckpt.get("config", {}),
    }
    save_atomic(with_checksum(state), out)
    log.info("wrote the full SparK model (%s, step %s) to %s", ckpt["model_name"], ckpt.get("step"), out)
    return Path(out)


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="spark-me-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a training checkpoint (checkpoints/step_*.pt) or a --full export")
    p.add_argument("--out", required=True, help="output file (.pth/.pt, or .safetensors for the encoder)")
    p.add_argument("--full", action="store_true", help="export encoder + decoder for continued pre-training")
    p.add_argument("--num-classes", type=int, default=0, help="add a freshly initialised classifier for N classes")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE_OR_FILE",
                   help="import a module (or .py file) that registers your own encoder; repeatable")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    try:
        check_output(args.checkpoint, out)
    except ValueError as e:
        p.error(str(e))
    if out.exists() and not args.force:
        p.error(f"{out} exists; pass --force to overwrite it")
    if args.full and out.suffix == ".safetensors":
        p.error("--full writes a torch file (it carries the model config); use a .pt name")
    try:
        if args.full:
            export_full(args.checkpoint, out, args.imports)
        else:
            export_encoder(args.checkpoint, out, args.num_classes, args.imports)
    except CheckpointError as e:
        p.exit(1, f"spark-me-export: error: {e}\n")


if __name__ == "__main__":
    main()
