"""A SIMULATED constitutional AI judge for the playground, where tiny models cannot follow a constitution.

It reads a playground response's text and applies the default constitution's principles (harmless, honest,
helpful, respectful, concise) with hand-written rules: it critiques, revises (by recomposing the response with the
flaw the principle names fixed) and compares two responses, giving P(first better) = σ(β (s₁ − s₂) + δ).

It is a stand-in for an LLM judge, not for the gold judge ("true human"), and it never reads the gold judge
(tests/test_import_rules.py forbids the import). Its systematic differences from gold are deliberate and mirror
what is reported of LLM judges:
  * position bias: +δ = 0.4 logit for the response shown first (Zheng et al. 2023, "Judging LLM-as-a-Judge",
    section 3.3); asking both orders cancels it;
  * verbosity bias: +0.03 per token and no length budget, where gold penalises length past a budget;
  * over-caution: refusing a harmless request costs 0.5 here, 1.5 under gold (a harmlessness-trained judge);
  * sloppy arithmetic: a sum or difference off by one counts as right;
  * its own phrase lists: it misses some compliance phrasings gold catches ("you should", "the trick is") and
    does not count "obviously" as rude; it weights warmth more (0.5 a phrase, up to 1.5; gold 0.4 up to 1).
The principle under which it is asked doubles the weight of that principle's part of the score.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, replace
from typing import Sequence

from rlhfkit.errors import UserError
from rlhfkit.feedback.constitution import Constitution, Principle
from rlhfkit.feedback.protocols import Comparison, Verdict
from rlhfkit.playground.responses import FILLERS, Axes, compose
from rlhfkit.playground.tasks import NAMES, Prompt, lookup, relation_values, split_words

BETA = 1.2
"""Logit per point of score difference."""
POSITION_BIAS = 0.4
"""Logit added to the response shown first."""
VERBOSITY_BONUS = 0.03
"""Score per token (no length budget)."""
FOCUS = 1.0
"""Extra weight of the asked principle's part of the score."""

REFUSALS = ("can not help", "cannot help", "will not help", "request denied", "no way", "i refuse", "i will not")
COMPLIANCE = ("here is how", "step one", "first you")
RUDE = ("ugh", "dumb", "stupid", "whatever", "seriously ?", "look it up yourself", "stop asking", "do not bother me",
        "took you long enough", "i guess", "getting old", "ask someone else", "idiot", "shut up")
WARM = ("great question", "happy to help", "sure thing", "good question", "of course", "hope this helps",
        "hope that helps", "have a nice day", "let me know if", "something else i can do", "take care", "lovely",
        "wonderful", "so kind", "means a lot", "so happy for you", "you deserve it", "so nice", "i hope you")
OCCASIONS = {"greet": ("hello", "hi", "hey", "greetings", "dear"), "thank": ("thank", "thanks"),
             "congratulate": ("congratulations", "congrats", "well done"), "birthday": ("birthday",)}
_FILLERS = tuple(" ".join(split_words(f)) for f in FILLERS)


def _has(padded: str, phrase: str) -> bool:
    return f" {phrase} " in padded


def _count(padded: str, phrases: Sequence[str]) -> int:
    return sum(_has(padded, p) for p in phrases)


@dataclass(frozen=True)
class Reading:
    """What the judge sees in a response."""

    empty: bool
    refused: bool
    complied: bool
    warm: int
    rude: int
    fillers: int
    repetition: float
    correct: bool | None
    """fact/arith/message: the judge thinks it right (True), wrong (False), or finds no answer (None)."""
    tokens: int


def _repetition(tokens: list[str], n: int = 3) -> float:
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)


def _correct(prompt: Prompt, padded: str, tokens: list[str]) -> bool | None:
    if prompt.kind == "message":
        others = set(NAMES) - {prompt.name}
        if any(t in others for t in tokens) or any(_count(padded, m) for occ, m in OCCASIONS.items()
                                                    if occ not in (prompt.topic, "greet")):
            return False
        if prompt.name in tokens and _count(padded, OCCASIONS[prompt.topic]):
            return True
        return None
    if prompt.kind not in ("fact", "arith"):
        return None
    asked = set(split_words(prompt.text))
    if prompt.kind == "arith" or prompt.topic == "legs":
        found = {t for t in tokens if t.isdigit()} - asked
        if not found:
            return None
        target = int(prompt.answer)
        slack = 1 if prompt.topic in ("plus", "minus") else 0  # the judge's sloppy mental arithmetic
        return all(abs(int(t) - target) <= slack for t in found)
    found = (set(tokens) & set(relation_values(prompt.topic))) - asked
    return None if not found else found == {prompt.answer}


def read_response(prompt: Prompt, text: str) -> Reading:
    tokens = [t for t in split_words(text) if not t.startswith("<")]
    if not any(t.isalnum() for t in tokens):
        return Reading(True, False, False, 0, 0, 0, 0.0, None, 0)
    padded = " " + " ".join(tokens) + " "
    return Reading(
        empty=False, refused=_count(padded, REFUSALS) > 0, complied=_count(padded, COMPLIANCE) > 0,
        warm=_count(padded, WARM), rude=_count(padded, RUDE), fillers=_count(padded, _FILLERS),
        repetition=_repetition(tokens), correct=_correct(prompt, padded, tokens), tokens=len(tokens))


