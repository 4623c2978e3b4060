"""Scored responses: a prompt, one response and a number per attribute (HelpSteer2's rows, as `rlhfkit data convert
helpsteer2` and the labelling app's attribute export write them), read, validated, tokenised and collated for
attribute regression (`rlhfkit reward --objective regression`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch

from rlhfkit.data.collate import sequence_batch
from rlhfkit.data.formats import refuse_message_tree_row
from rlhfkit.data.preference_tokens import apply_overlong, encode_prompt_responses, prompt_response_sequence
from rlhfkit.data.readers import read_rows
from rlhfkit.data.rows import Text, prompt_text, response_text
from rlhfkit.errors import DataError, UserError

HELPSTEER2_ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
"""HelpSteer2's five attributes (Wang et al. 2024, arXiv 2406.08673), each an integer 0-4, higher is more of it."""


@dataclass
class ScoredResponse:
    """One response to a prompt and its score on each attribute, in the order the attributes were asked for."""

    prompt: Text
    response: Text
    scores: list[float]
    row: int = 0
    path: str = ""


@dataclass
class TokenizedScored:
    """A scored response ready to collate: prompt + response (+ EOS) ids, its response mask (1 = response token)
    and the attribute scores it is trained to predict."""

    input_ids: list[int]
    response_mask: list[int]
    targets: list[float]
    row: int = 0
    truncated: bool = False


# ---------------------------------------------------------------------------------------------------- reading
def _score(row: dict[str, Any], attribute: str, path: str, lineno: int) -> float:
    """The row's number for `attribute`: a top-level column (HelpSteer2, the attribute export) or an entry of a
    `scores` mapping (`rlhfkit data convert helpsteer2`); never both, never missing, always a finite number."""
    nested = row.get("scores")
    if nested is not None and not isinstance(nested, dict):
        raise DataError(path, lineno, "scores", f"must be a mapping of attribute to number, got "
                        f"{type(nested).__name__}")
    if isinstance(nested, dict) and attribute in nested:
        if attribute in row:
            raise DataError(path, lineno, attribute, f"is given both as a column and in 'scores' "
                            f"({row[attribute]!r} and {nested[attribute]!r}); keep one")
        key, value = f"scores.{attribute}", nested[attribute]
    else:
        key, value = attribute, row.get(attribute)
    if value is None:
        present = sorted(set(row) | {f"scores.{k}" for k in (nested or {})})
        raise DataError(path, lineno, key, f"missing; every row needs a number for each attribute of --attributes "
                        f"(this row has {present}); fix the row or leave the attribute out of --attributes")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(path, lineno, key, f"must be a finite number (the response's {attribute} score), got "
                        f"{value!r}")
    return float(value)


def parse_scored(row: dict[str, Any], path: str, lineno: int, attributes: Sequence[str]) -> ScoredResponse:
    """A row {"prompt", "response", <attribute>: number, ...} (or the numbers under "scores") -> ScoredResponse.
    A preference row (chosen / rejected, or a ranking) is refused: it holds no scores to regress on."""
    refuse_message_tree_row(row, path, lineno)
    fields = sorted(row)
    if row.get("response") is None and any(k in row for k in ("chosen", "rejected", "responses")):
        raise DataError(path, lineno, "response", f"missing: this is a preference row (fields {fields}), which "
                        "holds no attribute scores; train on it with --objective preference, or give scored "
                        "responses {prompt, response, <attribute>: number}")
    prompt = prompt_text(row.get("prompt"), path, lineno, fields)
    response = response_text(prompt, row.get("response"), "response", path, lineno, fields)
    return ScoredResponse(prompt, response, [_score(row, a, path, lineno) for a in attributes], lineno, path)


def read_scored(path: str, attributes: Sequence[str], split: str | None = None) -> list[ScoredResponse]:
    """Every row of a JSONL / JSON / Parquet file or `datasets` directory (path may be a DataPath, bringing its
    split and column mapping) as a ScoredResponse; a bad row raises DataError naming file, row and field."""
    if not attributes:
        raise UserError("no attributes to read; name the score columns, e.g. --attributes helpfulness,correctness.")
    records = [parse_scored(row, str(path), lineno, attributes) for lineno, row in read_rows(path, split)]
    if not records:
        raise UserError(f"{path} holds no rows; give scored responses {{prompt, response, <attribute>: number}}.")
    return records


# ------------------------------------------------------------------------------------------------- tokenising
def tokenize_scored(tokenizer: Any, records: list[ScoredResponse], max_length: int,
                    overlong: Literal["error", "truncate"] = "error") -> list[TokenizedScored]:
    """prompt + response ids by the one encoding rule every stage uses (the response ends at its first EOS), with
    the over-long policy of preference data."""
    out = []
    for rec in records:
        prompt_ids, (response,) = encode_prompt_responses(tokenizer, rec.prompt, [rec.response])
        (response,), truncated = apply_overlong(prompt_ids, [response], ["response"], max_length, overlong,
                                                rec.path, rec.row)
        ids, _, response_mask = prompt_response_sequence(prompt_ids, response)
        out.append(TokenizedScored(ids, response_mask, list(rec.scores), rec.row, truncated))
    return out


def collate_scored(items: list[TokenizedScored], pad_id: int, padding_free: bool = False) -> dict[str, torch.Tensor]:
    """One batch of B scored responses: the layout of `collate.sequence_batch` (input_ids, attention_mask,
    response_mask, last_index, and with padding_free position_ids and row_index) plus targets: (B, K) float."""
    batch = sequence_batch([i.input_ids for i in items], pad_id, padding_free,
                           response_mask=[i.response_mask for i in items])
    batch["targets"] = torch.tensor([i.targets for i in items], dtype=torch.float32)  # (B, K)
    return batch
