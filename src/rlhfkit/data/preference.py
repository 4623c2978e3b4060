"""Preference records: pairs and K-way rankings read from TRL's formats (explicit or implicit prompt, standard or
conversational, optional margin/strength/confidence), UltraFeedback's scored full conversations, Anthropic HH
transcripts and our K-way rows; validated, and written back as TRL explicit-prompt JSONL.
`data.preference_tokens` turns them into ids and `data.collate` into batches."""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from rlhfkit.data.formats import prompt_hint, prompt_like, refuse_message_tree_row
from rlhfkit.data.readers import read_rows
from rlhfkit.data.rows import (
    Message, Text, message_list, optional_text, prompt_text, real_number, required_text, response_text,
)
from rlhfkit.errors import DataError, UserError

log = logging.getLogger(__name__)

# Llama 2 (Touvron et al. 2023) §3.2.2: four strength levels and their margins at the two scales they tried
STRENGTHS = ("significantly_better", "better", "slightly_better", "negligible")
_MARGINS = {
    "large": {"significantly_better": 3.0, "better": 2.0, "slightly_better": 1.0, "negligible": 0.0},
    "small": {"significantly_better": 1.0, "better": 2 / 3, "slightly_better": 1 / 3, "negligible": 0.0},
}

HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"


# ------------------------------------------------------------------------------------------------------ records
@dataclass
class PreferencePair:
    """One judgment "chosen ≻ rejected" for a prompt. prompt, chosen and rejected are all strings (standard) or
    all message lists (conversational; chosen/rejected then start with an assistant message).
    row and path say where the record came from; they are not part of equality."""

    prompt: Text
    chosen: Text
    rejected: Text
    margin: float | None = None
    """Label margin m ≥ 0 given in the data (Llama 2 §3.2.2); None when the row has none."""
    strength: str | None = None
    """One of STRENGTHS, or None. Kept as given; `margin_of` turns it into a margin."""
    annotator: str | None = None
    source: str | None = None
    chosen_safe: bool | None = None
    """Whether the chosen response is safe (PKU-SafeRLHF's is_response_*_safe), for a cost model's safety
    classifier; None when the row does not say."""
    rejected_safe: bool | None = None
    confidence: float | None = None
    """Probability in [0, 1] that chosen is truly better than rejected (e.g. an annotator-reliability posterior,
    Dawid & Skene 1979): the trainers fit it as a soft target; below 0.5 the row is probably reversed. None when
    the row has none: the label is taken as certain."""
    row: int = field(default=0, compare=False)
    path: str = field(default="", compare=False)

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


@dataclass
class Ranking:
    """K ≥ 2 responses to one prompt ranked by one judgment.

    ranking is a list of tiers, best first; each tier lists the indices of responses tied with each other,
    e.g. [[0], [1, 2], [3]] = 0 ≻ {1, 2} ≻ 3. Every index of `responses` appears exactly once and there are at
    least two tiers. In files a tier of one may be written as a bare index: [0, [2, 1], 3] or [2, 0, 1].
    strength (one of STRENGTHS) labels the whole ranking and is copied to each pair by `ranking_to_pairs`."""

    prompt: Text
    responses: list[Text]
    ranking: list[list[int]]
    strength: str | None = None
    annotator: str | None = None
    source: str | None = None
    row: int = field(default=0, compare=False)
    path: str = field(default="", compare=False)

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


Preference = Union[PreferencePair, Ranking]


def strength_to_margin(strength: str, scale: Literal["large", "small"] = "large") -> float:
    """Llama 2 §3.2.2 (Table 28): significantly_better / better / slightly_better / negligible map to margins
    3, 2, 1, 0 ("large") or 1, 2/3, 1/3, 0 ("small")."""
    if scale not in _MARGINS:
        raise UserError(f"margin scale {scale!r} is unknown; use 'large' or 'small'.")
    if strength not in _MARGINS[scale]:
        raise UserError(f"preference strength {strength!r} is unknown; use one of {', '.join(STRENGTHS)}.")
    return _MARGINS[scale][strength]


def margin_of(pair: PreferencePair, scale: Literal["large", "small"] = "large") -> float | None:
    """The pair's margin: its explicit `margin` if given, else its strength mapped at `scale`, else None."""
    if pair.margin is not None:
        return pair.margin
    if pair.strength is not None:
        return strength_to_margin(pair.strength, scale)
    return None


