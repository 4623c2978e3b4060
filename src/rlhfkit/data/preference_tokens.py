"""Preference records as token ids: the prompt encoded once and each response after it by `data.encoding`'s rule
(a response ends at its first EOS), and the over-long policy applied.

response_mask[t] = 1 means token t belongs to the response (its EOS included); 0 = prompt or padding."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from rlhfkit.data.encoding import encode_prompt, encode_response, render_prompt
from rlhfkit.data.preference import Preference, PreferencePair, Ranking, margin_of
from rlhfkit.data.rows import Text
from rlhfkit.errors import DataError, UserError

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------ records
@dataclass
class TokenizedPair:
    """A pair ready to collate: the shared prompt ids, and for each response the full sequence
    prompt + response (+ EOS) with its attention mask (1 = real token) and response mask (1 = response token)."""

    prompt_ids: list[int]
    chosen_input_ids: list[int]
    chosen_attention_mask: list[int]
    chosen_response_mask: list[int]
    rejected_input_ids: list[int]
    rejected_attention_mask: list[int]
    rejected_response_mask: list[int]
    margin: float | None = None
    """Resolved label margin (explicit margin, else strength at the chosen scale), None if neither."""
    row: int = 0
    truncated: bool = False
    chosen_safe: bool | None = None
    """Safety labels of the two responses (None: not labelled), for a cost model's classifier term."""
    rejected_safe: bool | None = None
    confidence: float | None = None
    """Probability in [0, 1] that chosen is truly better (`PreferencePair.confidence`); None: taken as certain."""


@dataclass
class TokenizedRanking:
    """A K-way ranking ready to collate: K full sequences sharing one prompt, and the tiers best first."""

    prompt_ids: list[int]
    input_ids: list[list[int]]
    attention_mask: list[list[int]]
    response_mask: list[list[int]]
    ranking: list[list[int]]
    row: int = 0
    truncated: bool = False


@dataclass
class PreferenceReport:
    """What tokenising a file did to its records (nothing is dropped silently)."""

    path: str
    pairs: int = 0
    rankings: int = 0
    truncated: int = 0
    truncated_rows: list[int] = field(default_factory=list)


