"""Tiny random models of three real families (Qwen2, Llama 3, GPT-2) with real byte-level BPE tokenizers trained
here from a small built-in corpus, their real chat conventions and special tokens, saved the way the hub ships
them; plus data files in every format a family can take. Nothing is downloaded.

A family's directory holds model.safetensors + config.json + tokenizer.json + tokenizer_config.json (+ the chat
template), so `AutoModelForCausalLM` / `AutoTokenizer` load it as they load the real checkpoints."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FAMILIES = ("qwen2", "llama3", "gpt2")

QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Qwen2.5-Instruct's ChatML conventions (its template without the function-calling branches; a tool result is
# wrapped in a user turn as Qwen does): a default system prompt when the conversation has none, every turn
# `<|im_start|>{role}\n{content}<|im_end|>\n`, no BOS.
QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + QWEN_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- elif not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Meta-Llama-3-8B-Instruct's template, verbatim: BOS before the first turn, headers, trimmed content, <|eot_id|>.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# The pre-tokenizer regexes of the real tokenizers (Qwen2: digits one at a time; Llama 3: up to three).
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")

MERGES = 400
"""BPE merges learned on top of the 256 byte symbols (fewer when the corpus runs out of pairs seen twice)."""


@dataclass(frozen=True)
class FamilySpec:
    """A family's real conventions."""

    name: str
    architecture: str
    specials: tuple[str, ...]
    """Special tokens, in id order after nothing: they get ids 0..len-1, as the trainer adds them first."""
    eos_token: str
    bos_token: str | None
    """The token that starts every encoded text (template or post-processor), or None."""
    pad_token: str | None
    """Pad token as the real tokenizer ships it (None: rlhfkit must add one)."""
    chat_template: str | None
    tokenizer_class: str
    """What the real checkpoint's tokenizer_config.json names (so AutoTokenizer picks the same class)."""
    adds_bos: bool
    """The tokenizer itself puts BOS before plain text (Llama 3's post-processor does)."""


SPECS: dict[str, FamilySpec] = {
    "qwen2": FamilySpec("qwen2", "Qwen2ForCausalLM", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                        eos_token="<|im_end|>", bos_token=None, pad_token="<|endoftext|>",
                        chat_template=QWEN2_TEMPLATE, tokenizer_class="Qwen2Tokenizer", adds_bos=False),
    "llama3": FamilySpec("llama3", "LlamaForCausalLM",
                         ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                          "<|reserved_special_token_1|>", "<|start_header_id|>", "<|end_header_id|>",
                          "<|reserved_special_token_2|>", "<|eot_id|>"),
                         eos_token="<|eot_id|>", bos_token="<|begin_of_text|>", pad_token=None,
                         chat_template=LLAMA3_TEMPLATE, tokenizer_class="PreTrainedTokenizerFast", adds_bos=True),
    "gpt2": FamilySpec("gpt2", "GPT2LMHeadModel", ("<|endoftext|>",), eos_token="<|endoftext|>", bos_token=None,
                       pad_token=None, chat_template=None, tokenizer_class="GPT2Tokenizer", adds_bos=False),
}


@dataclass(frozen=True)
class Family:
    """A built family: where it is saved and what a test may rely on."""

    name: str
    path: Path
    spec: FamilySpec

    @property
    def has_template(self) -> bool:
        return self.spec.chat_template is not None

    @property
    def formats(self) -> tuple[str, ...]:
        """Data formats the family can train on: plain strings always, message lists with a chat template."""
        return ("text", "messages") if self.has_template else ("text",)

    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.path))


# ---------------------------------------------------------------------------------------------- the corpus
NAMES = ["Ada", "Bo", "Cyrus", "Dee", "Eve", "Farah", "Gus", "Hal"]
COLOURS = ["red", "blue", "green", "gold", "pink", "grey"]
FRUITS = ["apples", "pears", "plums", "figs", "limes"]

PROSE = """\
The weather today is mild, with a light breeze from the west. In the afternoon it may rain; take an umbrella.
A helpful assistant answers the question that was asked, clearly and politely, and says when it does not know.
Here is a short list:
- first, read the question;
- second, think about the answer;
- third, write it down.

Q: What is the capital of France?
A: Paris is the capital of France.

User: Can you help me with my homework, please?
Assistant: Of course! What is the problem you're working on?
System: You are a helpful, honest and harmless assistant.

She said, "It's not that hard." He replied: 'I'll try again tomorrow.' They'd already left...
Numbers such as 12, 345 and 6789 appear in text; so do sums like 3 + 4 = 7 and 10 - 2 = 8.
"""


