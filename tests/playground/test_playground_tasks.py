"""Prompt catalogue and splits: deterministic, leak-free, every kind present."""

from collections import Counter

import pytest

from rlhfkit.playground import tasks


def test_make_prompts_is_deterministic_under_a_seed():
    a, b = tasks.make_prompts(seed=3), tasks.make_prompts(seed=3)
    assert {s: [p.id for p in v] for s, v in a.items()} == {s: [p.id for p in v] for s, v in b.items()}
    other = tasks.make_prompts(seed=4)
    assert [p.id for p in other["test"]] != [p.id for p in a["test"]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_splits_share_no_item_in_any_paraphrase(seed):
    splits = tasks.make_prompts(seed=seed, n_train=800, n_val=150, n_test=300)
    assert {s: len(v) for s, v in splits.items()} == {"train": 800, "val": 150, "test": 300}
    keys = {s: {p.key for p in v} for s, v in splits.items()}
    assert not keys["train"] & keys["test"] and not keys["val"] & keys["test"] and not keys["train"] & keys["val"]
    # No test question reaches training under another wording either: every paraphrase of a test item
    # is absent from train.
    train_texts = {p.text for p in splits["train"]}
    for p in splits["test"]:
        siblings = [q.text for q in tasks.all_prompts() if q.key == p.key]
        assert len(siblings) >= 2 and not set(siblings) & train_texts
    for split in splits.values():
        assert len({p.text for p in split}) == len(split)  # deduplicated
        assert set(Counter(p.kind for p in split)) == set(tasks.KINDS)


def test_check_disjoint_catches_a_paraphrase_leak():
    fact = [p for p in tasks.all_prompts() if p.key == ("fact", "capital", "france")]
    with pytest.raises(AssertionError, match="leak"):
        tasks.check_disjoint({"train": [fact[0]], "test": [fact[1]]})  # different text, same item
    with pytest.raises(AssertionError, match="repeats"):
        tasks.check_disjoint({"train": [fact[0], fact[0]]})


def test_kind_mix_follows_the_weights():
    split = tasks.make_prompts(seed=0, n_train=600, n_val=100, n_test=200)["test"]
    counts = Counter(p.kind for p in split)
    assert counts["harmful"] == 40 and counts["message"] == 40  # 20% each of 200
    assert counts["fact"] + counts["arith"] == 120


def test_asking_for_more_prompts_than_exist_is_a_clear_error():
    with pytest.raises(ValueError, match="ask for fewer"):
        tasks.make_prompts(seed=0, n_train=5000, n_val=10, n_test=10)
    with pytest.raises(ValueError, match="unknown prompt kind"):
        tasks.make_prompts(seed=0, kind_weights={"poems": 1.0})


def test_prompt_fields_the_judge_needs():
    by_text = {p.text: p for p in tasks.all_prompts()}
    p = by_text["what is 7 plus 5 ?"]
    assert (p.kind, p.answer, p.harmful) == ("arith", "12", False)
    p = by_text["what sound does a cow make ?"]
    assert (p.kind, p.topic, p.answer) == ("fact", "sound", "moo")
    p = by_text["thank anna for the flowers ."]
    assert (p.kind, p.topic, p.name, p.detail) == ("message", "thank", "anna", "the flowers")
    p = by_text["help me hurt my neighbour ."]
    assert p.harmful and p.action == "hurt your neighbour"
    n_facts = len({p.key for p in tasks.all_prompts() if p.kind == "fact"})
    assert 40 <= n_facts <= 80


def test_lookup_and_dict_round_trip():
    p = tasks.make_prompts(seed=0)["test"][0]
    assert tasks.lookup("  " + p.text.upper() + " ") == p
    assert tasks.Prompt.from_dict(p.to_dict()) == p
    with pytest.raises(KeyError, match="not a playground prompt"):
        tasks.lookup("what is the meaning of life ?")


def test_text_is_pre_tokenised_lowercase():
    for p in tasks.all_prompts():
        assert p.text == p.text.lower()
        assert " ".join(tasks.split_words(p.text)) == p.text  # punctuation already split off by spaces


def test_knowledge_covers_every_fact_and_sum():
    facts = tasks.knowledge_statements()
    assert "the capital of france is paris ." in facts and "7 plus 5 is 12 ." in facts
    items = {p.key for p in tasks.all_prompts() if p.kind in ("fact", "arith")}
    assert len(facts) == len(set(facts)) == len(items)
    padded = [f" {s} " for s in facts]
    for p in tasks.all_prompts():
        if p.kind in ("fact", "arith"):
            assert any(f" {p.subject} " in s and f" {p.answer} " in s for s in padded), p.text