# -------------------------------------------------------------------------------------------------- tokenising
def encode_prompt_responses(tokenizer: Any, prompt: Text, responses: list[Text]
                            ) -> tuple[list[int], list[list[int]]]:
    """Prompt ids (shared) and each response's ids, by the one rule of `data.encoding`: the prompt encoded as in
    every stage (a string as plain text, messages through the template), each response ending at its first
    EOS (ChatML's newline after `<|im_end|>` is not part of it). The prompt is tokenised on its own, so its ids
    are the same for every response and equal what a policy is given at generation time."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    prompt_text = None if isinstance(prompt, str) else render_prompt(tokenizer, prompt)
    return prompt_ids, [encode_response(tokenizer, prompt, r, prompt_text) for r in responses]


def apply_overlong(prompt_ids: list[int], responses: list[list[int]], names: list[str], max_length: int,
                   overlong: str, path: str, row: int) -> tuple[list[list[int]], bool]:
    """Apply the over-long policy: 'error' names the row and lengths; 'truncate' cuts response tails and keeps
    the prompt whole (a prompt that leaves no room for a response is an error either way)."""
    if overlong not in ("error", "truncate"):
        raise UserError(f"overlong must be 'error' or 'truncate', got {overlong!r}.")
    P = len(prompt_ids)
    too_long = [(n, len(r)) for n, r in zip(names, responses) if P + len(r) > max_length]
    if not too_long:
        return responses, False
    lengths = ", ".join(f"{n} {P + r} tokens (prompt {P} + response {r})" for n, r in too_long)
    if overlong == "error":
        raise DataError(path, row, None, f"{lengths} > max_length {max_length}; raise max_length or set "
                        "overlong: truncate")
    if P >= max_length:
        raise DataError(path, row, "prompt", f"is {P} tokens, leaving no room for a response within max_length "
                        f"{max_length}; raise max_length or shorten the prompt")
    return [r[: max_length - P] for r in responses], True


def prompt_response_sequence(prompt_ids: list[int], response_ids: list[int]) -> tuple[list[int], list[int], list[int]]:
    """prompt + response ids, their attention mask (all 1) and response mask (1 on the response)."""
    ids = prompt_ids + response_ids
    return ids, [1] * len(ids), [0] * len(prompt_ids) + [1] * len(response_ids)


def tokenize_pair(
    tokenizer: Any,
    pair: PreferencePair,
    max_length: int,
    overlong: Literal["error", "truncate"] = "error",
    margin_scale: Literal["large", "small"] = "large",
) -> TokenizedPair:
    """Tokenise prompt + chosen and prompt + rejected (see `encode_prompt_responses`), applying the over-long
    policy. Raises DataError when the two responses tokenise to the same ids (after truncation too)."""
    prompt_ids, (chosen, rejected) = encode_prompt_responses(tokenizer, pair.prompt, [pair.chosen, pair.rejected])
    (chosen, rejected), truncated = apply_overlong(prompt_ids, [chosen, rejected], ["chosen", "rejected"],
                                                   max_length, overlong, pair.path, pair.row)
    if chosen == rejected:
        where = f" within max_length {max_length}" if truncated else ""
        raise DataError(pair.path, pair.row, "rejected", f"tokenises to the same ids as chosen{where}, so the pair "
                        "carries no preference (constant loss log 2, zero gradient)")
    c_ids, c_attn, c_resp = prompt_response_sequence(prompt_ids, chosen)
    r_ids, r_attn, r_resp = prompt_response_sequence(prompt_ids, rejected)
    return TokenizedPair(prompt_ids, c_ids, c_attn, c_resp, r_ids, r_attn, r_resp,
                         margin=margin_of(pair, margin_scale), row=pair.row, truncated=truncated,
                         chosen_safe=pair.chosen_safe, rejected_safe=pair.rejected_safe, confidence=pair.confidence)


def tokenize_ranking(
    tokenizer: Any, ranking: Ranking, max_length: int, overlong: Literal["error", "truncate"] = "error"
) -> TokenizedRanking:
    """Tokenise the K responses of a ranking against their shared prompt, applying the over-long policy."""
    names = [f"responses[{i}]" for i in range(len(ranking.responses))]
    prompt_ids, responses = encode_prompt_responses(tokenizer, ranking.prompt, ranking.responses)
    responses, truncated = apply_overlong(prompt_ids, responses, names, max_length, overlong, ranking.path, ranking.row)
    tier_of = {i: t for t, tier in enumerate(ranking.ranking) for i in tier}
    for i in range(len(responses)):
        for j in range(i + 1, len(responses)):
            if tier_of[i] != tier_of[j] and responses[i] == responses[j]:
                raise DataError(ranking.path, ranking.row, names[j], f"tokenises to the same ids as {names[i]} "
                                "but is ranked differently")
    seqs = [prompt_response_sequence(prompt_ids, r) for r in responses]
    return TokenizedRanking(prompt_ids, [s[0] for s in seqs], [s[1] for s in seqs], [s[2] for s in seqs],
                            [list(t) for t in ranking.ranking], row=ranking.row, truncated=truncated)


def tokenize_preferences(
    tokenizer: Any,
    records: list[Preference],
    max_length: int,
    overlong: Literal["error", "truncate"] = "error",
    margin_scale: Literal["large", "small"] = "large",
) -> tuple[list[TokenizedPair | TokenizedRanking], PreferenceReport]:
    """Tokenise every record (pairs with `tokenize_pair`, rankings with `tokenize_ranking`) and report counts
    and truncated rows."""
    report = PreferenceReport(path=records[0].path if records else "")
    out: list[TokenizedPair | TokenizedRanking] = []
    for rec in records:
        if isinstance(rec, PreferencePair):
            item: TokenizedPair | TokenizedRanking = tokenize_pair(tokenizer, rec, max_length, overlong, margin_scale)
            report.pairs += 1
        else:
            item = tokenize_ranking(tokenizer, rec, max_length, overlong)
            report.rankings += 1
        if item.truncated:
            report.truncated += 1
            report.truncated_rows.append(rec.row)
        out.append(item)
    if report.truncated:
        log.warning("%s: truncated the responses of %d of %d records to max_length %d (rows %s%s)", report.path,
                    report.truncated, len(out), max_length, report.truncated_rows[:10],
                    "..." if report.truncated > 10 else "")
    return out, report
