"""The reward model's likelihood term: score = w.h + c * log p(response | prompt) + offset, the log-likelihood read
from the model's own trunk through its tied input embeddings, c fit after training."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from rlhfkit.data.collate import encode_responses
from rlhfkit.errors import ConfigError, UserError
from rlhfkit.generation import encode_prompts
from rlhfkit.models import load_causal_lm, load_tokenizer
from rlhfkit.reward import model as rmodel
from rlhfkit.reward import train as rtrain
from rlhfkit.reward.model import LIKELIHOOD_KEY, OFFSET_KEY

from helpers import preference_rows, ranking_rows, write_jsonl

PROMPTS = ["what is 2 plus 3 ?", "what is 4 plus 4 ?", "what is 1 plus 9 ?"]
RESPONSES = ["2 plus 3 is 5 , ada !", "4 plus 4 is 9 .", "i like red ."]


def lm_response_logprob(lm, ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p(token t | tokens before t) over response tokens, from the causal LM's full logits. (B,)"""
    with torch.no_grad():
        logits = lm(input_ids=ids, attention_mask=(ids != -1).long()).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    return (lp * response_mask[:, 1:]).sum(1)


@pytest.fixture(scope="module")
def rm_with_term(tiny_model, tmp_path_factory):
    """The tiny model as a fresh one-head reward model with a likelihood term set by hand, saved."""
    tok = load_tokenizer(str(tiny_model), padding_side="right")
    model = rmodel.load_reward_model(str(tiny_model), tok).eval()
    setattr(model.config, OFFSET_KEY, 0.2)
    setattr(model.config, LIKELIHOOD_KEY, 0.3)
    out = tmp_path_factory.mktemp("rm-term") / "rm"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_response_log_likelihood_is_the_language_models_own(tiny_model):
    tok = load_tokenizer(str(tiny_model), padding_side="right")
    lm = load_causal_lm(str(tiny_model), tok).eval()
    rm = rmodel.load_reward_model(str(tiny_model), tok).eval()
    batch = encode_responses(tok, PROMPTS[0], RESPONSES, 64)
    with torch.no_grad():
        logit, like = rmodel.head_and_likelihood(rm, batch["input_ids"], batch["attention_mask"],
                                                 batch["last_index"], batch["response_mask"])
        plain = rmodel.sequence_scores(rm, batch["input_ids"], batch["attention_mask"])
    assert logit.tolist() == pytest.approx(plain.tolist(), abs=1e-5)  # fresh model: offset 0, no term
    want = lm_response_logprob(lm, batch["input_ids"], batch["response_mask"].float())
    assert like.tolist() == pytest.approx(want.tolist(), abs=1e-4)
    assert (like < 0).all()  # a sum of log-probs over at least one token each


def test_scores_with_the_term_on_every_path(rm_with_term, tiny_model):
    ensemble = rmodel.load_reward_ensemble(str(rm_with_term))
    tok = ensemble.tokenizer
    lm = load_causal_lm(str(tiny_model), tok).eval()
    ours, _ = rmodel.score_texts(ensemble, PROMPTS, RESPONSES)
    for prompt, response, got in zip(PROMPTS, RESPONSES, ours):
        batch = encode_responses(tok, prompt, [response], 64)
        with torch.no_grad():
            logit, _ = rmodel.head_and_likelihood(ensemble.members[0], batch["input_ids"], batch["attention_mask"],
                                                  batch["last_index"], batch["response_mask"])
        like = lm_response_logprob(lm, batch["input_ids"], batch["response_mask"].float())
        assert got == pytest.approx(float(logit[0]) + 0.2 + 0.3 * float(like[0]), abs=1e-4)
    # PPO's layout: prompts left-padded, responses right-padded after them, the response tokens marked
    prompt_ids, prompt_mask = encode_prompts(tok, PROMPTS)
    answers = [tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in RESPONSES]
    R = max(map(len, answers))
    response_ids = torch.tensor([a + [tok.pad_token_id] * (R - len(a)) for a in answers])
    rmask = torch.tensor([[1] * len(a) + [0] * (R - len(a)) for a in answers])
    ids, mask = torch.cat([prompt_ids, response_ids], 1), torch.cat([prompt_mask, rmask], 1)
    response = torch.cat([torch.zeros_like(prompt_mask), rmask], 1)
    mean, _ = ensemble.mean_std(ids, mask, response)
    assert mean.tolist() == pytest.approx(ours, abs=1e-4)
    with pytest.raises(ValueError, match="likelihood term"):  # without the response tokens: never a wrong score
        ensemble.mean_std(ids, mask)


