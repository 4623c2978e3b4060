"""Typed dataclass configs: YAML and `--dotted.flag value` overrides, field docs for --help, strict keys.

Precedence is dataclass default < YAML file (`--config`) < command-line flag. Any key that is not a field is an
error naming the key and the closest valid one. This module imports only the standard library and PyYAML so
`rlhfkit <stage> --help` stays fast.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import os
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rlhfkit.errors import ConfigError

_NONE_WORDS = {"none", "null", "~"}
_TRUE_WORDS = {"true", "yes", "on", "1"}
_FALSE_WORDS = {"false", "no", "off", "0"}


# --------------------------------------------------------------------------------------------------- shared fields
@dataclass
class LoraConfig:
    """Low-rank adapters (peft). With LoRA on, the reference model is the same network with the adapter disabled."""

    enabled: bool = False
    """Train a LoRA adapter instead of all weights."""
    r: int = 8
    """Adapter rank."""
    alpha: int = 16
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapter input; keep 0 for RL so sampling and training see the same network."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names (suffixes) that receive an adapter."""
    load_in_4bit: bool = False
    """QLoRA (Dettmers et al. 2023): load the frozen base in 4-bit NF4 with double quantization (bitsandbytes,
    `pip install bitsandbytes`; GPUs and CPUs), adapters in full precision. The saved model merges the adapter
    into the base's original full-precision weights. Policy stages (sft, dpo, kto, ppo, online-dpo); not under
    FSDP."""


