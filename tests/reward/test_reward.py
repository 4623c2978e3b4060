"""Reward models: score position, equivalences of the ranking loss, training end to end, normalisation,
ensembles, and what plain transformers sees."""

import json
import math
import subprocess
import sys

import pytest
import torch

from helpers import preference_rows, ranking_rows, write_jsonl
from rlhfkit.data.collate import collate_pairs, collate_rankings, encode_responses
from rlhfkit.data.preference import PreferencePair, Ranking
from rlhfkit.data.preference_tokens import tokenize_pair, tokenize_ranking
from rlhfkit.errors import UserError
from rlhfkit.losses import batched_ranking_loss, bradley_terry_loss
from rlhfkit.models import load_tokenizer
from rlhfkit.reward import train as rtrain
from rlhfkit.reward.model import (
    OFFSET_KEY, apply_normalisation, last_token_index, load_reward_ensemble, load_reward_model, score_texts,
    sequence_scores,
)
from rlhfkit.train import read_metrics


@pytest.fixture(scope="module")
def rm(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    return load_reward_model(str(tiny_model), tok).eval(), tok


def test_score_is_read_at_the_last_real_token_whatever_the_padding(rm):
    model, tok = rm
    texts = ["what is 2 plus 3 ? 5 , ada !", "say hi .", "hi bo , i like red and blue and green ."]
    alone = []
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tok(t)["input_ids"]])
            alone.append(float(sequence_scores(model, ids, torch.ones_like(ids))))
        for side in ("right", "left"):
            tok.padding_side = side
            batch = tok(texts, padding=True, return_tensors="pt")
            got = sequence_scores(model, batch["input_ids"], batch["attention_mask"])
            assert got.tolist() == pytest.approx(alone, abs=1e-5), side
    tok.padding_side = "right"
    # a score read at padding (the classic bug) would differ: the pad position gives another number
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    assert last_token_index(mask).item() == 2
    assert last_token_index(torch.tensor([[0, 0, 1, 1, 1]])).item() == 4


def _pair_item(tok, prompt, chosen, rejected):
    return tokenize_pair(tok, PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected), 64)


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).clone()


def test_k2_ranking_equals_the_bradley_terry_pair_in_loss_and_gradient(rm):
    model, tok = rm
    cfg = rtrain.RewardConfig(model="m", data="d", output_dir="o", use_margin=False)
    prompt, good, bad = "what is 2 plus 3 ?", "2 plus 3 is 5 .", "2 plus 3 is 7 ."
    pair = _pair_item(tok, prompt, good, bad)
    ranking = tokenize_ranking(tok, Ranking(prompt=prompt, responses=[bad, good], ranking=[[1], [0]]), 64)
    model.zero_grad()
    loss_pair, _ = rtrain.micro_batch_loss(model, [pair], tok.pad_token_id, cfg, "cpu", 1.0)
    loss_pair.backward()
    g_pair = _grads(model)
    model.zero_grad()
    loss_rank, _ = rtrain.micro_batch_loss(model, [ranking], tok.pad_token_id, cfg, "cpu", 1.0)
    loss_rank.backward()
    g_rank = _grads(model)
    model.zero_grad()
    assert loss_rank.item() == pytest.approx(loss_pair.item(), rel=1e-6)
    # equal up to float32 rounding of sums taken in another order (relative to the largest entry)
    assert float((g_rank - g_pair).abs().max()) < 1e-5 * float(g_pair.abs().max())


def test_k4_ranking_is_the_mean_of_its_six_pairwise_losses(rm):
    model, tok = rm
    cfg = rtrain.RewardConfig(model="m", data="d", output_dir="o")
    prompt = "what is 2 plus 3 ?"
    responses = ["2 plus 3 is 5 , ada !", "2 plus 3 is 5 .", "2 plus 3 is 6 .", "i like red ."]
    item = tokenize_ranking(tok, Ranking(prompt=prompt, responses=responses, ranking=[[0], [1], [2], [3]]), 64)
    with torch.no_grad():
        loss, counts = rtrain.micro_batch_loss(model, [item], tok.pad_token_id, cfg, "cpu", 1.0)
        batch = encode_responses(tok, prompt, responses, 64)
        r = sequence_scores(model, batch["input_ids"], batch["attention_mask"], batch["last_index"]).tolist()
    # by hand: the 6 ordered pairs (w, l) with w ranked above l; loss = mean of -log sigma(r_w - r_l)
    pairs = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    by_hand = sum(math.log1p(math.exp(-(r[w] - r[l]))) for w, l in pairs) / 6
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)
    assert counts["compared"] == 6