def test_plain_transformers_reproduces_the_score(rm_with_term):
    ensemble = rmodel.load_reward_ensemble(str(rm_with_term))
    ours, _ = rmodel.score_texts(ensemble, PROMPTS[:1], RESPONSES[:1])
    script = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
        f"m = AutoModelForSequenceClassification.from_pretrained({str(rm_with_term)!r}).eval()\n"
        f"t = AutoTokenizer.from_pretrained({str(rm_with_term)!r})\n"
        f"p = t({PROMPTS[0]!r})['input_ids']\n"
        f"ids = torch.tensor([p + t({RESPONSES[0]!r}, add_special_tokens=False)['input_ids'] + [t.eos_token_id]])\n"
        "out = m(input_ids=ids, output_hidden_states=True)\n"
        "lp = torch.log_softmax(out.hidden_states[-1][0, :-1] @ m.get_input_embeddings().weight.T, -1)\n"
        "like = lp.gather(-1, ids[0, 1:, None])[len(p) - 1 :].sum()\n"
        "c = m.config.rlhfkit_likelihood_coef\n"
        "print(json.dumps({'score': out.logits[0, 0].item() + m.config.rlhfkit_reward_offset + c * like.item()}))\n"
    )
    res = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                    check=True).stdout.strip().splitlines()[-1])
    assert res["score"] == pytest.approx(ours[0], abs=1e-4)


def test_normalisation_scales_the_term_with_the_head(rm_with_term):
    ensemble = rmodel.load_reward_ensemble(str(rm_with_term))
    before = torch.tensor(rmodel.score_texts(ensemble, PROMPTS, RESPONSES)[0])
    rmodel.apply_normalisation(ensemble.members[0], mean=-1.5, std=4.0)
    after = torch.tensor(rmodel.score_texts(ensemble, PROMPTS, RESPONSES)[0])
    assert after.tolist() == pytest.approx(((before + 1.5) / 4.0).tolist(), abs=1e-5)
    assert rmodel.likelihood_coef(ensemble.members[0].config) == pytest.approx(0.3 / 4.0)


def test_fit_recovers_bradley_terry_weights():
    gen = torch.Generator().manual_seed(0)
    n = 40000
    head = 1.5 * torch.randn(n, generator=gen, dtype=torch.float64)
    like = 6.0 * torch.randn(n, generator=gen, dtype=torch.float64)  # nats: a wider scale than the head's
    p = torch.sigmoid(2.0 * head + 0.25 * like)  # P(first is better) under the true weights (2, 0.25)
    first = torch.rand(n, generator=gen, dtype=torch.float64) < p
    sign = torch.where(first, 1.0, -1.0).double()  # each pair is written better minus worse
    gain, weight = rtrain.fit_likelihood_weights(sign * head, sign * like)
    assert gain == pytest.approx(2.0, rel=0.05) and weight == pytest.approx(0.25, rel=0.05)
    # labels from the head alone: a likelihood that carries nothing gets (about) no weight
    sign = torch.where(torch.rand(n, generator=gen, dtype=torch.float64) < torch.sigmoid(2.0 * head), 1.0, -1.0)
    gain, weight = rtrain.fit_likelihood_weights(sign * head, sign * like)
    assert gain == pytest.approx(2.0, rel=0.05) and abs(weight) < 0.01


def test_fit_is_the_bradley_terry_optimum_on_a_hand_example():
    d_head = torch.tensor([1.0, -0.5, 2.0, 0.3], dtype=torch.float64)
    d_like = torch.tensor([0.5, 2.0, -1.0, 1.0], dtype=torch.float64)
    gain, weight = rtrain.fit_likelihood_weights(d_head, d_like)
    w = torch.tensor([gain, weight], dtype=torch.float64, requires_grad=True)
    loss = torch.nn.functional.softplus(-(w[0] * d_head + w[1] * d_like)).mean()
    loss.backward()
    assert w.grad.abs().max() < 1e-6  # stationary: the maximum-likelihood weights
    assert float(loss.detach()) < float(torch.nn.functional.softplus(-d_head).mean())  # better than the head as trained


def shorter_wins(rows: list[dict]) -> list[dict]:
    """The same pairs with the shorter answer preferred: under a random model the shorter response is the likelier
    one, so here the likelihood agrees with the labels (in preference_rows the longer, friendly answer wins)."""
    return [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in rows]


