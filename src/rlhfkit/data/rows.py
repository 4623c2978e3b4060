"""Checks on the fields of one data row, shared by the SFT, preference and KTO readers: each returns the value
or raises DataError naming file, row and field, so a bad field reads the same whichever reader meets it."""

from __future__ import annotations

from typing import Any, Union

from rlhfkit.data.formats import prompt_hint, tool_calls
from rlhfkit.errors import DataError

ROLES = ("system", "user", "assistant", "tool")

Message = dict[str, str]
Text = Union[str, list[Message]]
"""A prompt or response: a plain string (standard format) or a list of {role, content} messages (conversational)."""


def required_text(value: Any, key: str, path: str, lineno: int, fields: list[str]) -> str:
    """A non-empty string; fields (the row's column names) go into the message when the value is missing."""
    if value is None:
        raise DataError(path, lineno, key, f"missing; this row has fields {fields}")
    if not isinstance(value, str):
        raise DataError(path, lineno, key, f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(path, lineno, key, "is empty")
    return value


def optional_text(row: dict[str, Any], key: str, path: str, lineno: int) -> str | None:
    """row[key] when given (a non-empty string), else None."""
    value = row.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise DataError(path, lineno, key, f"must be a non-empty string when given, got {value!r}")
    return value


def real_number(value: Any, key: str, path: str, lineno: int) -> int | float:
    """An int or float, returned as given (a bool is not a number here, although Python counts it as an int)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(path, lineno, key, f"must be a number, got {type(value).__name__}")
    return value


def message_list(value: Any, key: str, path: str, lineno: int) -> list[dict[str, Any]]:
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


def response_messages(value: Any, key: str, path: str, lineno: int, what: str = "response") -> list[dict[str, Any]]:
    """Messages that answer a conversational prompt, so they start with the assistant's turn; `what` names them
    in the message (a response, a completion)."""
    msgs = message_list(value, key, path, lineno)
    if msgs[0]["role"] != "assistant":
        raise DataError(path, lineno, f"{key}[0].role", f"a conversational {what} starts with an assistant message")
    return msgs


def prompt_text(value: Any, path: str, lineno: int, fields: list[str]) -> Text:
    """The `prompt` field: a non-empty string (standard format) or a message list (conversational); a missing
    prompt names any prompt-like column the row has and how to map it."""
    if isinstance(value, list):
        return message_list(value, "prompt", path, lineno)
    if value is None:
        raise DataError(path, lineno, "prompt", f"missing; this row has fields {fields}{prompt_hint(fields)}")
    return required_text(value, "prompt", path, lineno, fields)


def response_text(prompt: Text, value: Any, key: str, path: str, lineno: int, fields: list[str]) -> Text:
    """A response in the prompt's format: a string for a string prompt, messages for a message-list prompt."""
    if isinstance(prompt, list):
        if value is None:
            raise DataError(path, lineno, key, f"missing; this row has fields {fields}")
        if not isinstance(value, list):
            raise DataError(path, lineno, key, f"must be a list of messages like the prompt (conversational format), "
                            f"got {type(value).__name__}")
        return response_messages(value, key, path, lineno)
    if isinstance(value, list):
        raise DataError(path, lineno, key, "must be a string like the prompt (standard format), got a list; "
                        "give the prompt as a list of messages for conversational data")
    return required_text(value, key, path, lineno, fields)