def ranking_to_pairs(r: Ranking) -> list[PreferencePair]:
    """All C(K, 2) pairs a ranking implies, best tier first; tied responses form no pair."""
    pairs = []
    for t, better in enumerate(r.ranking):
        for worse in r.ranking[t + 1 :]:
            for i in better:
                for j in worse:
                    pairs.append(PreferencePair(r.prompt, r.responses[i], r.responses[j], strength=r.strength,
                                                annotator=r.annotator, source=r.source, row=r.row, path=r.path))
    return pairs


# ------------------------------------------------------------------------------------------------- validation
def _same(a: Text, b: Text) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return a.strip() == b.strip()
    return a == b


def _strength(row: dict[str, Any], path: str, lineno: int) -> str | None:
    value = row.get("strength")
    if value is None:
        return None
    if value not in STRENGTHS:
        raise DataError(path, lineno, "strength", f"unknown strength {value!r}; use one of {', '.join(STRENGTHS)}")
    return value


def _margin(row: dict[str, Any], path: str, lineno: int) -> float | None:
    value = row.get("margin")
    if value is None:
        return None
    value = real_number(value, "margin", path, lineno)
    if not math.isfinite(value) or value < 0:
        raise DataError(path, lineno, "margin", f"must be a finite number >= 0 (how much better chosen is), "
                        f"got {value}")
    return float(value)


def _confidence(row: dict[str, Any], path: str, lineno: int) -> float | None:
    value = row.get("confidence")
    if value is None:
        return None
    value = real_number(value, "confidence", path, lineno)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise DataError(path, lineno, "confidence", f"must be a probability in [0, 1] (that chosen is truly better "
                        f"than rejected), got {value}")
    return float(value)


def score_gap(row: dict[str, Any], path: str, lineno: int) -> float | None:
    """score_chosen - score_rejected of a row that rates both responses (HuggingFaceH4/ultrafeedback_binarized:
    the mean GPT-4 rating of each), else None. A negative gap contradicts the row's own label and is refused."""
    scores = row.get("score_chosen"), row.get("score_rejected")
    if scores == (None, None):
        return None
    for key, value in zip(("score_chosen", "score_rejected"), scores):
        if value is None:
            raise DataError(path, lineno, key, "missing while the other score is given; give both or neither")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DataError(path, lineno, key, f"must be a finite number, got {value!r}")
    gap = float(scores[0]) - float(scores[1])
    if gap < 0:
        raise DataError(path, lineno, "score_rejected", f"is above score_chosen ({scores[1]} > {scores[0]}), so the "
                        "row contradicts its own label; fix the scores or swap chosen and rejected")
    return gap


def _identical_error(path: str, lineno: int) -> DataError:
    return DataError(path, lineno, "rejected", "is identical to chosen, so the pair carries no preference (its "
                     "loss is the constant log 2 with zero gradient); remove the row or fix the labels")


