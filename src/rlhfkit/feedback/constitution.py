"""Constitutions for AI feedback: YAML files of principles, each with a critique request, a revision request and
a comparison question (Constitutional AI, Bai et al. 2022, arXiv 2212.08073, sections 3 and 4), validated with
one clear error per mistake. `load_constitution(None)` gives the default shipped with the package."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from rlhfkit.errors import UserError

DEFAULT_NAME = "default"
_ID_RE = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")
_PRINCIPLE_KEYS = {"id", "critique", "revision", "comparison", "weight"}
_TOP_KEYS = {"name", "version", "principles", "templates"}

# The prompt shapes of the CAI paper: critique and revision requests follow the response (section 3.1, "Critique
# Request: ... Critique:"), and the comparison is a multiple-choice question whose answer the judge's
# log-probabilities of "(A)" / "(B)" decide (section 4.1). A constitution file may replace any of them; each must
# keep its placeholders.
DEFAULT_TEMPLATES = {
    "critique": ("Human: {prompt}\n\nAssistant: {response}\n\nCritique Request: {critique}\n\nCritique:"),
    "revision": ("Human: {prompt}\n\nAssistant: {response}\n\nCritique Request: {critique}\n\nCritique: "
                 "{critique_text}\n\nRevision Request: {revision}\n\nRevision:"),
    "comparison": ("Consider the following conversation between a human and an assistant:\n\nHuman: {prompt}\n\n"
                   "{question}\n\nOptions:\n(A) {first}\n(B) {second}\n\nThe answer is: ("),
}
TEMPLATE_FIELDS = {
    "critique": {"prompt", "response", "critique"},
    "revision": {"prompt", "response", "critique", "critique_text", "revision"},
    "comparison": {"prompt", "question", "first", "second"},
}


@dataclass(frozen=True)
class Principle:
    """One principle of a constitution."""

    id: str
    """Short identifier (lowercase letters, digits, '-' or '_'), recorded with every AI label."""
    critique: str
    """Critique request: what the feedback model should look for in a response."""
    revision: str
    """Revision request: how the feedback model should rewrite the response."""
    comparison: str
    """Comparison question asked of two responses ("Which response is less harmful?")."""
    weight: float = 1.0
    """Relative probability of drawing this principle (the paper samples one principle per critique/comparison)."""


@dataclass(frozen=True)
class Constitution:
    """A named list of principles plus the prompt templates that put them to a judge."""

    name: str
    principles: tuple[Principle, ...]
    templates: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_TEMPLATES))
    source: str = ""
    """The file it came from (or 'package default')."""

    def principle(self, principle_id: str) -> Principle:
        for p in self.principles:
            if p.id == principle_id:
                return p
        raise UserError(f"constitution {self.name!r} has no principle {principle_id!r}; its principles are "
                        f"{', '.join(p.id for p in self.principles)}.")

    def sample(self, rng: random.Random) -> Principle:
        """One principle drawn in proportion to its weight."""
        return rng.choices(self.principles, weights=[p.weight for p in self.principles])[0]


def _fail(where: str, message: str) -> UserError:
    return UserError(f"constitution {where}: {message}")


def _text(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(where, f"'{key}' must be a non-empty string, got {value!r}.")
    return " ".join(value.split()) if key != "template" else value


def parse_constitution(data: Any, where: str) -> Constitution:
    """Validate a loaded YAML mapping. Every error names the file, the principle and the key at fault."""
    if not isinstance(data, dict):
        raise _fail(where, "must be a mapping with 'name' and 'principles' (see the package default, "
                    "rlhfkit/feedback/constitutions/default.yaml).")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise _fail(where, f"unknown key(s) {unknown}; a constitution has {sorted(_TOP_KEYS)}.")
    name = _text(data.get("name"), where, "name")
    raw = data.get("principles")
    if not isinstance(raw, list) or not raw:
        raise _fail(where, "'principles' must be a non-empty list of principles (id, critique, revision, comparison).")
    principles: list[Principle] = []
    for i, item in enumerate(raw):
        at = f"principles[{i}]"
        if not isinstance(item, dict):
            raise _fail(where, f"{at} must be a mapping with id, critique, revision and comparison.")
        extra = sorted(set(item) - _PRINCIPLE_KEYS)
        if extra:
            raise _fail(where, f"{at} has unknown key(s) {extra}; a principle has {sorted(_PRINCIPLE_KEYS)}.")
        pid = item.get("id")
        if not isinstance(pid, str) or not _ID_RE.match(pid):
            raise _fail(where, f"{at}.id must be a short lowercase identifier like 'harmless', got {pid!r}.")
        at = f"principle {pid!r}"
        if any(p.id == pid for p in principles):
            raise _fail(where, f"{at} appears twice; give every principle its own id.")
        texts = {k: _text(item.get(k), where, f"{pid}.{k}") for k in ("critique", "revision", "comparison")}
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise _fail(where, f"{at} has weight {weight!r}; use a positive number.")
        principles.append(Principle(pid, **texts, weight=float(weight)))
    templates = dict(DEFAULT_TEMPLATES)
    given = data.get("templates") or {}
    if not isinstance(given, dict):
        raise _fail(where, "'templates' must be a mapping of critique / revision / comparison to a template.")
    for key, template in given.items():
        if key not in TEMPLATE_FIELDS:
            raise _fail(where, f"unknown template {key!r}; templates are {sorted(TEMPLATE_FIELDS)}.")
        template = _text(template, where, "template")
        found = set(re.findall(r"{(\w+)}", template))
        missing, extra = TEMPLATE_FIELDS[key] - found, found - TEMPLATE_FIELDS[key]
        if missing or extra:
            raise _fail(where, f"template {key!r} must use exactly the placeholders "
                        f"{sorted('{' + f + '}' for f in TEMPLATE_FIELDS[key])}; "
                        + (f"missing {sorted(missing)}" if missing else f"unknown {sorted(extra)}") + ".")
        templates[key] = template
    return Constitution(name, tuple(principles), templates, where)


def load_constitution(path: str | None = None) -> Constitution:
    """The constitution in a YAML file, or the package default when path is None or empty."""
    if not path or path == DEFAULT_NAME:
        text = resources.files("rlhfkit.feedback").joinpath("constitutions/default.yaml").read_text()
        return parse_constitution(yaml.safe_load(text), "package default")
    p = Path(path)
    if not p.is_file():
        raise UserError(f"constitution file {path} does not exist; pass a YAML file (or leave --constitution empty "
                        "for the default).")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"constitution {path} is not valid YAML: {exc}") from None
    return parse_constitution(data, str(path))
