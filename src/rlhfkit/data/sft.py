"""SFT examples: prompt/completion (plain or conversational), `messages` chats and plain `text`, tokenised with
a loss mask that covers only what the model should learn to write; collation with right padding; packing.

loss_mask[t] = 1 means token t is a target (the model is trained to predict it from tokens < t)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from rlhfkit.data.encoding import encode_prompt, encode_response, render_messages
from rlhfkit.data.formats import prompt_hint, refuse_message_tree_row, sharegpt_messages, tool_calls, tools_of
from rlhfkit.data.packing import block_diagonal_mask
from rlhfkit.data.readers import read_rows
from rlhfkit.errors import DataError, UserError

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")


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


def _text(row: dict[str, Any], key: str, path: str, lineno: int) -> str:
    value = row.get(key)
    if value is None:
        raise DataError(path, lineno, key, f"missing; this row has fields {sorted(row)}")
    if not isinstance(value, str):
        raise DataError(path, lineno, key, f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(path, lineno, key, "is empty")
    return value


def _messages(value: Any, key: str, path: str, lineno: int) -> list[dict[str, Any]]:
    """Validated chat messages {role, content}, keeping what tool use adds (TRL's tool-calling format): an
    assistant message's `tool_calls` (its content may then be empty or None), a message's `name` and a tool
    message's `tool_call_id`. An empty system message is kept (some data sets write one on every row)."""
    if not isinstance(value, list) or not value:
        raise DataError(path, lineno, key, "must be a non-empty list of {role, content} messages")
    out = []
    for j, msg in enumerate(value):
        where = f"{key}[{j}]"
        calls = msg.get("tool_calls") if isinstance(msg, dict) else None
        if not isinstance(msg, dict) or "role" not in msg or ("content" not in msg and not calls):
            raise DataError(path, lineno, where, "each message must be an object with 'role' and 'content'")
        role, content = msg["role"], msg.get("content")
        if role not in ROLES:
            raise DataError(path, lineno, f"{where}.role", f"unknown role {role!r}; use one of {ROLES}")
        if calls:  # Parquet gives a message without tool calls tool_calls None or []
            if role != "assistant":
                raise DataError(path, lineno, f"{where}.tool_calls", "only an assistant message makes tool calls")
            if content is not None and not isinstance(content, str):
                raise DataError(path, lineno, f"{where}.content", "must be a string (or empty beside tool_calls)")
        elif not isinstance(content, str) or (not content.strip() and role != "system"):
            raise DataError(path, lineno, f"{where}.content", "must be a non-empty string")
        out.append({"role": role, "content": content or ""})
        if calls:
            out[-1]["tool_calls"] = tool_calls(calls, f"{where}.tool_calls", path, lineno)
        for extra in ("name", "tool_call_id"):
            if isinstance(msg.get(extra), str) and msg[extra]:
                out[-1][extra] = msg[extra]
    return out


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
        msgs = _messages(row[key] if key == "messages" else sharegpt_messages(row[key], key, path, lineno), key,
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
            prompt = _messages(row["prompt"], "prompt", path, lineno)
            completion = _messages(row["completion"], "completion", path, lineno)
            if completion[0]["role"] != "assistant":
                raise DataError(path, lineno, "completion[0].role", "a conversational completion starts with "
                                "an assistant message")
            return tokenize_chat(tokenizer, prompt + completion, train_from=len(prompt),
                                 tools=tools_of(row, path, lineno))
        prompt_text = _text(row, "prompt", path, lineno)
        completion_text = _text(row, "completion", path, lineno)
        # prompt and completion are tokenised separately, so the boundary is exact (no merge across it), by the
        # rule every stage shares (a string prompt is plain text; the completion ends at its first EOS)
        prompt_ids = encode_prompt(tokenizer, prompt_text)
        completion_ids = encode_response(tokenizer, prompt_text, completion_text)
        return prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids)
    if "text" in row:
        ids = tokenizer(_text(row, "text", path, lineno), add_special_tokens=True)["input_ids"]
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


def collate_sft(examples: list[SFTExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch. Returns input_ids, attention_mask (1 = real), loss_mask (1 = target): each (B, T)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, T)
    attn = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
    loss = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        attn[i, :n] = 1
        loss[i, :n] = torch.tensor(e.loss_mask)
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


@dataclass
class PackedRow:
    """Several examples laid end to end in one row; they never attend to each other."""

    examples: list[SFTExample]

    @property
    def length(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)


def pack_examples(examples: list[SFTExample], max_length: int) -> list[PackedRow]:
    """First-fit packing in data order; an example is never split across rows."""
    rows: list[PackedRow] = []
    for ex in examples:
        for row in rows:
            if row.length + len(ex.input_ids) <= max_length:
                row.examples.append(ex)
                break
        else:
            rows.append(PackedRow([ex]))
    return rows


def collate_packed(rows: list[PackedRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Packed batch with a block-diagonal causal mask so examples sharing a row stay independent, and positions
    restarting at 0 for each example. attention_mask is additive float (B, 1, T, T): 0 = may attend
    (`packing.block_diagonal_mask`)."""
    width = max(r.length for r in rows)
    B = len(rows)
    ids = torch.full((B, width), pad_id, dtype=torch.long)  # (B, T)
    loss = torch.zeros((B, width), dtype=torch.long)  # (B, T)
    pos = torch.zeros((B, width), dtype=torch.long)  # (B, T)
    segment = torch.full((B, width), -1, dtype=torch.long)  # (B, T), -1 = padding
    for i, row in enumerate(rows):
        at = 0
        for j, e in enumerate(row.examples):
            n = len(e.input_ids)
            ids[i, at : at + n] = torch.tensor(e.input_ids)
            loss[i, at : at + n] = torch.tensor(e.loss_mask)
            pos[i, at : at + n] = torch.arange(n)
            segment[i, at : at + n] = j
            at += n
    return {"input_ids": ids, "attention_mask": block_diagonal_mask(segment), "position_ids": pos, "loss_mask": loss}
