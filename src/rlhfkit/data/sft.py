"""SFT examples: prompt/completion (plain or conversational), `messages` chats and plain `text`, tokenised with
a loss mask that covers only what the model should learn to write (`data.collate` batches and packs them).

loss_mask[t] = 1 means token t is a target (the model is trained to predict it from tokens < t)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from rlhfkit.data.encoding import encode_prompt, encode_response, render_messages
from rlhfkit.data.formats import prompt_hint, refuse_message_tree_row, sharegpt_messages, tools_of
from rlhfkit.data.readers import read_rows
from rlhfkit.data.rows import message_list, required_text, response_messages
from rlhfkit.errors import DataError, UserError

log = logging.getLogger(__name__)


@dataclass
class SFTExample:
    input_ids: list[int]
    loss_mask: list[int]
    row: int = 0
    """1-based row in the source file, for error messages and reports."""


@dataclass
class SFTReport:
    """What reading a file did to its rows (nothing is dropped silently)."""

    path: str
    rows: int = 0
    truncated: int = 0
    truncated_rows: list[int] = field(default_factory=list)


def tokenize_chat(tokenizer: Any, messages: list[dict[str, Any]], train_from: int = 0, tools: Any = None
                  ) -> tuple[list[int], list[int]]:
    """Render the conversation once and mark the assistant turns at index >= train_from as targets: each turn
    through its first EOS (`data.encoding`'s rule: what a template writes after EOS, such as ChatML's newline
    after `<|im_end|>`, is not learned, and after the final turn it is not kept). The text is tokenised piece by
    piece at the turn boundaries, so the ids before a turn are the prompt ids the policy is given at generation
    time (`encode_prompt`), with no BPE merge across a boundary."""
    full = render_messages(tokenizer, messages, add_generation_prompt=False, tools=tools)
    spans: list[tuple[int, int]] = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant" or i < train_from:
            continue
        if i == 0:
            raise UserError("the conversation starts with an assistant turn, so there is no prompt it answers; "
                            "start it with a user (or system) message.")
        before = render_messages(tokenizer, messages[:i], add_generation_prompt=True, tools=tools)
        through = render_messages(tokenizer, messages[: i + 1], add_generation_prompt=False, tools=tools)
        if not full.startswith(before) or not full.startswith(through) or len(through) < len(before):
            raise UserError("the tokenizer's chat template is not prefix-stable (rendering the first turns is not "
                            "a prefix of rendering all of them), so assistant turns cannot be located.")
        spans.append((len(before), len(through)))

    def encode(text: str) -> list[int]:
        # the template supplies any BOS itself; add_special_tokens=False avoids a doubled BOS
        return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    eos = tokenizer.eos_token_id
    ids: list[int] = []
    mask: list[int] = []
    at = 0
    for start, end in spans:
        context = encode(full[at:start])
        turn = encode(full[start:end])
        n = turn.index(eos) + 1 if eos in turn else len(turn)  # the turn's targets end at its first EOS
        if end == len(full):
            turn = turn[:n]  # nothing follows the last turn: what the template writes after EOS is dropped
        ids += context + turn
        mask += [0] * len(context) + [1] * n + [0] * (len(turn) - n)
        at = end
    tail = encode(full[at:])
    return ids + tail, mask + [0] * len(tail)


def encode_row(tokenizer: Any, row: dict[str, Any], path: str, lineno: int) -> tuple[list[int], list[int]]:
    """One data row -> (input_ids, loss_mask). Chats come as `messages` (TRL) or ShareGPT `conversations`
    ({from, value} turns, with LLaMA-Factory's optional `system` column); a `tools` column goes to the template."""
    eos = tokenizer.eos_token_id
    refuse_message_tree_row(row, path, lineno)
    if "messages" in row or "conversations" in row:
        key = "messages" if "messages" in row else "conversations"
        msgs = message_list(row[key] if key == "messages" else sharegpt_messages(row[key], key, path, lineno), key,
                            path, lineno)
        system = row.get("system") if key == "conversations" else None
        if isinstance(system, str) and system.strip():
            if msgs[0]["role"] == "system":
                raise DataError(path, lineno, "system", "is given, but conversations already starts with a system "
                                "turn; keep one of them")
            msgs = [{"role": "system", "content": system}] + msgs
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(path, lineno, key, "has no assistant message to learn from")
        return tokenize_chat(tokenizer, msgs, tools=tools_of(row, path, lineno))
    if "prompt" in row and "completion" in row:
        if isinstance(row["prompt"], list) or isinstance(row["completion"], list):
            prompt = message_list(row["prompt"], "prompt", path, lineno)
            completion = response_messages(row["completion"], "completion", path, lineno, what="completion")
            return tokenize_chat(tokenizer, prompt + completion, train_from=len(prompt),
                                 tools=tools_of(row, path, lineno))
        prompt_text = required_text(row["prompt"], "prompt", path, lineno, sorted(row))
        completion_text = required_text(row["completion"], "completion", path, lineno, sorted(row))
        # prompt and completion are tokenised separately, so the boundary is exact (no merge across it), by the
        # rule every stage shares (a string prompt is plain text; the completion ends at its first EOS)
        prompt_ids = encode_prompt(tokenizer, prompt_text)
        completion_ids = encode_response(tokenizer, prompt_text, completion_text)
        return prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids)
    if "text" in row:
        ids = tokenizer(required_text(row["text"], "text", path, lineno, sorted(row)),
                        add_special_tokens=True)["input_ids"]
        if ids[-1] != eos:  # a document already ending in EOS (a chat transcript) gets no second one
            ids.append(eos)
        return ids, [1] * len(ids)
    missing = "completion" if "prompt" in row else "prompt"
    raise DataError(path, lineno, missing, "missing; an SFT row needs prompt+completion, messages, or text "
                    f"(this row has fields {sorted(row)}){prompt_hint(row) if missing == 'prompt' else ''}")


def read_sft_examples(
    path: str, tokenizer: Any, max_length: int, overlong: Literal["error", "truncate"] = "error"
) -> tuple[list[SFTExample], SFTReport]:
    report = SFTReport(path=path)
    examples: list[SFTExample] = []
    for lineno, row in read_rows(path):
        ids, mask = encode_row(tokenizer, row, path, lineno)
        mask[0] = 0  # the first token has no context inside its example (also keeps packed examples apart)
        if len(ids) > max_length:
            if overlong == "error":
                raise DataError(path, lineno, None, f"is {len(ids)} tokens, longer than max_length {max_length}; "
                                "raise max_length or set overlong: truncate")
            ids, mask = ids[:max_length], mask[:max_length]
            report.truncated += 1
            report.truncated_rows.append(lineno)
        if sum(mask) == 0:
            raise DataError(path, lineno, None, f"has no completion tokens within max_length {max_length}; "
                            "shorten the prompt or raise max_length")
        examples.append(SFTExample(ids, mask, lineno))
    report.rows = len(examples)
    if report.truncated:
        log.warning("%s: truncated %d of %d rows to max_length %d (rows %s%s)", path, report.truncated,
                    report.rows, max_length, report.truncated_rows[:10], "..." if report.truncated > 10 else "")
    return examples, report
