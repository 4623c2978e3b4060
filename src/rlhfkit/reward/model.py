"""Reward models: an `AutoModelForSequenceClassification` with `num_labels=1`, its score read at the last real
token, normalised (gain folded into the head, offset kept in the config), and ensembles of such models.

What we save is a plain Hugging Face sequence-classification model: `transformers` alone loads it and, for an
unpadded text, its logit plus `config.rlhfkit_reward_offset` is exactly the score rlhfkit computes."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from rlhfkit.errors import UserError
from rlhfkit.models import is_peft, load_tokenizer, model_mask, position_ids_from_mask, quiet_transformers

log = logging.getLogger(__name__)

OFFSET_KEY = "rlhfkit_reward_offset"
ENSEMBLE_FILE = "ensemble.json"


def load_reward_model(path: str, tokenizer: Any | None = None, dtype: torch.dtype = torch.float32) -> Any:
    """A reward model from a reward-model directory, or a fresh score head on a causal LM (e.g. the SFT policy).

    A fresh head is drawn from N(0, 1/sqrt(d+1)) as in lm-human-preferences (the default 0.02 init makes
    early scores nearly constant)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    quiet_transformers()
    p = Path(path)
    if not (p / "config.json").exists():
        raise UserError(f"{path} is not a Hugging Face model directory (no config.json); pass the SFT model or a "
                        "reward model saved by `rlhfkit reward`.")
    config = AutoConfig.from_pretrained(path)
    fresh = not any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    config.num_labels = 1
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a fresh head is "missing from the checkpoint" by design; we init it below
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, config=config, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
    if tokenizer is not None:
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id
    if fresh:
        d = model.config.hidden_size
        with torch.no_grad():
            model.score.weight.normal_(0.0, 1.0 / math.sqrt(d + 1))
        setattr(model.config, OFFSET_KEY, 0.0)
    return model


def _unwrap(model: Any) -> Any:
    return model.get_base_model() if is_peft(model) else model


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token in each row, for left, right or no padding. (B,)"""
    T = attention_mask.shape[1]
    positions = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)  # (B, T)
    return (positions * attention_mask.long()).argmax(-1)


def sequence_scores(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    last_index: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                    row_index: torch.Tensor | None = None) -> torch.Tensor:
    """Scalar reward per sequence, read at the last real token (never at padding: trl#3750; lm-human-preferences
    reads the score at the end of the response). input_ids, attention_mask: (B, T). Returns (B,).
    A padding-free batch (`collate_pairs(..., padding_free=True)`) passes its (R, 1, T, T) mask, position_ids
    and each sequence's row_index / last_index (N,); the result is then (N,)."""
    net = _unwrap(model)
    backbone = getattr(net, net.base_model_prefix)
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    hidden = backbone(input_ids=input_ids, attention_mask=model_mask(attention_mask, net), position_ids=position_ids,
                      use_cache=False).last_hidden_state  # (R, T, H)
    if last_index is None:
        last_index = last_token_index(attention_mask)
    if row_index is None:
        row_index = torch.arange(hidden.shape[0], device=hidden.device)
    picked = hidden[row_index, last_index]  # (N, H)
    scores = net.score(picked).squeeze(-1).float()  # (B,)
    return scores + float(getattr(net.config, OFFSET_KEY, 0.0) or 0.0)


def apply_normalisation(model: Any, mean: float, std: float) -> tuple[float, float]:
    """Make scores with this (mean, std) come out with mean 0 and std 1: the gain 1/std is folded into the score
    head, the offset kept in the config (lm-human-preferences normalises on reference-policy samples).
    Returns (gain, new offset)."""
    if not math.isfinite(std) or std <= 1e-8:
        raise UserError(f"cannot normalise the reward model: its scores on the reference samples have std {std:.3g} "
                        "(all responses scored alike); train longer or sample more varied responses.")
    net = _unwrap(model)
    gain = 1.0 / std
    old_offset = float(getattr(net.config, OFFSET_KEY, 0.0) or 0.0)
    with torch.no_grad():
        net.score.weight.mul_(gain)
    # s' = gain * (w.h + o) - gain * mean  =  (gain w).h + gain * (o - mean)
    new_offset = gain * (old_offset - mean)
    setattr(net.config, OFFSET_KEY, new_offset)
    return gain, new_offset


# ------------------------------------------------------------------------------------------------- ensembles
@dataclass
class RewardEnsemble:
    """N reward models scoring the same sequences; PPO can optimise mean - lambda * std (Coste et al. 2023)."""

    members: list[Any]
    tokenizer: Any
    paths: list[str]

    @torch.no_grad()
    def scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N members, B) scores; input is right- or left-padded token ids in the reward tokenizer's vocab."""
        return torch.stack([sequence_scores(m, input_ids, attention_mask) for m in self.members])

    @torch.no_grad()
    def mean_std(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.scores(input_ids, attention_mask)  # (N, B)
        std = s.std(0, unbiased=True) if s.shape[0] > 1 else torch.zeros_like(s[0])
        return s.mean(0), std

    def to(self, device: Any) -> RewardEnsemble:
        self.members = [m.to(device) for m in self.members]
        return self


def member_dirs(path: str | Path) -> list[Path]:
    """The member directories of an ensemble directory, or [path] for a single reward model."""
    p = Path(path)
    manifest = p / ENSEMBLE_FILE
    if manifest.exists():
        return [p / m for m in json.loads(manifest.read_text())["members"]]
    return [p]


def load_reward_ensemble(path: str, device: Any = "cpu") -> RewardEnsemble:
    dirs = member_dirs(path)
    tokenizer = load_tokenizer(str(dirs[0]))
    members = [load_reward_model(str(d), tokenizer).eval().to(device) for d in dirs]
    return RewardEnsemble(members, tokenizer, [str(d) for d in dirs])


def score_texts(ensemble: RewardEnsemble, prompts: Sequence[Any], responses: Sequence[Any],
                max_length: int = 1024) -> tuple[list[float], list[float]]:
    """Mean and std of the members' scores for (prompt, response) pairs, encoded exactly as training data is
    (chat template applied once; plain strings concatenated with EOS). One forward pass per prompt group."""
    from rlhfkit.data.collate import encode_responses

    device = next(ensemble.members[0].parameters()).device
    means: list[float] = [0.0] * len(prompts)
    stds: list[float] = [0.0] * len(prompts)
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(json.dumps(prompt), []).append(i)
    for key, idx in groups.items():
        batch = encode_responses(ensemble.tokenizer, json.loads(key), [responses[i] for i in idx], max_length)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        with torch.no_grad():
            s = torch.stack([sequence_scores(m, ids, mask, batch["last_index"].to(device)) for m in ensemble.members])
        std = s.std(0) if s.shape[0] > 1 else torch.zeros(s.shape[1])
        for j, i in enumerate(idx):
            means[i], stds[i] = float(s[:, j].mean()), float(std[j])
    return means, stds
