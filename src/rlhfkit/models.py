"""Loading, building and saving models and tokenizers in Hugging Face formats, plus `logprobs_of`.

Every algorithm gets per-token log-probabilities through `logprobs_of`, so padding, position ids and the
sampling temperature are handled in one place. What we save loads with plain `transformers`, no rlhfkit import.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import torch

from rlhfkit.errors import UserError

if TYPE_CHECKING:
    from rlhfkit.config import LoraConfig

log = logging.getLogger(__name__)


def quiet_transformers() -> None:
    """Silence transformers' per-shard progress bars; our own bar shows progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

PAD_TOKEN = "<pad>"
# A small chat template for tokenizers we build (the playground's). Each turn ends with EOS, so a policy that
# learned to finish its turn emits EOS, which generation and reward scoring both key on.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|> ' + message['content'] + ' </s> ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


# -------------------------------------------------------------------------------------------------- tokenizers
def _require_dir(path: str, what: str) -> None:
    """Fail early, naming the path, when a local model/tokenizer directory is missing or is not one."""
    p = Path(path).expanduser()
    if p.exists():
        if what == "model" and not (p / "config.json").exists():
            raise UserError(
                f"{path} is not a Hugging Face model directory (no config.json); pass a directory written by "
                "save_pretrained (for example a previous run's output_dir)."
            )
        return
    hub_id = re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path) is not None and not path.startswith(".")
    if not hub_id or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UserError(f"{what} directory {path} does not exist; pass a saved Hugging Face model directory.")


def ensure_pad_token(tokenizer: Any) -> bool:
    """Guarantee a pad token distinct from EOS. Returns True when one was added (embeddings must then grow).

    With pad == EOS, masking padding also masks the real EOS, so the policy never learns to stop and a reward
    model reads its score at the wrong place (N implementation details of RLHF, 'pad token'; trl#3750)."""
    eos = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos:
        return False
    if tokenizer.pad_token_id is not None:
        log.warning("tokenizer's pad token equals its EOS token (id %s); adding a distinct %s token", eos, PAD_TOKEN)
    else:
        log.warning("tokenizer has no pad token; adding %s", PAD_TOKEN)
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return True


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "merges.txt", "vocab.txt")


def load_tokenizer(path: str, padding_side: str = "right") -> Any:
    """AutoTokenizer with a pad token distinct from EOS. Right padding for scoring, left for generation."""
    from transformers import AutoTokenizer

    _require_dir(path, "tokenizer")
    local = Path(path).expanduser()
    if local.is_dir() and not any((local / f).exists() for f in TOKENIZER_FILES):
        raise UserError(f"{path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the tokenizer "
                        "beside the model (tokenizer.save_pretrained(path)) or copy its files there.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"could not load a tokenizer from {path} ({first}); the directory needs the files "
                        "tokenizer.save_pretrained writes (tokenizer.json and tokenizer_config.json for a fast "
                        "tokenizer).") from None
    if tokenizer.eos_token_id is None:
        raise UserError(f"the tokenizer in {path} has no EOS token; set eos_token in its tokenizer_config.json.")
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = padding_side
    return tokenizer