def test_expected_calibration_error_and_pearson_by_hand():
    # gaps 0 -> p 0.5, counted as wrong (a tie predicts nothing): one bin at confidence 0.5, accuracy 0 -> ECE 0.5
    assert rtrain.expected_calibration_error(torch.tensor([0.0, 0.0])) == pytest.approx(0.5)
    # gap ln 3 -> p = 0.75 correct, gap -ln 3 -> confidence 0.75 wrong: one bin, accuracy 0.5 vs 0.75 -> 0.25
    g = math.log(3)
    assert rtrain.expected_calibration_error(torch.tensor([g, -g])) == pytest.approx(0.25)
    assert rtrain.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert rtrain.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_normalisation_folds_the_gain_and_keeps_the_order(rm, tiny_model):
    tok = load_tokenizer(str(tiny_model))
    model = load_reward_model(str(tiny_model), tok).eval()
    ids = torch.tensor([tok(t)["input_ids"] for t in ["2 plus 3 is 5 .", "2 plus 3 is 6 .", "2 plus 3 is 7 ."]])
    with torch.no_grad():
        before = sequence_scores(model, ids, torch.ones_like(ids))
        apply_normalisation(model, float(before.mean()), float(before.std()))
        after = sequence_scores(model, ids, torch.ones_like(ids))
    assert float(after.mean()) == pytest.approx(0.0, abs=1e-5) and float(after.std()) == pytest.approx(1.0, rel=1e-4)
    assert after.argsort().tolist() == before.argsort().tolist()
    with pytest.raises(UserError, match="cannot normalise the reward model: its scores on the reference samples "
                                        "have std 0"):
        apply_normalisation(model, 0.0, 0.0)



def test_step_counts_from_the_loss_stats_equal_counting_the_scores_directly():
    """The trainer counts correctly ordered pairs from each loss's RewardStats (a float32 accuracy and a pair
    count): the integers must be exactly what comparing the scores gives, ties counted wrong, for pair counts
    that are not powers of two (where accuracy = k/n is rounded)."""
    gen = torch.Generator().manual_seed(0)
    for n in [1, 3, 7, 49, 97, 1000, 4097]:
        chosen = torch.randint(-3, 4, (n,), generator=gen).float() / 4  # coarse values: many ties
        rejected = torch.randint(-3, 4, (n,), generator=gen).float() / 4
        counts = {"correct": 0.0, "compared": 0.0}
        rtrain.count_ordered_pairs(counts, bradley_terry_loss(chosen, rejected)[1])
        assert counts == {"correct": float((chosen > rejected).sum()), "compared": float(n)}, n
    # rankings: 5 prompts of up to 4 responses (padding slots and ties are in no ordered pair)
    rewards = torch.randn(5, 4, generator=gen)
    rewards[0, 1] = rewards[0, 0]  # a tie in score, ranked apart: counts as wrong
    beats = torch.zeros(5, 4, 4, dtype=torch.bool)
    for g, k in enumerate([4, 3, 2, 4, 3]):
        beats[g, :k, :k] = torch.ones(k, k, dtype=torch.bool).triu(1)  # slot i ranked above every later slot
    beats[3, 1, 2] = False  # slots 1 and 2 of prompt 3 tied in the ranking
    counts = {"correct": 0.0, "compared": 0.0}
    rtrain.count_ordered_pairs(counts, batched_ranking_loss(rewards, beats)[1])
    ordered = (rewards[:, :, None] > rewards[:, None, :]) & beats  # (G, K, K)
    assert counts == {"correct": float(ordered.sum()), "compared": float(beats.sum())}
    assert counts["compared"] == 6 + 3 + 1 + 5 + 3

def cfg_for(model, data, out, **kw):
    base = dict(model=str(model), data=str(data), output_dir=str(out), max_steps=30, batch_size=8,
                learning_rate=2e-3, report_to=["jsonl"], progress=False, eval_fraction=0.2, seed=3)
    base.update(kw)
    return rtrain.RewardConfig(**base)


@pytest.fixture(scope="module")
def pref_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("prefs")
    write_jsonl(d / "prompts.jsonl", [{"prompt": r["prompt"]} for r in preference_rows(20, seed=9)])
    return write_jsonl(d / "prefs.jsonl", preference_rows(60) + ranking_rows(20, seed=1))