@dataclass
class TrainConfig:
    """Fields every training stage shares (README, "Bring your own model and data")."""

    model: str = ""
    """Hugging Face model directory (or a hub id where a hub is reachable) to start from."""
    data: str = ""
    """Training data: a JSONL/JSON/Parquet file (.jsonl.gz, .json.gz too) or a `datasets` directory saved with
    save_to_disk."""
    data_split: str = "train"
    """Split of --data to read when it is a saved DatasetDict (e.g. train_prefs for
    HuggingFaceH4/ultrafeedback_binarized)."""
    eval_data_split: str = "train"
    """Split of the held-out data file (eval_data, eval_prompts) to read when it is a saved DatasetDict (e.g.
    test_prefs)."""
    chat: bool = False
    """Read plain-string prompts as one user turn (and string responses as the assistant's turn), rendered by the
    chat template in every stage, for chat models trained on data that stores prompts as text (e.g. the `prompt`
    column of HuggingFaceH4/ultrafeedback_binarized). Default: a string prompt is plain text and only message
    lists are templated (TRL's rule), the same in every stage."""
    data_fields: dict[str, str] = field(default_factory=dict)
    """Rename data columns before reading, ours=theirs: --data-fields prompt=input,system=system (in YAML a
    mapping). Applies to --data and the held-out data; a row without a mapped column is an error. A mapped system
    column becomes the system message before the prompt, which makes the rows chat messages (so the tokenizer
    needs a chat template); an empty system text gives no system message."""
    output_dir: str = ""
    """Run directory: config.yaml, metrics.jsonl, checkpoints/ and the final model are written here."""
    max_steps: int = 100
    """Optimizer steps to run (each step sees batch_size x grad_accum x processes examples)."""
    seed: int = 0
    """Seed for every random number generator and for the data order."""
    resume: bool = False
    """Continue from the newest complete checkpoint in output_dir/checkpoints."""
    overwrite: bool = False
    """Replace a finished or abandoned run already in output_dir (without it, that is an error)."""
    batch_size: int = 8
    """Examples per micro-batch on each process."""
    grad_accum: int = 1
    """Micro-batches accumulated into one optimizer step."""
    learning_rate: float = 1e-4
    """Peak learning rate of AdamW."""
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Decay after warm-up: linear to 0 (lm-human-preferences anneals linearly), cosine to 0, or constant."""
    warmup_steps: int = 0
    """Steps of linear warm-up from 0 to learning_rate."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Mixed precision for the forward pass. Keep fp32 on CPUs: bf16 matmul is ~30x slower on many of them."""
    cpu: bool = False
    """Run on the CPU even when a GPU is present."""
    compile: bool = False
    """torch.compile the trained model's forward (and a frozen reference model's): fused kernels, fewer launches.
    The first step of each new batch shape compiles (tens of seconds; after the second shape the graph is
    compiled for dynamic shapes); pays off on a GPU and in long runs, barely on a CPU. Weights, checkpoints and
    the saved model are unchanged."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward instead of storing them (Hugging Face's gradient
    checkpointing, non-reentrant): activation memory of one layer instead of all, for about a third more compute.
    The same losses and gradients."""
    sharding: Literal["auto", "none", "fsdp", "zero2", "zero3"] = "auto"
    """Under several processes: `fsdp` shards the trained model's weights, gradients and optimizer state over
    them (FSDP2, each decoder layer a unit); `zero2` partitions the optimizer state and gradients (DeepSpeed
    ZeRO-2), `zero3` the weights too (ZeRO-3); `none` replicates it (DDP). `auto` follows the launcher: FSDP or
    DeepSpeed when `accelerate launch` was given such a config (examples/accelerate/fsdp.yaml, zero2.yaml,
    zero3.yaml), else DDP. PPO's frozen reference and reward models follow `frozen_models` (replicated under
    DeepSpeed)."""
    log_every: int = 1
    """Write metrics every N optimizer steps."""
    save_every: int = 0
    """Write a checkpoint every N optimizer steps (0: only the final model)."""
    keep_checkpoints: int = 2
    """Newest checkpoints to keep on disk (older ones are deleted after a new one is complete)."""
    eval_every: int = 0
    """Evaluate on the held-out split every N steps (0: only at the end)."""
    report_to: list[str] = field(default_factory=lambda: ["jsonl", "tensorboard"])
    """Metric sinks: any of jsonl, tensorboard, wandb (wandb needs the `wandb` extra)."""
    progress: bool = True
    """Show a progress bar with the headline metrics."""
    dropout_off: bool = True
    """Set every dropout probability in the model to 0 (standard for RLHF; SFT may turn it back on)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapter settings."""

    def validate(self) -> None:
        """Raise ConfigError for values no run can use. Stages extend this."""
        if not self.model:
            raise ConfigError("--model is required: pass a Hugging Face model directory (or `model:` in the YAML).")
        if not self.data:
            raise ConfigError("--data is required: pass a data file or `datasets` directory (or `data:` in the YAML).")
        if not self.output_dir:
            raise ConfigError("--output-dir is required: pass the run directory to write into.")
        for name in ("max_steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("save_every", "eval_every", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 or more, got {getattr(self, name)}.")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints must be at least 1, got {self.keep_checkpoints}.")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ConfigError(f"learning_rate must be a positive number, got {self.learning_rate}.")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}.")
        for name in ("adam_eps", "weight_decay", "max_grad_norm"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ConfigError(f"{name} must be 0 or more, got {getattr(self, name)}.")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be in [0, 2**63), got {self.seed} (torch seeds are 64-bit).")
        if self.warmup_steps > self.max_steps:
            raise ConfigError(f"warmup_steps ({self.warmup_steps}) is more than max_steps ({self.max_steps}); the "
                              "learning rate would never reach its peak. Lower warmup_steps.")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other: --resume continues the run in "
                              "output_dir, --overwrite replaces it; pass one of them.")
        if self.lora.r < 1:
            raise ConfigError(f"lora.r must be at least 1, got {self.lora.r}.")
        if self.lora.alpha <= 0:
            raise ConfigError(f"lora.alpha must be positive, got {self.lora.alpha}.")
        if not 0.0 <= self.lora.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.lora.dropout}.")
        if self.lora.load_in_4bit and not self.lora.enabled:
            raise ConfigError("lora.load_in_4bit needs lora.enabled: QLoRA trains LoRA adapters on the 4-bit base "
                              "(set lora.enabled: true, or drop lora.load_in_4bit).")
        if self.lora.enabled and not self.lora.target_modules:
            raise ConfigError("lora.target_modules is empty; name the modules to adapt (e.g. q_proj,v_proj).")
        bad = sorted(set(self.report_to) - {"jsonl", "tensorboard", "wandb"})
        if bad:
            raise ConfigError(f"report_to has unknown sink(s) {bad}; use any of jsonl, tensorboard, wandb.")
        from rlhfkit.data.formats import check_fields

        check_fields(self.data_fields)

    def data_source(self, path: str | None = None, held_out: bool = False) -> Any:
        """`path` (default --data) as the readers take it: a `data.readers.DataPath` carrying data_split (or
        eval_data_split for held-out data) and the data_fields mapping."""
        from rlhfkit.data.readers import DataPath

        if held_out:
            return DataPath(path or "", self.eval_data_split, self.data_fields, "--eval-data-split", self.chat)
        return DataPath(path or self.data, self.data_split, self.data_fields, "--data-split", self.chat)


