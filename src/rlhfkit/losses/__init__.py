"""Pure tensor math: every function here takes tensors and returns tensors (plus typed diagnostics).

Imports only torch, so a loss can be called and tested with no model, trainer or data loader."""

from rlhfkit.losses.dpo import (
    KTOStats, ORPOStats, PreferenceStats, cdpo_loss, dpo_loss, ipo_loss, kto_loss, orpo_loss, sequence_logps,
    simpo_loss,
)
from rlhfkit.losses.masked import masked_mean, masked_sum, masked_var, whiten
from rlhfkit.losses.reward import (
    RewardStats, batched_ranking_loss, best_of_k_loss, bradley_terry_loss, centering_penalty, ranking_loss,
)
from rlhfkit.losses.sft import SFTStats, sft_loss

__all__ = [
    "masked_mean", "masked_sum", "masked_var", "whiten", "sft_loss", "SFTStats",
    "dpo_loss", "cdpo_loss", "ipo_loss", "simpo_loss", "kto_loss", "orpo_loss", "sequence_logps",
    "PreferenceStats", "KTOStats", "ORPOStats",
    "bradley_terry_loss", "ranking_loss", "batched_ranking_loss", "best_of_k_loss", "centering_penalty",
    "RewardStats",
]