def test_reward_stage_learns_normalises_and_plain_transformers_agrees(tmp_path, tiny_model, pref_file):
    out = tmp_path / "rm"
    summary = rtrain.main(cfg_for(tiny_model, pref_file, out, eval_every=10,
                                  normalize_prompts=str(pref_file.parent / "prompts.jsonl"), normalize_samples=16))
    metrics = read_metrics(out / "metrics.jsonl")
    assert metrics[-1]["eval/accuracy"] >= 0.8 and metrics[-1]["eval/accuracy"] > metrics[0]["accuracy"] - 1e-9
    for key in ("heldout_accuracy", "heldout_ece", "heldout_length_correlation", "normalisation"):
        assert key in summary
    assert summary["normalisation"]["samples"] == 16
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1
    assert config[OFFSET_KEY] == pytest.approx(summary["normalisation"]["offset"])

    ensemble = load_reward_ensemble(str(out))
    prompt, response = "what is 2 plus 3 ?", "2 plus 3 is 5 , ada !"
    ours, _ = score_texts(ensemble, [prompt], [response])
    text = prompt + " " + response  # standard rows: prompt, then the response tokens, then EOS
    script = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
        f"m = AutoModelForSequenceClassification.from_pretrained({str(out)!r}).eval()\n"
        f"t = AutoTokenizer.from_pretrained({str(out)!r})\n"
        f"ids = t({prompt!r})['input_ids'] + t({response!r}, add_special_tokens=False)['input_ids'] + [t.eos_token_id]\n"
        "logit = m(input_ids=torch.tensor([ids])).logits[0, 0].item()\n"
        "print(json.dumps({'score': logit + m.config.rlhfkit_reward_offset,"
        " 'rlhfkit': any(k.startswith('rlhfkit') for k in sys.modules)}))\n"
    )
    res = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                    check=True).stdout.strip().splitlines()[-1])
    assert res["rlhfkit"] is False
    assert res["score"] == pytest.approx(ours[0], abs=1e-4), text


def test_scoring_batches_across_prompts_and_equals_each_pair_scored_alone(rm, tiny_model):
    """The defect: score_texts ran one forward pass per prompt, so PPO's one sample per prompt (64 prompts a step)
    and the held-out pairs (a few responses per prompt) were scored in batches of 1-6 rows."""
    from rlhfkit.data.collate import encode_responses
    from rlhfkit.reward import model as rmodel

    model, tok = rm
    second = load_reward_model(str(tiny_model), tok).eval()
    with torch.no_grad():
        second.score.weight.mul_(-2.0)  # a member that disagrees, so the std is not zero
    ensemble = rmodel.RewardEnsemble([model, second], tok, ["a", "b"])
    words = ["red", "blue", "green", "ada", "bo", "hi", "i like", "what is 2 plus 3 ?", "5 ,", "say"]
    prompts, responses = [], []
    for i in range(40):
        prompt = "say hi ." if i % 3 == 0 else [{"role": "user", "content": f"what is {i} plus 3 ?"}]
        for k in range(1 + i % 4):  # 1-4 responses per prompt, of different lengths, some repeated
            prompts.append(prompt)
            responses.append(" ".join(words[(i + j) % len(words)] for j in range(1 + (k * 7 + i) % 9)))
    prompts.append(prompts[0])
    responses.append(responses[0])  # the same pair twice
    calls = []
    real = rmodel.sequence_scores

    def counted(m, ids, *a, **k):
        calls.append(ids.shape)
        return real(m, ids, *a, **k)

    rmodel.sequence_scores = counted
    try:
        mean, std = rmodel.score_texts(ensemble, prompts, responses, max_length=64)
    finally:
        rmodel.sequence_scores = real
    distinct = len({(json.dumps(p), r) for p, r in zip(prompts, responses)})
    assert sum(shape[0] for shape in calls) == 2 * distinct  # each distinct pair once per member
    assert len(calls) == 2  # every row in one batch per member (not one per prompt)
    for i in range(0, len(prompts), 7):
        batch = encode_responses(tok, prompts[i], [responses[i]], 64)
        with torch.no_grad():
            alone = [float(rmodel.sequence_scores(m, batch["input_ids"], batch["attention_mask"])) for m in
                     (model, second)]
        assert mean[i] == pytest.approx(sum(alone) / 2, abs=1e-5)
        assert std[i] == pytest.approx(abs(alone[0] - alone[1]) / 2 ** 0.5, abs=1e-5)
    assert (mean[-1], std[-1]) == (mean[0], std[0])
    # a small token budget splits the rows into several batches of sorted lengths; the scores do not change
    batches = list(rmodel._scoring_batches(ensemble, prompts, responses, 64, max_tokens=200, max_rows=16))
    assert len(batches) > 2 and all(ids.shape[0] * ids.shape[1] <= 200 or ids.shape[0] == 1
                                    for _, ids, _, _, _ in batches)
    assert sorted(i for rows, *_ in batches for idx in rows for i in idx) == list(range(len(prompts)))
    every = rmodel.score_texts_all_heads(ensemble, prompts, responses, max_length=64)  # (M, B, 1)
    assert every.mean(0)[:, 0].tolist() == pytest.approx(mean, abs=1e-5)