def _task(rng: random.Random) -> tuple[str, str, str]:
    """(question, good answer, bad answer), with spaces, punctuation and newlines so BPE merges matter."""
    kind = rng.randrange(5)
    name, colour = rng.choice(NAMES), rng.choice(COLOURS)
    a, b = rng.randint(2, 19), rng.randint(2, 19)
    if kind == 0:
        wrong = a + b + rng.choice([-2, -1, 1, 3])
        return (f"What is {a} + {b}?", f"{a} + {b} = {a + b}. Happy to help, {name}!", f"{a} + {b} = {wrong}.")
    if kind == 1:
        return (f"Say hello to {name}, please.", f"Hello, {name}! It's nice to meet you.",
                f"no.\n\n{name} who?")
    if kind == 2:
        f1, f2 = rng.sample(FRUITS, 2)
        return ("Name two fruits, one per line.", f"Sure:\n- {f1}\n- {f2}", f"{f1} {f1} {f1}")
    if kind == 3:
        return (f"What colour is the {colour} ball?", f"The ball is {colour}.",
                f"I'm not sure; maybe it's {rng.choice(COLOURS)}?")
    return (f"Tell {name} about the weather, in a few lines.",
            f"Hi {name}! It's mild today, with a light breeze from the west.\nIn the afternoon it may rain, so take "
            "an umbrella.\nTomorrow should be sunny and warm again.", "Weather.")


def corpus(seed: int = 0, n: int = 300) -> list[str]:
    """The BPE training corpus: prose, chat-flavoured text, the Qwen system prompt, role words, and task texts."""
    rng = random.Random(seed)
    texts = PROSE.split("\n\n") + [QWEN_SYSTEM, "system\nuser\nassistant\ntool", "Question:\nAnswer:"]
    for _ in range(n):
        q, good, bad = _task(rng)
        texts += [f"{q}\n{good}", f"Question: {q}\nAnswer: {bad}"]
    return texts


# ------------------------------------------------------------------------------------------------- building
def train_tokenizer(spec: FamilySpec, seed: int = 0) -> Any:
    """A byte-level BPE `tokenizers.Tokenizer` with the family's pre-tokenizer, decoder and post-processor."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if spec.name == "qwen2":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False), byte_level])
    elif spec.name == "llama3":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False), byte_level])
    else:  # GPT-2: the byte-level pre-tokenizer with its own regex
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=256 + len(spec.specials) + MERGES, min_frequency=2, special_tokens=list(spec.specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(seed), trainer)
    byte_post = processors.ByteLevel(trim_offsets=False)
    if spec.adds_bos:  # Llama 3: ByteLevel offsets, then BOS before every text
        bos = tok.token_to_id(spec.bos_token)
        tok.post_processor = processors.Sequence([byte_post, processors.TemplateProcessing(
            single=f"{spec.bos_token} $A", pair=f"{spec.bos_token} $A {spec.bos_token} $B",
            special_tokens=[(spec.bos_token, bos)])])
    else:
        tok.post_processor = byte_post
    return tok


def build_tokenizer(spec: FamilySpec, seed: int = 0) -> Any:
    """The trained tokenizer wrapped as a transformers.PreTrainedTokenizerFast with the family's special tokens
    and chat template."""
    from transformers import PreTrainedTokenizerFast

    tok = train_tokenizer(spec, seed)
    named = {t for t in (spec.eos_token, spec.bos_token, spec.pad_token) if t}
    kwargs: dict[str, Any] = {"eos_token": spec.eos_token,
                              "extra_special_tokens": [t for t in spec.specials if t not in named]}
    if spec.bos_token:
        kwargs["bos_token"] = spec.bos_token
    if spec.pad_token:
        kwargs["pad_token"] = spec.pad_token
    if spec.name == "gpt2":  # GPT-2's tokenizer names <|endoftext|> as BOS and UNK too (and never adds it)
        kwargs.update(bos_token=spec.eos_token, unk_token=spec.eos_token)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    if spec.chat_template:
        fast.chat_template = spec.chat_template
    return fast


def build_model(spec: FamilySpec, tokenizer: Any, hidden: int = 32, layers: int = 2, seed: int = 0) -> Any:
    """A randomly initialised tiny model of the family, its special-token ids as the real config sets them."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    V = len(tokenizer)
    eos = tokenizer.convert_tokens_to_ids(spec.eos_token)
    if spec.name == "qwen2":
        config = Qwen2Config(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=eos,
                             tie_word_embeddings=True)
        cls: Any = Qwen2ForCausalLM
    elif spec.name == "llama3":
        config = LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             rope_theta=500000.0, bos_token_id=tokenizer.bos_token_id, eos_token_id=eos,
                             tie_word_embeddings=False)
        cls = LlamaForCausalLM
    else:  # GPT-2 keeps its real dropout (0.1 everywhere): rlhfkit must switch it off itself
        config = GPT2Config(vocab_size=V, n_embd=hidden, n_layer=layers, n_head=4, n_positions=512,
                            bos_token_id=eos, eos_token_id=eos)
        cls = GPT2LMHeadModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    model.generation_config.eos_token_id = eos
    return model


