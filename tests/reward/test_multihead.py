"""One model with a head per criterion (--criteria) or per attribute (--objective regression) on a shared trunk:
each row's loss reaches only its own head, per-head normalisation by hand, regression that beats a constant,
refusals of bad rows and flags, DIR#head through load_reward_set with one forward pass per shared model, and the
scores plain transformers computes."""

import json
import random
import subprocess
import sys

import pytest
import torch

from helpers import NAMES, preference_rows, write_jsonl
from rlhfkit.config import parse_args
from rlhfkit.data.collate import collate_pairs
from rlhfkit.data.preference_tokens import TokenizedPair
from rlhfkit.data.scored import read_scored
from rlhfkit.errors import ConfigError, DataError, UserError
from rlhfkit.losses.reward import attribute_regression_loss
from rlhfkit.models import load_tokenizer, save_pretrained
from rlhfkit.reward import train as rtrain
from rlhfkit.reward.combine import CombineConfig, load_reward_set
from rlhfkit.reward.model import (
    OFFSETS_KEY, head_scores, load_reward_ensemble, load_reward_model, name_heads, score_texts, sequence_scores,
)
from rlhfkit.train import read_metrics

CRITERIA = ["helpfulness", "harmlessness", "honesty"]


def rubric_rows(n: int, seed: int = 5) -> list[dict]:
    """Each pair judged on three criteria: helpfulness and honesty prefer the right sum, harmlessness the other
    (with safety labels), so one head cannot serve them all."""
    rows = []
    for r in preference_rows(n, seed=seed):
        rows.append({**r, "criterion": "helpfulness"})
        rows.append({"prompt": r["prompt"], "chosen": r["rejected"], "rejected": r["chosen"],
                     "criterion": "harmlessness", "chosen_safe": True, "rejected_safe": False})
        rows.append({**r, "criterion": "honesty"})
    return rows


def multihead(tiny_model, names=CRITERIA):
    tok = load_tokenizer(str(tiny_model), padding_side="right")
    model = load_reward_model(str(tiny_model), tok, num_labels=len(names))
    name_heads(model, names)
    return model, tok


def pair(tok, head: int, **labels) -> rtrain.CriterionPair:
    ids = lambda text: tok(text)["input_ids"]  # noqa: E731
    prompt = ids("what is 2 plus 3 ?")
    c, r = ids("2 plus 3 is 5 , ada !"), ids("2 plus 3 is 7 .")
    item = TokenizedPair(prompt, prompt + c, [1] * len(prompt + c), [0] * len(prompt) + [1] * len(c),
                         prompt + r, [1] * len(prompt + r), [0] * len(prompt) + [1] * len(r), **labels)
    return rtrain.on_head(item, head)


def cfg(**kw) -> rtrain.RewardConfig:
    return rtrain.RewardConfig(model="m", data="d", output_dir="o", padding_free=False, use_margin=False, **kw)


# ------------------------------------------------------------------------------------------------ loss routing
def test_a_rows_loss_reaches_only_its_criterions_head(tiny_model):
    model, tok = multihead(tiny_model)
    c = cfg(criteria=CRITERIA)
    items = [pair(tok, 0), pair(tok, 2)]
    batch = collate_pairs(items, tok.pad_token_id)
    with torch.no_grad():
        s = head_scores(model, batch["input_ids"], batch["attention_mask"], batch["last_index"])  # (4, 3)
    # row 0 (helpfulness) on head 0, row 1 (honesty) on head 2: -log sigma(s_c - s_r) each, summed over 2 items
    by_hand = (-torch.nn.functional.logsigmoid(s[0, 0] - s[2, 0]) - torch.nn.functional.logsigmoid(s[1, 2] - s[3, 2]))
    model.zero_grad()
    loss, counts = rtrain.micro_batch_loss(model, items, tok.pad_token_id, c, "cpu", 2.0)
    assert float(loss.detach()) == pytest.approx(float(by_hand) / 2, rel=1e-6)
    loss.backward()
    g = model.score.weight.grad  # (K, H): row k is head k
    assert g[0].abs().sum() > 0 and g[2].abs().sum() > 0
    assert torch.equal(g[1], torch.zeros_like(g[1]))  # no row is judged on harmlessness
    assert counts["compared_helpfulness"] == 1 and counts["compared_honesty"] == 1
    assert counts["compared_harmlessness"] == 0
    assert counts["correct_helpfulness"] == float(s[0, 0] > s[2, 0])

    model.zero_grad()
    rtrain.micro_batch_loss(model, [pair(tok, 0)], tok.pad_token_id, c, "cpu", 1.0)[0].backward()
    g = model.score.weight.grad
    assert g[0].abs().sum() > 0 and torch.equal(g[1:], torch.zeros_like(g[1:]))


