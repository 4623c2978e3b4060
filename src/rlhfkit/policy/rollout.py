"""Batched sampling shared by PPO, best-of-n, labelling and evaluation.

Prompts are left-padded for generation (so every row's next token sits at the same column); responses come back
right-padded with a mask that covers the real tokens up to and including EOS. PPO re-scores responses with
right padding through `models.logprobs_of` (N implementation details of RLHF: left-pad to generate, right-pad to
score)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

Message = dict[str, str]


@dataclass
class Rollout:
    prompt_ids: torch.Tensor
    """(B, P) left-padded prompt tokens."""
    prompt_mask: torch.Tensor
    """(B, P) 1 = real prompt token."""
    response_ids: torch.Tensor
    """(B, R) sampled tokens, right-padded with the pad id after EOS."""
    response_mask: torch.Tensor
    """(B, R) 1 = real response token (EOS included)."""
    ended: torch.Tensor
    """(B,) True where the response emitted EOS within max_new_tokens."""
    texts: list[str]
    """Decoded responses without special tokens."""

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)


def render_prompt(tokenizer: Any, prompt: str | Sequence[Message], chat: bool = True) -> str:
    """A user turn (or message list) through the chat template with the generation prompt; plain text when the
    tokenizer has no template or chat is False."""
    if isinstance(prompt, str) and (not chat or getattr(tokenizer, "chat_template", None) is None):
        return prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompts(tokenizer: Any, prompts: Sequence[str | Sequence[Message]], chat: bool = True):
    """Left-padded prompt batch: (input_ids, attention_mask), each (B, P)."""
    texts = [render_prompt(tokenizer, p, chat) for p in prompts]
    templated = chat and getattr(tokenizer, "chat_template", None) is not None
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=not templated)
    finally:
        tokenizer.padding_side = side
    return enc["input_ids"], enc["attention_mask"]


@torch.no_grad()
def sample(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str | Sequence[Message]],
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 64,
    chat: bool = True,
) -> Rollout:
    """Sample one response per prompt (repeat prompts for several). temperature 0 means greedy."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    parts = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = encode_prompts(tokenizer, prompts[start : start + batch_size], chat)
        ids, mask = ids.to(device), mask.to(device)
        greedy = temperature <= 0
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=not greedy,
            temperature=None if greedy else temperature, top_p=None if greedy else top_p,
            top_k=None if greedy else (top_k or 0), pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        parts.append((ids.cpu(), mask.cpu(), out[:, ids.shape[1] :].cpu()))
    model.train(was_training)
    P = max(p[0].shape[1] for p in parts)
    R = max(max(p[2].shape[1] for p in parts), 1)
    pad = tokenizer.pad_token_id
    prompt_ids = torch.cat([torch.nn.functional.pad(p[0], (P - p[0].shape[1], 0), value=pad) for p in parts])
    prompt_mask = torch.cat([torch.nn.functional.pad(p[1], (P - p[1].shape[1], 0), value=0) for p in parts])
    response_ids = torch.cat([torch.nn.functional.pad(p[2], (0, R - p[2].shape[1]), value=pad) for p in parts])
    is_eos = response_ids == tokenizer.eos_token_id  # (B, R)
    ended = is_eos.any(-1)
    first_eos = torch.where(ended, is_eos.float().argmax(-1), torch.full_like(ended, R, dtype=torch.long))
    positions = torch.arange(R)[None, :]
    response_mask = (positions <= first_eos[:, None]).long()  # (B, R), EOS itself counts
    response_ids = torch.where(response_mask.bool(), response_ids, torch.full_like(response_ids, pad))
    texts = tokenizer.batch_decode(response_ids, skip_special_tokens=True)
    return Rollout(prompt_ids, prompt_mask, response_ids, response_mask, ended, [t.strip() for t in texts])
