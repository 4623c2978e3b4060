"""Masked reductions shared by every algorithm (they exist exactly once).

Mask polarity everywhere: mask = 1 (or True) marks a real token that counts, 0 marks padding or prompt."""

from __future__ import annotations

from typing import Literal

import torch

Aggregation = Literal["token_mean", "sequence_mean", "constant"]


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of values where mask is 1."""
    masked = values * mask
    return masked.sum() if dim is None else masked.sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of values over the positions where mask is 1 (over all positions, or along `dim`).

    An all-zero mask gives 0 rather than NaN: a batch element with no real tokens contributes nothing."""
    mask = mask.to(values.dtype)
    total = masked_sum(values, mask, dim)
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return total / count.clamp(min=1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries; Bessel-corrected like lm-human-preferences' whitening when unbiased."""
    mask = mask.to(values.dtype)
    mean = masked_mean(values, mask)
    centred_sq = (values - mean) ** 2
    var = masked_mean(centred_sq, mask)
    if unbiased:
        count = mask.sum()
        if count < 2:
            raise ValueError(f"masked_var with unbiased=True needs at least 2 real entries, got {int(count)}.")
        var = var * count / (count - 1)
    return var


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over masked entries; padding stays 0 in the output.

    shift_mean=False keeps the mean (lm-human-preferences whitens *rewards* without shifting them, so the sign
    of the total reward survives; advantages are whitened with the shift)."""
    mask = mask.to(values.dtype)
    mean = masked_mean(values, mask)
    if mask.sum() < 2:
        # one real entry (one response that is a lone EOS on this process) has no spread to divide by: it is
        # centred (shift_mean) or left as it is, never an error
        return ((values - mean) if shift_mean else values) * mask
    var = masked_var(values, mask)
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def aggregate(values: torch.Tensor, mask: torch.Tensor, how: Aggregation = "token_mean",
              max_tokens: int | None = None) -> torch.Tensor:
    """Reduce per-token losses (B, R) to a scalar.

    token_mean: mean over every real token of the batch (long responses weigh more; DAPO's token-level loss).
    sequence_mean: mean over tokens within each sequence, then over sequences (the GRPO paper, Shao et al. 2024,
    Eq. 3: 1/G sum_i 1/|o_i| sum_t). constant: sum over real tokens / (B * max_tokens), Dr. GRPO's constant
    normaliser (Liu et al. 2025), which removes the per-sequence length bias of sequence_mean."""
    mask = mask.to(values.dtype)
    if how == "token_mean":
        return masked_mean(values, mask)
    if how == "sequence_mean":
        per_seq = masked_mean(values, mask, dim=-1)  # (B,)
        return per_seq.mean()
    if how == "constant":
        if not max_tokens or max_tokens < 1:
            raise ValueError("aggregation 'constant' needs max_tokens >= 1 (the longest response allowed)")
        return masked_sum(values, mask) / (values.shape[0] * max_tokens)
    raise ValueError(f"unknown loss aggregation {how!r}; use token_mean, sequence_mean or constant")