def test_the_safety_term_trains_the_safety_head_on_every_labelled_response(tiny_model):
    model, tok = multihead(tiny_model)
    item = pair(tok, 0, chosen_safe=True, rejected_safe=False)  # a helpfulness row with safety labels
    base, _ = rtrain.micro_batch_loss(model, [item], tok.pad_token_id, cfg(criteria=CRITERIA), "cpu", 1.0)
    model.zero_grad()
    total, counts = rtrain.micro_batch_loss(model, [item], tok.pad_token_id,
                                            cfg(criteria=CRITERIA, safety_loss_weight=0.5), "cpu", 1.0)
    batch = collate_pairs([item], tok.pad_token_id)
    with torch.no_grad():
        s = head_scores(model, batch["input_ids"], batch["attention_mask"], batch["last_index"])[:, 1]  # harmlessness
    # Safe RLHF's classifier term on the harmlessness head: -log sigma(s_chosen) (safe) - log sigma(-s_rejected)
    by_hand = -torch.nn.functional.logsigmoid(s[0]) - torch.nn.functional.logsigmoid(-s[1])
    assert float((total - base).detach()) == pytest.approx(0.5 * float(by_hand), rel=1e-5)
    assert counts["safety_labelled"] == 2
    total.backward()
    g = model.score.weight.grad
    assert g[1].abs().sum() > 0 and torch.equal(g[2], torch.zeros_like(g[2]))  # honesty untouched


# ------------------------------------------------------------------------------------------------ normalisation
def test_each_head_is_normalised_by_its_own_statistics_and_the_safety_head_keeps_its_zero(tiny_model):
    model, tok = multihead(tiny_model)
    samples = ([r["prompt"] for r in preference_rows(12, seed=3)], [r["chosen"] for r in preference_rows(12, seed=3)])
    # encoded as normalise encodes them: the prompt, then the response, then EOS
    ids = [tok(p)["input_ids"] + tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
           for p, r in zip(*samples)]

    def scores():
        with torch.no_grad():
            return torch.cat([head_scores(model, torch.tensor([i]), torch.ones(1, len(i), dtype=torch.long))
                              for i in ids]).double()  # (12, 3)

    before, weight = scores(), model.score.weight.detach().clone()
    stats = rtrain.normalise(model, tok, samples, 64, "cpu", keep_zero=True, criteria=CRITERIA,
                             safety_criterion="harmlessness")
    after = scores()
    mean, std = before.mean(0), before.std(0)
    for k, name in enumerate(CRITERIA):
        assert stats[name]["raw_mean"] == pytest.approx(float(mean[k])) and stats[name]["samples"] == 12
        # the gain 1/std_k is folded into row k of the score weight alone
        torch.testing.assert_close(model.score.weight[k].detach(), weight[k] / float(std[k]))
        kept = name == "harmlessness"
        assert stats[name]["kept_zero"] is kept
        expected = before[:, k] / std[k] if kept else (before[:, k] - mean[k]) / std[k]
        torch.testing.assert_close(after[:, k], expected, rtol=1e-4, atol=1e-5)
        assert float(after[:, k].std()) == pytest.approx(1.0, abs=1e-4)
    offsets = getattr(model.config, OFFSETS_KEY)
    assert offsets[1] == 0.0  # s' = s / std: zero stays the safe / unsafe boundary
    assert offsets[0] == pytest.approx(-float(mean[0] / std[0]), rel=1e-5)