# ------------------------------------------------------------------------------------------------ row parsing
def _split_common_prefix(chosen: str, rejected: str, path: str, lineno: int) -> tuple[str, str, str]:
    """TRL implicit prompt, standard format: the prompt is the longest shared prefix that ends at a word boundary
    (before the whitespace that precedes the first differing word); each response keeps that whitespace, so the
    concatenation prompt + response gives back the original text."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    cut = n
    while cut > 0 and not chosen[cut - 1].isspace():  # back to the start of the first differing word
        cut -= 1
    while cut > 0 and chosen[cut - 1].isspace():  # the separating whitespace goes with the responses
        cut -= 1
    prompt = chosen[:cut]
    if not prompt.strip():
        raise DataError(path, lineno, "prompt", "missing, and chosen and rejected share no leading words to take it "
                        "from; add a 'prompt' field")
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        if not text[cut:].strip():
            raise DataError(path, lineno, key, "is empty after splitting off the prompt shared with the other "
                            "response; add an explicit 'prompt' field")
    return prompt, chosen[cut:], rejected[cut:]


def _is_hh(text: str) -> bool:
    return text.lstrip().startswith("Human:") and HH_ASSISTANT in text


def _hh_messages(transcript: str, key: str, path: str, lineno: int) -> list[Message]:
    """'\\n\\nHuman: a\\n\\nAssistant: b ...' -> [{user: a}, {assistant: b}, ...]."""
    text = transcript if transcript.startswith("\n\n") else "\n\n" + transcript.lstrip()
    parts = re.split(r"\n\n(Human|Assistant):", text)  # ['', 'Human', ' a', 'Assistant', ' b', ...]
    if parts[0].strip():
        raise DataError(path, lineno, key, "an Anthropic HH transcript must start with 'Human:'")
    messages = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        if not content.strip():
            raise DataError(path, lineno, key, f"has an empty {speaker} turn (turn {len(messages) + 1})")
        messages.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    return messages


def _parse_hh(row: dict[str, Any], chosen: str, rejected: str, path: str, lineno: int, chat: bool,
              extras: dict[str, Any]) -> PreferencePair:
    """Anthropic HH: chosen and rejected are whole transcripts; the shared text through the last
    '\\n\\nAssistant:' is the prompt, what follows it is the response. With chat, the transcript becomes
    messages for the tokenizer's template; without (a tokenizer with no template, as with the DPO paper's Pythia
    models on HH), the text stays raw: the prompt ends with that '\\n\\nAssistant:' and each response is the
    rest of its transcript, its leading space kept (the model continues the prompt) and trailing space dropped."""
    prefixes, responses, raw = [], [], []
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        k = text.rfind(HH_ASSISTANT)
        if k < 0 or not _is_hh(text):
            raise DataError(path, lineno, key, "is not an Anthropic HH transcript ('\\n\\nHuman: ...\\n\\nAssistant: "
                            "...') although the other response is")
        response = text[k + len(HH_ASSISTANT) :].strip()
        if not response:
            raise DataError(path, lineno, key, "the final Assistant turn is empty")
        prefixes.append(text[:k])
        responses.append(response)
        raw.append(text[k + len(HH_ASSISTANT) :].rstrip())
    if prefixes[0] != prefixes[1]:
        raise DataError(path, lineno, "rejected", "the conversation before the last Assistant turn differs from "
                        "chosen's; an HH pair must share it")
    if responses[0] == responses[1]:
        raise _identical_error(path, lineno)
    if not chat:
        return PreferencePair(prefixes[0] + HH_ASSISTANT, raw[0], raw[1], **extras)
    prompt = _hh_messages(prefixes[0], "chosen", path, lineno)
    return PreferencePair(prompt, [{"role": "assistant", "content": responses[0]}],
                          [{"role": "assistant", "content": responses[1]}], **extras)


def _extras(row: dict[str, Any], path: str, lineno: int, margin_from_scores: bool = False) -> dict[str, Any]:
    margin = _margin(row, path, lineno)
    gap = score_gap(row, path, lineno)
    if gap == 0:
        raise DataError(path, lineno, "score_rejected", f"equals score_chosen ({row['score_chosen']}): a tie, so "
                        "the pair carries no preference; set preference_ties: drop (--preference-ties drop) to leave "
                        "ties out, counted and logged")
    if margin_from_scores and gap is not None:
        if margin is not None:
            raise DataError(path, lineno, "margin", "is given as well as score_chosen/score_rejected while "
                            "margin_from_scores is on; keep one of them")
        margin = gap
    return dict(margin=margin, strength=_strength(row, path, lineno), confidence=_confidence(row, path, lineno),
                annotator=optional_text(row, "annotator", path, lineno),
                source=optional_text(row, "source", path, lineno),
                chosen_safe=_safety_label(row, "chosen_safe", path, lineno),
                rejected_safe=_safety_label(row, "rejected_safe", path, lineno), row=lineno, path=path)


def _safety_label(row: dict[str, Any], key: str, path: str, lineno: int) -> bool | None:
    value = row.get(key)
    if value is None or isinstance(value, bool):
        return value
    raise DataError(path, lineno, key, f"must be true or false (is the response safe?), got {value!r}")


def _split_conversations(prompt: str, chosen: Any, rejected: Any, path: str, lineno: int
                         ) -> tuple[list[Message], list[Message], list[Message]]:
    """HuggingFaceH4/ultrafeedback_binarized: a string prompt, and chosen/rejected as whole conversations that
    begin with it. The messages both share are the prompt, the rest (from the assistant turn where they first
    differ) the responses. The string must be the first user turn; a row where it is not is refused, not
    guessed at."""
    c, r = message_list(chosen, "chosen", path, lineno), message_list(rejected, "rejected", path, lineno)
    if c == r:
        raise _identical_error(path, lineno)
    n = 0
    while n < min(len(c), len(r)) and c[n] == r[n]:
        n += 1
    if n == 0:
        raise DataError(path, lineno, "rejected[0]", "differs from chosen[0]; two full conversations must begin with "
                        "the same prompt turns")
    for key, msgs in (("chosen", c), ("rejected", r)):
        if n == len(msgs) or msgs[n]["role"] != "assistant":
            what = "ends" if n == len(msgs) else f"continues with a {msgs[n]['role']} turn"
            raise DataError(path, lineno, f"{key}[{n}]", f"the conversations share {n} messages and {key} then "
                            f"{what}; a pair's conversations must first differ at an assistant turn")
    first_user = next((m["content"] for m in c[:n] if m["role"] == "user"), None)
    if first_user is None or first_user.strip() != prompt.strip():
        raise DataError(path, lineno, "prompt", "is not the first user turn of chosen and rejected (the full "
                        "conversations must begin with it); fix the row, or remove its prompt field to take the "
                        "prompt from the turns the conversations share")
    return c[:n], c[n:], r[n:]


def parse_pair(row: dict[str, Any], path: str, lineno: int, *, chat: bool = True,
               margin_from_scores: bool = False) -> PreferencePair:
    """A TRL (explicit or implicit prompt, standard or conversational), UltraFeedback (string prompt, full
    conversations) or Anthropic HH row -> PreferencePair. chat: whether the tokenizer has a chat template (HH
    transcripts stay raw text without one). margin_from_scores: margin = score_chosen - score_rejected. A row
    whose two scores are equal (a tie) is refused."""
    fields = sorted(row)
    chosen, rejected = row.get("chosen"), row.get("rejected")
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if value is None:
            raise DataError(path, lineno, key, f"missing; a preference pair needs chosen and rejected (this row has "
                            f"fields {fields})")
    extras = _extras(row, path, lineno, margin_from_scores)
    if row.get("prompt") is not None:  # explicit prompt
        prompt = prompt_text(row["prompt"], path, lineno, fields)
        full = [isinstance(v, list) and v and isinstance(v[0], dict) and v[0].get("role") != "assistant"
                for v in (chosen, rejected)]
        if isinstance(prompt, str) and all(full):
            return PreferencePair(*_split_conversations(prompt, chosen, rejected, path, lineno), **extras)
        chosen = response_text(prompt, chosen, "chosen", path, lineno, fields)
        rejected = response_text(prompt, rejected, "rejected", path, lineno, fields)
        if _same(chosen, rejected):
            raise _identical_error(path, lineno)
        return PreferencePair(prompt, chosen, rejected, **extras)
    like = prompt_like(row)
    if like:  # the shared leading words of two answers are not the prompt when the row names one
        raise DataError(path, lineno, "prompt", f"missing, so it would be taken from what chosen and rejected share"
                        f"{prompt_hint(row)}")
    if isinstance(chosen, list) or isinstance(rejected, list):  # implicit prompt, conversational
        chosen_msgs = message_list(chosen, "chosen", path, lineno)
        if not isinstance(rejected, list):
            raise DataError(path, lineno, "rejected", f"must be a list of messages like chosen, got "
                            f"{type(rejected).__name__}")
        rejected_msgs = message_list(rejected, "rejected", path, lineno)
        for key, msgs in (("chosen", chosen_msgs), ("rejected", rejected_msgs)):
            if msgs[-1]["role"] != "assistant":
                raise DataError(path, lineno, f"{key}[{len(msgs) - 1}].role", "the last message must be the "
                                "assistant response (implicit-prompt conversational format)")
            if len(msgs) < 2:
                raise DataError(path, lineno, key, "has no prompt messages before the final assistant turn; "
                                "add a 'prompt' field")
        if chosen_msgs[:-1] != rejected_msgs[:-1]:
            raise DataError(path, lineno, "rejected", "the messages before the last assistant turn differ from "
                            "chosen's; the prompt must be the same for both")
        if chosen_msgs[-1] == rejected_msgs[-1]:
            raise _identical_error(path, lineno)
        return PreferencePair(chosen_msgs[:-1], chosen_msgs[-1:], rejected_msgs[-1:], **extras)
    chosen = required_text(chosen, "chosen", path, lineno, fields)
    rejected = required_text(rejected, "rejected", path, lineno, fields)
    if _is_hh(chosen) or _is_hh(rejected):
        return _parse_hh(row, chosen, rejected, path, lineno, chat, extras)
    if _same(chosen, rejected):
        raise _identical_error(path, lineno)
    prompt, chosen, rejected = _split_common_prefix(chosen, rejected, path, lineno)
    return PreferencePair(prompt, chosen, rejected, **extras)


def _tiers(value: Any, k: int, path: str, lineno: int) -> list[list[int]]:
    if not isinstance(value, list):
        raise DataError(path, lineno, "ranking", f"must be a list of response indices best first, got "
                        f"{type(value).__name__}")
    tiers = []
    for entry in value:
        tier = entry if isinstance(entry, list) else [entry]
        if not tier or any(isinstance(i, bool) or not isinstance(i, int) for i in tier):
            raise DataError(path, lineno, "ranking", f"entries must be response indices or non-empty lists of tied "
                            f"indices, got {entry!r}")
        tiers.append(list(tier))
    flat = [i for tier in tiers for i in tier]
    if sorted(flat) != list(range(k)):
        raise DataError(path, lineno, "ranking", f"{value} is not a permutation of the response indices "
                        f"0..{k - 1}; rank every response exactly once")
    if len(tiers) < 2:
        raise DataError(path, lineno, "ranking", "ties every response, so it holds no preference")
    return tiers


def parse_ranking(row: dict[str, Any], path: str, lineno: int) -> Ranking:
    """A K-way row {"prompt", "responses": [...], "ranking": [...]} -> Ranking."""
    fields = sorted(row)
    prompt = prompt_text(row.get("prompt"), path, lineno, fields)
    responses = row.get("responses")
    if responses is None:
        raise DataError(path, lineno, "responses", f"missing; this row has fields {fields}")
    if not isinstance(responses, list):
        raise DataError(path, lineno, "responses", f"must be a list, got {type(responses).__name__}")
    if len(responses) < 2:
        raise DataError(path, lineno, "responses", f"has {len(responses)} response(s); a ranking needs at least 2")
    responses = [response_text(prompt, r, f"responses[{i}]", path, lineno, fields) for i, r in enumerate(responses)]
    if row.get("ranking") is None:
        raise DataError(path, lineno, "ranking", f"missing; this row has fields {fields}")
    tiers = _tiers(row["ranking"], len(responses), path, lineno)
    tier_of = {i: t for t, tier in enumerate(tiers) for i in tier}
    for i in range(len(responses)):
        for j in range(i + 1, len(responses)):
            if tier_of[i] != tier_of[j] and _same(responses[i], responses[j]):
                raise DataError(path, lineno, f"responses[{j}]", f"is identical to responses[{i}] but ranked "
                                "differently; identical responses can only be tied")
    if row.get("margin") is not None:
        raise DataError(path, lineno, "margin", "is not supported on a ranking row; use 'strength'")
    if row.get("confidence") is not None:
        raise DataError(path, lineno, "confidence", "is not supported on a ranking row (one probability cannot "
                        "qualify all its C(K, 2) pairs); write the ranking as pair rows, each with its confidence, or "
                        "drop the column")
    return Ranking(prompt, responses, tiers, strength=_strength(row, path, lineno),
                   annotator=optional_text(row, "annotator", path, lineno),
                   source=optional_text(row, "source", path, lineno), row=lineno, path=path)


def parse_preference(row: dict[str, Any], path: str, lineno: int, *, chat: bool = True,
                     margin_from_scores: bool = False) -> Preference:
    """Any supported row shape -> PreferencePair or Ranking (a row with responses or ranking is a ranking);
    chat and margin_from_scores as in `parse_pair`."""
    refuse_message_tree_row(row, path, lineno)
    if row.get("responses") is not None or row.get("ranking") is not None:
        return parse_ranking(row, path, lineno)
    if row.get("chosen") is None and row.get("rejected") is None:
        raise DataError(path, lineno, "chosen", f"missing; a preference row needs chosen and rejected (TRL, "
                        f"Anthropic HH) or responses and ranking (K-way); this row has fields {sorted(row)}")
    return parse_pair(row, path, lineno, chat=chat, margin_from_scores=margin_from_scores)


def untied_rows(path: str, split: str | None, ties: Literal["error", "drop"]) -> list[tuple[int, dict[str, Any]]]:
    """The rows of path; with ties="drop", without the rows whose score_chosen equals score_rejected, which are
    counted and logged with their row numbers (with "error" they stay, and parsing refuses them)."""
    if ties not in ("error", "drop"):
        raise UserError(f"preference_ties must be 'error' or 'drop', got {ties!r}.")
    rows = read_rows(path, split)
    if ties == "error":
        return rows
    kept = [(n, row) for n, row in rows if score_gap(row, str(path), n) != 0]
    if len(kept) < len(rows):
        tied = sorted({n for n, _ in rows} - {n for n, _ in kept})
        log.warning("%s: left out %d of %d rows whose score_chosen equals score_rejected (preference_ties: drop): "
                    "rows %s%s", path, len(tied), len(rows), tied[:20], " ..." if len(tied) > 20 else "")
    return kept


def criterion_rows(rows: list[tuple[int, dict[str, Any]]], path: str, criterion: str | None
                   ) -> list[tuple[int, dict[str, Any]]]:
    """The rows judged on `criterion` (a rubric export's `criterion` column). Without a criterion, a file whose
    rows name more than one is refused: mixing "more helpful" with "more harmless" would train one reward model on
    contradicting labels."""
    named = sorted({str(row["criterion"]) for _, row in rows if row.get("criterion") is not None})
    if not criterion:
        if len(named) > 1:
            raise UserError(f"{path}: the rows are judged on several criteria ({', '.join(named)}); train one reward "
                            f"model per criterion with --criterion NAME (e.g. --criterion {named[0]}).")
        return rows
    if not named:
        raise UserError(f"{path}: --criterion {criterion} asks for the rows of one criterion, but no row has a "
                        "criterion column; drop --criterion, or export the rubric project's judgments again.")
    kept = [(n, row) for n, row in rows if row.get("criterion") == criterion]
    if not kept:
        raise UserError(f"{path}: no row is judged on criterion {criterion!r}; the file has {', '.join(named)}.")
    unnamed = [n for n, row in rows if row.get("criterion") is None]
    if unnamed:
        raise DataError(path, unnamed[0], "criterion", f"missing, while other rows name theirs; {len(unnamed)} rows "
                        "have none: give every row its criterion, or none")
    return kept


def read_preferences(path: str, split: str | None = None, *, chat: bool = True,
                     ties: Literal["error", "drop"] = "error", margin_from_scores: bool = False,
                     criterion: str | None = None) -> list[Preference]:
    """Read every row of a JSONL / JSON / Parquet file or `datasets` directory as a PreferencePair or Ranking
    (path may be a DataPath, bringing its split and column mapping). A bad row raises DataError naming file, row,
    field and reason; no row is dropped, except ties with ties="drop" (see `untied_rows`) and, with a criterion,
    the rows of the other criteria (`criterion_rows`). chat and margin_from_scores as in `parse_pair`."""
    rows = criterion_rows(untied_rows(path, split, ties), str(path), criterion)
    return [parse_preference(row, str(path), lineno, chat=chat, margin_from_scores=margin_from_scores)
            for lineno, row in rows]


# ------------------------------------------------------------------------------------------------------ writer
def _pair_row(p: PreferencePair) -> dict[str, Any]:
    row: dict[str, Any] = {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
    for key in ("margin", "strength", "confidence", "annotator", "source"):
        if getattr(p, key) is not None:
            row[key] = getattr(p, key)
    return row


def _ranking_row(r: Ranking) -> dict[str, Any]:
    tied = any(len(t) > 1 for t in r.ranking)
    row: dict[str, Any] = {"prompt": r.prompt, "responses": r.responses,
                           "ranking": [list(t) for t in r.ranking] if tied else [t[0] for t in r.ranking]}
    for key in ("strength", "annotator", "source"):
        if getattr(r, key) is not None:
            row[key] = getattr(r, key)
    return row


def write_preferences(records: list[Preference], path: str | Path) -> Path:
    """Write JSONL: a PreferencePair as TRL's explicit-prompt format (prompt/chosen/rejected, plus margin,
    strength, confidence, annotator and source when set); a Ranking as our K-way row (expand it first with
    `ranking_to_pairs` for tools that only read pairs)."""
    p = Path(path)
    if p.suffix.lower() not in (".jsonl", ".ndjson"):
        raise UserError(f"{path}: preference data is written as JSON Lines; use a .jsonl file name.")
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as fh:
        for rec in records:
            row = _pair_row(rec) if isinstance(rec, PreferencePair) else _ranking_row(rec)
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return p