def test_gradient_accumulation_1x8_equals_8x1(tmp_path, tiny_model, pref_file):
    a, b = tmp_path / "1x8", tmp_path / "8x1"
    rtrain.main(cfg_for(tiny_model, pref_file, a, max_steps=3, batch_size=8, grad_accum=1))
    rtrain.main(cfg_for(tiny_model, pref_file, b, max_steps=3, batch_size=1, grad_accum=8))
    la = [m["loss"] for m in read_metrics(a / "metrics.jsonl")]
    lb = [m["loss"] for m in read_metrics(b / "metrics.jsonl")]
    assert la == pytest.approx(lb, rel=1e-4)


def test_ensemble_members_differ_and_score_mean_and_std(tmp_path, tiny_model, pref_file):
    out = tmp_path / "ens"
    summary = rtrain.main(cfg_for(tiny_model, pref_file, out, max_steps=10, ensemble_size=2))
    assert json.loads((out / "ensemble.json").read_text())["members"] == ["member-0", "member-1"]
    assert len(summary["members"]) == 2 and "heldout_accuracy" in summary
    ensemble = load_reward_ensemble(str(out))
    batch = collate_pairs([_pair_item(ensemble.tokenizer, "what is 2 plus 3 ?", "2 plus 3 is 5 .", "2 plus 3 is 6 .")],
                          ensemble.tokenizer.pad_token_id)
    scores = ensemble.scores(batch["input_ids"], batch["attention_mask"])
    assert scores.shape == (2, 2) and not torch.allclose(scores[0], scores[1])  # bootstrap + seed differ
    mean, std = ensemble.mean_std(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(mean, scores.mean(0))
    assert (std > 0).all()
    with pytest.raises(UserError, match="already holds a reward run; pass --resume"):
        rtrain.main(cfg_for(tiny_model, pref_file, out, max_steps=10, ensemble_size=2))


def test_ensemble_trained_member_by_member_as_the_demo_does_equals_one_ensemble_run(tmp_path, tiny_model, pref_file):
    """`rlhfkit demo` trains each member as a job of its own and then gathers them: the same ensemble as one
    `rtrain.main` run, weights and summary, and a gathered rerun reuses every member."""
    from safetensors.torch import load_file

    from rlhfkit.pipeline import reward_job, reward_member_job

    def cfg(out):
        return cfg_for(tiny_model, pref_file, out, max_steps=6, ensemble_size=2, bootstrap=True,
                       normalize_prompts=str(pref_file.parent / "prompts.jsonl"), normalize_samples=8)

    whole = rtrain.main(cfg(tmp_path / "whole"))
    parts = cfg(tmp_path / "parts")
    assert [reward_member_job(parts, i).ran for i in (0, 1)] == [True, True]
    assert reward_job("reward", parts, tmp_path).ran
    gathered = json.loads((tmp_path / "parts" / "summary.json").read_text())
    assert gathered["heldout_accuracy"] == whole["heldout_accuracy"]
    for i in (0, 1):
        a = load_file(tmp_path / "whole" / f"member-{i}" / "model.safetensors")
        b = load_file(tmp_path / "parts" / f"member-{i}" / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), i
        assert (gathered["members"][i]["normalisation"] == whole["members"][i]["normalisation"])
    assert json.loads((tmp_path / "parts" / "ensemble.json").read_text())["members"] == ["member-0", "member-1"]
    # a rerun with nothing changed reuses the members and the gathered run
    assert [reward_member_job(parts, i).ran for i in (0, 1)] == [False, False]
    assert not reward_job("reward", parts, tmp_path).ran


def test_pack_rows_places_every_sequence_once_within_the_longest_width():
    from rlhfkit.data.collate import pack_rows

    lengths = [9, 3, 5, 4, 9, 2, 6, 1]
    rows = pack_rows(lengths)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 9 for r in rows)
    assert len(rows) == 5  # 39 tokens in rows of 9: [9] [9] [6 3] [5 4] [2 1] by first-fit decreasing
    assert pack_rows([4, 4, 4]) == [[0], [1], [2]]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["pairs", "rankings"])