# ------------------------------------------------------------------------------------------ training end to end
def test_multihead_model_learns_opposite_criteria_and_plain_transformers_agrees(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "rubric.jsonl", rubric_rows(40))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in preference_rows(8, seed=2)])
    out = tmp_path / "rm"
    summary = rtrain.main(rtrain.RewardConfig(
        model=str(tiny_model), data=str(data), output_dir=str(out), max_steps=15, batch_size=12, learning_rate=2e-3,
        report_to=["jsonl"], progress=False, eval_fraction=0.2, seed=3, criteria=CRITERIA, safety_loss_weight=1.0,
        normalize_prompts=str(prompts), normalize_samples=8))
    for c in CRITERIA:  # harmlessness prefers the other response of the same pairs: only separate heads learn both
        assert summary[f"heldout_accuracy_{c}"] >= 0.8, c
    assert summary["criteria"] == CRITERIA and summary["heads"] == CRITERIA
    assert summary["normalisation"]["harmlessness"]["kept_zero"]
    assert not summary["normalisation"]["helpfulness"]["kept_zero"]
    assert "accuracy_harmlessness" in read_metrics(out / "metrics.jsonl")[-1]
    config = json.loads((out / "config.json").read_text())
    assert config["rlhfkit_criteria"] == CRITERIA and config["id2label"] == {"0": CRITERIA[0], "1": CRITERIA[1],
                                                                             "2": CRITERIA[2]}
    offsets = config["rlhfkit_reward_offsets"]
    assert len(offsets) == 3 and offsets[1] == 0.0 and offsets[0] != 0.0
    assert "rlhfkit_reward_offset" not in config and config["rlhfkit_safety_criterion"] == "harmlessness"

    prompt, response = "what is 2 plus 3 ?", "2 plus 3 is 5 , ada !"
    ours = [score_texts(load_reward_ensemble(f"{out}#{c}"), [prompt], [response])[0][0] for c in CRITERIA]
    script = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
        f"m = AutoModelForSequenceClassification.from_pretrained({str(out)!r}).eval()\n"
        f"t = AutoTokenizer.from_pretrained({str(out)!r})\n"
        f"ids = t({prompt!r})['input_ids'] + t({response!r}, add_special_tokens=False)['input_ids']\n"
        "ids = ids + [t.eos_token_id]\n"
        "logits = m(input_ids=torch.tensor([ids])).logits[0]\n"
        "print(json.dumps({'scores': [float(logits[k]) + m.config.rlhfkit_reward_offsets[k] for k in range(3)],"
        " 'labels': [m.config.id2label[k] for k in range(3)],"
        " 'rlhfkit': any(k.startswith('rlhfkit') for k in sys.modules)}))\n"
    )
    res = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                    check=True).stdout.strip().splitlines()[-1])
    assert res["rlhfkit"] is False and res["labels"] == CRITERIA
    assert res["scores"] == pytest.approx(ours, abs=1e-4)
    assert ours[1] < 0  # labelled unsafe by this rubric: below the harmlessness head's zero

    with pytest.raises(UserError, match="has 3 heads .*helpfulness, harmlessness, honesty.*#helpfulness"):
        load_reward_ensemble(str(out))
    with pytest.raises(UserError, match="no head named 'harmless'.*helpfulness, harmlessness, honesty"):
        load_reward_ensemble(f"{out}#harmless")
    with pytest.raises(UserError, match="3 head.*this run trains 1"):  # a one-head run cannot start from it
        load_reward_model(str(out), num_labels=1)


def test_an_ensemble_of_multihead_members_scores_a_head_with_its_spread(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "rubric.jsonl", rubric_rows(12))
    out = tmp_path / "ens"
    summary = rtrain.main(rtrain.RewardConfig(
        model=str(tiny_model), data=str(data), output_dir=str(out), max_steps=3, batch_size=6, learning_rate=2e-3,
        report_to=["jsonl"], progress=False, eval_fraction=0.2, criteria=CRITERIA, ensemble_size=2))
    assert len(summary["members"]) == 2 and "heldout_accuracy_helpfulness" in summary
    ensemble = load_reward_ensemble(f"{out}#honesty")
    assert len(ensemble.members) == 2 and ensemble.head == 2
    mean, std = score_texts(ensemble, ["what is 2 plus 3 ?"], ["2 plus 3 is 5 ."])
    assert std[0] > 0