@dataclass
class PreferenceDataConfig:
    """Fields of the stages that read preference pairs (reward, dpo)."""

    preference_ties: Literal["error", "drop"] = "error"
    """Rows rating both responses the same (score_chosen == score_rejected, as in UltraFeedback) carry no
    preference: error stops at the first one, naming it; drop leaves them out and logs how many and which rows."""
    margin_from_scores: bool = False
    """Take each pair's margin from its ratings, score_chosen - score_rejected (rows without both scores keep
    their own margin). The reward model uses it in -log sigma(r_c - r_r - m) (with use_margin); DPO's losses take
    no margin."""

    criterion: str = ""
    """Train on the rows judged on this criterion only (the `criterion` column of a rubric export, e.g.
    helpfulness); a file whose rows name several criteria needs it."""

    def reader_options(self, tokenizer: Any) -> dict[str, Any]:
        """Keyword arguments of read_preferences for this config and tokenizer: whether it has a chat template
        (Anthropic HH transcripts stay raw text without one), ties, margin_from_scores and the criterion."""
        return {"chat": getattr(tokenizer, "chat_template", None) is not None, "ties": self.preference_ties,
                "margin_from_scores": self.margin_from_scores, "criterion": self.criterion or None}


# ------------------------------------------------------------------------------------------------ introspection
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def is_config(obj: Any) -> bool:
    return dataclasses.is_dataclass(obj)


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal right after a field) of cls and its dataclass bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for stmt, nxt in zip(body, body[1:] + [None]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def all_keys(cls: type, prefix: str = "") -> dict[str, Any]:
    """Every leaf key as a dotted path -> its type."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            out.update(all_keys(tp, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = tp
    return out


def _norm(key: str) -> str:
    return key.replace("-", "_")


def _unknown_key(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(_norm(key), valid, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"unknown config key {key!r} in {where}{hint}")


def _unknown_flag(flag: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(_norm(flag), valid, n=1, cutoff=0.6)
    hint = f"; did you mean '--{close[0].replace('_', '-')}'?" if close else "; see --help for the valid flags"
    return ConfigError(f"unknown flag {'--' + flag!r}{hint}")


# ------------------------------------------------------------------------------------------------- conversion
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in typing.get_args(tp)) + "}"
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _type_name(args[0]) + "|none" if len(args) == 1 else "|".join(_type_name(a) for a in args)
    if origin in (list, tuple):
        return f"{_type_name(typing.get_args(tp)[0])},..."
    if origin is dict:
        return "key=value,..."
    return getattr(tp, "__name__", str(tp)).lower()


def coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Convert a YAML value or a command-line string to tp, or raise ConfigError naming key and expected type."""

    def fail(reason: str = "") -> ConfigError:
        return ConfigError(
            f"{where}: '{key}' must be {_type_name(tp)}, got {value!r}" + (f" ({reason})" if reason else "")
        )

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in _NONE_WORDS)):
            return None
        options = [a for a in args if a is not type(None)]
        for arg in options:
            try:
                return coerce(value, arg, key, where)
            except ConfigError as exc:
                if len(options) == 1:  # an optional value: its own reason ("a finite number") is the useful one
                    raise ConfigError(f"{exc} (or none)") from None
                continue
        raise fail()
    if origin is Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise fail(f"choose one of {', '.join(map(str, choices))}")
    if origin in (list, tuple):
        (elem, *_rest) = typing.get_args(tp) or (str,)
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                value = yaml.safe_load(text)
            else:
                value = [v.strip() for v in text.split(",") if v.strip()] if text else []
        if not isinstance(value, (list, tuple)):
            raise fail("expected a list")
        items = [coerce(v, elem, f"{key}[{i}]", where) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp) or (Any, Any)
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("{"):
                value = yaml.safe_load(text)
            else:  # the command-line form k=v,k=v
                pairs = [item.partition("=") for item in text.split(",") if item.strip()]
                if any(not eq or not k.strip() for k, eq, _ in pairs):
                    raise fail("write key=value pairs separated by commas, e.g. prompt=input,system=system")
                value = {k.strip(): v.strip() for k, _, v in pairs}
        if not isinstance(value, dict):
            raise fail("expected a mapping")
        return {coerce(k, key_tp, f"{key} key", where): coerce(v, value_tp, f"{key}.{k}", where)
                for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE_WORDS | _FALSE_WORDS:
            return value.lower() in _TRUE_WORDS
        raise fail("use true or false")
    if tp is int:
        if isinstance(value, bool):
            raise fail()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:
                    as_float = float(value)
                except ValueError:
                    raise fail() from None
                if math.isfinite(as_float) and as_float.is_integer():
                    return int(as_float)
        raise fail()
    if tp is float:
        if isinstance(value, bool):
            raise fail()
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise fail() from None
        else:
            raise fail()
        if not math.isfinite(number):  # no setting means anything at NaN or infinity; they fail far from here
            raise fail("a finite number")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise fail()
    if tp is Any:
        return value
    raise fail(f"unsupported field type {tp}")


def from_dict(cls: type, data: dict[str, Any], where: str, base: Any = None, prefix: str = "") -> Any:
    """Build cls from a nested mapping, starting from `base` (an instance) or the defaults; strict keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: '{prefix.rstrip('.') or 'the config'}' must be a mapping of keys to values.")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    valid = list(all_keys(cls, prefix))
    kwargs: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = _norm(str(raw_key))
        if key not in names:
            raise _unknown_key(prefix + str(raw_key), valid, where)
        tp = hints[key]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            sub_base = getattr(base, key) if base is not None else None
            kwargs[key] = from_dict(tp, value if value is not None else {}, where, sub_base, f"{prefix}{key}.")
        else:
            kwargs[key] = coerce(value, tp, prefix + key, where)
    if base is None:
        return cls(**kwargs)
    return dataclasses.replace(base, **kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist; check the --config path.")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of keys to values, not {type(data).__name__}.")
    return data


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)


def load_config(cls: type, path: str | os.PathLike) -> Any:
    return from_dict(cls, load_yaml(path), str(path))


# ------------------------------------------------------------------------------------------------------ the CLI
def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        tree = tree.setdefault(part, {})
    tree[parts[-1]] = value


def parse_args(cls: type, argv: list[str], prog: str = "rlhfkit") -> Any:
    """Parse `[--config FILE] [--key value | --key=value | --flag | --no-flag]...` into cls (strict keys)."""
    keys = all_keys(cls)
    yaml_path: str | None = None
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument {token!r}; flags look like --key value (see {prog} --help).")
        name, has_eq, inline = token[2:].partition("=")
        key = _norm(name)
        if key == "config":
            if not has_eq:
                if i + 1 >= len(argv):
                    raise ConfigError("--config needs a YAML file path.")
                inline, i = argv[i + 1], i + 1
            yaml_path = inline
            i += 1
            continue
        negated = key.startswith("no_") and key not in keys and key[3:] in keys
        if negated:
            key = key[3:]
        if key not in keys:
            raise _unknown_flag(name, list(keys))
        tp = keys[key]
        if tp is bool and not has_eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is not None and nxt.lower() in _TRUE_WORDS | _FALSE_WORDS:
                value: Any = nxt
                i += 1
            else:
                value = "true"
            if negated:
                value = "false" if coerce(value, bool, key, "the command line") else "true"
        elif has_eq:
            value = inline
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{name} needs a value ({_type_name(tp)}).")
            value, i = argv[i + 1], i + 1
        _set_dotted(overrides, key, coerce(value, tp, key, "the command line"))
        i += 1
    cfg = from_dict(cls, load_yaml(yaml_path), yaml_path) if yaml_path else cls()
    return from_dict(cls, overrides, "the command line", base=cfg)


def format_help(cls: type, prog: str, summary: str) -> str:
    lines = [f"usage: {prog} [--config FILE.yaml] [--key value ...]", "", summary, ""]
    lines.append("Precedence: defaults < --config YAML < flags. Nested keys use dots: --lora.r 16.")
    lines.append("Booleans: --flag, --flag false, --no-flag. Lists: --key a,b,c. Mappings: --key a=x,b=y.")
    lines.append("")

    def walk(klass: type, prefix: str, default_obj: Any) -> None:
        docs = field_docs(klass)
        hints = _hints(klass)
        for f in dataclasses.fields(klass):
            tp = hints[f.name]
            current = getattr(default_obj, f.name)
            if isinstance(tp, type) and dataclasses.is_dataclass(tp):
                lines.append(f"[{prefix}{f.name}] {docs.get(f.name, '')}")
                walk(tp, f"{prefix}{f.name}.", current)
                continue
            flag = "--" + (prefix + f.name).replace("_", "-")
            shown = ",".join(map(str, current)) if isinstance(current, (list, tuple)) else current
            name = _type_name(tp)
            lines.append(f"  {flag} {name if name.startswith('{') else name.upper()}  (default: {shown!s})")
            doc = docs.get(f.name, "")
            if doc:
                lines.extend("      " + ln for ln in textwrap.wrap(doc, 96))

    walk(cls, "", cls())
    return "\n".join(lines) + "\n"
