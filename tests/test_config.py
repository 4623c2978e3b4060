import textwrap
from dataclasses import dataclass, field
from typing import Literal

import pytest

from rlhfkit.config import LoraConfig, field_docs, format_help, load_config, parse_args, save_config
from rlhfkit.errors import ConfigError
from rlhfkit.policy.sft import SFTConfig


@dataclass
class Inner:
    depth: int = 2
    """How deep."""


@dataclass
class Toy:
    learning_rate: float = 0.1
    """Step size."""
    name: str = "x"
    """A name."""
    flag: bool = False
    """A switch."""
    mode: Literal["a", "b"] = "a"
    """Which mode."""
    tags: list[str] = field(default_factory=lambda: ["p"])
    """Some tags."""
    limit: int | None = None
    """Optional limit."""
    inner: Inner = field(default_factory=Inner)
    """Nested section."""


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_precedence_default_yaml_cli(tmp_path):
    p = write(tmp_path, """
        learning_rate: 0.5
        name: from_yaml
        inner:
          depth: 7
    """)
    cfg = parse_args(Toy, ["--config", str(p), "--name", "from_cli"])
    assert cfg.learning_rate == 0.5  # YAML beats the default
    assert cfg.name == "from_cli"  # the flag beats YAML
    assert cfg.inner.depth == 7
    assert cfg.flag is False and cfg.mode == "a"  # untouched defaults


def test_flag_forms(tmp_path):
    cfg = parse_args(Toy, ["--flag", "--learning-rate=1e-4", "--inner.depth", "3", "--tags", "a,b", "--limit", "none"])
    assert cfg.flag is True and cfg.learning_rate == 1e-4 and cfg.inner.depth == 3 and cfg.tags == ["a", "b"]
    assert cfg.limit is None
    assert parse_args(Toy, ["--flag", "false"]).flag is False
    assert parse_args(Toy, ["--no-flag"]).flag is False
    assert parse_args(Toy, ["--limit", "5"]).limit == 5


def test_unknown_yaml_key_names_it_and_the_closest(tmp_path):
    p = write(tmp_path, "lerning_rate: 0.5\n")
    with pytest.raises(ConfigError) as err:
        parse_args(Toy, ["--config", str(p)])
    msg = str(err.value)
    assert "'lerning_rate'" in msg and "did you mean 'learning_rate'" in msg and str(p) in msg
    assert "\n" not in msg


def test_unknown_nested_key_and_flag():
    with pytest.raises(ConfigError, match=r"unknown flag '--inner.dpeth'; did you mean '--inner.depth'"):
        parse_args(Toy, ["--inner.dpeth", "3"])
    with pytest.raises(ConfigError, match=r"'--lerning-rate'; did you mean '--learning-rate'"):
        parse_args(Toy, ["--lerning-rate", "z"])
    with pytest.raises(ConfigError, match=r"'inner.dpeth' in c.yaml; did you mean 'inner.depth'"):
        from rlhfkit.config import from_dict
        from_dict(Toy, {"inner": {"dpeth": 1}}, "c.yaml")


def test_type_errors_name_key_and_type():
    with pytest.raises(ConfigError, match=r"'learning_rate' must be float, got 'fast'"):
        parse_args(Toy, ["--learning-rate", "fast"])
    with pytest.raises(ConfigError, match=r"'mode'.*choose one of a, b"):
        parse_args(Toy, ["--mode", "c"])
    with pytest.raises(ConfigError, match="needs a value"):
        parse_args(Toy, ["--name"])


def test_field_docs_and_help_list_every_field():
    docs = field_docs(SFTConfig)
    # fields from the base TrainConfig and the stage's own both carry docs
    for name in ("model", "data", "output_dir", "max_steps", "seed", "resume", "packing", "lora"):
        assert docs.get(name), name
    text = format_help(SFTConfig, "rlhfkit sft", "summary")
    for flag in ("--model", "--data", "--output-dir", "--max-steps", "--seed", "--resume", "--lora.r"):
        assert flag in text
    assert "Adapter rank." in text


def test_round_trip_through_yaml(tmp_path):
    cfg = parse_args(SFTConfig, ["--model", "m", "--data", "d", "--output-dir", "o", "--lora.enabled",
                                 "--lora.target-modules", "q_proj,v_proj"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(SFTConfig, tmp_path / "config.yaml")
    assert again == cfg
    assert again.lora == LoraConfig(enabled=True, target_modules=["q_proj", "v_proj"])


def test_validation_errors_are_clear():
    with pytest.raises(ConfigError, match="--model is required"):
        SFTConfig(data="d", output_dir="o").validate()
    with pytest.raises(ConfigError, match="batch_size must be at least 1"):
        SFTConfig(model="m", data="d", output_dir="o", batch_size=0).validate()