# ------------------------------------------------------------------------------------------------- regression
def scored_rows(n: int, seed: int) -> list[dict]:
    """Two attributes read off the response: warmth (a greeting by name or not) and verbosity (its length)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        warm = rng.random() < 0.5
        extra = rng.randint(0, 3)
        response = f"{a} plus {b} is {a + b}" + (f" , {rng.choice(NAMES)} !" if warm else " .")
        response += " i like red" * extra
        rows.append({"prompt": f"what is {a} plus {b} ?", "response": response, "warmth": 4 if warm else 0,
                     "verbosity": extra + (1 if warm else 0)})
    return rows


def test_regression_heads_beat_a_constant_predictor(tmp_path, tiny_model):
    train_rows, eval_rows = scored_rows(64, seed=1), scored_rows(24, seed=2)
    out = tmp_path / "attrs"
    summary = rtrain.main(rtrain.RewardConfig(
        model=str(tiny_model), data=str(write_jsonl(tmp_path / "scores.jsonl", train_rows)),
        eval_data=str(write_jsonl(tmp_path / "eval.jsonl", eval_rows)), output_dir=str(out), max_steps=20,
        batch_size=16, learning_rate=2e-3, report_to=["jsonl"], progress=False, objective="regression",
        attributes=["warmth", "verbosity"]))
    for a in ("warmth", "verbosity"):
        mean = sum(r[a] for r in train_rows) / len(train_rows)
        # the constant predictor: every held-out response gets the training mean
        constant = (sum((r[a] - mean) ** 2 for r in eval_rows) / len(eval_rows)) ** 0.5
        assert summary[f"heldout_rmse_{a}"] < 0.6 * constant, a
        assert summary[f"heldout_pearson_{a}"] > 0.8, a
        assert summary["offsets"][a] == pytest.approx(mean)  # a fresh head starts from the training mean
    config = json.loads((out / "config.json").read_text())
    assert config["rlhfkit_criteria"] == ["warmth", "verbosity"] and config["rlhfkit_objective"] == "regression"
    assert "rmse_warmth" in read_metrics(out / "metrics.jsonl")[-1]
    # a head used as a reward is the predicted attribute on its own scale
    warm, _ = score_texts(load_reward_ensemble(f"{out}#warmth"), ["what is 2 plus 3 ?", "what is 2 plus 3 ?"],
                          ["2 plus 3 is 5 , ada !", "2 plus 3 is 5 ."])
    assert warm[0] > 2 > warm[1]


def test_regression_loss_by_hand():
    pred = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    target = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    loss, stats = attribute_regression_loss(pred, target)
    # squared errors [[1, 0], [4, 1]]: mean 6 / 4; per attribute sums (5, 1)
    assert float(loss) == pytest.approx(1.5)
    assert stats.squared_error_sum.tolist() == [5.0, 1.0] and int(stats.num_responses) == 2


def test_scored_rows_are_read_flat_or_nested_and_bad_ones_are_refused(tmp_path):
    flat = {"prompt": "p ?", "response": "r .", "helpfulness": 3, "verbosity": 1.5}
    nested = {"prompt": "p ?", "response": "r .", "scores": {"helpfulness": 2, "verbosity": 0}}
    path = write_jsonl(tmp_path / "ok.jsonl", [flat, nested])
    got = read_scored(str(path), ["helpfulness", "verbosity"])
    assert [r.scores for r in got] == [[3.0, 1.5], [2.0, 0.0]]
    bad = [
        ({"prompt": "p ?", "response": "r .", "helpfulness": 3}, "row 1, field 'verbosity': missing"),
        ({"prompt": "p ?", "response": "r .", "helpfulness": "3", "verbosity": 1}, "'helpfulness': must be a finite"),
        ({"prompt": "p ?", "response": "r .", "helpfulness": True, "verbosity": 1}, "'helpfulness': must be a finite"),
        ({"prompt": "p ?", "response": "r .", "helpfulness": float("nan"), "verbosity": 1}, "must be a finite"),
        ({**nested, "helpfulness": 1}, "'helpfulness': is given both as a column and in 'scores'"),
        ({"prompt": "p ?", "chosen": "a .", "rejected": "b ."}, "preference row .* --objective preference"),
        ({"prompt": "p ?", "helpfulness": 1, "verbosity": 1}, "'response': missing"),
    ]
    for row, match in bad:
        with pytest.raises(DataError, match=match):
            read_scored(str(write_jsonl(tmp_path / "bad.jsonl", [row])), ["helpfulness", "verbosity"])


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("kw, match", [
    (dict(criteria=CRITERIA, criterion="honesty"), "pass one of them"),
    (dict(criteria=["helpfulness"]), "--criterion helpfulness"),
    (dict(criteria=["helpfulness", "helpfulness"]), "more than once"),
    (dict(criteria=["help#1", "safe"]), "not a usable head name"),
    (dict(criteria=["helpfulness", "honesty"], safety_loss_weight=1.0), "--safety-criterion 'harmlessness'"),
    (dict(other_criteria="drop"), "only with --criteria"),
    (dict(attributes=["helpfulness"]), "add --objective regression"),
    (dict(objective="regression", safety_loss_weight=1.0, center_eta=0.01), "--safety-loss-weight, --center-eta"),
    (dict(objective="regression", attributes=[]), "--attributes is empty"),
])
def test_flags_that_do_not_fit_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        rtrain.RewardConfig(model="m", data="d", output_dir="o", **kw).validate()


def test_the_command_line_reads_the_head_flags():
    c = parse_args(rtrain.RewardConfig, ["--model", "m", "--data", "d", "--output-dir", "o", "--criteria",
                                         "helpfulness,harmlessness,honesty", "--safety-criterion", "harmlessness"])
    assert c.criteria == CRITERIA
    c = parse_args(rtrain.RewardConfig, ["--model", "m", "--data", "d", "--output-dir", "o", "--objective",
                                         "regression", "--attributes", "helpfulness,verbosity"])
    assert c.heads() == ["helpfulness", "verbosity"]


def test_rubric_rows_of_unlisted_or_missing_criteria_are_refused_or_dropped_by_name(tmp_path, tiny_model):
    tok = load_tokenizer(str(tiny_model), padding_side="right")
    path = write_jsonl(tmp_path / "rubric.jsonl", rubric_rows(6))
    two = rtrain.RewardConfig(model=str(tiny_model), data=str(path), output_dir="o",
                              criteria=["helpfulness", "honesty"])
    with pytest.raises(UserError, match="6 rows are judged on harmlessness.*--other-criteria drop"):
        rtrain.load_items(two, tok)
    train, held, info = rtrain.load_items(replace_cfg(two, other_criteria="drop"), tok)
    assert len(train) + len(held) == 12 and {i.head for i in train + held} == {0, 1}
    with pytest.raises(UserError, match="no row is judged on truthfulness"):
        rtrain.load_items(replace_cfg(two, criteria=["helpfulness", "truthfulness"], other_criteria="drop"), tok)
    unnamed = write_jsonl(tmp_path / "unnamed.jsonl", rubric_rows(1)[:1] + preference_rows(1))
    with pytest.raises(DataError, match="row 2, field 'criterion': missing"):
        rtrain.load_items(replace_cfg(two, data=str(unnamed)), tok)
    plain = write_jsonl(tmp_path / "plain.jsonl", preference_rows(3))
    with pytest.raises(UserError, match="no row has one"):
        rtrain.load_items(replace_cfg(two, data=str(plain)), tok)
    numeric = write_jsonl(tmp_path / "numeric.jsonl", [{**preference_rows(1)[0], "criterion": 1}])
    with pytest.raises(DataError, match="'criterion': must be a string"):
        rtrain.load_items(replace_cfg(two, data=str(numeric)), tok)


def replace_cfg(c, **kw):
    from dataclasses import replace

    return replace(c, **kw)


# ------------------------------------------------------------------------------ heads as rewards (load_reward_set)
@pytest.fixture(scope="module")
def saved_multihead(tiny_model, tmp_path_factory):
    """An untrained three-head model saved as `rlhfkit reward` saves one, with offsets that are not 0."""
    model, tok = multihead(tiny_model)
    setattr(model.config, OFFSETS_KEY, [0.5, -1.0, 2.0])
    out = tmp_path_factory.mktemp("rm") / "multi"
    save_pretrained(model, tok, out)
    return out


def count_forwards(ensemble) -> list[int]:
    calls = [0]

    def hook(*_):
        calls[0] += 1

    for m in ensemble.members:
        m.model.register_forward_hook(hook)  # the shared trunk
    return calls


def test_heads_of_one_model_are_loaded_once_and_scored_in_one_forward_pass(saved_multihead):
    d = str(saved_multihead)
    tok = load_tokenizer(d)
    cfg_ = CombineConfig(rewards={"help": f"{d}#helpfulness", "safe": f"{d}#harmlessness", "honest": f"{d}#honesty"},
                         reward_normalization="none")
    rewards = load_reward_set(cfg_, tok)
    help_, safe = rewards.ensembles["help"], rewards.ensembles["safe"]
    assert help_.members[0] is safe.members[0] and (help_.head, safe.head) == (0, 1)
    calls = count_forwards(help_)
    prompts = ["what is 2 plus 3 ?", "what is 4 plus 1 ?"]
    texts = ["2 plus 3 is 5 , ada !", "4 plus 1 is 6 ."]
    enc = [tok(p + " " + t)["input_ids"] + [tok.eos_token_id] for p, t in zip(prompts, texts)]
    width = max(map(len, enc))
    ids = torch.tensor([e + [tok.pad_token_id] * (width - len(e)) for e in enc])
    mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in enc])
    named = rewards.named_scores(ids, mask, prompts, texts)
    assert calls[0] == 1  # three rewards, one forward pass of the shared trunk
    assert list(named) == ["help", "safe", "honest"]
    with torch.no_grad():
        for k, name in enumerate(["help", "safe", "honest"]):
            alone = sequence_scores(help_.members[0], ids, mask, head=k)  # offset-corrected head k
            torch.testing.assert_close(named[name], alone)
    # from the texts (another vocabulary): one forward pass for every prompt's responses, not one per reward
    rewards.same_vocab = dict.fromkeys(rewards.same_vocab, False)
    calls[0] = 0
    by_text = rewards.named_scores(None, None, prompts, texts)
    assert calls[0] == 1
    for name, spec in cfg_.rewards.items():
        alone, _ = score_texts(load_reward_ensemble(spec), prompts, texts)
        assert by_text[name].tolist() == pytest.approx(alone, abs=1e-5)
    combined, _ = rewards.score_texts(prompts, texts)
    assert combined == pytest.approx((by_text["help"] + by_text["safe"] + by_text["honest"]).tolist(), abs=1e-5)


def test_a_reward_must_name_an_existing_head(saved_multihead, tmp_path, tiny_model):
    d = str(saved_multihead)
    tok = load_tokenizer(d)
    with pytest.raises(UserError, match=r"has 3 heads \(helpfulness, harmlessness, honesty\)"):
        load_reward_set(CombineConfig(rewards={"help": d, "safe": f"{d}#harmlessness"}), tok)
    with pytest.raises(UserError, match="no head named 'helpful'"):
        load_reward_set(CombineConfig(rewards={"help": f"{d}#helpful", "safe": f"{d}#harmlessness"}), tok)
    with pytest.raises(UserError, match="write a reward model's head as DIR#criterion"):
        load_reward_ensemble(f"{d}#")
    # a one-head model takes no suffix, or its own criterion's name
    one = tmp_path / "one"
    model = load_reward_model(str(tiny_model), tok)
    model.config.rlhfkit_criterion = "helpfulness"
    save_pretrained(model, tok, one)
    assert load_reward_ensemble(f"{one}#helpfulness").head is None
    with pytest.raises(UserError, match="no head named 'honesty'.*its heads are helpfulness"):
        load_reward_ensemble(f"{one}#honesty")


def test_a_one_attribute_model_is_a_one_head_model_with_a_named_head(tiny_model, tmp_path):
    tok = load_tokenizer(str(tiny_model))
    model = load_reward_model(str(tiny_model), tok)
    ids = torch.tensor([tok("what is 2 plus 3 ? 2 plus 3 is 5 .")["input_ids"]])
    with torch.no_grad():
        raw = sequence_scores(model, ids, torch.ones_like(ids))
    name_heads(model, ["warmth"])  # the one offset moves into the list
    setattr(model.config, OFFSETS_KEY, [2.0])
    assert not hasattr(model.config, "rlhfkit_reward_offset")
    with torch.no_grad():
        torch.testing.assert_close(sequence_scores(model, ids, torch.ones_like(ids)), raw + 2.0)
    save_pretrained(model, tok, tmp_path / "one")
    plain, named = load_reward_ensemble(str(tmp_path / "one")), load_reward_ensemble(f"{tmp_path / 'one'}#warmth")
    assert plain.head is None and named.head is None and plain.heads == ["warmth"]
    mask = torch.ones_like(ids)
    torch.testing.assert_close(named.scores(ids, mask)[0], raw + 2.0)
