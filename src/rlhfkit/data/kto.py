"""KTO data: unpaired prompt/completion/label rows (TRL's unpaired format, standard or conversational), or paired
preference rows split into one desirable and one undesirable example; tokenised, and given fixed mismatched
partners for KTO's KL reference point (`data.collate.collate_completions` batches them).

response_mask[t] = 1 means token t belongs to the completion (its EOS included); 0 = prompt or padding."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import torch

from rlhfkit.data.formats import refuse_message_tree_row
from rlhfkit.data.preference import (
    Preference, PreferencePair, Ranking, criterion_rows, parse_preference, ranking_to_pairs, untied_rows,
)
from rlhfkit.data.preference_tokens import apply_overlong, encode_prompt_responses
from rlhfkit.data.rows import Text, prompt_text, response_text
from rlhfkit.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class KTOExample:
    """One completion with a binary judgment: desirable (thumbs-up) or undesirable (thumbs-down)."""

    prompt: Text
    completion: Text
    desirable: bool
    row: int = field(default=0, compare=False)
    path: str = field(default="", compare=False)


KTORecord = Union[KTOExample, PreferencePair, Ranking]
"""A row as read: an unpaired KTOExample, or a paired record that `unpair` turns into KTOExamples."""


def parse_kto_row(row: dict[str, Any], path: str, lineno: int, *, chat: bool = True,
                  margin_from_scores: bool = False) -> KTORecord:
    """An unpaired row {"prompt", "completion", "label": bool, or 0/1 as some exports write it} -> KTOExample;
    any preference row (TRL pairs, UltraFeedback, Anthropic HH, K-way rankings) -> its PreferencePair or Ranking,
    with the preference reader's checks (chat and margin_from_scores as in `parse_pair`; KTO uses no margin)."""
    refuse_message_tree_row(row, path, lineno)
    if "completion" not in row and "label" not in row:
        return parse_preference(row, path, lineno, chat=chat, margin_from_scores=margin_from_scores)
    fields = sorted(row)
    prompt = prompt_text(row.get("prompt"), path, lineno, fields)
    completion = response_text(prompt, row.get("completion"), "completion", path, lineno, fields)
    label = row.get("label")
    if label is None:
        raise DataError(path, lineno, "label", f"missing; an unpaired KTO row needs prompt, completion and label "
                        f"(true = desirable, false = undesirable); this row has fields {fields}")
    if not (isinstance(label, int) and label in (0, 1)):  # bool is an int: True, False, 1 and 0 pass
        raise DataError(path, lineno, "label", f"must be true (desirable) or false (undesirable), or 1 / 0, got "
                        f"{label!r}")
    return KTOExample(prompt, completion, bool(label), row=lineno, path=path)


def read_kto_records(path: str, split: str | None = None, *, chat: bool = True,
                     ties: Literal["error", "drop"] = "error", margin_from_scores: bool = False,
                     criterion: str | None = None) -> list[KTORecord]:
    """Read every row of a JSONL / JSON / Parquet file or `datasets` directory (see `parse_kto_row`; path may be
    a DataPath). A bad row raises DataError naming file, row, field and reason; no row is dropped, except paired
    rows with tied scores with ties="drop" (see `untied_rows`) and, with a criterion, other criteria's rows."""
    rows = criterion_rows(untied_rows(path, split, ties), str(path), criterion)
    return [parse_kto_row(row, str(path), lineno, chat=chat, margin_from_scores=margin_from_scores)
            for lineno, row in rows]


def unpair(records: list[KTORecord | Preference]) -> list[KTOExample]:
    """KTOExamples from mixed records: a pair gives its chosen response as desirable and its rejected one as
    undesirable (as TRL's unpair_preference_dataset does); a K-way ranking is first expanded into its C(K, 2)
    pairs with `ranking_to_pairs`, so a middle-ranked response appears once per pair it is in, with that pair's
    label."""
    out: list[KTOExample] = []
    for rec in records:
        if isinstance(rec, KTOExample):
            out.append(rec)
            continue
        for pair in ranking_to_pairs(rec) if isinstance(rec, Ranking) else [rec]:
            out.append(KTOExample(pair.prompt, pair.chosen, True, row=pair.row, path=pair.path))
            out.append(KTOExample(pair.prompt, pair.rejected, False, row=pair.row, path=pair.path))
    return out


