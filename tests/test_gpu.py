"""End-to-end checks only a GPU can run (make gpu-check's test phase selects them by the
`cuda` marker; without a GPU they are collected and skipped)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import NEEDS_CUDA

pytestmark = NEEDS_CUDA


@pytest.mark.parametrize("graphs", [False, True], ids=["plain", "cuda_graphs"])
def test_cuda_bf16_pretraining_reduces_the_loss(tmp_path, graphs):
    """The demo recipe on the GPU in bf16, as a user runs it (and with the encoder replayed
    from CUDA graphs): the loss must fall."""
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "spark_me.pretrain", "experiment=demo", "trainer.device=cuda",
         "trainer.precision=bf16", "trainer.progress_bar=false", "logger.image_every=0",
         f"trainer.cuda_graphs={str(graphs).lower()}", f"trainer.output_dir={out}", f"hydra.run.dir={out}"],
        capture_output=True, text=True, timeout=900,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    losses = [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) >= 10, losses
    first, last = losses[0], sum(losses[-3:]) / 3
    assert last < 0.85 * first, f"bf16 pre-training did not learn: loss {first:.4f} -> {last:.4f} ({losses})"
    if graphs:
        log = proc.stdout + proc.stderr
        assert "captured the encoder's forward+backward as a CUDA graph" in log, log[-3000:]
        assert "before the data loader started" in log, log[-3000:]  # not inside the first step
        assert "without its CUDA graph" not in log and "as a CUDA graph failed" not in log
