"""Loading, building and saving models and tokenizers in Hugging Face formats, plus `logprobs_of`.

Every algorithm gets per-token log-probabilities through `logprobs_of`, so padding, position ids and the
sampling temperature are handled in one place. What we save loads with plain `transformers`, no rlhfkit import.
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
import re
import sys
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import torch
import torch.utils.checkpoint

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
    quantize = lora is not None and lora.enabled and lora.load_in_4bit
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **(_nf4_kwargs(dtype) if quantize else {}))
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
    if quantize:
        from peft import prepare_model_for_kbit_training

        # the base frozen, its norms and embeddings in fp32; checkpointing stays the run's own choice
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        _keep_4bit_layout_differentiable(model)
    if lora is not None and lora.enabled:
        model = add_lora(model, lora)
    return model


def _nf4_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    """from_pretrained arguments for QLoRA's base: 4-bit NF4 with double quantization, computing in `dtype`, on
    this process's GPU (or the CPU)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("lora.load_in_4bit (QLoRA) needs bitsandbytes: pip install bitsandbytes (or rlhfkit's "
                        "[qlora] extra).") from None
    from transformers import BitsAndBytesConfig

    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype),
            "device_map": {"": device}}


def _keep_4bit_layout_differentiable(model: Any) -> None:
    """bitsandbytes (0.50) repacks a 4-bit weight for its AVX512-BF16 CPU kernel at the first no-grad forward
    in eval mode, for good, and that kernel has no backward: every training step after an evaluation (or DPO's
    reference pass) would then get wrong gradients through the base layers, with only a warning. Keep the
    differentiable layout (slower CPU inference, the same results)."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def is_quantized(model: Any) -> bool:
    """Whether the network (inside a peft wrapper or not) was loaded in 4 or 8 bits."""
    net = model.get_base_model() if is_peft(model) else model
    return bool(getattr(net, "is_loaded_in_4bit", False) or getattr(net, "is_loaded_in_8bit", False))


def _merged_in_full_precision(model: Any) -> Any:
    """A QLoRA model's adapter merged into its base's original full-precision weights (merging into the 4-bit copy
    would save quantized weights that plain transformers cannot load without bitsandbytes, and carry the
    quantization error). What is not adapted and not quantized (embeddings grown for a pad token, norms) is
    taken from the trained model."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    peft_config = model.peft_config["default"]
    base = AutoModelForCausalLM.from_pretrained(peft_config.base_model_name_or_path, dtype=torch.float32)
    trained = model.get_base_model()
    if trained.get_input_embeddings().num_embeddings != base.get_input_embeddings().num_embeddings:
        base.resize_token_embeddings(trained.get_input_embeddings().num_embeddings)
    plain = dict(base.named_parameters())
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if name in plain and param.dtype.is_floating_point and param.shape == plain[name].shape:
                plain[name].copy_(param.detach().to("cpu", torch.float32))
    from peft import get_peft_model

    merged = get_peft_model(base, copy.deepcopy(peft_config))
    set_peft_model_state_dict(merged, get_peft_model_state_dict(model))
    return merged.merge_and_unload()


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
    """Whether model is a peft PeftModel. Without peft imported, nothing can be one: the check then imports
    nothing (importing peft sets up torch.compile machinery, about a second on a CPU, which a plain model's first
    log-prob pass would otherwise pay)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


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
        model = _merged_in_full_precision(model) if is_quantized(model) else copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


# ---------------------------------------------------------------------------------------------------- log-probs
def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so left padding does not shift rotary positions. (B, T)"""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def attention_token_weight(model: Any) -> float | None:
    """One token's arithmetic in a decoder layer's linear layers, in units of one query-key pair of its attention:
    (4H^2 + 3HI) multiply-adds against 2H, i.e. 2H + 1.5I for hidden size H and MLP width I (grouped keys and
    values ignored). What `collate.shared_prefix_pays` weighs wider rows against. None when the model (under any
    wrapper: DDP, DeepSpeed, peft) has no such config."""
    while getattr(model, "config", None) is None and hasattr(model, "module"):
        model = model.module
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    hidden = getattr(config, "hidden_size", None)
    if not isinstance(hidden, int):
        return None
    width = getattr(config, "intermediate_size", None)
    return 2.0 * hidden + 1.5 * (width if isinstance(width, int) else 4 * hidden)


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
    start: int = 0,
    keep: torch.Tensor | None = None,
    with_output: bool = False,
) -> Any:
    """Log-probability of each token given the ones before it.

    input_ids, attention_mask: (B, T), mask 1 = real token. Returns (B, T-1-start): entry t is
    log p(x_{start+t+1} | x_<=start+t). temperature divides the logits, matching the sampler (N implementation
    details of RLHF: training logits are divided by the sampling temperature, else the ratio and KL are computed
    against a different policy). attention_mask may also be a 4D (B, 1, T, T) additive mask (packed sequences);
    then pass position_ids. keep: (B, T-1-start) bool, the entries that are needed; the others come back 0 and
    their logits are never computed. with_output: also return the model's own output (its logits hold only the
    last position on the fast path). Entropies come without gradient (a metric).

    The LM head runs on the final hidden states in chunks of rows (recomputed chunk by chunk in backward), so
    the (B, T, V) logits are never materialised: with a 150k-token vocabulary they, not the model, would set
    peak memory. Values and gradients are those of the full logits (tested). A model whose output is more than
    its head's linear map (logit scaling, soft-capping, a LoRA head) is detected on its first call and takes the
    full-logits path."""
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    found = final_hidden(model, input_ids, attention_mask, position_ids)
    if found is not None:
        hidden, head, out = found
        result = logprobs_from_hidden(hidden, head, input_ids, temperature, return_entropy, start, keep)
        return (result, out) if with_output else result
    out = model(input_ids=input_ids, attention_mask=model_mask(attention_mask, model), position_ids=position_ids,
                use_cache=False)
    result = token_logprobs(_logits_of(out), input_ids, temperature, return_entropy, start, keep)
    return (result, out) if with_output else result