# -------------------------------------------------------------------------------------------------- tokenising
@dataclass
class TokenizedCompletion:
    """prompt ids and completion ids (ending in EOS unless truncated), kept apart so a mismatched pair can put
    this prompt before another example's completion."""

    prompt_ids: list[int]
    response_ids: list[int]
    desirable: bool
    row: int = 0
    truncated: bool = False

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    @property
    def response_mask(self) -> list[int]:
        return [0] * len(self.prompt_ids) + [1] * len(self.response_ids)


@dataclass
class KTOReport:
    """What tokenising did to the examples (nothing is dropped silently)."""

    path: str
    desirable: int = 0
    undesirable: int = 0
    truncated: int = 0
    truncated_rows: list[int] = field(default_factory=list)


def tokenize_kto(
    tokenizer: Any, examples: list[KTOExample], max_length: int, overlong: Literal["error", "truncate"] = "error"
) -> tuple[list[TokenizedCompletion], KTOReport]:
    """Tokenise prompt + completion like a preference response (`encode_prompt_responses`: standard rows get the
    prompt with special tokens and the completion plus EOS; conversational rows render the chat template once)
    and apply the over-long policy ('error' names the row, 'truncate' cuts completion tails)."""
    report = KTOReport(path=examples[0].path if examples else "")
    out: list[TokenizedCompletion] = []
    for ex in examples:
        prompt_ids, (completion,) = encode_prompt_responses(tokenizer, ex.prompt, [ex.completion])
        (completion,), truncated = apply_overlong(prompt_ids, [completion], ["completion"], max_length, overlong,
                                                  ex.path, ex.row)
        out.append(TokenizedCompletion(prompt_ids, completion, ex.desirable, row=ex.row, truncated=truncated))
        report.desirable += int(ex.desirable)
        report.undesirable += int(not ex.desirable)
        if truncated:
            report.truncated += 1
            report.truncated_rows.append(ex.row)
    if report.truncated:
        log.warning("%s: truncated the completions of %d of %d examples to max_length %d (rows %s%s)", report.path,
                    report.truncated, len(out), max_length, report.truncated_rows[:10],
                    "..." if report.truncated > 10 else "")
    return out, report


# ------------------------------------------------------------------------------------- mismatched pairs for z₀
def kl_partners(n: int, seed: int) -> list[int]:
    """partner[i] = the example whose completion is paired with example i's prompt to estimate KTO's reference
    point z₀ ≈ KL(π‖π_ref) (arXiv 2402.01306 §4.2 uses mismatched pairs from the same batch; TRL rotates the
    completions of each batch by one).

    We fix the assignment once for the whole dataset instead: a seeded single cycle through a random order, so
    partner[i] != i whenever n >= 2 (n = 1 pairs the example with itself). Because it does not depend on how a
    step is split into micro-batches, gradient accumulation 1x8 equals 8x1 and the reference log-probs of the
    mismatched pairs can be computed once and cached."""
    if n < 1:
        return []
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    partner = [0] * n
    for k, i in enumerate(order):
        partner[i] = order[(k + 1) % n]
    return partner


def mismatched(examples: list[TokenizedCompletion], partners: list[int],
               max_length: int) -> list[TokenizedCompletion]:
    """For each example, its own prompt followed by its partner's completion, cut to max_length (these pairs
    only estimate z₀, so cutting a tail is harmless). `desirable` is copied from the example and unused."""
    out = []
    for ex, j in zip(examples, partners):
        room = max_length - len(ex.prompt_ids)
        response = examples[j].response_ids[:room]
        out.append(TokenizedCompletion(ex.prompt_ids, response, ex.desirable, row=ex.row,
                                       truncated=len(response) < len(examples[j].response_ids)))
    return out
