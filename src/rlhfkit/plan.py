"""`rlhfkit plan`: per-GPU memory of a training stage under DDP, FSDP, ZeRO-2, ZeRO-3, LoRA and QLoRA, computed
from the model's shape by the formulas below (nothing is loaded or measured; `tests/test_plan.py` checks the
totals against measured peak tensor memory of real training steps on tiny models).

Formulas. Ψ is a network's parameter count, N the number of GPUs, h hidden size, L layers, a attention heads,
d = h / a the head size (or config.json's head_dim), g KV heads (GQA), f the MLP size, V the vocabulary.

Parameters (Llama: RMSNorm, no biases, SwiGLU, GQA)
  per layer      h·a·d (q) + 2·h·g·d (k, v) + a·d·h (o) + 3·h·f (gate, up, down) + 2·h (two RMSNorms)
  whole LM       V·h (embedding) + V·h (head, 0 when tied) + L·layer + h (final norm)
  reward model   the LM without its head, plus a score head of h (LlamaForSequenceClassification, no bias)
  value head     h + 1 (rlhfkit's PolicyWithValue: Linear(h, 1) on the policy's last hidden state)
  Llama-3-8B comes to 8,030,261,248, the published 8.03B.

Model states per trained parameter (ZeRO, Rajbhandari et al. 2020, §3.1: mixed-precision Adam holds 2 + 2 + K
bytes, K = 12)
  autocast       what rlhfkit trains with (the default): torch autocast under --precision bf16 keeps fp32 weights
                 and gradients and no extra master copy: 4 + 4 + 8, the same 16 bytes in all as bf16-mixed, but
                 split differently (which matters where weights and gradients are divided differently: ZeRO-2),
                 and FSDP and ZeRO-3 gather fp32 units. Activations and the KV cache are 16-bit.
  bf16-mixed     the ZeRO paper's: weights 2 (16-bit), gradients 2, optimizer 12 (fp32 master copy 4 + Adam m 4 +
                 v 4), as DeepSpeed's bf16 mode or FSDP's mixed-precision policy hold them (not rlhfkit's layout).
  bf16           weights 2, gradients 2, optimizer 4 (m and v in bf16): 8 bytes.
  fp32           weights 4, gradients 4, optimizer 8: 16 bytes, and 32-bit activations (the mode the CPU
                 validation test uses).
  A frozen network (reference, reward model, LoRA's base) holds only its weights: 4 bytes under autocast and fp32
  (rlhfkit loads them in fp32), 2 otherwise.

Per-GPU split by strategy (ZeRO paper, Figure 1 and §5)
  DDP            everything replicated: weights, gradients and optimizer state of Ψ on every GPU.
  ZeRO-2         weights replicated; gradients and optimizer state divided by N. Frozen networks replicated.
  ZeRO-3, FSDP   weights, gradients, optimizer state and frozen networks all divided by N (FSDP FULL_SHARD is
                 ZeRO-3; rlhfkit shards the frozen networks under both by default, --frozen-models auto). Both
                 also gather one wrapped unit's full weights to compute it, prefetch the next, and hold its full
                 gradients before the reduce-scatter: "gathered" = 3 × the largest unit (a decoder layer, the
                 embedding or the head) × the weight bytes. DeepSpeed's bucket sizes
                 (stage3_prefetch_bucket_size, reduce_bucket_size) can move this a little; they are not modelled,
                 and neither are DDP's 25 MB gradient buckets.
  LoRA           the base frozen and replicated; adapters trained (data parallel, replicated): an adapter on a
                 d_in × d_out matrix has r·(d_in + d_out) parameters (Hu et al. 2021). With LoRA the reference
                 model is the policy with its adapter disabled, so it costs nothing extra.
  QLoRA          LoRA over a base whose linear layers are NF4 with double quantization: 4 + 8/64 + 32/(64·256)
                 = 4.127 bits per parameter (Dettmers et al. 2023, §2). bitsandbytes leaves the embedding, the
                 head and the norms in 16-bit, and so does this plan. The reward model stays 16-bit.

Activations of one micro-batch (16-bit unless fp32; tokens = rows × sequence length)
  Korthikanti et al. 2022 (Eq. 1) give s·b·h·(34 + 5·a·s/h) bytes per GPT layer in 16-bit without
  recomputation: 11·sbh attention, 19·sbh MLP (4h wide, GeLU), 4·sbh LayerNorms, 5·a·s²·b for the softmax, its
  dropout mask and dropout output. For Llama, counting what autograd keeps in Hugging Face's implementation with
  sdpa or flash attention (e = 2 bytes, 4 in fp32), per token and layer:
    RMSNorm ×2   its input, upcast to float32 by HF (4·h bytes each), and its normalised output (e·h each)
    linears      the q/k/v input and the gate/up input (e·h each); the o_proj input (e·a·d)
    attention    q and k after RoPE, v (e·(a·d + 2·g·d): GQA keeps K and V at g heads when sdpa is called with
                 enable_gqa or flash attention runs, i.e. no padding mask), the output (e·a·d) and the
                 log-sum-exp (4·a). sdpa/flash never store the a·s² probabilities, so the 5·a·s/h term is gone;
                 no dropout, so no masks.
    SwiGLU       gate output, silu(gate), up output, their product: 4·e·f (Korthikanti's GeLU MLP is 9·h + mask
                 elements for f = 4h; SwiGLU's three matrices keep 4·f plus the input h).
  full fine-tuning: 8·h + e·(2h + 2h + 3·a·d + 2·g·d + 4f) + 4·a bytes per token and layer
  (Llama-3-8B: 8·h + 2·23.25·h, i.e. 46.5·sbh of 16-bit plus the two fp32 norm inputs).
  LoRA: a frozen linear needs no input for its backward and a frozen norm weight no normalised output, so only
  the norm inputs, the inputs of adapted matrices, the attention tensors, 3·f of SwiGLU and r per adapter remain.
  Final norm and head: 4·h + e·h per token, plus e·h per log-prob row (the rows are gathered for the head).
  Gradient checkpointing (Korthikanti §4: ~2·sbh per layer, its input, with full recomputation): e·h per token
  and layer, plus one layer's full activations while it is recomputed in backward.

Logits: rlhfkit never builds the (B, T, V) logits. `models.logprobs_of` runs the LM head on chunks of
LOGIT_CHUNK_BYTES of float32 logits (checkpointed). At a chunk's backward four chunk-sized float32 tensors live
at once: the logits kept by logsumexp, gather's scattered gradient, and logsumexp's backward
grad·exp(logits − lse) with its (logits − lse) and exp temporaries, so logits = 4 × min(rows, rows_per_chunk)·V·4.
Under DDP and ZeRO-2 the head's weight gradient (V·h·2, 4 in fp32) is computed fresh and then added into the
gradient buffer, so it is counted here too (ZeRO-3 and FSDP count it in "gathered"). Measured on CPU in fp32:
4.1 to 4.4 chunk-sized tensors beside the head's gradient.

KV cache of a rollout (PPO, GRPO): 2 (K and V) · L · g · d · (P + R) · rollout rows · e (Pope et al. 2022).
rlhfkit's sampler allocates a static cache per call and frees it before the update (it keeps it only with
compile_sampler), so the rollout and the update do not overlap:
  total = weights + gradients + optimizer + gathered + max(activations + logits, KV cache).
Frozen networks' no-grad forwards (reference, reward) keep one layer at a time and are not counted.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rlhfkit.errors import ConfigError, UserError

GIB = 2**30
# rlhfkit.models.LOGIT_CHUNK_BYTES (kept equal by a test; this module imports no torch so `rlhfkit plan` is instant)
LOGIT_CHUNK_BYTES = 128 * 2**20
LOGIT_CHUNK_COPIES = 4
QLORA_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # NF4 + double-quantised absmax (QLoRA §2): 4.127 bits
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STRATEGIES = ("DDP", "FSDP", "ZeRO-2", "ZeRO-3", "LoRA", "QLoRA")

# Published shapes (the models' config.json on the Hugging Face hub, meta-llama/*)
PRESETS: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, intermediate_size=14336,
                      vocab_size=128256, tied_embeddings=False),
    "llama3-70b": dict(hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8, intermediate_size=28672,
                       vocab_size=128256, tied_embeddings=False),
    "llama3-405b": dict(hidden_size=16384, num_layers=126, num_heads=128, num_kv_heads=8, intermediate_size=53248,
                        vocab_size=128256, tied_embeddings=False),
    "llama3.2-1b": dict(hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, intermediate_size=8192,
                        vocab_size=128256, tied_embeddings=True),
    "llama3.2-3b": dict(hidden_size=3072, num_layers=28, num_heads=24, num_kv_heads=8, intermediate_size=8192,
                        vocab_size=128256, tied_embeddings=True),
}
SHAPE_FIELDS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size")
# our field -> the Hugging Face config.json key
HF_KEYS = {"hidden_size": "hidden_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
           "num_kv_heads": "num_key_value_heads", "intermediate_size": "intermediate_size",
           "vocab_size": "vocab_size"}


@dataclass
class PlanConfig:
    """What to plan: a model shape (a preset, a config.json, or the fields), a stage, GPUs, batch and precision."""

    preset: str = ""
    """A published shape by name: llama3-8b, llama3-70b, llama3-405b, llama3.2-1b, llama3.2-3b."""
    model: str = ""
    """A Hugging Face model directory or its config.json; only the config is read, never the weights."""
    hidden_size: int = 0
    """Hidden size h (overrides the preset's or config.json's when given)."""
    num_layers: int = 0
    """Decoder layers L."""
    num_heads: int = 0
    """Attention (query) heads a."""
    num_kv_heads: int = 0
    """Key/value heads g (GQA); 0 means as many as num_heads."""
    intermediate_size: int = 0
    """MLP (SwiGLU) width f."""
    vocab_size: int = 0
    """Vocabulary size V."""
    head_dim: int = 0
    """Head size d; 0 means hidden_size / num_heads."""
    tied_embeddings: bool | None = None
    """The LM head shares the embedding matrix (none: the preset's or config.json's value, else false)."""
    stage: Literal["sft", "reward", "dpo", "ppo", "grpo"] = "sft"
    """Which networks are in memory: sft and reward train one; dpo a policy (+ reference unless cached); ppo a
    policy with a value head, a reference and a reward model; grpo a policy, a reference and a reward model."""
    gpus: int = 1
    """Data-parallel GPUs N."""
    batch_size: int = 1
    """Micro-batch per GPU: sequences (sft), pairs (reward, dpo: chosen and rejected both run), or rollout rows
    per update minibatch (ppo, grpo)."""
    seq_len: int = 2048
    """Tokens per sequence (sft, reward, dpo)."""
    prompt_len: int = 512
    """Prompt tokens P (ppo, grpo)."""
    response_len: int = 512
    """Response tokens R (ppo, grpo)."""
    rollout_batch: int = 16
    """Sequences sampled at once per GPU (ppo, grpo; GRPO's K samples per prompt included): sets the KV cache."""
    precision: Literal["autocast", "bf16-mixed", "bf16", "fp32"] = "autocast"
    """autocast: rlhfkit's own layout under --precision bf16 (fp32 weights, gradients, AdamW and frozen networks,
    16-bit activations: 4+4+8 bytes per parameter); bf16-mixed: 16-bit weights and gradients, fp32 master weights
    and AdamW (2+2+12, the ZeRO paper's); bf16: everything 16-bit (2+2+4); fp32: everything 32-bit (4+4+8)."""
    gradient_checkpointing: bool = True
    """Recompute each decoder layer in backward (the total uses this; the table shows both)."""
    lora_rank: int = 16
    """Adapter rank r of the LoRA and QLoRA rows."""
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Matrices that get an adapter (rlhfkit's default lora.target_modules)."""
    cached_reference: bool = True
    """dpo only: the reference log-probs are computed once before training and cached (rlhfkit's default
    `reference: cached`), so no reference network is in memory while training; false keeps a frozen copy."""
    gpu_memory_gib: float = 80.0
    """Memory of one GPU, for the fits column."""
    json: bool = False
    """Print the plan as JSON instead of a table."""


@dataclass(frozen=True)
class Shape:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool
    head_dim: int

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def matrices(self) -> dict[str, tuple[int, int]]:
        """(d_in, d_out) of each linear of one decoder layer."""
        h, f = self.hidden_size, self.intermediate_size
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}

    def layer_linear_params(self) -> int:
        return sum(i * o for i, o in self.matrices().values())

    def layer_params(self) -> int:
        return self.layer_linear_params() + 2 * self.hidden_size

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def head_params(self) -> int:
        return 0 if self.tied_embeddings else self.vocab_size * self.hidden_size

    def lm_params(self) -> int:
        return self.embedding_params() + self.head_params() + self.num_layers * self.layer_params() + self.hidden_size

    def reward_params(self) -> int:
        return self.embedding_params() + self.num_layers * self.layer_params() + 2 * self.hidden_size

    def adapter_params(self, rank: int, targets: list[str]) -> int:
        m = self.matrices()
        return self.num_layers * sum(rank * (m[t][0] + m[t][1]) for t in targets)


# ------------------------------------------------------------------------------------------------- the shape
def _positive(value: Any, name: str, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}; {fix}.")
    return value


def read_hf_config(path: str) -> dict[str, Any]:
    """Shape fields from a Hugging Face config.json (a model directory or the file itself)."""
    p = Path(path).expanduser()
    file = p / "config.json" if p.is_dir() else p
    if not file.is_file():
        raise UserError(f"--model {path}: no config.json there; pass a Hugging Face model directory or its "
                        "config.json (only the config is read).")
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{file} is not valid JSON ({exc}); pass the model's config.json.") from None
    if not isinstance(raw, dict):
        raise UserError(f"{file} must hold a JSON object of config fields.")
    if "hidden_size" not in raw and isinstance(raw.get("text_config"), dict):  # multimodal: the language model's
        raw = {**raw["text_config"], "tie_word_embeddings": raw.get("tie_word_embeddings",
                                                                   raw["text_config"].get("tie_word_embeddings"))}
    missing = [hf for ours, hf in HF_KEYS.items() if ours != "num_kv_heads" and hf not in raw]
    if missing:
        flags = ", ".join("--" + ours.replace("_", "-") for ours, hf in HF_KEYS.items() if hf in missing)
        raise UserError(f"{file} has no {', '.join(missing)}; it is not a decoder LM config this planner reads. "
                        f"Pass the shape with {flags} instead (or fix the config).")
    out = {ours: raw[hf] for ours, hf in HF_KEYS.items() if hf in raw and raw[hf] is not None}
    if raw.get("head_dim"):
        out["head_dim"] = raw["head_dim"]
    out["tied_embeddings"] = bool(raw.get("tie_word_embeddings", False))
    for name, value in out.items():
        if name != "tied_embeddings":
            _positive(value, f"{file}: {HF_KEYS.get(name, name)}", "fix the config or pass the shape as flags")
    return out


def resolve_shape(cfg: PlanConfig) -> Shape:
    """The shape from --preset or --model, with any shape flag given on top; one clear error for each bad input."""
    if cfg.preset and cfg.model:
        raise ConfigError("--preset and --model both give the shape; pass one of them.")
    base: dict[str, Any] = {}
    if cfg.preset:
        if cfg.preset not in PRESETS:
            close = difflib.get_close_matches(cfg.preset, list(PRESETS), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(f"unknown preset {cfg.preset!r}; {hint}presets: {', '.join(PRESETS)} (or pass --model "
                              "DIR or the shape fields).")
        base = dict(PRESETS[cfg.preset])
    elif cfg.model:
        base = read_hf_config(cfg.model)
    for name in SHAPE_FIELDS + ("head_dim",):
        value = getattr(cfg, name)
        if value != 0:
            base[name] = _positive(value, name, f"pass --{name.replace('_', '-')} N with N >= 1")
    if cfg.tied_embeddings is not None:
        base["tied_embeddings"] = cfg.tied_embeddings
    missing = [n for n in SHAPE_FIELDS if n != "num_kv_heads" and n not in base]
    if missing:
        flags = " ".join(f"--{n.replace('_', '-')} N" for n in missing)
        raise ConfigError(f"the model shape lacks {', '.join(missing)}; pass {flags}, or --preset NAME "
                          f"({', '.join(PRESETS)}), or --model DIR.")
    h, a = base["hidden_size"], base["num_heads"]
    g = base.get("num_kv_heads") or a
    if a % g:
        raise ConfigError(f"num_heads ({a}) is not a multiple of num_kv_heads ({g}); GQA shares each KV head among "
                          "a whole number of query heads. Fix --num-kv-heads.")
    d = base.get("head_dim") or 0
    if not d:
        if h % a:
            raise ConfigError(f"hidden_size ({h}) is not a multiple of num_heads ({a}); pass --head-dim to give the "
                              "head size, or fix one of them.")
        d = h // a
    return Shape(h, base["num_layers"], a, g, base["intermediate_size"], base["vocab_size"],
                 bool(base.get("tied_embeddings", False)), d)


def validate(cfg: PlanConfig) -> None:
    for name in ("gpus", "batch_size", "prompt_len", "response_len", "rollout_batch", "lora_rank"):
        _positive(getattr(cfg, name), name, f"pass --{name.replace('_', '-')} N with N >= 1")
    if isinstance(cfg.seq_len, bool) or not isinstance(cfg.seq_len, int) or cfg.seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2 tokens (a log-prob needs a token before it), got "
                          f"{cfg.seq_len!r}; pass --seq-len N.")
    if not (math.isfinite(cfg.gpu_memory_gib) and cfg.gpu_memory_gib > 0):
        raise ConfigError(f"gpu_memory_gib must be a positive number, got {cfg.gpu_memory_gib}; pass "
                          "--gpu-memory-gib 80.")
    bad = [t for t in cfg.lora_targets if t not in LORA_MODULES]
    if bad or not cfg.lora_targets:
        raise ConfigError(f"lora_targets {bad or '(empty)'} are not Llama matrices; choose from "
                          f"{', '.join(LORA_MODULES)}.")


# ---------------------------------------------------------------------------------------------- activations
def _bytes(precision: str) -> tuple[float, float, float, float]:
    """(trained weight, gradient, optimizer, frozen weight) bytes per parameter; see the module docstring."""
    return {"autocast": (4, 4, 8, 4), "bf16-mixed": (2, 2, 12, 2), "bf16": (2, 2, 4, 2), "fp32": (4, 4, 8, 4)}[precision]


def layer_activation_bytes(shape: Shape, tokens: int, act_bytes: int, lora: tuple[int, list[str]] | None) -> int:
    """Bytes autograd keeps for one decoder layer over `tokens` tokens (module docstring, "Activations")."""
    h, f, q, kv = shape.hidden_size, shape.intermediate_size, shape.q_dim, shape.kv_dim
    norm_inputs = 2 * 4 * h  # HF's RMSNorm upcasts its input to float32 and keeps it
    attention = q + 2 * kv + q  # q, k after RoPE and v; sdpa's output
    if lora is None:
        elems = 2 * h + 2 * h + attention + q + 4 * f  # normalised outputs, linear inputs, attention, o input, SwiGLU
    else:
        rank, targets = lora
        t = set(targets)
        elems = attention + 3 * f + rank * len(t)  # SwiGLU keeps gate, silu(gate), up; each adapter its r-wide middle
        elems += h * bool(t & {"q_proj", "k_proj", "v_proj"}) + h * bool(t & {"gate_proj", "up_proj"})
        elems += q * ("o_proj" in t) + f * ("down_proj" in t)
    return tokens * (norm_inputs + act_bytes * elems + 4 * shape.num_heads)


def activation_bytes(shape: Shape, tokens: int, head_rows: int, act_bytes: int, checkpointing: bool,
                     lora: tuple[int, list[str]] | None) -> int:
    layer = layer_activation_bytes(shape, tokens, act_bytes, lora)
    h = shape.hidden_size
    final = tokens * (4 * h + act_bytes * h * (lora is None)) + head_rows * act_bytes * h
    if checkpointing:  # each layer's input, plus the one layer being recomputed
        return shape.num_layers * tokens * act_bytes * h + layer + final
    return shape.num_layers * layer + final


def logit_bytes(vocab_size: int, rows: int) -> int:
    """Peak float32 logits of rlhfkit's chunked LM head (models.chunked_head_logprobs)."""
    if rows == 0:
        return 0
    per_chunk = max(1, LOGIT_CHUNK_BYTES // (4 * vocab_size))
    return LOGIT_CHUNK_COPIES * min(rows, per_chunk) * 4 * vocab_size


def kv_cache_bytes(shape: Shape, rows: int, length: int, act_bytes: int) -> int:
    return 2 * shape.num_layers * shape.kv_dim * length * rows * act_bytes


# ------------------------------------------------------------------------------------------------- the plan
@dataclass
class Network:
    name: str
    params: int
    trained: bool
    note: str = ""


def networks(cfg: PlanConfig, shape: Shape) -> list[Network]:
    """The networks a stage holds in memory while it trains."""
    lm, rm = shape.lm_params(), shape.reward_params()
    if cfg.stage == "sft":
        return [Network("policy", lm, True)]
    if cfg.stage == "reward":
        return [Network("reward model", rm, True, "the LM body with a score head instead of the LM head")]
    if cfg.stage == "dpo":
        ref = ([] if cfg.cached_reference else [Network("reference", lm, False)])
        note = ("reference log-probs cached before training (reference: cached), so no reference network is "
                "resident" if cfg.cached_reference else "")
        return [Network("policy", lm, True, note)] + ref
    reward = Network("reward model", rm, False, "assumed the policy's shape")
    if cfg.stage == "ppo":
        return [Network("policy + value head", lm + shape.hidden_size + 1, True),
                Network("reference", lm, False), reward]
    return [Network("policy", lm, True), Network("reference", lm, False), reward]


def stage_tokens(cfg: PlanConfig) -> tuple[int, int]:
    """(tokens in one micro-batch's forward, rows of log-probs through the LM head)."""
    if cfg.stage == "sft":
        return cfg.batch_size * cfg.seq_len, cfg.batch_size * (cfg.seq_len - 1)
    if cfg.stage == "reward":  # chosen and rejected in one forward; a score head, no LM head
        return 2 * cfg.batch_size * cfg.seq_len, 0
    if cfg.stage == "dpo":
        return 2 * cfg.batch_size * cfg.seq_len, 2 * cfg.batch_size * (cfg.seq_len - 1)
    # ppo, grpo: log-probs of response tokens only (logprobs_of's keep)
    return cfg.batch_size * (cfg.prompt_len + cfg.response_len), cfg.batch_size * cfg.response_len


def strategy_bytes(cfg: PlanConfig, shape: Shape, strategy: str, nets: list[Network]) -> dict[str, float]:
    """Per-GPU bytes of weights, gradients, optimizer and gathered working set under one strategy."""
    wb, gb, ob, fb = _bytes(cfg.precision)
    n = cfg.gpus
    out = {"weights": 0.0, "gradients": 0.0, "optimizer": 0.0, "gathered": 0.0}
    if strategy in ("LoRA", "QLoRA"):
        adapters = shape.adapter_params(cfg.lora_rank, cfg.lora_targets)
        for net in nets:
            if net.name == "reference":
                continue  # the policy with its adapter disabled
            if not net.trained:
                out["weights"] += fb * net.params
                continue
            trainable = adapters + (net.params - shape.lm_params() if cfg.stage == "ppo" else 0)  # + value head
            base = net.params - (trainable - adapters)
            if strategy == "QLoRA":
                linear = shape.num_layers * shape.layer_linear_params()
                out["weights"] += linear * QLORA_BITS / 8 + fb * (base - linear)
            else:
                out["weights"] += fb * base
            out["weights"] += wb * trainable
            out["gradients"] += gb * trainable
            out["optimizer"] += ob * trainable
        return out
    shard = n if strategy in ("FSDP", "ZeRO-3") else 1
    state_shard = n if strategy in ("FSDP", "ZeRO-3", "ZeRO-2") else 1
    for net in nets:
        if net.trained:
            out["weights"] += wb * net.params / shard
            out["gradients"] += gb * net.params / state_shard
            out["optimizer"] += ob * net.params / state_shard
        else:
            out["weights"] += fb * net.params / shard
    if shard > 1:
        unit = max(shape.layer_params(), shape.embedding_params(), shape.head_params())
        out["gathered"] = 3 * unit * wb
    return out


def plan(cfg: PlanConfig) -> dict[str, Any]:
    """The whole plan as plain data (bytes), for the table and for --json."""
    validate(cfg)
    shape = resolve_shape(cfg)
    nets = networks(cfg, shape)
    act_bytes = 4 if cfg.precision == "fp32" else 2
    tokens, head_rows = stage_tokens(cfg)
    logits = logit_bytes(shape.vocab_size, head_rows)
    rollout = cfg.stage in ("ppo", "grpo")
    kv = kv_cache_bytes(shape, cfg.rollout_batch, cfg.prompt_len + cfg.response_len, act_bytes) if rollout else 0
    lora = (cfg.lora_rank, list(cfg.lora_targets))
    rows: dict[str, dict[str, float]] = {}
    for strategy in STRATEGIES:
        adapter = lora if strategy in ("LoRA", "QLoRA") else None
        acts = {ckpt: activation_bytes(shape, tokens, head_rows, act_bytes, ckpt, adapter) for ckpt in (True, False)}
        row = strategy_bytes(cfg, shape, strategy, nets)
        head_grad = (logits > 0 and strategy in ("DDP", "ZeRO-2")) * _bytes(cfg.precision)[1] * \
            shape.vocab_size * shape.hidden_size
        row.update(activations_checkpointed=acts[True], activations_no_checkpointing=acts[False],
                   activations=acts[cfg.gradient_checkpointing], logits=logits + head_grad, kv_cache=kv)
        states = row["weights"] + row["gradients"] + row["optimizer"] + row["gathered"]
        row["total"] = states + max(row["activations"] + row["logits"], kv)
        row["fits"] = row["total"] <= cfg.gpu_memory_gib * GIB
        rows[strategy] = row
    return {
        "config": dataclasses.asdict(cfg),
        "shape": dataclasses.asdict(shape),
        "params": shape.lm_params(),
        "adapter_params": shape.adapter_params(cfg.lora_rank, cfg.lora_targets),
        "networks": [dataclasses.asdict(n) for n in nets],
        "tokens_per_micro_batch": tokens,
        "logprob_rows": head_rows,
        "strategies": rows,
    }


def format_table(p: dict[str, Any]) -> str:
    cfg, shape = p["config"], p["shape"]
    name = cfg["preset"] or cfg["model"] or "custom shape"
    ckpt = "on" if cfg["gradient_checkpointing"] else "off"
    lines = [
        f"{name}: {p['params'] / 1e9:.2f}B parameters (h={shape['hidden_size']}, L={shape['num_layers']}, "
        f"heads={shape['num_heads']}, kv heads={shape['num_kv_heads']}, mlp={shape['intermediate_size']}, "
        f"vocab={shape['vocab_size']}, tied={shape['tied_embeddings']})",
        f"stage {cfg['stage']} on {cfg['gpus']} GPU(s), {cfg['precision']}, micro-batch {cfg['batch_size']}, "
        f"{p['tokens_per_micro_batch']} tokens per micro-batch forward, gradient checkpointing {ckpt}; "
        f"LoRA/QLoRA rank {cfg['lora_rank']} on {','.join(cfg['lora_targets'])} ({p['adapter_params'] / 1e6:.1f}M "
        "adapter parameters)",
        "networks held:",
    ]
    for net in p["networks"]:
        role = "trained" if net["trained"] else "frozen"
        lines.append(f"  {net['name']}: {net['params'] / 1e9:.2f}B, {role}" + (f"; {net['note']}" if net["note"] else ""))
    if cfg["stage"] in ("ppo", "grpo"):
        lines.append("  (LoRA/QLoRA: the reference is the policy with its adapter disabled: no extra copy)")
    lines.append("")
    lines.append(f"per-GPU GiB (act = activations with gradient checkpointing {ckpt}, used in the total; "
                 f"act {'off' if ckpt == 'on' else 'on'} shown beside)")
    cols = ["weights", "grads", "optim", "gather", "act", "act " + ("off" if ckpt == "on" else "on"), "logits",
            "kv", "total"]
    keys = ["weights", "gradients", "optimizer", "gathered", "activations",
            "activations_no_checkpointing" if ckpt == "on" else "activations_checkpointed", "logits", "kv_cache",
            "total"]
    lines.append(f"{'strategy':<9}" + "".join(f"{c:>10}" for c in cols) + f"  fits {cfg['gpu_memory_gib']:g} GiB")
    for strategy, row in p["strategies"].items():
        lines.append(f"{strategy:<9}" + "".join(f"{row[k] / GIB:>10.2f}" for k in keys)
                     + f"  {'yes' if row['fits'] else 'no'}")
    lines.append("total = weights + grads + optim + gather + max(act + logits, kv): the rollout's KV cache is "
                 "freed before the update. Formulas and sources: rlhfkit/plan.py's docstring.")
    return "\n".join(lines)


def main(cfg: PlanConfig) -> dict[str, Any]:
    p = plan(cfg)
    print(json.dumps(p, indent=2) if cfg.json else format_table(p))
    return p
