"""The one tokenise rule every stage uses: how a prompt becomes ids, and where a response ends.

- A prompt given as a string is plain text (tokenised with the tokenizer's own special tokens, e.g. BOS); a
  prompt given as a list of messages goes through the chat template with the generation prompt. Strings are
  never templated implicitly (TRL's rule), so a prompt becomes the same ids in SFT, reward, DPO/KTO data,
  sampling (PPO, best-of-n, online DPO, labelling) and scoring. To chat with a string, pass
  `user_turn(text)`.
- A response ends at its first EOS. Templates whose turns end `<|im_end|>\\n` (ChatML) render text after the
  EOS; it is cut, so the reward model is trained and read at the EOS token, the token PPO's rollouts stop at.
"""

from __future__ import annotations

from typing import Any, Sequence, Union

Message = dict[str, Any]
Prompt = Union[str, Sequence[Message]]


def user_turn(text: str) -> list[Message]:
    """A string as a one-message conversation (what "chat with this text" means)."""
    return [{"role": "user", "content": text}]


def single_turn_text(prompt: Prompt) -> str | None:
    """The user's text of a string prompt or of a conversation that is one user turn (None for any other
    conversation): what judges that read text are shown."""
    if isinstance(prompt, str):
        return prompt
    turns = list(prompt)
    if len(turns) == 1 and turns[0].get("role") == "user" and isinstance(turns[0].get("content"), str):
        return turns[0]["content"]
    return None


def has_template(tokenizer: Any) -> bool:
    return getattr(tokenizer, "chat_template", None) is not None


def render_messages(tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool,
                    tools: Any = None) -> str:
    if not has_template(tokenizer):
        from rlhfkit.errors import UserError

        raise UserError("conversational data (a list of messages) needs a tokenizer with a chat template; set "
                        "chat_template in tokenizer_config.json, or give prompts and responses as plain strings.")
    kwargs = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **kwargs)


def render_prompt(tokenizer: Any, prompt: Prompt) -> str:
    """The text a prompt becomes: a string as it is, a message list through the template with the generation
    prompt. (`encode_prompt` is what to tokenise; this is for display and prefix checks.)"""
    if isinstance(prompt, str):
        return prompt
    return render_messages(tokenizer, prompt, add_generation_prompt=True)


def encode_prompt(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Prompt ids, the same in every stage. A string gets the tokenizer's special tokens (BOS where it adds one);
    a rendered conversation gets none, because the template writes its own BOS (no doubled BOS)."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    return list(tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"])


def end_at_eos(ids: Sequence[int], eos: int) -> list[int]:
    """ids through their first EOS; with no EOS, ids + [EOS] (a response always ends with one)."""
    ids = list(ids)
    if eos in ids:
        return ids[: ids.index(eos) + 1]
    return ids + [eos]


def encode_response(tokenizer: Any, prompt: Prompt, response: Any, prompt_text: str | None = None) -> list[int]:
    """Response ids after `encode_prompt(prompt)`, ending at the first EOS.

    A string prompt takes a string response, tokenised on its own (so the prompt/response boundary is exact,
    as at generation time, where the policy continues the prompt's ids). A message-list prompt takes a message
    list (or a string, taken as the assistant's turn): the template renders prompt + response once, and the text
    after the prompt's rendering is the response; the prompt rendering must be a byte-identical prefix, so
    whatever the template injects (a default system prompt, BOS) belongs to the shared prompt."""
    eos = tokenizer.eos_token_id
    if isinstance(prompt, str):
        if not isinstance(response, str):
            from rlhfkit.errors import UserError

            raise UserError("a plain-string prompt needs a plain-string response; give both as message lists for "
                            "conversational data.")
        return end_at_eos(tokenizer(response, add_special_tokens=False)["input_ids"], eos)
    if isinstance(response, str):
        response = [{"role": "assistant", "content": response}]
    prompt_text = render_prompt(tokenizer, prompt) if prompt_text is None else prompt_text
    full = render_messages(tokenizer, list(prompt) + list(response), add_generation_prompt=False)
    if not full.startswith(prompt_text):
        from rlhfkit.errors import UserError

        raise UserError("the tokenizer's chat template is not prefix-stable (the prompt rendered with the "
                        "generation prompt is not a prefix of the prompt + response rendering), so the response "
                        "cannot be located; use a template that renders earlier turns unchanged.")
    return end_at_eos(tokenizer(full[len(prompt_text):], add_special_tokens=False)["input_ids"], eos)