def train_word_tokenizer(texts: Iterable[str], min_frequency: int = 1, lowercase: bool = True) -> Any:
    """A word-level tokenizer (tokenizers library) wrapped as a PreTrainedTokenizerFast with a chat template.

    Special tokens: <pad> (id 0), <unk>, <s> (BOS), </s> (EOS) and the role markers used by CHAT_TEMPLATE."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD_TOKEN, "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(
        special_tokens=specials, min_frequency=min_frequency, vocab_size=2**31 - 1))  # keep every word: no silent <unk>
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies punctuation
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=specials[4:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# ------------------------------------------------------------------------------------------------------ models
def build_llama(
    tokenizer: Any,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_positions: int = 512,
    dropout: float = 0.0,
    seed: int = 0,
) -> Any:
    """A freshly initialised Llama-architecture causal LM sized for the tokenizer (no hub access needed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=max_positions,
        attention_dropout=dropout,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def disable_dropout(model: torch.nn.Module) -> None:
    """Zero every dropout probability: with dropout on, the log-probs PPO trains on differ from the ones it
    sampled with, and the KL estimate is noise (N implementation details of RLHF, 'disable dropout')."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        # attention modules copy their rate from the config when built (LlamaAttention.attention_dropout, Qwen2's,
        # Mistral's ...) and pass it to the attention kernel themselves, so the config alone is not enough
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float) and not isinstance(value, bool):
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    for name in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if config is not None and hasattr(config, name) and isinstance(getattr(config, name), float):
            setattr(config, name, 0.0)


def load_causal_lm(
    path: str,
    tokenizer: Any | None = None,
    dtype: torch.dtype = torch.float32,
    lora: LoraConfig | None = None,
    dropout_off: bool = True,
) -> Any:
    """AutoModelForCausalLM from a local directory (or hub id), embeddings grown to the tokenizer, optional LoRA."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    _require_dir(path, "model")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise UserError(f"could not load a causal LM from {path}: {exc}") from None
    if tokenizer is not None:
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            log.warning("resizing embeddings of %s from %d to %d tokens to fit the tokenizer (added pad token)",
                        path, model.get_input_embeddings().num_embeddings, len(tokenizer))
            model.resize_token_embeddings(len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            model.generation_config.eos_token_id = tokenizer.eos_token_id
    if dropout_off:
        disable_dropout(model)
    if lora is not None and lora.enabled:
        model = add_lora(model, lora)
    return model


def add_lora(model: Any, lora: LoraConfig) -> Any:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in lora.target_modules if m not in names]
    if missing:
        raise UserError(
            f"lora.target_modules {missing} are not modules of this model; some that exist: "
            f"{sorted(n for n in names if n.endswith('proj'))[:12]}"
        )
    peft_cfg = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules), task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a core dependency
        return False
    return isinstance(model, PeftModel)


def save_pretrained(model: Any, tokenizer: Any | None, out_dir: str | os.PathLike) -> None:
    """Save in Hugging Face format. A LoRA model is saved merged (plain transformers loads it) and its adapter
    goes to out_dir/adapter for peft users."""
    quiet_transformers()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "export_pretrained"):  # composite modules (policy + value head) know their parts
        model.export_pretrained(out, tokenizer)
        return
    if is_peft(model):
        model.save_pretrained(out / "adapter")
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


# ---------------------------------------------------------------------------------------------------- log-probs
def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so left padding does not shift rotary positions. (B, T)"""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def model_mask(attention_mask: torch.Tensor, model: Any) -> torch.Tensor:
    """A 4-D additive mask (packed rows) in the model's dtype (sdpa wants the query's dtype or bool); a 2-D
    padding mask as it is."""
    if attention_mask.dim() == 4 and attention_mask.is_floating_point():
        param = next(model.parameters(), None)
        if param is not None and param.dtype != attention_mask.dtype:
            return attention_mask.to(param.dtype)
    return attention_mask


def logprobs_of(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float = 1.0,
    position_ids: torch.Tensor | None = None,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each token given the ones before it.

    input_ids, attention_mask: (B, T), mask 1 = real token. Returns (B, T-1): entry t is log p(x_{t+1} | x_<=t).
    temperature divides the logits, matching the sampler (N implementation details of RLHF: training logits
    are divided by the sampling temperature, else the ratio and KL are computed against a different policy).
    attention_mask may also be a 4D (B, 1, T, T) additive mask (packed sequences); then pass position_ids."""
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    out = model(input_ids=input_ids, attention_mask=model_mask(attention_mask, model), position_ids=position_ids,
                use_cache=False)
    return token_logprobs(out.logits, input_ids, temperature, return_entropy)


def token_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0, return_entropy: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Next-token log-probs (and entropies) from a forward pass's logits (B, T, V); returns (B, T-1)."""
    logits = logits[:, :-1].float()  # (B, T-1, V)
    if temperature != 1.0:
        logits = logits / temperature
    targets = input_ids[:, 1:]  # (B, T-1)
    # gather minus logsumexp avoids materialising the full (B, T, V) log-softmax a second time
    normaliser = torch.logsumexp(logits, dim=-1)  # (B, T-1)
    logprobs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - normaliser  # (B, T-1)
    if not return_entropy:
        return logprobs
    probs = torch.softmax(logits, dim=-1)
    entropy = normaliser - (probs * logits).sum(-1)  # (B, T-1)
    return logprobs, entropy