def test_padding_free_batches_give_the_padded_scores_loss_and_gradient(rm, kind, attn, monkeypatch):
    """Mixed lengths packed several to a row (block-diagonal mask, positions restarting) score, train and
    backpropagate exactly like the right-padded batch -- under eager attention too, which adds a 4-D mask to
    the scores (a boolean mask there let packed sequences see each other: scores off by ~0.015). So does the
    layout in which an item's responses share one copy of their prompt (share_prompt)."""
    model, tok = rm
    previous = model.config._attn_implementation
    model.set_attn_implementation(attn)
    prompts = ["what is 2 plus 3 ?", "say hi .", "hi bo , i like red and blue and green . what is 1 plus 1 ?"]
    answers = [("5 .", "2 plus 3 is 7 , ada , i like it ."), ("hi !", "no ."), ("2 .", "1 plus 1 is 2 , bo .")]
    if kind == "pairs":
        items = [_pair_item(tok, p, a, b) for p, (a, b) in zip(prompts, answers)]
        batch = collate_pairs(items, tok.pad_token_id, padding_free=True)
    else:
        items = [tokenize_ranking(tok, Ranking(prompt=p, responses=[a, b, a + " ok"], ranking=[[2], [0], [1]]), 64)
                 for p, (a, b) in zip(prompts, answers)]
        batch = collate_rankings(items, tok.pad_token_id, padding_free=True)
    assert batch["attention_mask"].dim() == 4 and batch["input_ids"].shape[0] < batch["row_index"].shape[0]
    collate = collate_pairs if kind == "pairs" else collate_rankings
    shared = collate(items, tok.pad_token_id, padding_free=True, share_prompt=True)
    # each prompt once: fewer tokens laid out than in the packed layout, which repeats it per response
    seqs = [[i.chosen_input_ids, i.rejected_input_ids] if kind == "pairs" else i.input_ids for i in items]
    tokens = sum(len(s) for group in seqs for s in group)
    repeats = sum(len(i.prompt_ids) * (len(group) - 1) for i, group in zip(items, seqs))
    assert int((shared["input_ids"] != tok.pad_token_id).sum()) <= tokens - repeats
    results = []
    # the shared layout in training whatever it would cost on this model (when it is chosen: tests/data/test_collate)
    monkeypatch.setattr("rlhfkit.data.collate.shared_prefix_pays", lambda *args: True)
    for padding_free, share_prompt in ((False, False), (True, False), (True, True)):
        cfg = rtrain.RewardConfig(model="m", data="d", output_dir="o", padding_free=padding_free,
                                  share_prompt=share_prompt, use_margin=False)
        model.zero_grad()
        loss, counts = rtrain.micro_batch_loss(model, items, tok.pad_token_id, cfg, "cpu", 1.0)
        loss.backward()
        results.append((loss.item(), counts, _grads(model)))
    model.zero_grad()
    model.set_attn_implementation(previous)
    (loss_a, counts_a, g_a), *others = results
    for loss_b, counts_b, g_b in others:
        assert loss_b == pytest.approx(loss_a, rel=1e-5)
        assert counts_b["correct"] == counts_a["correct"]
        # float32 sums in another order: differences at the rounding level of the largest gradient entries
        assert float((g_b - g_a).abs().max()) < 1e-5 * float(g_a.abs().max()), float((g_b - g_a).abs().max())


def test_reward_training_weighs_sharing_the_prompt_with_the_models_size(rm, monkeypatch):
    """The reward model's own attention_token_weight reaches every batch's layout choice (pairs and rankings)."""
    from rlhfkit.data import collate
    from rlhfkit.models import attention_token_weight

    model, tok = rm
    seen = []
    real = collate.shared_prefix_pays
    monkeypatch.setattr(collate, "shared_prefix_pays", lambda ids, groups, w: seen.append(w) or real(ids, groups, w))
    items = [_pair_item(tok, "say hi .", "hi !", "no ."),
             tokenize_ranking(tok, Ranking(prompt="say hi .", responses=["hi !", "no .", "hi ! ok"],
                                           ranking=[[0], [2], [1]]), 64)]
    cfg = rtrain.RewardConfig(model="m", data="d", output_dir="o", use_margin=False)
    rtrain.micro_batch_loss(model, items, tok.pad_token_id, cfg, "cpu", 2.0)
    assert seen == [attention_token_weight(model)] * 2 and seen[0] is not None
