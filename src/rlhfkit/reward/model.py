"""Reward models: an `AutoModelForSequenceClassification` with `num_labels=1` (or one head per criterion or
attribute on a shared trunk), its score read at the last real token, normalised (gain folded into the head, offset
kept in the config), and ensembles of such models.

What we save is a plain Hugging Face sequence-classification model: `transformers` alone loads it and, for an
unpadded text, its logit plus `config.rlhfkit_reward_offset` is exactly the score rlhfkit computes. A model with
several heads names them in `config.rlhfkit_criteria` (and `id2label`); head k's score is `logits[:, k]` plus
`config.rlhfkit_reward_offsets[k]`, and a reward that uses it is written DIR#criterion.

A one-head model trained with `likelihood_term` also adds `config.rlhfkit_likelihood_coef` times the response's
log-likelihood under the model's own trunk read through its (tied) input embeddings: the sum over response tokens
of log-softmax(hidden[t - 1] @ embeddings.T)[token t] (`response_log_likelihood`). Plain transformers gives the
logit; that sum is the one extra line."""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Sequence

import torch

from rlhfkit.errors import UserError
from rlhfkit.models import is_peft, load_tokenizer, model_mask, position_ids_from_mask, quiet_transformers

log = logging.getLogger(__name__)

OFFSET_KEY = "rlhfkit_reward_offset"
OFFSETS_KEY = "rlhfkit_reward_offsets"
"""Per-head offsets of a model with named heads (one list entry per head, in head order)."""
CRITERIA_KEY = "rlhfkit_criteria"
"""The names of a model's heads, in head order (the criteria or attributes it was trained on)."""
LIKELIHOOD_KEY = "rlhfkit_likelihood_coef"
"""Weight of the response's log-likelihood under the model's own trunk in a one-head model's score (absent: 0)."""
HEAD_SEPARATOR = "#"
ENSEMBLE_FILE = "ensemble.json"


def is_reward_model(config: Any) -> bool:
    """Whether a Hugging Face config is a sequence classifier (a saved reward model) rather than a causal LM."""
    return any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))


def head_names(config: Any) -> list[str]:
    """The names of a reward model's heads: its criteria (several heads, or attributes), the one criterion of a
    model trained with --criterion, else [] (one unnamed head)."""
    named = getattr(config, CRITERIA_KEY, None)
    if named:
        return [str(n) for n in named]
    one = getattr(config, "rlhfkit_criterion", None)
    return [str(one)] if one else []


def head_offsets(config: Any) -> list[float]:
    """The offset added to each head's logit: `rlhfkit_reward_offsets` of a model with named heads, else the one
    `rlhfkit_reward_offset` (0 when absent)."""
    offsets = getattr(config, OFFSETS_KEY, None)
    if offsets is not None:
        return [float(o) for o in offsets]
    return [float(getattr(config, OFFSET_KEY, 0.0) or 0.0)]


def likelihood_coef(config: Any) -> float:
    """The weight of the response log-likelihood term in the score (`LIKELIHOOD_KEY`); 0 when the model has none."""
    return float(getattr(config, LIKELIHOOD_KEY, 0.0) or 0.0)


def check_likelihood_term(config: Any, where: str) -> None:
    """A likelihood term reads log-probs through the input embeddings, so the model's LM head must be them (tied)
    and the model must have one head."""
    if not getattr(config, "tie_word_embeddings", False):
        raise UserError(f"{where}: the likelihood term reads the response's log-probs through the input embeddings, "
                        "but this model's LM head is not tied to them (tie_word_embeddings is false); drop "
                        "--likelihood-term for this model.")


def response_log_likelihood(net: Any, hidden: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor
                            ) -> torch.Tensor:
    """Sum over each sequence's response tokens of log p(token t | tokens before t), the final hidden states
    (B, T, H) read through the input embeddings (the tied LM head), chunk by chunk (never the full B x T x V
    logits). response_mask: (B, T), 1 at response tokens (a sequence's first token is never one). Returns (B,)
    float32."""
    from rlhfkit.models import chunked_head_logprobs

    keep = response_mask[:, 1:].bool()  # (B, T-1): position t-1 predicts token t
    rows = hidden[:, :-1][keep]  # (M, H)
    targets = input_ids[:, 1:][keep]  # (M,)
    lp, _ = chunked_head_logprobs(rows, net.get_input_embeddings().weight, None, targets)
    which = keep.nonzero()[:, 0]  # (M,) the sequence of each kept token
    return torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device).index_add_(0, which, lp.float())


