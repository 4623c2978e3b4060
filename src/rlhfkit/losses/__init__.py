"""Pure tensor math: every function here takes tensors and returns tensors (plus typed diagnostics).

Imports only torch, so a loss can be called and tested with no model, trainer or data loader."""

from rlhfkit.losses.masked import masked_mean, masked_sum, masked_var, whiten
from rlhfkit.losses.sft import SFTStats, sft_loss

__all__ = ["masked_mean", "masked_sum", "masked_var", "whiten", "sft_loss", "SFTStats"]
