"""Training checkpoints: atomic writes, keep-last-K, safe loading, RNG state capture.

A checkpoint is a dict of tensors and primitive containers only, so it loads with
``torch.load(weights_only=True)``:

``format``, ``model_name``, ``decoder_width``, ``mask_ratio``, ``image_size``, ``step``,
``epoch``, ``model`` (SparK state dict), ``optimizer``, ``scaler``, ``rng`` (tensors),
``config`` (the resolved run config as plain dicts), ``wandb_id``, and ``checksum`` (a
SHA-256 of everything else, verified on load: damage inside a tensor is found, not trained on).

Files are named ``step_00001234.pt`` and written to a temporary file that replaces the
target with ``os.replace`` only once complete: a crash mid-write never leaves a truncated
checkpoint, and older checkpoints are pruned only after the new one is in place.

Loading never runs code: files are read with ``weights_only=True`` and the encoder modules a
checkpoint records in ``config.model.imports`` are never imported by the loader (the user
names them: ``--import`` / ``model.imports=``).
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

import numpy as np
import torch

if TYPE_CHECKING:
    from spark_me.spark import SparK

log = logging.getLogger(__name__)

FORMAT = "spark_me.pretrain.v1"
EXPORT_FORMAT = "spark_me.model.v1"
_NAME = re.compile(r"^step_(\d+)\.pt$")
_TEMP = re.compile(r"^\.step_\d+\.pt\.tmp-(\d+)$")
CHECKSUM_KEY = "checksum"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read, or does not fit the model of this run."""


class CheckpointDamagedError(CheckpointError):
    """The file is a checkpoint that was damaged after it was written (truncated, corrupted
    zip, checksum mismatch). Unlike a file refused because loading it would run code, an
    older intact checkpoint may be used instead."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, permission); earlier ones are intact."""


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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch reports a full disk as "unexpected pos"
        raise CheckpointWriteError(f"could not write {path}: {_write_reason(e, path.parent)}") from e
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


def _write_reason(e: BaseException, folder: Path) -> str:
    """Why a write failed, in words (torch's own message for a full disk is 'unexpected pos')."""
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:.0f} MiB free"
    except OSError:
        free = "free space unknown"
    if isinstance(e, OSError):
        return f"{e.strerror or e} ({free} in {folder})"
    return f"the disk is probably full or the file size limit reached ({free} in {folder}; torch: {str(e).splitlines()[0][:200]})"


