"""Responses, corpus and demonstrations: axes do what they say, sizes fit the model, vocabulary stays small."""

import itertools
import random
import subprocess
import sys

import pytest

from rlhfkit.playground import responses as R
from rlhfkit.playground import tasks
from rlhfkit.playground.tasks import split_words

FRANCE = tasks.lookup("what is the capital of france ?")
STEAL = tasks.lookup("how do i steal a car ?")
THANK = tasks.lookup("thank anna for the flowers .")


def test_same_seed_same_text():
    prompts = tasks.make_prompts(seed=0)["train"]
    first = list(R.pretraining_corpus(prompts, seed=5, n_docs=200))
    assert first == list(R.pretraining_corpus(prompts, seed=5, n_docs=200))
    assert first != list(R.pretraining_corpus(prompts, seed=6, n_docs=200))
    assert R.sft_demonstrations(prompts, 1, 50) == R.sft_demonstrations(prompts, 1, 50)
    rng_a, rng_b = random.Random(9), random.Random(9)
    draws_a = [R.sample_response(FRANCE, rng_a) for _ in range(20)]
    assert draws_a == [R.sample_response(FRANCE, rng_b) for _ in range(20)]


def test_axes_control_the_text():
    rng = random.Random(0)
    good = R.good_response(FRANCE, rng)
    assert "paris" in good.split() and "!" in good
    wrong = R.sample_response(FRANCE, rng, correct=False, style="robotic", verbosity="concise", refuse=False)
    assert "paris" not in wrong.split() and "!" not in wrong
    rude = R.sample_response(FRANCE, rng, style="rude", verbosity="concise", refuse=False)
    jabs = ("ugh", "obviously", "dumb", "seriously", "yourself", "stop asking", "whatever", "bother")
    assert any(w in rude for w in jabs)
    refusals = [R.good_response(STEAL, rng) for _ in range(10)]
    assert all("can not help" in r or "will not help" in r for r in refusals)
    comply = R.sample_response(STEAL, rng, refuse=False)
    assert "here is how to steal a car" in comply
    over_refusal = R.sample_response(FRANCE, rng, refuse=True, style="warm")
    assert "can not help" in over_refusal and "paris" not in over_refusal
    wrong_msg = R.sample_response(THANK, rng, correct=False, style="robotic", refuse=False)
    assert "anna" not in wrong_msg.split() or "thank" not in wrong_msg
    rambling = R.sample_response(FRANCE, rng, correct=True, style="warm", verbosity="rambling", refuse=False)
    repetitive = R.sample_response(FRANCE, rng, correct=True, style="robotic", verbosity="repetitive", refuse=False)
    assert len(split_words(rambling)) > len(split_words(good)) + 5
    assert repetitive.count("paris") >= 2


def test_unknown_axis_is_an_error():
    with pytest.raises(TypeError, match="unknown response axes"):
        R.sample_response(FRANCE, random.Random(0), politeness="high")
    with pytest.raises(ValueError, match="unknown style"):
        R.compose(FRANCE, R.Axes(style="sarcastic"), random.Random(0))


def test_every_response_fits_the_64_token_context():
    rng = random.Random(0)
    combos = list(itertools.product([True, False], R.STYLES, R.VERBOSITIES, [None, True, False]))
    longest = 0
    longest_paraphrase = {}  # per item: the worst case for the context budget
    for prompt in tasks.all_prompts():
        best = longest_paraphrase.get(prompt.key)
        if best is None or len(split_words(prompt.text)) > len(split_words(best.text)):
            longest_paraphrase[prompt.key] = prompt
    for prompt in longest_paraphrase.values():
        for correct, style, verbosity, refuse in combos:
            text = R.compose(prompt, R.Axes(correct, style, verbosity, refuse), rng)
            assert 1 <= len(split_words(text)) <= R.MAX_RESPONSE_TOKENS
            longest = max(longest, len(split_words("<s> " + R.format_chat(prompt.text, text))))
    assert longest <= 64


def test_corpus_is_mediocre_and_mixed():
    prompts = tasks.make_prompts(seed=0)["train"]
    docs = list(R.pretraining_corpus(prompts, seed=0, n_docs=2000))
    chats = [d for d in docs if d.startswith("<|user|> ")]
    assert 0.7 < len(chats) / len(docs) < 0.9  # the rest are knowledge documents
    for d in chats[:50]:
        assert d.endswith(" </s> ") and " </s> <|assistant|> " in d
    replies = [d.split("<|assistant|> ")[1] for d in chats]
    frac = lambda pred: sum(map(pred, replies)) / len(replies)  # noqa: E731
    assert frac(lambda r: "!" in r) < 0.3  # warm replies are a minority
    assert frac(lambda r: "here is how" in r) > 0.03  # some unsafe compliance
    assert frac(lambda r: any(w in r for w in ("ugh", "whatever", "dumb", "yourself", "bother"))) > 0.1
    train_texts = {p.text for p in prompts}
    test_texts = {p.text for p in tasks.make_prompts(seed=0)["test"]}
    asked = {d.split(" </s> ")[0][len("<|user|> "):] for d in chats}
    assert asked <= train_texts and not asked & test_texts


def test_sft_demonstrations_cycle_through_prompts():
    prompts = tasks.make_prompts(seed=0, n_train=30, n_val=5, n_test=5)["train"]
    demos = R.sft_demonstrations(prompts, seed=0, n=75)
    assert len(demos) == 75 and set(demos[0]) == {"prompt", "completion"}
    assert {d["prompt"] for d in demos[:30]} == {p.text for p in prompts}  # a full pass before repeating


def test_vocabulary_is_small_and_covered_by_the_lexicon():
    splits = tasks.make_prompts(seed=0)
    words = set()
    for d in R.pretraining_corpus(splits["train"], seed=0, n_docs=5000):
        words.update(split_words(d))
    for p in tasks.all_prompts():
        if p.kind not in tasks.HHH_KINDS:  # the default world's prompts; the HHH world has its own, larger lexicon
            words.update(split_words(p.text))
    words -= {"<|user|>", "<|assistant|>", "</s>"}
    lexicon = set(R.lexicon())
    assert words <= lexicon
    assert 200 <= len(lexicon) <= 500
    assert {w for p in tasks.all_prompts() for w in split_words(p.text)} <= set(R.lexicon(hhh=True))


def test_importing_tasks_and_responses_never_loads_the_gold_judge():
    code = ("import sys, rlhfkit.playground, rlhfkit.playground.tasks, rlhfkit.playground.responses; "
            "assert not [m for m in sys.modules if m.endswith(('.gold', '.annotators'))], sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
