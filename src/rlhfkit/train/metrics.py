"""Metric sinks (metrics.jsonl, TensorBoard, optional wandb) and the NaN/inf guard."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from rlhfkit.errors import ConfigError, TrainingDiverged


def check_finite(metrics: dict[str, Any], step: int) -> None:
    """Stop with a message naming the step and the metric when a value is NaN or infinite."""
    for name, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise TrainingDiverged(
                f"step {step}: metric '{name}' is {value}. Training diverged; lower learning_rate, keep "
                "max_grad_norm > 0, use fp32, or --resume from an earlier checkpoint."
            )


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop lines logged after `last_step` (written by a run that died after its last checkpoint)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except json.JSONDecodeError:
            break  # a torn final line from a killed process
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(k + "\n" for k in kept))
    os.replace(tmp, path)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class MetricsLogger:
    """Writes one JSON object per logged step; mirrors scalars to TensorBoard / wandb. Main process only."""

    def __init__(self, run_dir: str | os.PathLike, report_to: list[str], enabled: bool = True,
                 resume_step: int | None = None, run_name: str | None = None, config: dict | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = self._wandb = None
        self._start = time.time()
        if not enabled:
            return
        if resume_step is not None:
            truncate_jsonl(self.path, resume_step)
        elif self.path.exists():
            self.path.unlink()
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("report_to includes tensorboard but it is not installed; "
                                  "pip install tensorboard or drop it from report_to.") from None
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"),
                                     purge_step=None if resume_step is None else resume_step + 1)
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError:
                raise ConfigError("report_to includes wandb but it is not installed; "
                                  "pip install 'rlhfkit[wandb]' or drop it from report_to.") from None
            self._wandb = wandb.init(name=run_name, config=config, resume="allow")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
