"""Responses of mixed quality for playground prompts, the pretraining corpus and the SFT demonstrations.

A response is composed along independent axes (`Axes`): right or wrong answer, warm / robotic / rude style,
concise / rambling / repetitive length, and refusing or not (a safe refusal or unsafe compliance for harmful
prompts, an over-refusal for harmless ones). Unsafe compliance is deliberately vague and non-actionable.
Every response is at most MAX_RESPONSE_TOKENS tokens, so prompt + response fits in 64 tokens.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

from .tasks import (
    ARITH_STATEMENTS,
    ARITH_TEMPLATES,
    BORDERLINE,
    BORDERLINE_TEMPLATES,
    FACTS,
    HARMS,
    HELP_STATEMENT,
    HHH_KINDS,
    MAX_NUMBER,
    MESSAGE_DETAILS,
    MESSAGE_TEMPLATES,
    NAMES,
    Prompt,
    UNKNOWABLE,
    all_prompts,
    knowledge_statements,
    relation_values,
    split_words,
)

MAX_RESPONSE_TOKENS = 40
STYLES = ("warm", "robotic", "rude")
VERBOSITIES = ("concise", "rambling", "repetitive")


@dataclass(frozen=True)
class Axes:
    """How good a response is, axis by axis. The default is the demonstration: correct, warm, concise, and
    refusing exactly when the prompt is harmful."""

    correct: bool = True  # right answer / right name and occasion / admits not knowing (unknowable prompts);
    # unused when the response refuses
    style: str = "warm"  # one of STYLES
    verbosity: str = "concise"  # one of VERBOSITIES
    refuse: bool | None = None  # None: refuse iff the prompt is harmful; True on a harmless prompt over-refuses
    # (on a borderline one, with the wording of a safety refusal)


@dataclass(frozen=True)
class Response:
    """A generated response with the axes that produced it (the gold judge never sees the axes)."""

    text: str
    axes: Axes


@dataclass(frozen=True)
class Mixture:
    """A distribution over axes: how often each quality appears."""

    p_correct: float
    style: dict[str, float]
    verbosity: dict[str, float]
    p_refuse_harmful: float  # safe refusals among responses to harmful prompts
    p_refuse_harmless: float  # over-refusals among responses to harmless prompts
    p_refuse_borderline: float | None = None  # over-refusals of borderline prompts (None: p_refuse_harmless)
    p_honest: float | None = None  # admitting not knowing, on unknowable prompts (None: p_correct)


# Balanced: what `sample_response` draws when an axis is not given, and the pairs annotators are calibrated on.
BALANCED = Mixture(
    p_correct=0.5,
    style={"warm": 0.4, "robotic": 0.35, "rude": 0.25},
    verbosity={"concise": 0.5, "rambling": 0.3, "repetitive": 0.2},
    p_refuse_harmful=0.5,
    p_refuse_harmless=0.1,
)
# "Web text": mostly robotic and often wrong, with some rudeness, rambling and unsafe compliance, so a model
# pretrained on it is fluent in the format but not helpful.
WEB = Mixture(
    p_correct=0.6,
    style={"warm": 0.15, "robotic": 0.6, "rude": 0.25},
    verbosity={"concise": 0.6, "rambling": 0.25, "repetitive": 0.15},
    p_refuse_harmful=0.5,
    p_refuse_harmless=0.05,
)
# Demonstrations as hired writers produce them (InstructGPT's contractors, not an oracle): always correct and
# friendly, but often padded with filler or repeating themselves, and complying with a harmful request 40% of the
# time. SFT on these imitates the mixture; the preference stages then have something to fix (gold about +1.3 for
# the mixture against +2.3 for the ideal response). Robotic or wrong demonstrations were tried and rejected: the
# 4-layer model then loses the habit of restating the question, and with it most of its correctness.
DEMONSTRATION = Mixture(
    p_correct=1.0,
    style={"warm": 1.0},
    verbosity={"concise": 0.6, "rambling": 0.3, "repetitive": 0.1},
    p_refuse_harmful=0.6,
    p_refuse_harmless=0.0,
)

# The helpful-harmless-honest world's mixtures. Web text complies with harmful requests half the time, refuses a
# third of the requests that only look harmful and makes up answers about the user more often than not.
HHH_WEB = replace(WEB, p_refuse_borderline=0.3, p_honest=0.3)
# Its contractors are well meaning but inconsistent on exactly the three points: half refuse harmful requests,
# three in ten refuse the borderline ones too, and half admit not knowing. Each criterion's reward model has something
# to pull the SFT policy toward, and they pull in different directions.
HHH_DEMONSTRATION = replace(DEMONSTRATION, p_refuse_harmful=0.5, p_refuse_borderline=0.3, p_honest=0.5)
# The labelling pairs: every behaviour equally often.
HHH_BALANCED = replace(BALANCED, p_refuse_borderline=0.5, p_honest=0.5)

# ------------------------------------------------------------------------------------------------- phrasing
WARM_OPENERS = ("great question !", "happy to help !", "sure thing !", "good question !", "of course !")
WARM_CLOSERS = (
    "hope this helps !", "have a nice day !", "i hope that helps you !", "let me know if you need more help !"
)
RUDE_OPENERS = ("ugh .", "obviously .", "what a dumb question .", "seriously ?")
RUDE_CLOSERS = (
    "look it up yourself next time .", "stop asking me easy stuff .", "whatever .", "do not bother me again ."
)
ROBOTIC_SHORT = ("{a} .", "answer : {a} .", "output : {a} .", "it is {a} .")
FILLERS = (
    "well , let me think about this for a moment .",
    "this is a question that many people ask .",
    "there is a lot that one could say about this .",
    "i have thought about things like this before .",
    "as i always say , it is good to ask .",
    "that is what i think , more or less .",
)
# Messages carry their style inside the message itself. {n} name, {d} detail.
MESSAGES = {
    "greet": {
        "warm": ("hello {n} ! i hope you are having a lovely day .",
                 "hi {n} ! it is so nice to hear from you . take care !"),
        "robotic": ("hello {n} .", "greetings , {n} ."),
        "rude": ("hey {n} , whatever .", "hi {n} . do not bother me again ."),
    },
    "thank": {
        "warm": ("dear {n} , thank you so much for {d} . it means a lot to me !",
                 "thank you for {d} , {n} ! you are so kind ."),
        "robotic": ("thank you {n} for {d} .", "{n} : thanks for {d} ."),
        "rude": ("{n} , thanks for {d} i guess . whatever .", "thanks for {d} , {n} . took you long enough ."),
    },
    "congratulate": {
        "warm": ("congratulations on {d} , {n} ! i am so happy for you .", "well done on {d} , {n} ! you deserve it ."),
        "robotic": ("congratulations {n} on {d} .", "{n} : congratulations on {d} ."),
        "rude": ("congrats on {d} , {n} . took you long enough .", "{n} , congrats on {d} i guess . whatever ."),
    },
    "birthday": {
        "warm": ("happy birthday , {n} ! i hope you have a wonderful day .",
                 "happy birthday {n} ! wishing you a lovely year ."),
        "robotic": ("happy birthday {n} .", "{n} : happy birthday ."),
        "rude": ("happy birthday {n} . you are getting old .", "happy birthday {n} i guess . whatever ."),
    },
}
# {h} the harm as a noun ("stealing"), {x} the request in the assistant's words ("steal a car").
REFUSALS = {
    "warm": ("sorry , i can not help with that . {h} is wrong and can hurt people . "
             "is there something else i can do for you ?",
             "i am sorry , but i will not help you {x} . i hope you understand . take care !"),
    "robotic": ("request denied . i can not help with that .", "i can not help with that ."),
    "rude": ("no . i will not help with that . what a stupid idea .", "no way . ask someone else ."),
}
OVER_REFUSALS = {
    "warm": ("sorry , i can not help with that . is there something else i can do for you ?",),
    "robotic": ("request denied . i can not help with that .", "i can not help with that ."),
    "rude": ("no . ask someone else .", "no way . i will not help with that ."),
}
# A safety refusal of a request that only looks harmful. {x} the request in the assistant's words.
BORDERLINE_REFUSALS = {
    "warm": ("sorry , i will not help you {x} . it could hurt someone .",
             "i am sorry , but i can not help with that . i hope you understand . take care !"),
    "robotic": ("request denied . i can not help with that .", "i can not help with that ."),
    "rude": ("no way . i will not help you {x} .", "no . i will not help with that . what a stupid idea ."),
}
COMPLIANCE = {
    "warm": ("sure , happy to help ! here is how to {x} : first you get ready , then you do it . good luck !",),
    "robotic": ("here is how to {x} : step one , get ready . step two , do it . done .",),
    "rude": ("ugh , fine . here is how to {x} : first you get ready , then you just do it . whatever .",),
}


# ------------------------------------------------------------------------------------------------- building
def _wrong_value(prompt: Prompt, rng: random.Random) -> str:
    """A plausible wrong answer: another value of the same relation, or a nearby number."""
    banned = set(split_words(prompt.text)) | {prompt.answer}
    if prompt.kind == "fact" and prompt.topic != "legs":
        return rng.choice([v for v in relation_values(prompt.topic) if v not in banned])
    answer = int(prompt.answer)
    choices = [str(answer + d) for d in (-3, -2, -1, 1, 2, 3) if 0 <= answer + d <= MAX_NUMBER]
    return rng.choice([c for c in choices if c not in banned])


def _answer_body(prompt: Prompt, value: str, style: str, rng: random.Random) -> str:
    """The sentence that answers a fact or arithmetic prompt with `value`."""
    if prompt.kind == "fact":
        statement = FACTS[prompt.topic][1].format(s=prompt.subject, a=value)
    else:
        x, y = prompt.key[2], prompt.key[3]
        statement = ARITH_STATEMENTS[prompt.topic].format(x=x, y=y, a=value)
    if style == "robotic" and rng.random() < 0.5:
        return rng.choice(ROBOTIC_SHORT).format(a=value)
    return statement


def _message_body(prompt: Prompt, correct: bool, style: str, rng: random.Random) -> str:
    name, occasion, detail = prompt.name, prompt.topic, prompt.detail
    if not correct:  # the wrong person, or the wrong occasion
        if rng.random() < 0.5:
            name = rng.choice([n for n in NAMES if n != prompt.name])
        else:
            occasion = rng.choice([o for o in MESSAGES if o != prompt.topic])
            detail = rng.choice(MESSAGE_DETAILS[occasion])
    return rng.choice(MESSAGES[occasion][style]).format(n=name, d=detail)


def _harm_noun(prompt: Prompt) -> str:
    return HARMS[prompt.topic][3]


def _hhh_body(prompt: Prompt, correct: bool, style: str, rng: random.Random) -> str:
    """The answer to a borderline request (the right advice, or advice for another request) or to an unknowable
    question (admitting not knowing, or a confident made-up answer)."""
    if prompt.kind == "borderline":
        advice = prompt.answer if correct else rng.choice([h for h in BORDERLINE.values() if h != prompt.answer])
        if style == "robotic" and rng.random() < 0.5:
            return f"{advice} ."
        return HELP_STATEMENT.format(v=prompt.action, h=advice)
    _, _, guesses, guessed, unknown = UNKNOWABLE[prompt.topic]
    if correct:
        return unknown.format(x=prompt.subject)
    return guessed.format(x=prompt.subject, a=rng.choice(guesses))


def _core(prompt: Prompt, axes: Axes, rng: random.Random) -> tuple[str, str, str]:
    """(opener, body, closer) before verbosity is applied."""
    refuse = prompt.harmful if axes.refuse is None else axes.refuse
    if refuse:
        table = REFUSALS if prompt.harmful else BORDERLINE_REFUSALS if prompt.kind == "borderline" else OVER_REFUSALS
        body = rng.choice(table[axes.style]).format(h=_harm_noun(prompt) if prompt.harmful else "", x=prompt.action)
        return "", body, ""
    if prompt.harmful:  # unsafe compliance: vague steps, nothing real
        return "", rng.choice(COMPLIANCE[axes.style]).format(x=prompt.action), ""
    if prompt.kind == "message":
        return "", _message_body(prompt, axes.correct, axes.style, rng), ""
    if prompt.kind in HHH_KINDS:
        body = _hhh_body(prompt, axes.correct, axes.style, rng)
    else:
        value = prompt.answer if axes.correct else _wrong_value(prompt, rng)
        body = _answer_body(prompt, value, axes.style, rng)
    if axes.style == "warm":
        return rng.choice(WARM_OPENERS), body, rng.choice(WARM_CLOSERS)
    if axes.style == "rude":
        drop = rng.random()  # a jab before, after, or both
        opener = "" if drop < 0.3 else rng.choice(RUDE_OPENERS)
        closer = "" if 0.3 <= drop < 0.6 else rng.choice(RUDE_CLOSERS)
        return opener, body, closer
    return "", body, ""


def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def compose(prompt: Prompt, axes: Axes, rng: random.Random) -> str:
    """The response text for `prompt` with the given axes; `rng` picks among phrasings."""
    if axes.style not in STYLES:
        raise ValueError(f"unknown style {axes.style!r}; styles are {list(STYLES)}")
    if axes.verbosity not in VERBOSITIES:
        raise ValueError(f"unknown verbosity {axes.verbosity!r}; verbosities are {list(VERBOSITIES)}")
    opener, body, closer = _core(prompt, axes, rng)
    if axes.verbosity == "rambling":
        # Filler that says nothing: at least one sentence, two when they fit.
        fillers = rng.sample(FILLERS, 2)
        text = _join(opener, fillers[0], body, closer)
        if len(split_words(text)) > MAX_RESPONSE_TOKENS:  # a long body: the pleasantries give way to the filler
            text = _join(fillers[0], body)
        longer = _join(opener, fillers[0], body, fillers[1], closer)
        if len(split_words(longer)) <= MAX_RESPONSE_TOKENS:
            text = longer
    elif axes.verbosity == "repetitive":
        # Repeat the first sentence of the body as many times as fit (2 or 3 copies).
        first = re.split(r"(?<=[.!?]) ", body)[0]
        copies = 3 if rng.random() < 0.5 else 2
        while True:
            text = _join(opener, body, *([first] * (copies - 1)), closer)
            if len(split_words(text)) <= MAX_RESPONSE_TOKENS or copies == 2:
                break
            copies -= 1
        if len(split_words(text)) > MAX_RESPONSE_TOKENS:  # a long body twice: the pleasantries give way
            text = _join(opener, body, first)
            if len(split_words(text)) > MAX_RESPONSE_TOKENS:
                text = _join(body, first)
    else:
        text = _join(opener, body, closer)
    if len(split_words(text)) > MAX_RESPONSE_TOKENS:  # a new template too long for the 64-token budget
        raise AssertionError(f"playground response over {MAX_RESPONSE_TOKENS} tokens: {text!r}")
    return text


def _draw(weights: dict[str, float], rng: random.Random) -> str:
    keys = sorted(weights)
    return rng.choices(keys, weights=[weights[k] for k in keys])[0]


def sample_axes(prompt: Prompt, rng: random.Random, mixture: Mixture = BALANCED, **fixed: object) -> Axes:
    """Draw every axis not given in `fixed` from `mixture`. Every axis is drawn even when pinned, so pinning
    one axis does not shift the random stream that the others (and the phrasing) come from."""
    unknown = set(fixed) - {"correct", "style", "verbosity", "refuse"}
    if unknown:
        raise TypeError(f"unknown response axes {sorted(unknown)}; axes are correct, style, verbosity, refuse")
    p_correct = mixture.p_correct
    p_refuse = mixture.p_refuse_harmful if prompt.harmful else mixture.p_refuse_harmless
    if prompt.kind == "unknowable" and mixture.p_honest is not None:
        p_correct = mixture.p_honest
    if prompt.kind == "borderline" and mixture.p_refuse_borderline is not None:
        p_refuse = mixture.p_refuse_borderline
    drawn = Axes(
        correct=rng.random() < p_correct,
        style=_draw(mixture.style, rng),
        verbosity=_draw(mixture.verbosity, rng),
        refuse=rng.random() < p_refuse,
    )
    return replace(drawn, **fixed)


def sample_labelled(prompt: Prompt, rng: random.Random, mixture: Mixture = BALANCED, **axes: object) -> Response:
    """A response and the axes it was made with."""
    chosen = sample_axes(prompt, rng, mixture, **axes)
    return Response(compose(prompt, chosen, rng), chosen)


def sample_response(prompt: Prompt, rng: random.Random, **axes: object) -> str:
    """A response to `prompt`; axes given as keywords (correct=, style=, verbosity=, refuse=) are fixed, the
    rest drawn from the balanced mixture."""
    return sample_labelled(prompt, rng, BALANCED, **axes).text


def good_response(prompt: Prompt, rng: random.Random) -> str:
    """A demonstration: correct, warm, concise, and refusing exactly the harmful prompts."""
    return compose(prompt, Axes(), rng)


def sample_pair(prompt: Prompt, rng: random.Random, mixture: Mixture = BALANCED) -> tuple[str, str]:
    """Two different responses to one prompt, as a labelling interface would show them."""
    a = sample_labelled(prompt, rng, mixture).text
    for _ in range(100):
        b = sample_labelled(prompt, rng, mixture).text
        if b != a:
            return a, b
    raise RuntimeError(f"could not draw two different responses to {prompt.text!r}")


# ---------------------------------------------------------------------------------------------------- corpora
def format_chat(prompt_text: str, response_text: str) -> str:
    """One exchange in the playground chat template (the same string `models.CHAT_TEMPLATE` renders)."""
    return "<|user|> " + prompt_text + " </s> " + "<|assistant|> " + response_text + " </s> "


def pretraining_corpus(
    prompts: Sequence[Prompt], seed: int, n_docs: int, knowledge_fraction: float = 0.2
) -> Iterator[str]:
    """`n_docs` documents of "web text": chat exchanges on `prompts` with mostly mediocre responses (the WEB
    mixture), and, with probability `knowledge_fraction`, a document of 3-6 true statements about the world.

    Pass the training prompts: test questions then never appear in the corpus, while the knowledge documents
    (which cover every fact and sum) let a model answer held-out questions it was never asked."""
    if not prompts:
        raise ValueError("pretraining_corpus needs at least one prompt")
    rng = random.Random(seed)
    hhh = any(p.kind in HHH_KINDS for p in prompts)
    facts = knowledge_statements(hhh)
    mixture = HHH_WEB if hhh else WEB
    for _ in range(n_docs):
        if rng.random() < knowledge_fraction:
            yield " ".join(rng.sample(facts, rng.randint(3, 6)))
        else:
            prompt = rng.choice(prompts)
            yield format_chat(prompt.text, sample_labelled(prompt, rng, mixture).text)


def sft_demonstrations(prompts: Sequence[Prompt], seed: int, n: int, mixture: Mixture | None = None
                       ) -> list[dict[str, str]]:
    """`n` {"prompt", "completion"} demonstrations, cycling through `prompts` in a seeded order (each pass
    reshuffled, phrasings re-drawn). mixture None gives the ideal response every time; DEMONSTRATION gives
    what a pool of hired writers produces."""
    if not prompts:
        raise ValueError("sft_demonstrations needs at least one prompt")
    rng = random.Random(seed)
    out: list[dict[str, str]] = []
    order: list[Prompt] = []
    while len(out) < n:
        if not order:
            order = list(prompts)
            rng.shuffle(order)
        prompt = order.pop()
        completion = good_response(prompt, rng) if mixture is None else sample_labelled(prompt, rng, mixture).text
        out.append({"prompt": prompt.text, "completion": completion})
    return out


# --------------------------------------------------------------------------------------------------- lexicon
def lexicon(hhh: bool = False) -> list[str]:
    """Every token any playground prompt, response or knowledge document can contain, sorted: a tokenizer
    built from it has no unknown words on playground text. `hhh` adds the borderline and unknowable kinds' words
    (the default world's tokenizer stays as it was)."""
    phrases: list[str] = [p.text for p in all_prompts() if hhh or p.kind not in HHH_KINDS]
    phrases += knowledge_statements(hhh)
    if hhh:
        phrases += [*BORDERLINE_TEMPLATES, *BORDERLINE.values()]
        phrases += [t for variants in BORDERLINE_REFUSALS.values() for t in variants]
        for templates, things, guesses, guessed, unknown in UNKNOWABLE.values():
            phrases += [*templates, *things, *guesses, guessed, unknown]
    phrases += [*WARM_OPENERS, *WARM_CLOSERS, *RUDE_OPENERS, *RUDE_CLOSERS, *ROBOTIC_SHORT, *FILLERS]
    for table in (REFUSALS, OVER_REFUSALS, COMPLIANCE):
        phrases += [t for variants in table.values() for t in variants]
    phrases += [t for styles in MESSAGES.values() for variants in styles.values() for t in variants]
    phrases += [t for templates in (*ARITH_TEMPLATES.values(), *MESSAGE_TEMPLATES.values()) for t in templates]
    phrases += [d for details in MESSAGE_DETAILS.values() for d in details if d]
    phrases += [" ".join(h[2:]) for h in HARMS.values()] + ["your"] + [str(i) for i in range(MAX_NUMBER + 1)]
    phrases += [v for rel in FACTS for v in relation_values(rel)]
    words: set[str] = set()
    for phrase in phrases:
        words.update(split_words(re.sub(r"\{[a-z]\}", " ", phrase)))  # placeholders are filled from the lists
    return sorted(words)
