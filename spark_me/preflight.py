"""Checks made before any heavy work: the device exists, wandb can log, every output
location is writable; and the run's record (``.hydra/``) written only once a run starts.

Each failure is a :class:`ConfigError` (exit code 2) naming the problem and the fix, so a
run never dies with a traceback at its first save or first log call.
"""
from __future__ import annotations

import logging
import netrc
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable, Optional

import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

WANDB_MODES = ("online", "offline", "disabled")
WANDB_HOST = "api.wandb.ai"


class ConfigError(ValueError):
    """An invalid configuration value, reported before any heavy work."""


# ----------------------------------------------------------------------------- device


def check_device(device: str, key: str = "trainer.device") -> None:
    """Raise ConfigError when ``device`` asks for a GPU that this machine does not have."""
    device = str(device)
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise ConfigError(
            f"{key}={device} but no CUDA GPU is visible here (torch.cuda.is_available() is False; "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}): use {key}=cpu, "
            f"or {key}=auto to take a GPU when there is one"
        )
    if ":" in device:
        index = device.split(":", 1)[1]
        count = torch.cuda.device_count()
        if not index.isdigit() or int(index) >= count:
            raise ConfigError(f"{key}={device} does not exist: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")


# ----------------------------------------------------------------------------- wandb


def wandb_mode(logger_cfg: DictConfig) -> str:
    """The mode wandb runs in: ``WANDB_MODE`` from the environment wins over ``logger.mode``
    (as every wandb user expects); ``WANDB_DISABLED=true`` means disabled."""
    if os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        return "disabled"
    env = os.environ.get("WANDB_MODE", "").strip()
    if env:
        if env == "dryrun":  # wandb's old name for offline
            return "offline"
        if env not in WANDB_MODES:
            raise ConfigError(f"WANDB_MODE={env!r} in the environment is unknown: use online, offline or disabled")
        return env
    return str(logger_cfg.mode)


def _wandb_api_key_present() -> bool:
    """An API key wandb would use, found without network: WANDB_API_KEY or the netrc entry
    that `wandb login` writes."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", f"https://{WANDB_HOST}").split("://")[-1].split("/")[0].split(":")[0]
    candidates = [os.environ.get("NETRC"), str(Path.home() / ".netrc"), str(Path.home() / "_netrc")]
    for path in filter(None, candidates):
        try:
            if netrc.netrc(path).authenticators(host):
                return True
        except (OSError, netrc.NetrcParseError):
            continue
    return False


def check_wandb(logger_cfg: DictConfig) -> None:
    """With logger=wandb: wandb is installed and, online, an API key is configured."""
    if logger_cfg.name != "wandb":
        return
    mode = wandb_mode(logger_cfg)
    if mode == "disabled":
        return
    try:
        import wandb  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"logger=wandb needs the wandb package ({e}): pip install wandb, or use logger=jsonl") from e
    if mode == "online" and not _wandb_api_key_present():
        raise ConfigError(
            "logger=wandb with logger.mode=online but no wandb API key is configured (no WANDB_API_KEY, no "
            "netrc entry): run `wandb login` once, or log without network with logger.mode=offline "
            "(or WANDB_MODE=offline) and `wandb sync` later"
        )


# ----------------------------------------------------------------------------- outputs


def check_writable(folders: Iterable[Path], min_free_bytes: int = 0) -> None:
    """Create each folder and write (then delete) a probe file in it; ConfigError naming the
    folder and the fix when that fails. Also warns when ``min_free_bytes`` are not free."""
    for folder in folders:
        folder = Path(folder)
        probe = folder / f".write-test-{uuid.uuid4().hex[:8]}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with open(probe, "wb") as f:
                f.write(b"spark_me")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise ConfigError(
                f"the output folder {folder} is not writable ({e.strerror or e}): fix its permissions or free "
                "space, or write the run elsewhere with trainer.output_dir=... (and hydra.run.dir=...)"
            ) from e
        finally:
            try:
                probe.unlink(missing_ok=True)
            except OSError:
                pass
        free = shutil.disk_usage(folder).free
        if min_free_bytes and free < min_free_bytes:
            log.warning("only %.0f MiB free in %s, a checkpoint needs about %.0f MiB: saves may fail (disk full)",
                        free / 2**20, folder, min_free_bytes / 2**20)


# ----------------------------------------------------------------------------- run record


# Set by spark_me.pretrain.main when it asks Hydra not to write .hydra/ itself: the record is
# then written by write_hydra_record once the run has started (a rejected start, e.g. a
# resume with the wrong model, leaves the record of the run it would have continued intact).
DEFERRED_SUBDIR_ENV = "SPARK_ME_HYDRA_SUBDIR"


def write_hydra_record(task_cfg: DictConfig) -> Optional[Path]:
    """Write ``config.yaml``, ``hydra.yaml`` and ``overrides.yaml`` as Hydra would have."""
    subdir = os.environ.get(DEFERRED_SUBDIR_ENV)
    if not subdir:
        return None
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    folder = Path(hydra_cfg.runtime.output_dir) / subdir
    folder.mkdir(parents=True, exist_ok=True)
    record = OmegaConf.create({"hydra": OmegaConf.to_container(hydra_cfg, resolve=False)})
    OmegaConf.set_struct(record, False)
    record.hydra.output_subdir = subdir
    OmegaConf.save(task_cfg, folder / "config.yaml", resolve=False)
    OmegaConf.save(record, folder / "hydra.yaml", resolve=False)
    OmegaConf.save(OmegaConf.create(list(hydra_cfg.overrides.task)), folder / "overrides.yaml")
    return folder


# ----------------------------------------------------------------------------- Hydra's run dir


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover (hydra is a dependency)
    _HydraCallback = object  # type: ignore[misc,assignment]

RUN_DIR_CALLBACK = "spark_me.preflight.RunDirCheck"


class RunDirCheck(_HydraCallback):  # type: ignore[misc,valid-type]
    """Hydra callback: the run directory must be writable before Hydra writes its log there
    (otherwise Hydra itself fails with a traceback). Exit code 2 with the fix."""

    def on_run_start(self, config: DictConfig, **kwargs: object) -> None:
        try:
            check_writable([Path(str(config.hydra.run.dir))])
        except ConfigError as e:
            log.error("ConfigError: %s", str(e).replace(" (and hydra.run.dir=...)", "").replace(
                "trainer.output_dir=...", "hydra.run.dir=..."))
            raise SystemExit(2) from e
