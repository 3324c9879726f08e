"""Training checkpoints: atomic writes, keep-last-K, safe loading, RNG state capture.

A checkpoint is a dict of tensors and primitive containers only, so it loads with
``torch.load(weights_only=True)``:

``format``, ``model_name``, ``decoder_width``, ``mask_ratio``, ``image_size``, ``step``,
``epoch``, ``model`` (SparK state dict), ``optimizer``, ``scaler``, ``rng`` (tensors),
``config`` (the resolved run config as plain dicts), ``wandb_id``.

Files are named ``step_00001234.pt`` and written to a temporary file that replaces the
target with ``os.replace`` only once complete: a crash mid-write never leaves a truncated
checkpoint, and older checkpoints are pruned only after the new one is in place.
"""
from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch

if TYPE_CHECKING:
    from spark_me.spark import SparK

log = logging.getLogger(__name__)

FORMAT = "spark_me.pretrain.v1"
EXPORT_FORMAT = "spark_me.model.v1"
_NAME = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read, or does not fit the model of this run."""


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    return Path(directory) / f"step_{step:08d}.pt"


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Checkpoints in ``directory``, oldest first (by step)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | os.PathLike) -> Optional[Path]:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


def save_checkpoint(state: dict, directory: str | os.PathLike, keep: int) -> Path:
    """Write ``state`` as ``step_<step>.pt`` atomically, then keep only the newest ``keep``."""
    path = save_atomic(state, checkpoint_path(directory, int(state["step"])))
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
        log.info("removed old checkpoint %s", old)
    return path


def load_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """``torch.load(weights_only=True)`` with errors that name the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, disallowed globals, ...
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
            "The file is truncated or is not a spark_me/PyTorch weights file. Move it away to fall "
            f"back to an older checkpoint in {path.parent}, or pass another file."
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """A training checkpoint written by :func:`save_checkpoint`."""
    ckpt = load_file(path, map_location)
    if ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a spark_me training checkpoint (format {ckpt.get('format')!r}, expected "
            f"{FORMAT!r}); to start from its weights use model.init={path}"
        )
    return ckpt


def check_model(ckpt: dict, path: str | os.PathLike, model_name: str, decoder_width: int) -> None:
    """Raise CheckpointError unless ``ckpt`` was written for the same encoder and decoder."""
    theirs = (ckpt.get("model_name"), ckpt.get("decoder_width"))
    if theirs != (model_name, decoder_width):
        raise CheckpointError(
            f"checkpoint {path} is for model {theirs[0]} with decoder width {theirs[1]}, but this run "
            f"builds {model_name} with decoder width {decoder_width}. Resume with "
            f"model={theirs[0]} model.decoder_width={theirs[1]}, or start a new run in another "
            "output directory (hydra.run.dir=...)"
        )


def load_model_state(model: torch.nn.Module, state: dict, path: str | os.PathLike) -> None:
    """``load_state_dict(strict=True)`` with a CheckpointError naming the file on mismatch."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"the weights in {path} do not fit this model: {e}") from e


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple["SparK", dict]:
    """The SparK model stored in a training checkpoint or a ``spark-me-export --full`` file."""
    from spark_me import SparK, build_sparse_encoder, import_encoder_modules, list_encoders

    ckpt = load_file(path, map_location)
    if ckpt.get("format") not in (FORMAT, EXPORT_FORMAT):
        raise CheckpointError(
            f"{path} is not a spark_me checkpoint or --full export (format {ckpt.get('format')!r}); "
            "encoder-only timm weights carry no decoder"
        )
    imports = ((ckpt.get("config") or {}).get("model") or {}).get("imports") or []
    try:
        import_encoder_modules(imports)
    except ValueError as e:
        raise CheckpointError(f"{path} was trained with a user encoder that cannot be imported here: {e}") from e
    if ckpt["model_name"] not in list_encoders():
        raise CheckpointError(
            f"{path} holds encoder {ckpt['model_name']!r}, which is not registered here; import the module "
            "that registers it first (the CLIs take --import MODULE_OR_FILE)"
        )
    model = SparK(
        build_sparse_encoder(ckpt["model_name"]),
        decoder_width=int(ckpt["decoder_width"]),
        mask_ratio=float(ckpt["mask_ratio"]),
    )
    load_model_state(model, ckpt["model"], path)
    return model, ckpt


def capture_rng_state(mask_generator: torch.Generator) -> dict[str, Any]:
    """Every RNG a training step uses, as tensors and numbers (weights_only-loadable)."""
    np_state = np.random.get_state(legacy=True)
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "mask": mask_generator.get_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
        "python_version": int(py_version),
        "python_internal": torch.tensor(py_internal, dtype=torch.int64),
        "python_gauss": py_gauss,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict[str, Any], mask_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    mask_generator.set_state(state["mask"])
    np.random.set_state(
        ("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
         state["numpy_has_gauss"], state["numpy_gauss"])
    )
    random.setstate((state["python_version"], tuple(state["python_internal"].tolist()), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(list(state["cuda"]))
