"""What an AI judge is, as the feedback stages see it: a comparison asked, the verdict returned, and the judge and
backend protocols. A leaf module (standard library and the constitution's records only), so the backends in
`feedback.judges`, the playground's simulated judge and the judge factory (`rlhfkit.judging`) all depend on it and
not on each other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from rlhfkit.feedback.constitution import Principle


# ------------------------------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class Comparison:
    """Ask which of two responses to one prompt is better under a principle; `first` is shown as option (A)."""

    prompt: str
    first: str
    second: str
    principle: Principle


@dataclass(frozen=True)
class Verdict:
    """A judge's answer to one Comparison."""

    prob_first: float | None
    """P(first response better) in [0, 1]; None when the judge gave no usable answer (abstained)."""
    method: str
    """How it was obtained: logprobs, text, rule (a simulated judge) or none (abstained)."""
    raw: str = ""
    """The parsed text, for inspection (empty for log-prob answers)."""


class Judge(Protocol):
    """What the AI-feedback stages need from a judge."""

    name: str

    def compare(self, items: Sequence[Comparison]) -> list[Verdict]: ...

    def critique(self, prompts: Sequence[str], responses: Sequence[str], principles: Sequence[Principle]) -> list[str]: ...

    def revise(self, prompts: Sequence[str], responses: Sequence[str], principles: Sequence[Principle],
               critiques: Sequence[str]) -> list[str]: ...


class Backend(Protocol):
    """A text model that completes prompts and (optionally) scores given continuations."""

    name: str
    """Identity for the cache: the same name must mean the same model."""

    def generate(self, prompts: Sequence[str], max_tokens: int, temperature: float) -> list[str]: ...

    def option_logprobs(self, prompts: Sequence[str], options: Sequence[str]) -> list[list[float] | None]:
        """log p(option | prompt) for each option, or None for a prompt where the backend cannot tell."""
        ...