def build_family(name: str, out: Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Family:
    """Train the tokenizer, build the model, save both into `out` (model.save_pretrained + tokenizer.save_pretrained),
    and name the real tokenizer class in tokenizer_config.json."""
    spec = SPECS[name]
    tokenizer = build_tokenizer(spec, seed)
    model = build_model(spec, tokenizer, hidden, layers, seed)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = spec.tokenizer_class
    if spec.name == "gpt2":
        cfg["add_bos_token"] = False
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return Family(name, out, spec)


# ----------------------------------------------------------------------------------------------------- data
@dataclass
class FamilyData:
    """Data files written for one family. files[(kind, fmt)]: kind is sft, preferences, kto or prompts; fmt is
    text (plain strings) or messages (chat message lists; only for families with a template)."""

    root: Path
    files: dict[tuple[str, str], Path] = field(default_factory=dict)
    rows: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)

    def path(self, kind: str, fmt: str) -> Path:
        return self.files[(kind, fmt)]

    def __getitem__(self, key: tuple[str, str]) -> Path:
        return self.files[key]


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _user(q: str, system: bool) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": "You answer in one or two short lines."}] if system else []
    return msgs + [{"role": "user", "content": q}]


def text_rows(n: int, seed: int) -> dict[str, list[dict[str, Any]]]:
    """Plain-string rows. Half the prompts end with "Answer:" and the completion starts with a space; the other
    half end with a newline. Either way prompt and completion meet where a joint encoding would merge bytes."""
    rng = random.Random(seed)
    sft, prefs, kto, prompts = [], [], [], []
    for i in range(n):
        q, good, bad = _task(rng)
        prompt = f"Question: {q}\nAnswer:" if i % 2 == 0 else f"{q}\n"
        lead = " " if i % 2 == 0 else ""
        sft.append({"prompt": prompt, "completion": lead + good})
        prefs.append({"prompt": prompt, "chosen": lead + good, "rejected": lead + bad})
        kto.append({"prompt": prompt, "completion": lead + (good if i % 3 else bad), "label": bool(i % 3)})
        prompts.append({"prompt": prompt})
    return {"sft": sft, "preferences": prefs, "kto": kto, "prompts": prompts}


def message_rows(n: int, seed: int) -> dict[str, list[dict[str, Any]]]:
    """Chat rows in every conversational layout rlhfkit reads: SFT `messages` (some with a system turn, some with
    two exchanges) and conversational prompt/completion; explicit- and implicit-prompt preference pairs; unpaired
    KTO rows; prompts as message lists (some with a system turn)."""
    rng = random.Random(seed)
    sft, prefs, kto, prompts = [], [], [], []
    for i in range(n):
        q, good, bad = _task(rng)
        prompt = _user(q, system=i % 3 == 0)
        if i % 4 == 1:  # a second exchange: only the last assistant turn is a target in prompt/completion form
            q0, good0, _ = _task(rng)
            prompt = [{"role": "user", "content": q0}, {"role": "assistant", "content": good0}] + prompt
        assistant = [{"role": "assistant", "content": good}]
        sft.append({"messages": prompt + assistant} if i % 2 == 0 else {"prompt": prompt, "completion": assistant})
        rejected = [{"role": "assistant", "content": bad}]
        if i % 5 == 4:  # implicit prompt: whole conversations that differ in the last turn
            prefs.append({"chosen": prompt + assistant, "rejected": prompt + rejected})
        else:
            prefs.append({"prompt": prompt, "chosen": assistant, "rejected": rejected})
        kto.append({"prompt": prompt, "completion": assistant if i % 3 else rejected, "label": bool(i % 3)})
        prompts.append({"prompt": prompt})
    return {"sft": sft, "preferences": prefs, "kto": kto, "prompts": prompts}


def write_family_data(family: Family, out: Path, n: int = 32, n_prompts: int = 12, seed: int = 0) -> FamilyData:
    """Write out/{kind}-{fmt}.jsonl for kind in sft, preferences, kto, prompts and every format the family takes
    (n rows each; n_prompts prompts)."""
    out.mkdir(parents=True, exist_ok=True)
    data = FamilyData(out)
    makers = {"text": text_rows, "messages": message_rows}
    for fmt in family.formats:
        rows = makers[fmt](n, seed)
        rows["prompts"] = makers[fmt](n_prompts, seed + 1)["prompts"]
        for kind, kind_rows in rows.items():
            data.files[(kind, fmt)] = _write(out / f"{kind}-{fmt}.jsonl", kind_rows)
            data.rows[(kind, fmt)] = kind_rows
    return data