def load_reward_model(path: str, tokenizer: Any | None = None, dtype: torch.dtype = torch.float32,
                      num_labels: int | None = None) -> Any:
    """A reward model from a reward-model directory, or fresh score heads on a causal LM (e.g. the SFT policy).

    num_labels: the heads training needs (a saved reward model must have as many); None keeps a saved model's
    heads and gives a causal LM one. A fresh head is drawn from N(0, 1/sqrt(d+1)) as in lm-human-preferences (the
    default 0.02 init makes early scores nearly constant); its offset starts at 0."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    quiet_transformers()
    p = Path(path)
    if not (p / "config.json").exists():
        raise UserError(f"{path} is not a Hugging Face model directory (no config.json); pass the SFT model or a "
                        "reward model saved by `rlhfkit reward`.")
    config = AutoConfig.from_pretrained(path)
    fresh = not is_reward_model(config)
    if fresh:
        config.num_labels = num_labels or 1
    elif num_labels is not None and config.num_labels != num_labels:
        names = ", ".join(head_names(config)) or "unnamed"
        raise UserError(f"{path} is a reward model with {config.num_labels} head(s) ({names}), but this run trains "
                        f"{num_labels}; start from the SFT model (its heads are then fresh) or from a reward model "
                        "with the same heads.")
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
        if model.config.num_labels == 1:
            setattr(model.config, OFFSET_KEY, 0.0)
        else:
            setattr(model.config, OFFSETS_KEY, [0.0] * model.config.num_labels)
    return model


def name_heads(model: Any, names: Sequence[str]) -> None:
    """Record the heads' names in the config (`rlhfkit_criteria`, and `id2label` for plain transformers) and
    give each head an offset entry (a one-head model's offset moves into the list)."""
    net = _unwrap(model)
    if len(names) != net.config.num_labels:
        raise ValueError(f"{len(names)} names for {net.config.num_labels} heads")
    offsets = head_offsets(net.config)
    setattr(net.config, CRITERIA_KEY, list(names))
    setattr(net.config, OFFSETS_KEY, offsets)
    if hasattr(net.config, OFFSET_KEY):
        delattr(net.config, OFFSET_KEY)
    net.config.id2label = dict(enumerate(names))
    net.config.label2id = {n: k for k, n in enumerate(names)}


def _unwrap(model: Any) -> Any:
    return model.get_base_model() if is_peft(model) else model


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token in each row, for left, right or no padding. (B,)"""
    T = attention_mask.shape[1]
    positions = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)  # (B, T)
    return (positions * attention_mask.long()).argmax(-1)


def _trunk(net: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
           position_ids: torch.Tensor | None) -> torch.Tensor:
    """The final hidden states of the model's trunk (its final norm applied), (R, T, H)."""
    backbone = getattr(net, net.base_model_prefix)
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    return backbone(input_ids=input_ids, attention_mask=model_mask(attention_mask, net), position_ids=position_ids,
                    use_cache=False).last_hidden_state


def _raw_head_scores(net: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     last_index: torch.Tensor | None, position_ids: torch.Tensor | None,
                     row_index: torch.Tensor | None, response_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Every head's logit at each sequence's last real token, before offsets, plus the likelihood term of a model
    that has one (which needs response_mask (B, T) of a padded batch). (N, K) float32"""
    coef = likelihood_coef(net.config)
    if coef and (response_mask is None or row_index is not None):
        raise ValueError("this reward model adds a likelihood term, which needs the response tokens of a padded "
                         "batch: pass response_mask (score_texts and scoring_batches do)")
    hidden = _trunk(net, input_ids, attention_mask, position_ids)  # (R, T, H)
    if last_index is None:
        last_index = last_token_index(attention_mask)
    if row_index is None:
        row_index = torch.arange(hidden.shape[0], device=hidden.device)
    picked = hidden[row_index, last_index]  # (N, H)
    raw = net.score(picked).float()  # (N, K)
    if coef:
        raw = raw + coef * response_log_likelihood(net, hidden, input_ids, response_mask)[:, None]
    return raw


def head_and_likelihood(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        last_index: torch.Tensor, response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A one-head model's two score features of a padded batch from one forward pass: the head's logit at the last
    real token (offset and likelihood term left out) and the response log-likelihood (`response_log_likelihood`);
    what the likelihood term's weight is fit on. Returns (B,), (B,) float32."""
    net = _unwrap(model)
    hidden = _trunk(net, input_ids, attention_mask, None)  # (B, T, H)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    logit = net.score(hidden[rows, last_index]).float()[:, 0]
    return logit, response_log_likelihood(net, hidden, input_ids, response_mask)


def sequence_scores(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    last_index: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                    row_index: torch.Tensor | None = None, head: int | None = None,
                    response_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scalar reward per sequence, read at the last real token (never at padding: trl#3750; lm-human-preferences
    reads the score at the end of the response). input_ids, attention_mask: (B, T). Returns (B,).
    A padding-free batch (`collate_pairs(..., padding_free=True)`) passes its (R, 1, T, T) mask, position_ids
    and each sequence's row_index / last_index (N,); the result is then (N,).
    head: which head of a model with several (its index in `head_names`); None for a one-head model.
    response_mask: (B, T) 1 at response tokens, which a model with a likelihood term needs (padded batches only)."""
    net = _unwrap(model)
    raw = _raw_head_scores(net, input_ids, attention_mask, last_index, position_ids, row_index,
                           response_mask)  # (N, K)
    if head is None:
        if raw.shape[-1] != 1:
            raise ValueError(f"this reward model has {raw.shape[-1]} heads ({', '.join(head_names(net.config))}); "
                             "pass head= (or use head_scores for all of them)")
        head = 0
    return raw[:, head] + head_offsets(net.config)[head]  # (N,)


def head_scores(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                last_index: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                row_index: torch.Tensor | None = None, response_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Every head's score per sequence from one forward pass of the shared trunk, offsets added: column k is
    `sequence_scores(..., head=k)`. Arguments as in `sequence_scores`. Returns (N, K)."""
    net = _unwrap(model)
    raw = _raw_head_scores(net, input_ids, attention_mask, last_index, position_ids, row_index,
                           response_mask)  # (N, K)
    return raw + raw.new_tensor(head_offsets(net.config))


def apply_normalisation(model: Any, mean: float, std: float, head: int | None = None) -> tuple[float, float]:
    """Make scores with this (mean, std) come out with mean 0 and std 1: the gain 1/std is folded into the score
    head, the offset kept in the config (lm-human-preferences normalises on reference-policy samples).
    head: the head to normalise, by index, on a model with named heads (its row of the score weight and its entry
    of `rlhfkit_reward_offsets`); None for a one-head model. Returns (gain, new offset)."""
    if not math.isfinite(std) or std <= 1e-8:
        raise UserError(f"cannot normalise the reward model: its scores on the reference samples have std {std:.3g} "
                        "(all responses scored alike); train longer or sample more varied responses.")
    net = _unwrap(model)
    gain = 1.0 / std
    if head is None and getattr(net.config, OFFSETS_KEY, None) is None:
        old_offset = float(getattr(net.config, OFFSET_KEY, 0.0) or 0.0)
        with torch.no_grad():
            net.score.weight.mul_(gain)
        # s' = gain * (w.h + c L + o) - gain * mean  =  (gain w).h + (gain c) L + gain * (o - mean)
        new_offset = gain * (old_offset - mean)
        setattr(net.config, OFFSET_KEY, new_offset)
        if likelihood_coef(net.config):
            setattr(net.config, LIKELIHOOD_KEY, gain * likelihood_coef(net.config))
        return gain, new_offset
    head = head or 0  # a one-head model whose head is named keeps its offset in the list too
    offsets = head_offsets(net.config)
    with torch.no_grad():  # the same fold on head k's row alone: the other heads' scores do not move
        net.score.weight[head].mul_(gain)
    offsets[head] = gain * (offsets[head] - mean)
    setattr(net.config, OFFSETS_KEY, offsets)
    if likelihood_coef(net.config):  # only a one-head model has the term
        setattr(net.config, LIKELIHOOD_KEY, gain * likelihood_coef(net.config))
    return gain, offsets[head]


# ------------------------------------------------------------------------------------------------- ensembles
@dataclass
class RewardEnsemble:
    """N reward models scoring the same sequences; PPO can optimise mean - lambda * std (Coste et al. 2023).
    Of a model with several heads, it scores the one `head` names (loaded from DIR#criterion)."""

    members: list[Any]
    tokenizer: Any
    paths: list[str]
    head: int | None = None
    """Index of the head scored, of a model with named heads; None for a one-head model."""
    heads: list[str] = field(default_factory=list)
    """The names of the members' heads (`head_names`), [] for one unnamed head."""

    @torch.no_grad()
    def scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               response_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(N members, B) scores; input is right- or left-padded token ids in the reward tokenizer's vocab, with
        the response tokens marked in response_mask (B, T) for members with a likelihood term."""
        return torch.stack([sequence_scores(m, input_ids, attention_mask, head=self.head,
                                            response_mask=response_mask) for m in self.members])

    @torch.no_grad()
    def head_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    response_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(N members, B, K) scores of every head, one forward pass per member."""
        return torch.stack([head_scores(m, input_ids, attention_mask, response_mask=response_mask)
                            for m in self.members])

    @torch.no_grad()
    def mean_std(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 response_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.scores(input_ids, attention_mask, response_mask)  # (N, B)
        std = s.std(0, unbiased=True) if s.shape[0] > 1 else torch.zeros_like(s[0])
        return s.mean(0), std

    def to(self, device: Any) -> RewardEnsemble:
        for m in self.members:  # in place: ensembles that share these members (one per head) move with them
            m.to(device)
        return self

    def with_head(self, head: str | None, spec: str) -> RewardEnsemble:
        """This ensemble's members scoring the head named `head` (from spec, DIR#head, named in errors); a model
        with several heads needs one, a one-head model takes none or its own criterion's name."""
        names = self.heads
        where = spec.rpartition(HEAD_SEPARATOR)[0] if head is not None else spec
        K = _unwrap(self.members[0]).config.num_labels
        if head is None:
            if K == 1:
                return replace(self, head=None)
            if not names:
                raise UserError(f"{spec} is a sequence classifier with {K} outputs and no head names, not a model "
                                "saved by `rlhfkit reward`; pass a reward model directory.")
            raise UserError(f"{spec} has {K} heads ({', '.join(names)}); name the one to use as "
                            f"{spec}{HEAD_SEPARATOR}{names[0]} (e.g. --rewards {names[0]}={spec}{HEAD_SEPARATOR}"
                            f"{names[0]}).")
        if head not in names:
            have = f"its heads are {', '.join(names)}" if names else "it has one unnamed head: drop the suffix"
            raise UserError(f"{where} has no head named {head!r} ({spec}); {have}.")
        return replace(self, head=None if K == 1 else names.index(head))


def split_head(spec: str) -> tuple[str, str | None]:
    """'runs/rm#helpfulness' -> ('runs/rm', 'helpfulness'): a reward-model directory and the head to score (None
    without a suffix). A path that exists as written is a directory, '#' and all."""
    spec = str(spec)
    if HEAD_SEPARATOR not in spec or Path(spec).exists():
        return spec, None
    directory, _, head = spec.rpartition(HEAD_SEPARATOR)
    if not directory or not head.strip():
        raise UserError(f"{spec!r}: write a reward model's head as DIR{HEAD_SEPARATOR}criterion, e.g. "
                        f"runs/rm{HEAD_SEPARATOR}helpfulness.")
    return directory, head.strip()


def member_dirs(path: str | Path) -> list[Path]:
    """The member directories of an ensemble directory, or [path] for a single reward model."""
    p = Path(path)
    manifest = p / ENSEMBLE_FILE
    if manifest.exists():
        return [p / m for m in json.loads(manifest.read_text())["members"]]
    return [p]


def load_members(directory: str, device: Any = "cpu") -> RewardEnsemble:
    """Every member of a reward-model (or ensemble) directory, all heads; `RewardEnsemble.with_head` picks one."""
    dirs = member_dirs(directory)
    tokenizer = load_tokenizer(str(dirs[0]))
    members = [load_reward_model(str(d), tokenizer).eval().to(device) for d in dirs]
    return RewardEnsemble(members, tokenizer, [str(d) for d in dirs], heads=head_names(_unwrap(members[0]).config))


def has_likelihood_term(path: str | Path) -> bool:
    """Whether any member of a reward-model (or ensemble) directory scores with a likelihood term."""
    return any(likelihood_coef(SimpleNamespace(**json.loads((m / "config.json").read_text()))) != 0.0
               for m in member_dirs(path))


def save_head_only(src: str | Path, dst: str | Path) -> Path:
    """A copy of a reward model (or ensemble) directory that scores with its heads alone: every member's
    likelihood term (`LIKELIHOOD_KEY`) removed from its config, everything else as it is. For ablations, and for
    optimising against the learned head without the term's own pull toward the model's language. Returns dst."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    for member in member_dirs(dst):
        config = json.loads((member / "config.json").read_text())
        config.pop(LIKELIHOOD_KEY, None)
        (member / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return dst


def load_reward_ensemble(path: str, device: Any = "cpu") -> RewardEnsemble:
    """The reward model (or ensemble) of `path`; DIR#criterion scores that head of a model with several."""
    directory, head = split_head(path)
    return load_members(directory, device).with_head(head, str(path))


SCORING_TOKENS = 16384
"""Token budget (sequences x padded length) of one scoring forward pass."""
SCORING_ROWS = 256
"""Most sequences in one scoring forward pass."""


def scoring_batches(tokenizer: Any, device: Any, prompts: Sequence[Any], responses: Sequence[Any], max_length: int,
                    max_tokens: int = SCORING_TOKENS, max_rows: int = SCORING_ROWS
                    ) -> Iterator[tuple[list[list[int]], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(indices per row, input_ids, attention_mask, last_index, response_mask) batches covering every (prompt,
    response) pair, on `device`. Each pair is encoded exactly as training data is (chat template applied once per
    prompt; plain strings concatenated with EOS); a pair that repeats is scored once (its row lists every index
    it answers for); rows of all prompts are sorted by length and batched up to max_tokens padded tokens, so a
    call with many prompts of few responses each (PPO's one sample per prompt, held-out pairs) takes a handful
    of forward passes rather than one per prompt. Right padding never reaches a row's score: it is read at the
    row's last real token under a causal mask."""
    from rlhfkit.data.collate import encode_responses, padded_batch

    groups: dict[str, dict[str, list[int]]] = {}
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        groups.setdefault(json.dumps(prompt), {}).setdefault(json.dumps(response), []).append(i)
    rows: list[tuple[list[int], list[int], list[int]]] = []  # (token ids, response mask, indices it scores)
    for key, by_response in groups.items():
        batch = encode_responses(tokenizer, json.loads(key), [json.loads(r) for r in by_response], max_length)
        for n, idx in enumerate(by_response.values()):
            end = int(batch["last_index"][n]) + 1
            rows.append((batch["input_ids"][n, :end].tolist(), batch["response_mask"][n, :end].tolist(), idx))
    rows.sort(key=lambda r: len(r[0]))
    start = 0
    while start < len(rows):
        end = start + 1  # rows are sorted, so the chunk's last row sets its padded width
        while end < len(rows) and end - start < max_rows and (end + 1 - start) * len(rows[end][0]) <= max_tokens:
            end += 1
        chunk = rows[start:end]
        batch = padded_batch([ids for ids, _, _ in chunk], tokenizer.pad_token_id,
                             response_mask=[m for _, m, _ in chunk])
        yield ([idx for _, _, idx in chunk], batch["input_ids"].to(device), batch["attention_mask"].to(device),
               batch["last_index"].to(device), batch["response_mask"].to(device))
        start = end


def _scoring_batches(ensemble: RewardEnsemble, prompts: Sequence[Any], responses: Sequence[Any], max_length: int,
                     **limits: int
                     ) -> Iterator[tuple[list[list[int]], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`scoring_batches` in the ensemble's tokenizer, on its members' device."""
    device = next(ensemble.members[0].parameters()).device
    return scoring_batches(ensemble.tokenizer, device, prompts, responses, max_length, **limits)


def score_texts(ensemble: RewardEnsemble, prompts: Sequence[Any], responses: Sequence[Any],
                max_length: int = 1024) -> tuple[list[float], list[float]]:
    """Mean and std of the members' scores (of the ensemble's head) for (prompt, response) pairs, encoded exactly
    as training data is, batched across prompts (`_scoring_batches`)."""
    means: list[float] = [0.0] * len(prompts)
    stds: list[float] = [0.0] * len(prompts)
    for rows, ids, mask, last, response in _scoring_batches(ensemble, prompts, responses, max_length):
        with torch.no_grad():
            s = torch.stack([sequence_scores(m, ids, mask, last, head=ensemble.head, response_mask=response)
                             for m in ensemble.members])
        mean = s.mean(0).tolist()
        std = (s.std(0) if s.shape[0] > 1 else torch.zeros(s.shape[1])).tolist()
        for j, idx in enumerate(rows):
            for i in idx:
                means[i], stds[i] = mean[j], std[j]
    return means, stds


def score_texts_all_heads(ensemble: RewardEnsemble, prompts: Sequence[Any], responses: Sequence[Any],
                          max_length: int = 1024) -> torch.Tensor:
    """Every member's score on every head for (prompt, response) pairs, batched across prompts
    (`_scoring_batches`), one forward pass per member and batch. Returns (N members, B, K), on the CPU."""
    out: torch.Tensor | None = None
    for rows, ids, mask, last, response in _scoring_batches(ensemble, prompts, responses, max_length):
        with torch.no_grad():
            s = torch.stack([head_scores(m, ids, mask, last, response_mask=response)
                             for m in ensemble.members]).cpu()  # (M, Bg, K)
        if out is None:
            out = torch.zeros((s.shape[0], len(prompts), s.shape[2]))  # (M, B, K)
        for j, idx in enumerate(rows):
            out[:, idx] = s[:, j : j + 1]
    if out is None:
        K = _unwrap(ensemble.members[0]).config.num_labels
        return torch.zeros((len(ensemble.members), 0, K))
    return out
