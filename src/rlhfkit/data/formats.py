"""Row shapes of public data sets brought to the ones our parsers read: column renaming (`data_fields`),
ShareGPT conversations and tool calls as chat messages, and the checks that refuse a shape we would misread."""

from __future__ import annotations

import json
from typing import Any

from rlhfkit.errors import ConfigError, DataError

PROMPT_LIKE = ("instruction", "question", "query", "input", "history", "post", "system")
"""Columns that hold a prompt under another name (argilla/distilabel-intel-orca-dpo-pairs: system + input;
stanfordnlp/SHP: history). A row with one of them and no `prompt` is refused rather than given a prompt guessed
from the words its two responses share."""

FIELD_NAMES = ("prompt", "chosen", "rejected", "completion", "label", "messages", "conversations", "text", "system",
               "tools", "responses", "ranking", "margin", "strength", "annotator", "source", "score_chosen",
               "score_rejected")
"""Columns `data_fields` may fill: the ones our readers look for."""

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "function_call": "assistant", "tool": "tool", "observation": "tool"}
"""ShareGPT `from` -> chat role. function_call / observation are LLaMA-Factory's ShareGPT tool turns: a JSON call
{"name", "arguments"} made by the assistant and the tool's answer."""


# ------------------------------------------------------------------------------------------- column mapping
def check_fields(fields: dict[str, str]) -> None:
    """ConfigError unless fields maps our column names to non-empty source column names."""
    for target, source in fields.items():
        if target not in FIELD_NAMES:
            raise ConfigError(f"data_fields maps unknown column '{target}'; the left side of each pair is one of "
                              f"{', '.join(FIELD_NAMES)} (e.g. --data-fields prompt=input).")
        if not isinstance(source, str) or not source.strip():
            raise ConfigError(f"data_fields: '{target}' needs a source column name (e.g. {target}=input), got "
                              f"{source!r}.")


def map_fields(row: dict[str, Any], fields: dict[str, str], path: str, lineno: int) -> dict[str, Any]:
    """The row with each source column renamed to its target (a mapped column replaces any column already named
    like its target). A mapped `system` becomes the prompt's system message, see `_fold_system`."""
    missing = sorted({s for s in fields.values() if s not in row})
    if missing:
        pairs = ",".join(f"{t}={s}" for t, s in fields.items())
        raise DataError(path, lineno, missing[0], f"missing, but --data-fields {pairs} reads it; this row has fields "
                        f"{sorted(row)}")
    out = {k: v for k, v in row.items() if k not in fields.values()}
    for target, source in fields.items():
        out[target] = row[source]
    if "system" in fields:
        return _fold_system(out, fields["system"], path, lineno)
    return out


def _fold_system(row: dict[str, Any], source: str, path: str, lineno: int) -> dict[str, Any]:
    """Put the system text before the prompt as a system message. A string prompt becomes [system, user] and
    string responses become assistant messages, so the row is conversational (rendered by the chat template): a
    system prompt has no place in plain text. An empty system text gives no system message, but the row is still
    made conversational, so every row of a file has the same format."""
    system = row.pop("system")
    if system is not None and not isinstance(system, str):
        raise DataError(path, lineno, source, f"is mapped to system and must be a string, got {type(system).__name__}")
    head = [{"role": "system", "content": system}] if system and system.strip() else []
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        return as_chat(row, head)
    key = "prompt" if isinstance(prompt, list) else next(
        (k for k in ("messages", "conversations") if isinstance(row.get(k), list)), None)
    if key is None:
        raise DataError(path, lineno, source, "is mapped to system, but the row has no prompt or messages to put it "
                        "before; map the prompt column too (e.g. --data-fields prompt=input,system=system)")
    first = row[key][0] if row[key] else None
    if head and isinstance(first, dict) and "system" in (first.get("role"), first.get("from")):
        raise DataError(path, lineno, source, f"is mapped to system, but {key} already starts with a system message; "
                        "keep one of them")
    row[key] = head + row[key]
    return row