def logprobs_at(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                rows: torch.Tensor, cols: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[m]) under the distribution the hidden state at (rows[m], cols[m]) predicts, from one forward
    pass: (M,). For layouts where a token's predictor is not the position just before it (`shared_prefix_batch`).
    The LM head runs on those M rows only, in chunks, as in `logprobs_of` (whose full-logits fallback it shares)."""
    found = final_hidden(model, input_ids, attention_mask, position_ids)
    if found is not None:
        hidden, head, _ = found
        return chunked_head_logprobs(hidden[rows, cols], head.weight, head.bias, targets)[0]
    out = model(input_ids=input_ids, attention_mask=model_mask(attention_mask, model), position_ids=position_ids,
                use_cache=False)
    return _logprobs_rows(_logits_of(out)[rows, cols], targets, 1.0, False)[0]


def final_hidden(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.nn.Linear, Any] | None:
    """One forward that computes the logits of the last position only: (the decoder's final hidden states
    (B, T, H), the LM head that maps them to logits, the model's output), or None for a model whose logits are
    not exactly that head's map of those states (the caller then asks for the full logits)."""
    lm = causal_lm_of(model)
    head = output_head(lm) if lm is not None else None
    if head is None:
        return None
    captured: dict[str, torch.Tensor] = {}

    def grab(_module: Any, _args: Any, output: Any) -> None:
        captured["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    hook = lm.get_decoder().register_forward_hook(grab)
    try:
        out = model(input_ids=input_ids, attention_mask=model_mask(attention_mask, model), position_ids=position_ids,
                    use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    hidden = captured.get("hidden")
    if hidden is None or not _head_matches(lm, head, hidden, _logits_of(out)):
        return None
    return hidden, head, out


def token_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0, return_entropy: bool = False,
    start: int = 0, keep: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Next-token log-probs (and entropies) from a forward pass's logits (B, T, V); returns (B, T-1-start), 0
    where keep (B, T-1-start) is False."""
    lp, ent = _logprobs_rows(logits[:, start:-1], input_ids[:, start + 1 :], temperature, return_entropy)
    if keep is not None:
        lp = lp * keep
        ent = ent * keep if ent is not None else None
    return (lp, ent) if return_entropy else lp


def _logprobs_rows(logits: torch.Tensor, targets: torch.Tensor, temperature: float, entropy: bool
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(target) and (if asked) the entropy, without gradient, of each row of logits (..., V), in float32."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    # gather minus logsumexp avoids materialising a log-softmax the size of the logits
    normaliser = torch.logsumexp(logits, dim=-1)
    logprobs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - normaliser
    if not entropy:
        return logprobs, None
    # the entropy is a metric, never a loss term here: computed without autograd, so a checkpointed chunk's
    # recomputation leaves no softmax behind that no backward step would ever consume
    with torch.no_grad():
        probs = torch.softmax(logits, dim=-1)
        return logprobs, normaliser - (probs * logits).sum(-1)


# ------------------------------------------------------------------------------ the LM head, chunk by chunk
# One chunk's float32 logits take about this many bytes (a few copies live at once inside a chunk): 128 MiB is
# ~220 rows of a 152k-token vocabulary, and the whole batch at once for the playground's.
LOGIT_CHUNK_BYTES = 128 * 2**20
_HEAD_CHECKED: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()
# config fields of families whose logits are more than hidden @ W^T (Gemma 2/3 soft-capping, Cohere and Granite
# scaling): they take the full-logits path without trying
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def enable_gradient_checkpointing(model: Any) -> None:
    """Hugging Face gradient checkpointing, non-reentrant (correct with frozen inputs, LoRA and FSDP), on every
    outermost transformers model inside `model` (a policy inside a value-head wrapper, a peft model's base)."""
    from transformers import PreTrainedModel

    done: set[int] = set()
    for module in model.modules():
        if not isinstance(module, PreTrainedModel) or id(module) in done:
            continue
        done.update(id(m) for m in module.modules())
        if not module.supports_gradient_checkpointing:
            raise UserError(f"{type(module).__name__} does not support gradient checkpointing; set "
                            "gradient_checkpointing: false.")
        if hasattr(module, "activation_checkpointing_enable"):  # transformers 5.x's name
            module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def causal_lm_of(model: Any) -> Any | None:
    """The Hugging Face causal LM inside the wrappers training puts around it (DDP, torch.compile, peft, a
    module carrying a value head that names it `causal_lm`), or None."""
    for _ in range(8):
        if is_peft(model):
            model = model.get_base_model()
        elif hasattr(model, "causal_lm"):
            model = model.causal_lm
        elif isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            break
    return model if hasattr(model, "get_output_embeddings") and hasattr(model, "get_decoder") else None


def output_head(lm: Any) -> torch.nn.Linear | None:
    """The LM's head when logits are exactly its linear map of the final hidden state, else None. The model's
    structure is inspected once (then its first call's check is remembered); a hook on the head, which can come
    and go, is looked at every call."""
    known = _HEAD_CHECKED.get(lm)
    if known is False:
        return None
    try:
        head = lm.get_output_embeddings()
        lm.get_decoder()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    if type(head) is not torch.nn.Linear or head._forward_hooks or head._forward_pre_hooks:
        return None
    if known is None:
        config = getattr(lm, "config", None)
        if any(getattr(config, k, None) not in (None, 1, 1.0) for k in _LOGIT_TRANSFORMS):
            return None
        parameters = inspect.signature(lm.forward).parameters
        if "logits_to_keep" not in parameters and not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            return None
    return head


def rows_per_chunk(vocab: int, chunk_bytes: int | None = None) -> int:
    """Rows of logits formed at once so one chunk's float32 logits take about chunk_bytes (LOGIT_CHUNK_BYTES)."""
    return max(1, (chunk_bytes or LOGIT_CHUNK_BYTES) // (4 * vocab))


def _logits_of(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out.logits


@torch.no_grad()
def _head_matches(lm: Any, head: torch.nn.Linear, hidden: torch.Tensor, last_logits: torch.Tensor) -> bool:
    """On an LM's first call: do its last-position logits equal its head applied to the captured hidden state?
    A model that scales or caps logits in a way no config field says fails here and is remembered."""
    known = _HEAD_CHECKED.get(lm)
    if known is not None:
        return known
    ours = torch.nn.functional.linear(hidden[:, -1], head.weight, head.bias).float()
    theirs = last_logits[:, -1].float()
    tolerance = 1e-4 if theirs.dtype == ours.dtype == torch.float32 and hidden.dtype == torch.float32 else 2e-2
    scale = theirs.abs().max().clamp(min=1e-6)
    ok = bool(ours.shape == theirs.shape and ((ours - theirs).abs().max() <= tolerance * scale).item())
    if not ok:
        log.warning("%s: its logits are not its output head's linear map; log-probs use the full logits "
                    "(more memory with a large vocabulary).", type(lm).__name__)
    _HEAD_CHECKED[lm] = ok
    return ok


def logprobs_from_hidden(hidden: torch.Tensor, head: torch.nn.Linear, input_ids: torch.Tensor,
                         temperature: float = 1.0, return_entropy: bool = False, start: int = 0,
                         keep: torch.Tensor | None = None, chunk_bytes: int | None = None) -> Any:
    """logprobs_of's result from the final hidden states (B, T, H) and the LM head, chunk by chunk."""
    B, T = input_ids.shape
    h = hidden[:, start:-1]  # (B, T-1-start, H): position t predicts token t+1
    targets = input_ids[:, start + 1 :]  # (B, T-1-start)
    if keep is None:
        rows, row_targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    else:
        keep = keep.bool()
        rows, row_targets = h[keep], targets[keep]  # (N, H), (N,)
    lp, ent = chunked_head_logprobs(rows, head.weight, head.bias, row_targets, temperature, return_entropy,
                                    chunk_bytes)

    def place(values: torch.Tensor) -> torch.Tensor:
        if keep is None:
            return values.view(B, T - 1 - start)
        return values.new_zeros((B, T - 1 - start)).masked_scatter(keep, values)

    return (place(lp), place(ent)) if return_entropy else place(lp)


def _head_chunk(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                temperature: float, entropy: bool) -> Any:
    lp, ent = _logprobs_rows(torch.nn.functional.linear(h, weight, bias), targets, temperature, entropy)
    return (lp, ent) if entropy else lp


def chunked_head_logprobs(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          targets: torch.Tensor, temperature: float = 1.0, entropy: bool = False,
                          chunk_bytes: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(target) (and entropy) of hidden rows (N, H) under the head (V, H), a chunk of rows at a time.
    Under autograd each chunk is checkpointed: its logits are recomputed in backward, never stored."""
    n, vocab = rows.shape[0], weight.shape[0]
    size = rows_per_chunk(vocab, chunk_bytes)
    if n <= size:
        out = _head_chunk(rows, weight, bias, targets, temperature, entropy)
        return out if entropy else (out, None)
    grad = torch.is_grad_enabled() and (rows.requires_grad or weight.requires_grad)
    lps, ents = [], []
    for s in range(0, n, size):
        args = (rows[s : s + size], weight, bias, targets[s : s + size], temperature, entropy)
        out = (torch.utils.checkpoint.checkpoint(_head_chunk, *args, use_reentrant=False) if grad
               else _head_chunk(*args))
        lps.append(out[0] if entropy else out)
        if entropy:
            ents.append(out[1])
    return torch.cat(lps), (torch.cat(ents) if entropy else None)
