"""Supervised fine-tuning loss: next-token negative log-likelihood on completion tokens only."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SFTStats:
    """Diagnostics of one SFT loss evaluation (detached)."""

    nll_sum: torch.Tensor
    """Summed negative log-likelihood of the counted tokens."""
    num_tokens: torch.Tensor
    """Number of counted (mask = 1) tokens in this call."""


def sft_loss(
    token_logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    num_tokens: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, SFTStats]:
    """Mean token NLL: -sum(logp * mask) / num_tokens.

    token_logprobs: (B, T) log p(token_t | tokens_<t); loss_mask: (B, T), 1 = completion token that counts.
    num_tokens: the normaliser. Pass the count of loss tokens in the *whole* optimizer step (all micro-batches and
    processes) so gradient accumulation 1x8 equals 8x1 exactly; the per-micro-batch mean would weight short
    micro-batches more (the transformers grad-accumulation bug of 2024). Defaults to this call's count."""
    mask = loss_mask.to(token_logprobs.dtype)
    nll_sum = -(token_logprobs * mask).sum()
    count = mask.sum()
    denom = count if num_tokens is None else torch.as_tensor(num_tokens, dtype=token_logprobs.dtype)
    loss = nll_sum / denom.clamp(min=1.0)
    return loss, SFTStats(nll_sum=nll_sum.detach(), num_tokens=count.detach())