@pytest.mark.parametrize("agrees", [True, False], ids=["likelihood-agrees", "likelihood-disagrees"])
def test_training_with_the_term(tmp_path, tiny_model, agrees):
    rows = preference_rows(60)
    data = write_jsonl(tmp_path / "prefs.jsonl", shorter_wins(rows) if agrees else rows + ranking_rows(20, seed=1))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in preference_rows(20, seed=9)])
    out = tmp_path / "rm"
    summary = rtrain.main(rtrain.RewardConfig(
        model=str(tiny_model), data=str(data), output_dir=str(out), max_steps=15, batch_size=8, learning_rate=2e-3,
        report_to=["jsonl"], progress=False, eval_fraction=0.2, seed=3, likelihood_term=True,
        likelihood_fit_pairs=40, normalize_prompts=str(prompts), normalize_samples=16))
    fit = summary["likelihood_term"]
    assert 40 <= fit["pairs"] < 40 + 6  # items are drawn until 40 ordered pairs; a ranking holds up to 6
    config = json.loads((out / "config.json").read_text())
    assert fit["used"] is agrees
    if agrees:
        assert fit["head_gain"] > 0 and fit["coef"] > 0
        assert "heldout_accuracy_head" in fit and "heldout_accuracy" in summary
        # normalisation folded its gain into the term as into the head
        assert config[LIKELIHOOD_KEY] == pytest.approx(fit["coef"] * summary["normalisation"]["gain"], rel=1e-6)
    else:
        assert LIKELIHOOD_KEY not in config
    ensemble = rmodel.load_reward_ensemble(str(out))
    scores, _ = rmodel.score_texts(ensemble, PROMPTS, RESPONSES)
    assert all(torch.isfinite(torch.tensor(scores)))
    # continuing from it without the term trains the head alone and saves no term
    again = rtrain.main(rtrain.RewardConfig(
        model=str(out), data=str(data), output_dir=str(tmp_path / "rm2"), max_steps=2, batch_size=8,
        report_to=["jsonl"], progress=False, eval_fraction=0.2, seed=3))
    assert "likelihood_term" not in again
    assert LIKELIHOOD_KEY not in json.loads((tmp_path / "rm2" / "config.json").read_text())


def test_errors_name_the_fix():
    with pytest.raises(UserError, match="tie_word_embeddings"):
        rmodel.check_likelihood_term(SimpleNamespace(tie_word_embeddings=False), "runs/sft")
    base = dict(model="m", data="d", output_dir="o", likelihood_term=True)
    with pytest.raises(ConfigError, match="--criteria"):
        rtrain.RewardConfig(**base, criteria=["helpfulness", "harmlessness"]).validate()
    with pytest.raises(ConfigError, match="--safety-loss-weight"):
        rtrain.RewardConfig(**base, safety_loss_weight=1.0).validate()
    with pytest.raises(ConfigError, match="likelihood_fit_pairs"):
        rtrain.RewardConfig(**base, likelihood_fit_pairs=1).validate()


def test_save_head_only_drops_the_term_and_nothing_else(rm_with_term, tmp_path):
    heads = rmodel.save_head_only(rm_with_term, tmp_path / "heads")
    assert rmodel.has_likelihood_term(rm_with_term) and not rmodel.has_likelihood_term(heads)
    full, _ = rmodel.score_texts(rmodel.load_reward_ensemble(str(rm_with_term)), PROMPTS, RESPONSES)
    alone, _ = rmodel.score_texts(rmodel.load_reward_ensemble(str(heads)), PROMPTS, RESPONSES)
    tok = load_tokenizer(str(rm_with_term), padding_side="right")
    model = rmodel.load_reward_model(str(rm_with_term), tok).eval()
    for prompt, response, f, a in zip(PROMPTS, RESPONSES, full, alone):
        batch = encode_responses(tok, prompt, [response], 64)
        with torch.no_grad():
            logit, like = rmodel.head_and_likelihood(model, batch["input_ids"], batch["attention_mask"],
                                                     batch["last_index"], batch["response_mask"])
        assert a == pytest.approx(float(logit[0]) + 0.2, abs=1e-4)  # the head and its offset, as before
        assert f - a == pytest.approx(0.3 * float(like[0]), abs=1e-4)
    source = json.loads((rm_with_term / "config.json").read_text())
    copy = json.loads((heads / "config.json").read_text())
    assert copy == {k: v for k, v in source.items() if k != LIKELIHOOD_KEY}
