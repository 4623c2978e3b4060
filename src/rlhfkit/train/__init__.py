"""Shared training machinery: Accelerator set-up, exact resume, metrics, progress bars, NaN guards."""

from rlhfkit.train.checkpoint import checkpoint_dirs, latest_checkpoint, load_checkpoint, save_checkpoint
from rlhfkit.train.metrics import MetricsLogger, check_finite, read_metrics
from rlhfkit.train.run import Run
from rlhfkit.train.sampler import EpochSampler
from rlhfkit.train.seeding import restore_rng_state, rng_state, set_seed

__all__ = [
    "Run", "EpochSampler", "MetricsLogger", "check_finite", "read_metrics", "save_checkpoint", "load_checkpoint",
    "latest_checkpoint", "checkpoint_dirs", "set_seed", "rng_state", "restore_rng_state",
]
