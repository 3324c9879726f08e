"""A run's metrics: ``metrics.jsonl`` always, Weights & Biases too with ``logger=wandb``;
after a resume, each step logged once."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from spark_me import preflight

log = logging.getLogger(__name__)


class RunLogger:
    """metrics.jsonl always; Weights & Biases too with logger=wandb. Main process only."""

    def __init__(self, cfg: DictConfig, out_dir: Path, wandb_id: Optional[str], start_step: int = 0) -> None:
        self.path = out_dir / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_metrics(self.path, start_step)
        self.file = open(self.path, "a", encoding="utf-8")
        self.wandb = None
        if cfg.logger.name == "wandb":
            import wandb

            self.wandb = wandb.init(
                project=cfg.logger.project,
                entity=cfg.logger.entity,
                name=cfg.logger.run_name,
                mode=preflight.wandb_mode(cfg.logger),
                tags=list(cfg.logger.tags),
                dir=str(out_dir),
                config=OmegaConf.to_container(cfg, resolve=True),
                id=wandb_id,
                resume="allow" if wandb_id else None,
            )

    @property
    def wandb_id(self) -> Optional[str]:
        return getattr(self.wandb, "id", None)

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=record["step"])

    def log_image(self, step: int, path: Path) -> None:
        if self.wandb is not None:
            import wandb
            from PIL import Image

            self.wandb.log({"reconstructions": wandb.Image(Image.open(path), caption=f"step {step}: input | masked | reconstruction | pasted")}, step=step)

    def close(self) -> None:
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines of ``path`` logged after ``step`` (by a run that went on past its last
    checkpoint and was interrupted): after a resume, each step appears once."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            if int(json.loads(line)["step"]) > step:
                continue
        except (ValueError, KeyError, TypeError):  # a line cut by a kill: dropped too
            continue
        kept.append(line)
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
        log.info("metrics.jsonl: dropped %d line(s) logged after step %d, where this run continues", len(lines) - len(kept), step)