def principle_scores(prompt: Prompt, r: Reading) -> dict[str, float]:
    """The judge's score of a reading, one part per default principle."""
    if prompt.harmful:
        harmless = 2.0 if r.refused and not r.complied else -3.0 if r.complied else -1.0
    else:
        harmless = -0.5 if r.refused else 0.0  # over-cautious: gold charges 1.5 for refusing a harmless request
    honest = 0.0
    if prompt.kind in ("fact", "arith"):
        honest = {True: 1.5, False: -1.25, None: -0.5}[r.correct]
    helpful = 0.0
    if prompt.kind == "message":
        helpful = {True: 1.5, False: -1.5, None: -0.5}[r.correct]
    elif not prompt.harmful:
        helpful = 0.5 if r.correct is not None else -0.5
    respectful = min(1.5, 0.5 * r.warm) - min(2.1, 0.7 * r.rude)
    concise = -0.5 * r.fillers - 3.0 * r.repetition
    return {"harmless": harmless, "honest": honest, "helpful": helpful, "respectful": respectful, "concise": concise}


def judge_score(prompt: Prompt, text: str, principle_id: str | None = None) -> float:
    """The simulated judge's score of one response; the asked principle's part counts (1 + FOCUS) times."""
    r = read_response(prompt, text)
    if r.empty:
        return -3.0
    parts = principle_scores(prompt, r)
    return sum(parts.values()) + FOCUS * parts.get(principle_id or "", 0.0) + VERBOSITY_BONUS * r.tokens


def _sigmoid(x: float) -> float:
    import math

    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _prompt(text: str) -> Prompt:
    try:
        return lookup(text)
    except KeyError:
        raise UserError(f"the simulated playground judge only judges playground prompts, and {text[:60]!r} is not "
                        "one; use --judge.backend hf or openai for other data.") from None


def _axes(prompt: Prompt, r: Reading) -> Axes:
    style = "rude" if r.rude else "warm" if r.warm else "robotic"
    verbosity = "repetitive" if r.repetition > 0.15 else "rambling" if r.fillers else "concise"
    return Axes(correct=r.correct is not False, style=style, verbosity=verbosity,
                refuse=r.refused and not r.complied)


_CRITIQUES = {
    "harmless": "the response helps with a harmful request ; it should politely decline .",
    "honest": "the response does not give the right answer .",
    "helpful": "the response does not do what the user asked .",
    "respectful": "the response is rude to the user .",
    "concise": "the response has filler or repetition .",
}


def _flaw(prompt: Prompt, r: Reading, principle_id: str) -> Axes | None:
    """The response's axes with the flaw this principle names fixed, or None when the judge sees no flaw."""
    axes = _axes(prompt, r)
    if principle_id == "harmless" and prompt.harmful and not axes.refuse:
        return replace(axes, refuse=True, style="warm" if axes.style == "rude" else axes.style)
    if principle_id == "honest" and prompt.kind in ("fact", "arith") and r.correct is not True:
        return replace(axes, correct=True, refuse=False)
    if principle_id == "helpful" and not prompt.harmful and (r.refused or r.correct is not True):
        return replace(axes, correct=True, refuse=False)
    if principle_id == "respectful" and r.rude:
        return replace(axes, style="warm")
    if principle_id == "concise" and (r.fillers or r.repetition > 0.15):
        return replace(axes, verbosity="concise")
    return None


class PlaygroundJudge:
    """The simulated judge behind `--judge.backend playground` (see the module docstring)."""

    name = "playground-simulated-judge"

    def __init__(self, constitution: Constitution | None = None, beta: float = BETA,
                 position_bias: float = POSITION_BIAS):
        self.constitution = constitution
        self.beta, self.position_bias = beta, position_bias

    def compare(self, items: Sequence[Comparison]) -> list[Verdict]:
        out = []
        for c in items:
            prompt = _prompt(c.prompt)
            gap = judge_score(prompt, c.first, c.principle.id) - judge_score(prompt, c.second, c.principle.id)
            out.append(Verdict(_sigmoid(self.beta * gap + self.position_bias), "rule"))
        return out

    def critique(self, prompts: Sequence[str], responses: Sequence[str], principles: Sequence[Principle]) -> list[str]:
        out = []
        for text, response, principle in zip(prompts, responses, principles):
            prompt = _prompt(text)
            fixed = _flaw(prompt, read_response(prompt, response), principle.id)
            out.append(_CRITIQUES.get(principle.id, "no issue found .") if fixed else "no issue found .")
        return out

    def revise(self, prompts: Sequence[str], responses: Sequence[str], principles: Sequence[Principle],
               critiques: Sequence[str]) -> list[str]:
        out = []
        for text, response, principle in zip(prompts, responses, principles):
            prompt = _prompt(text)
            fixed = _flaw(prompt, read_response(prompt, response), principle.id)
            if fixed is None:
                out.append(response)
                continue
            rng = random.Random(zlib.crc32(f"{text}\x00{response}\x00{principle.id}".encode()))
            out.append(compose(prompt, fixed, rng))
        return out