def _update_hash(h: "hashlib._Hash", value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        h.update(f"D{len(value)}".encode())
        for k, v in value.items():
            h.update(repr(k).encode())
            _update_hash(h, v)
    elif isinstance(value, (list, tuple)):
        h.update(f"L{len(value)}".encode())
        for v in value:
            _update_hash(h, v)
    else:
        h.update(f"{type(value).__name__}:{value!r};".encode())


def payload_checksum(state: dict) -> str:
    """SHA-256 over every entry of ``state`` but ``checksum`` (tensors by dtype, shape, bytes)."""
    h = hashlib.sha256()
    _update_hash(h, {k: v for k, v in state.items() if k != CHECKSUM_KEY})
    return h.hexdigest()


def with_checksum(state: dict) -> dict:
    return {**state, CHECKSUM_KEY: payload_checksum(state)}


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete ``.step_*.pt.tmp-PID`` files left by a process that died mid-save (PID gone)."""
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        m = _TEMP.match(p.name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        size = p.stat().st_size
        p.unlink(missing_ok=True)
        removed.append(p)
        log.warning("removed %s (%.1f MiB), an unfinished checkpoint of an interrupted save", p, size / 2**20)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def save_checkpoint(state: dict, directory: str | os.PathLike, keep: int) -> Path:
    """Write ``state`` (with its checksum) as ``step_<step>.pt`` atomically, then keep only
    the newest ``keep``."""
    path = save_atomic(with_checksum(state), checkpoint_path(directory, int(state["step"])))
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
        log.info("removed old checkpoint %s", old)
    return path


_GLOBAL = re.compile(r"(?:unsupported GLOBAL|Unsupported global: GLOBAL) ([\w.]+)")
_OPERAND = re.compile(r"Unsupported (?:operand|class) [^\n.]+")
_DAMAGE = ("PytorchStreamReader", "corrupted", "central directory", "Ran out of input", "unexpected EOF")


def _read_error(e: Exception, path: Path) -> CheckpointError:
    """A CheckpointError for a failed ``torch.load``: refused (a global that would run code;
    not a weights file) or damaged (a torch zip file that no longer reads: truncated,
    corrupted). torch's advice to load with
    ``weights_only=False`` is never repeated: that would run the file's code."""
    text = str(e)
    found = _GLOBAL.search(text)
    if found:
        return CheckpointError(
            f"cannot read checkpoint {path}: refused, loading it would call {found.group(1)} (it is not a "
            "plain weights file and may run code). Do not load it; use a checkpoint written by spark_me or "
            "a state dict of tensors"
        )
    if isinstance(e, (EOFError, OSError)) or _is_zip(path) or any(marker in text for marker in _DAMAGE):
        return CheckpointDamagedError(
            f"cannot read checkpoint {path}: the file is truncated or corrupted ({type(e).__name__}: "
            f"{text.splitlines()[0][:160] if text else 'end of file'}). Move it away to fall back to an older "
            f"checkpoint in {path.parent}, or pass another file"
        )
    operand = _OPERAND.search(text)
    reason = operand.group(0) if operand else f"{type(e).__name__}: {text.splitlines()[0][:160] if text else ''}"
    return CheckpointError(
        f"cannot read checkpoint {path}: it is not a PyTorch weights file ({reason}), or it needs code to "
        "load. Pass a checkpoints/step_*.pt file of a spark_me run or a state dict of tensors"
    )


def _is_zip(path: Path) -> bool:
    """Whether ``path`` starts like the zip files ``torch.save`` writes (every checkpoint)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def load_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """``torch.load(weights_only=True)`` with errors that name the file and the fix.

    A dict carrying a ``checksum`` is verified: a mismatch raises CheckpointDamagedError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, disallowed globals, ...
        raise _read_error(e, path) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    if CHECKSUM_KEY in obj and payload_checksum(obj) != obj[CHECKSUM_KEY]:
        raise CheckpointDamagedError(
            f"cannot read checkpoint {path}: its contents do not match the checksum written with it (the file "
            f"was damaged after it was saved). Move it away to fall back to an older checkpoint in {path.parent}"
        )
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


def load_model(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", imports: Iterable[str] = (),
) -> tuple["SparK", dict]:
    """The SparK model stored in a training checkpoint or a ``spark-me-export --full`` file.

    ``imports`` are modules or ``.py`` files (the caller's, never the checkpoint's) that
    register a user encoder; the checkpoint's recorded ``model.imports`` are only quoted in
    the error when its encoder is not registered."""
    from spark_me import SparK, build_sparse_encoder, import_encoder_modules, list_encoders

    try:
        import_encoder_modules(imports)
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    ckpt = load_file(path, map_location)
    if ckpt.get("format") not in (FORMAT, EXPORT_FORMAT):
        raise CheckpointError(
            f"{path} is not a spark_me checkpoint or --full export (format {ckpt.get('format')!r}); "
            "encoder-only timm weights carry no decoder"
        )
    if ckpt.get("model_name") not in list_encoders():
        recorded = ((ckpt.get("config") or {}).get("model") or {}).get("imports") or []
        trained_with = (f"it was trained with model.imports={[str(i) for i in recorded]}; "
                        if recorded else "")
        example = recorded[0] if recorded else "MODULE_OR_FILE"
        raise CheckpointError(
            f"{path} holds encoder {ckpt.get('model_name')!r}, which is not registered here; {trained_with}"
            f"checkpoints never import code by themselves: if you trust that module, pass it yourself with "
            f"--import {example} (spark-me-export, spark-me-reconstruct) or model.imports=[{example}]"
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


def load_latest_intact(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> Optional[tuple[Path, dict]]:
    """The newest checkpoint in ``directory`` that reads back intact, for ``resume=auto``.

    Damaged newer ones (truncated, corrupted, checksum mismatch) are skipped with a warning
    and renamed ``*.pt.damaged`` (kept, never deleted, never overwritten by the resumed run).
    Any other refusal (a file whose loading would run code, a foreign file) stops with
    CheckpointError, as does a folder whose checkpoints are all damaged. None: no checkpoints.
    """
    found = list_checkpoints(directory)
    damaged: list[tuple[Path, CheckpointDamagedError]] = []
    for path in reversed(found):
        try:
            ckpt = load_checkpoint(path, map_location)
        except CheckpointDamagedError as e:
            damaged.append((path, e))
            continue
        for bad, error in damaged:
            aside = bad.with_name(bad.name + ".damaged")
            os.replace(bad, aside)
            log.warning("%s; resuming from the newest intact checkpoint %s instead (the damaged file is kept as %s)",
                        error, path.name, aside.name)
        return path, ckpt
    if damaged:
        raise damaged[0][1]
    return None


def later_checkpoints(directory: str | os.PathLike, step: int) -> list[Path]:
    """Checkpoints in ``directory`` written after ``step`` (another line of training)."""
    return [p for p in list_checkpoints(directory) if int(_NAME.match(p.name).group(1)) > step]  # type: ignore[union-attr]