def as_chat(row: dict[str, Any], head: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """A row whose prompt is a string, made conversational: the prompt one user turn (after `head`, e.g. a system
    message), string responses (chosen, rejected, completion, response, each of responses) the assistant's turn.
    Rows without a string prompt (already conversational, HH transcripts, plain text) are returned as they are."""
    if not isinstance(row.get("prompt"), str):
        return row
    row = dict(row)
    row["prompt"] = list(head or []) + [{"role": "user", "content": row["prompt"]}]
    for key in ("chosen", "rejected", "completion", "response"):
        if isinstance(row.get(key), str):
            row[key] = [{"role": "assistant", "content": row[key]}]
    if isinstance(row.get("responses"), list):
        row["responses"] = [[{"role": "assistant", "content": r}] if isinstance(r, str) else r
                            for r in row["responses"]]
    return row


# ------------------------------------------------------------------------------------------------ refusals
def prompt_like(fields: Any) -> list[str]:
    """The prompt-like columns among fields (a row or its column names), in PROMPT_LIKE order; for a row, only
    the columns that hold a value (Parquet gives absent columns as None)."""
    if isinstance(fields, dict):
        return [c for c in PROMPT_LIKE if fields.get(c) is not None]
    return [c for c in PROMPT_LIKE if c in fields]


def prompt_hint(fields: Any) -> str:
    """'; the row has a prompt-like column ... map it with --data-fields ...' for a missing-prompt error, or ''."""
    like = prompt_like(fields)
    if not like:
        return ""
    main = next((c for c in like if c != "system"), "system")
    fix = f"prompt={main}" + (",system=system" if "system" in like and main != "system" else "")
    names = " and ".join(f"'{c}'" for c in like)
    return f"; the row has prompt-like column(s) {names}: name the prompt with --data-fields {fix}"


def refuse_message_tree_row(row: dict[str, Any], path: str, lineno: int) -> None:
    """OpenAssistant/oasst1 ships one message per row (message_id, parent_id, role prompter/assistant, text,
    rank) forming conversation trees; read as rows they would train every message as a document of its own."""
    if "message_id" in row and "parent_id" in row and ("text" in row or "role" in row):
        raise DataError(path, lineno, "message_id", "this is an OpenAssistant message row (one message of a "
                        "conversation tree), not a training example; build conversations and ranked pairs from the "
                        "trees with `rlhfkit data convert oasst1` and train on its output")


# ----------------------------------------------------------------------------------------- chat conversions
def sharegpt_messages(value: Any, key: str, path: str, lineno: int) -> list[dict[str, Any]]:
    """ShareGPT `conversations` [{"from": "human", "value": ...}, {"from": "gpt", ...}] as chat messages (left
    for the caller to validate). Turns already written as {role, content} pass through."""
    if not isinstance(value, list) or not value:
        raise DataError(path, lineno, key, "must be a non-empty list of {from, value} turns (ShareGPT)")
    out = []
    for j, turn in enumerate(value):
        where = f"{key}[{j}]"
        if isinstance(turn, dict) and "role" in turn:
            out.append(turn)
            continue
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(path, lineno, where, "each ShareGPT turn must be an object with 'from' and 'value'")
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise DataError(path, lineno, f"{where}.from", f"unknown speaker {turn['from']!r}; use one of "
                            f"{', '.join(SHAREGPT_ROLES)}")
        if turn["from"] == "function_call":
            out.append({"role": "assistant", "content": "",
                        "tool_calls": _sharegpt_call(turn["value"], f"{where}.value", path, lineno)})
        else:
            out.append({"role": role, "content": turn["value"]})
    return out


def _sharegpt_call(value: Any, where: str, path: str, lineno: int) -> list[dict[str, Any]]:
    try:
        call = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError:
        call = None
    calls = call if isinstance(call, list) else [call]
    if not all(isinstance(c, dict) and "name" in c for c in calls):
        raise DataError(path, lineno, where, 'a function_call turn holds JSON {"name": ..., "arguments": {...}} '
                        f"(or a list of them), got {value!r}")
    return [{"type": "function", "function": {"name": c["name"], "arguments": c.get("arguments", {})}}
            for c in calls]


def tool_calls(value: Any, where: str, path: str, lineno: int) -> list[dict[str, Any]]:
    """An assistant message's tool_calls in the form chat templates read (TRL's and transformers' tool-use
    format): [{"type": "function", "function": {"name": str, "arguments": dict}}]; arguments given as a JSON
    string (OpenAI's API does) are parsed, since templates serialise the dict themselves."""
    if not isinstance(value, list):
        raise DataError(path, lineno, where, "must be a list of tool calls")
    out = []
    for i, call in enumerate(value):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise DataError(path, lineno, f"{where}[{i}]", 'each tool call must be {"type": "function", "function": '
                            '{"name": ..., "arguments": {...}}}')
        raw = fn.get("arguments")
        args = {} if raw is None else raw
        if isinstance(raw, str):
            try:
                args = json.loads(raw) if raw.strip() else {}
            except json.JSONDecodeError:
                pass  # left a string: refused just below
        if not isinstance(args, dict):
            raise DataError(path, lineno, f"{where}[{i}].function.arguments", "must be an object of argument "
                            f"values (or a JSON string of one), got {raw!r}")
        entry: dict[str, Any] = {"type": call.get("type") or "function",
                                 "function": {"name": fn["name"], "arguments": args}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        out.append(entry)
    return out


def tools_of(row: dict[str, Any], path: str, lineno: int) -> list[dict[str, Any]] | None:
    """The row's `tools` column (function schemas for apply_chat_template(tools=...)), or None. A JSON string
    (how LLaMA-Factory's ShareGPT and many Parquet exports store it) is parsed."""
    value = row.get("tools")
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(path, lineno, "tools", "is a string but not JSON; give a list of tool schemas "
                            '({"type": "function", "function": {"name", "description", "parameters"}})') from None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise DataError(path, lineno, "tools", "must be a list of tool schemas ({\"type\": \"function\", "
                        "\"function\": {...}}), as apply_chat_template(tools=...) takes them")
    return value or None
