"""Reward models per criterion: reading one criterion of a rubric export, the safety classifier term of a cost
model (hand value), a zero kept through normalisation, and refusals of files that would mix criteria."""

import json

import pytest
import torch

from helpers import preference_rows, write_jsonl
from rlhfkit.data.collate import collate_pairs
from rlhfkit.data.preference import read_preferences
from rlhfkit.data.preference_tokens import TokenizedPair
from rlhfkit.errors import DataError, UserError
from rlhfkit.models import load_tokenizer
from rlhfkit.reward import train as rtrain
from rlhfkit.reward.model import load_reward_model, sequence_scores


def rubric_rows(n: int = 40) -> list[dict]:
    """Each pair judged on two criteria that disagree: helpfulness prefers the right sum, harmlessness the other."""
    rows = []
    for r in preference_rows(n, seed=5):
        rows.append({**r, "criterion": "helpfulness"})
        rows.append({"prompt": r["prompt"], "chosen": r["rejected"], "rejected": r["chosen"],
                     "criterion": "harmlessness", "chosen_safe": True, "rejected_safe": False})
    return rows


def test_one_criterion_is_read_and_mixed_files_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "rubric.jsonl", rubric_rows(6))
    helpful = read_preferences(str(path), criterion="helpfulness")
    harmless = read_preferences(str(path), criterion="harmlessness")
    assert len(helpful) == len(harmless) == 6
    assert helpful[0].chosen == harmless[0].rejected
    assert (harmless[0].chosen_safe, harmless[0].rejected_safe) == (True, False)
    assert helpful[0].chosen_safe is None
    with pytest.raises(UserError, match="several criteria .* --criterion"):
        read_preferences(str(path))
    with pytest.raises(UserError, match="no row is judged on criterion 'honesty'"):
        read_preferences(str(path), criterion="honesty")
    plain = write_jsonl(tmp_path / "plain.jsonl", preference_rows(3))
    with pytest.raises(UserError, match="no row has a criterion column"):
        read_preferences(str(plain), criterion="helpfulness")
    partly = write_jsonl(tmp_path / "partly.jsonl", rubric_rows(2)[:1] + preference_rows(1))
    with pytest.raises(DataError, match="criterion"):
        read_preferences(str(partly), criterion="helpfulness")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{**preference_rows(1)[0], "chosen_safe": "yes"}])
    with pytest.raises(DataError, match="chosen_safe"):
        read_preferences(str(bad))


def test_safety_term_adds_the_classifier_loss_by_hand(tiny_model):
    tok = load_tokenizer(str(tiny_model), padding_side="right")
    model = load_reward_model(str(tiny_model), tok)
    ids = lambda text: tok(text)["input_ids"]  # noqa: E731
    prompt = ids("what is 2 plus 3 ?")
    c, r = ids("2 plus 3 is 5 ."), ids("2 plus 3 is 7 .")
    item = TokenizedPair(prompt, prompt + c, [1] * len(prompt + c), [0] * len(prompt) + [1] * len(c),
                         prompt + r, [1] * len(prompt + r), [0] * len(prompt) + [1] * len(r),
                         chosen_safe=True, rejected_safe=False)
    plain = rtrain.RewardConfig(model=str(tiny_model), data="x", output_dir="y", padding_free=False)
    safety = rtrain.RewardConfig(model=str(tiny_model), data="x", output_dir="y", padding_free=False,
                                 safety_loss_weight=0.5)
    base, _ = rtrain.micro_batch_loss(model, [item], tok.pad_token_id, plain, "cpu", 1.0)
    total, counts = rtrain.micro_batch_loss(model, [item], tok.pad_token_id, safety, "cpu", 1.0)
    batch = collate_pairs([item], tok.pad_token_id)
    with torch.no_grad():
        s = sequence_scores(model, batch["input_ids"], batch["attention_mask"], batch["last_index"])
    # Safe RLHF's classifier term with cost = -score: -log sigma(+s_chosen) (safe) - log sigma(-s_rejected) (unsafe)
    by_hand = -torch.nn.functional.logsigmoid(s[0]) - torch.nn.functional.logsigmoid(-s[1])
    assert float((total - base).detach()) == pytest.approx(0.5 * float(by_hand), rel=1e-5)
    assert counts["safety_labelled"] == 2 and counts["safety_correct"] == float((s[0] > 0) + (s[1] < 0))


def test_a_cost_model_keeps_its_zero_and_learns_both_criteria_apart(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "rubric.jsonl", rubric_rows(40))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in preference_rows(8, seed=2)])
    common = dict(model=str(tiny_model), data=str(data), max_steps=30, batch_size=8, learning_rate=2e-3,
                  report_to=["jsonl"], progress=False, eval_fraction=0.2, seed=3, normalize_prompts=str(prompts),
                  normalize_samples=8)
    helpful = rtrain.main(rtrain.RewardConfig(**common, output_dir=str(tmp_path / "help"), criterion="helpfulness"))
    harmless = rtrain.main(rtrain.RewardConfig(**common, output_dir=str(tmp_path / "safe"), criterion="harmlessness",
                                               safety_loss_weight=1.0))
    assert helpful["criterion"] == "helpfulness" and helpful["heldout_accuracy"] >= 0.8
    assert harmless["heldout_accuracy"] >= 0.8  # the opposite order, learned from the same pairs
    assert harmless["normalisation"]["kept_zero"] and harmless["normalisation"]["offset"] == 0.0
    assert helpful["normalisation"]["offset"] != 0.0
    config = json.loads((tmp_path / "safe" / "config.json").read_text())
    assert config["rlhfkit_criterion"] == "harmlessness" and config["rlhfkit_safety_zero"] is True
    with pytest.raises(UserError, match="several criteria"):
        rtrain.main(rtrain.RewardConfig(**common, output_dir=str(tmp_path / "mixed")))
    plain = write_jsonl(tmp_path / "plain.jsonl", preference_rows(30))
    with pytest.raises(UserError, match="chosen_safe / rejected_safe"):
        rtrain.main(rtrain.RewardConfig(**{**common, "data": str(plain)}, output_dir=str(tmp_path / "nolabels"),
                                        safety_loss_weight=1.0))
