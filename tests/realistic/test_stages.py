"""Every stage's main(cfg), a few steps, on tiny Qwen2 / Llama 3 / GPT-2 models with real byte-level BPE
tokenizers and real chat conventions, for plain-string data and (where the family has a chat template) message
lists. Each test checks an outcome that a wrong encoding, mask or save would change."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from realistic.families import FAMILIES, SPECS, Family, FamilyData

CASES = [(name, fmt) for name in FAMILIES for fmt in (("text", "messages") if SPECS[name].chat_template else ("text",))]
CASE_IDS = [f"{n}-{f}" for n, f in CASES]
QUIET = dict(report_to=["jsonl"], progress=False)


# ------------------------------------------------------------------------------------------------- helpers
def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_finite_metrics(run_dir: Path, steps: int) -> list[dict[str, Any]]:
    """Every logged number is finite, and one row per step was written."""
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for row in rows:
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                assert math.isfinite(value), (key, value, row["step"])
    return rows


def changed_tensors(before: Path, after: Path, name: str = "model.safetensors") -> int:
    """How many tensors of equal name and shape differ between two saved models."""
    a, b = load_file(str(before / name)), load_file(str(after / name))
    common = [k for k in a if k in b and a[k].shape == b[k].shape]
    assert common, "the saved models share no tensor"
    return sum(not torch.equal(a[k], b[k]) for k in common)


def assert_plain_transformers_loads(out: Path, family: Family) -> Any:
    """The output directory is a plain Hugging Face causal LM with a tokenizer that encodes like the family's own
    and carries a pad distinct from EOS; returns the tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert type(model).__name__ == family.spec.architecture
    assert model.get_input_embeddings().num_embeddings >= len(tok)
    original = family.tokenizer()
    sample = "Question: What is 13 + 29?\nAnswer: 42, Ada!"
    assert tok(sample)["input_ids"] == original(sample)["input_ids"]
    assert tok.eos_token == original.eos_token and tok.pad_token_id not in (None, tok.eos_token_id)
    if family.has_template:
        chat = [{"role": "user", "content": "Say hello to Bo, please."}]
        assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
            original.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    eos = GenerationConfig.from_pretrained(str(out)).eos_token_id
    assert tok.eos_token_id in (eos if isinstance(eos, list) else [eos])  # plain generate() stops at the turn end
    return tok


def mixed_file(data: FamilyData, kind: str, out: Path) -> Path:
    """All of a family's rows of one kind, every format in one file (rlhfkit reads mixed rows)."""
    rows = [r for (k, _), rs in data.rows.items() if k == kind for r in rs]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def case(family_dir, family_data, name: str) -> tuple[Family, FamilyData]:
    family = family_dir(name)
    return family, family_data(family)


# ------------------------------------------------------------------------------- trained policy and reward
@pytest.fixture(scope="session")
def sft_policy(tmp_path_factory, family_dir, family_data):
    """sft_policy(name) -> a directory: the family model after 80 SFT steps on all its SFT rows (both formats),
    enough for it to answer in the data's style and end its turns."""
    from rlhfkit.policy import sft

    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            family, data = case(family_dir, family_data, name)
            root = tmp_path_factory.mktemp(f"policy-{name}")
            sft.main(sft.SFTConfig(model=str(family.path), data=str(mixed_file(data, "sft", root / "sft.jsonl")),
                                   output_dir=str(root / "sft"), max_steps=80, batch_size=16, learning_rate=1e-2,
                                   lr_schedule="constant", eval_fraction=0.0, **QUIET))
            built[name] = root / "sft"
        return built[name]

    return get


@pytest.fixture(scope="session")
def reward_model(tmp_path_factory, family_dir, family_data, sft_policy):
    """reward_model(name) -> a reward model trained from the SFT policy on all the family's preference rows."""
    from rlhfkit.reward import train as rtrain

    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            family, data = case(family_dir, family_data, name)
            root = tmp_path_factory.mktemp(f"rm-{name}")
            rtrain.main(rtrain.RewardConfig(
                model=str(sft_policy(name)), data=str(mixed_file(data, "preferences", root / "prefs.jsonl")),
                output_dir=str(root / "rm"), max_steps=20, batch_size=16, learning_rate=3e-3, eval_fraction=0.0,
                **QUIET))
            built[name] = root / "rm"
        return built[name]

    return get


# ------------------------------------------------------------------------------------------------------ sft
@pytest.mark.parametrize("name, fmt", CASES, ids=CASE_IDS)
def test_sft(tmp_path, family_dir, family_data, name, fmt):
    from rlhfkit.policy import sft

    family, data = case(family_dir, family_data, name)
    out = tmp_path / "sft"
    summary = sft.main(sft.SFTConfig(model=str(family.path), data=str(data.path("sft", fmt)), output_dir=str(out),
                                     max_steps=8, batch_size=8, learning_rate=3e-3, eval_fraction=0.0, **QUIET))
    rows = assert_finite_metrics(out, 8)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert summary["train_rows"] == 32 and summary["truncated_rows"] == 0
    assert_plain_transformers_loads(out, family)
    assert changed_tensors(family.path, out) > 0


# --------------------------------------------------------------------------------------------------- reward
@pytest.mark.parametrize("name, fmt", CASES, ids=CASE_IDS)
def test_reward(tmp_path, family_dir, family_data, name, fmt):
    from transformers import AutoModelForSequenceClassification

    from rlhfkit.data.collate import encode_responses
    from rlhfkit.data.preference import read_preferences
    from rlhfkit.reward import train as rtrain
    from rlhfkit.reward.model import OFFSET_KEY, load_reward_ensemble, score_texts

    family, data = case(family_dir, family_data, name)
    out = tmp_path / "rm"
    summary = rtrain.main(rtrain.RewardConfig(model=str(family.path), data=str(data.path("preferences", fmt)),
                                              output_dir=str(out), max_steps=8, batch_size=8, learning_rate=3e-3,
                                              eval_fraction=0.0, **QUIET))
    rows = assert_finite_metrics(out, 8)
    assert rows[-1]["loss"] < rows[0]["loss"] and summary["pairs"] == 32
    pairs = read_preferences(str(data.path("preferences", fmt)))[:6]
    ensemble = load_reward_ensemble(str(out))
    chosen, _ = score_texts(ensemble, [p.prompt for p in pairs], [p.chosen for p in pairs])
    rejected, _ = score_texts(ensemble, [p.prompt for p in pairs], [p.rejected for p in pairs])
    assert all(math.isfinite(s) for s in chosen + rejected)
    assert all(c != r for c, r in zip(chosen, rejected))
    assert sum(c > r for c, r in zip(chosen, rejected)) >= 4  # it learned something about these pairs

    # plain transformers reads the same score (logit + saved offset) from the same, unpadded, tokens: score_texts
    # batches the six prompts' responses together, right-padded, and padding never reaches a score
    plain = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    offset = float(getattr(plain.config, OFFSET_KEY, 0.0) or 0.0)
    for pair, c, r in zip(pairs, chosen, rejected):
        for response, expected in ((pair.chosen, c), (pair.rejected, r)):
            ids = encode_responses(ensemble.tokenizer, pair.prompt, [response], 512)["input_ids"]
            with torch.no_grad():
                logit = plain(input_ids=ids).logits[0, 0].item()
            assert logit + offset == pytest.approx(expected, abs=1e-4)


# ------------------------------------------------------------------------------------------------------ ppo
@pytest.mark.slow
@pytest.mark.parametrize("advantage", ["gae", "grpo", "rloo"])
@pytest.mark.parametrize("name, fmt", CASES, ids=CASE_IDS)
def test_ppo(tmp_path, family_dir, family_data, sft_policy, reward_model, name, fmt, advantage):
    from rlhfkit.policy import ppo

    family, data = case(family_dir, family_data, name)
    policy, out = sft_policy(name), tmp_path / "ppo"
    summary = ppo.main(ppo.PPOConfig(
        model=str(policy), data=str(data.path("prompts", fmt)), reward_model=str(reward_model(name)),
        output_dir=str(out), advantage=advantage, samples_per_prompt=1 if advantage == "gae" else 2, max_steps=2,
        batch_size=4, learning_rate=1e-3, max_new_tokens=24, temperature=0.7, ppo_epochs=1, seed=1, **QUIET))
    rows = assert_finite_metrics(out, 2)
    # the policy starts as the reference: any misalignment of sampled and re-scored tokens shows up here
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)
    assert all(r["response_length"] > 0 for r in rows)
    assert max(r["eos_fraction"] for r in rows) > 0  # the SFT policy ends its turns with the family's EOS
    assert summary["steps"] == 2
    assert_plain_transformers_loads(out, family)
    assert ("value_loss" in rows[0]) == (advantage == "gae")  # only GAE trains a critic
    assert changed_tensors(policy, out) > 0


# ------------------------------------------------------------------------------------------ dpo and variants
@pytest.mark.parametrize("loss", ["dpo", "cdpo", "ipo", "simpo", "orpo", "kto"])
@pytest.mark.parametrize("name, fmt", CASES, ids=CASE_IDS)
def test_dpo(tmp_path, family_dir, family_data, name, fmt, loss):
    from rlhfkit.policy import dpo

    family, data = case(family_dir, family_data, name)
    out = tmp_path / loss
    summary = dpo.main(dpo.DPOConfig(
        model=str(family.path), data=str(data.path("kto" if loss == "kto" else "preferences", fmt)), loss=loss,
        output_dir=str(out), max_steps=3, batch_size=8, learning_rate=1e-3, eval_fraction=0.0, **QUIET))
    rows = assert_finite_metrics(out, 3)
    # at step 1 the policy equals the reference, so every implicit reward is 0 and the loss is known exactly:
    # a cached reference computed on other tokens than the policy's forward would move it
    first = {"dpo": math.log(2), "cdpo": math.log(2), "ipo": (1 / (2 * 0.1)) ** 2, "kto": 0.5}
    if loss in first:
        assert rows[0]["loss"] == pytest.approx(first[loss], abs=1e-4)
        assert rows[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
        assert (out / "ref_logps.safetensors").exists()
    if loss != "kto":
        assert rows[-1]["rewards/margin"] > rows[0]["rewards/margin"]  # chosen pulls away from rejected
        assert summary["train_pairs"] == 32
    assert_plain_transformers_loads(out, family)
    assert changed_tensors(family.path, out) > 0


# ----------------------------------------------------------------------------------------------- online dpo
# defect 2 was here too: sample_pairs wrote a plain-string prompt as a user message, so the DPO round trained on a
# templated prompt the policy was never sampled on (and GPT-2, with no template, could not train at all)
ONLINE_CASES = [pytest.param(n, f, id=f"{n}-{f}", marks=[pytest.mark.slow]) for n, f in CASES]


@pytest.mark.parametrize("name, fmt", ONLINE_CASES)
def test_online_dpo(tmp_path, family_dir, family_data, sft_policy, reward_model, name, fmt):
    from rlhfkit.data.preference import read_preferences
    from rlhfkit.data.readers import read_prompts
    from rlhfkit.policy import online_dpo

    family, data = case(family_dir, family_data, name)
    policy, out = sft_policy(name), tmp_path / "online"
    summary = online_dpo.main(online_dpo.OnlineDPOConfig(
        model=str(policy), data=str(data.path("prompts", fmt)), reward_model=str(reward_model(name)),
        output_dir=str(out), rounds=1, prompts_per_round=8, temperature=1.0, max_new_tokens=24, max_steps=2,
        batch_size=4, learning_rate=1e-3, eval_fraction=0.0, **QUIET))
    (round_info,) = summary["rounds"]
    assert round_info["pairs"] > 0 and math.isfinite(round_info["final_loss"])
    pairs = read_preferences(str(out / "round-1" / "pairs.jsonl"))
    assert len(pairs) == round_info["pairs"] and all(p.chosen != p.rejected for p in pairs)
    # the pairs keep the prompts as given: DPO trains on the prompt ids the policy was sampled on
    prompts = read_prompts(str(data.path("prompts", fmt)))
    assert all(p.prompt in prompts for p in pairs)
    assert_plain_transformers_loads(out, family)
    assert changed_tensors(policy, out) > 0


# ----------------------------------------------------------------------------------------------- best-of-n
@pytest.mark.parametrize("name, fmt", CASES, ids=CASE_IDS)
def test_best_of_n(tmp_path, family_dir, family_data, sft_policy, reward_model, name, fmt):
    from rlhfkit.data.readers import read_prompts
    from rlhfkit.policy import best_of_n
    from rlhfkit.reward.model import load_reward_ensemble, score_texts

    family, data = case(family_dir, family_data, name)
    out = tmp_path / "bon"
    summary = best_of_n.main(best_of_n.BestOfNConfig(
        model=str(sft_policy(name)), reward_model=str(reward_model(name)), data=str(data.path("prompts", fmt)),
        output_dir=str(out), n=4, temperature=1.0, max_new_tokens=24))
    rows = read_jsonl(out / "samples.jsonl")
    prompts = read_prompts(str(data.path("prompts", fmt)))
    assert [r["prompt"] for r in rows] == prompts
    for row in rows:
        best = row["scores"].index(max(row["scores"]))
        assert row["score"] == row["scores"][best] and row["response"] == row["candidates"][best]
    assert any(len(set(r["scores"])) > 1 for r in rows)  # the reward model tells candidates apart
    assert summary["mean_best_score"] >= summary["mean_score"]
    # the recorded score is what the reward model gives the saved text, re-encoded from scratch
    ensemble = load_reward_ensemble(str(reward_model(name)))
    rescored, _ = score_texts(ensemble, [r["prompt"] for r in rows], [r["response"] for r in rows])
    assert rescored == pytest.approx([r["score"] for r in rows], abs=1e-4)


# --------------------------------------------------------------------------------------------------- cai
def single_turn_prompts(data: FamilyData, fmt: str, out: Path) -> Path:
    """The family's prompts that judges can read: strings, or conversations of one user turn."""
    rows = [r for r in data.rows[("prompts", fmt)] if isinstance(r["prompt"], str) or len(r["prompt"]) == 1]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.mark.parametrize("command", ["revise", "label"])
@pytest.mark.parametrize("name, fmt", CASES, ids=CASE_IDS)
def test_cai(tmp_path, family_dir, family_data, sft_policy, name, fmt, command):
    from rlhfkit.data.preference import read_preferences
    from rlhfkit.data.preference_tokens import tokenize_preferences
    from rlhfkit.data.sft import read_sft_examples
    from rlhfkit.feedback.ai import CAIConfig
    from rlhfkit.cai import main as cai_main
    from rlhfkit.feedback.judges import JudgeConfig
    from rlhfkit.models import load_tokenizer

    family, data = case(family_dir, family_data, name)
    policy, out = sft_policy(name), tmp_path / "cai"
    summary = cai_main(CAIConfig(
        command=command, model=str(policy), prompts=str(single_turn_prompts(data, fmt, tmp_path / "prompts.jsonl")),
        output_dir=str(out), judge=JudgeConfig(backend="hf", model=str(policy), max_new_tokens=16, device="cpu"),
        max_prompts=4, samples_per_prompt=3, max_new_tokens=24, temperature=1.0, conversational=fmt == "messages"))
    tok = load_tokenizer(str(policy))
    if command == "revise":
        chains = read_jsonl(out / "chains.jsonl")
        assert len(chains) == 4 and all(len(c["steps"]) == 1 for c in chains)
        examples, _ = read_sft_examples(str(out / "sft.jsonl"), tok, max_length=512)  # trainable by this family
        assert len(examples) == summary["rows"] > 0
    else:
        judgments = read_jsonl(out / "judgments.jsonl")
        assert judgments and all(set(j["methods"]) == {"logprobs"} for j in judgments)  # exact option scores
        assert all(0.0 <= j["prob_a"] <= 1.0 for j in judgments)
        pairs = read_preferences(str(out / "preferences.jsonl"))
        assert len(pairs) == summary["rows"] > 0
        assert all(p.conversational == (fmt == "messages") for p in pairs)
        tokenize_preferences(tok, pairs, max_length=512)  # trainable by this family


# --------------------------------------------------------------------------------------------------- eval
@pytest.mark.parametrize("judge", ["reward", "ai"])
@pytest.mark.parametrize("name, fmt", CASES, ids=CASE_IDS)
def test_eval(tmp_path, family_dir, family_data, sft_policy, reward_model, name, fmt, judge):
    from rlhfkit.eval.winrate import EvalConfig
    from rlhfkit.eval.winrate import main as eval_main
    from rlhfkit.feedback.judges import JudgeConfig

    family, data = case(family_dir, family_data, name)
    policy, out = sft_policy(name), tmp_path / "eval"
    summary = eval_main(EvalConfig(
        model=str(policy), baseline=str(family.path), prompts=str(single_turn_prompts(data, fmt, tmp_path / "p.jsonl")),
        judge=judge, reward_model=str(reward_model(name)),
        ai_judge=JudgeConfig(backend="hf", model=str(policy), device="cpu"),
        output_dir=str(out), max_prompts=5, max_new_tokens=24, temperature=1.0))
    assert summary["n"] + summary["abstained"] == 5
    assert summary["wins"] + summary["ties"] + summary["losses"] == summary["n"]
    assert summary["ci_low"] <= summary["win_rate"] <= summary["ci_high"]
    # KL to the reference (the baseline): zero for the baseline itself, positive for the fine-tuned policy
    assert summary["baseline"]["kl_to_ref"] == pytest.approx(0.0, abs=1e-5)
    assert summary["policy"]["kl_to_ref"] > 0.01
    rows = read_jsonl(out / "comparisons.jsonl")
    assert len(rows) == 5 and any(r["policy"] != r["baseline"] for r in rows)
    if judge == "reward":  # the reward model was trained on this policy's kind of answers: it prefers them
        assert summary["win_rate"] > 0.5


# -------------------------------------------------------------------------------------------------- serve
@pytest.fixture(scope="session")
def served(family_dir, sft_policy):
    """served(name, trained=False) -> (engine, client) serving the family's random model (which emits arbitrary
    bytes) or its SFT policy (which writes words)."""
    pytest.importorskip("fastapi", reason="the server tests need the `web` extra")
    from fastapi.testclient import TestClient

    from rlhfkit.serve import Engine, create_app

    clients: dict[tuple[str, bool], Any] = {}

    def get(name: str, trained: bool = False) -> tuple[Any, Any]:
        if (name, trained) not in clients:
            path = sft_policy(name) if trained else family_dir(name).path
            engine = Engine(str(path), name="policy", device="cpu", seed=0)
            clients[(name, trained)] = (engine, TestClient(create_app(engine, max_tokens_limit=64)))
        return clients[(name, trained)]

    return get


PROMPT = "Question: What is 13 + 29?\nAnswer:"


@pytest.mark.parametrize("name", FAMILIES)
def test_serve_completion_logprobs_equal_training_side_scoring(served, name):
    from rlhfkit.models import logprobs_of

    engine, client = served(name)
    body = client.post("/v1/completions", json={"model": "policy", "prompt": PROMPT, "max_tokens": 8,
                                                "temperature": 1.0, "seed": 3, "logprobs": 2, "echo": True}).json()
    choice = body["choices"][0]
    lp = choice["logprobs"]
    prompt_ids, _ = engine.encode_text(PROMPT)
    P = len(prompt_ids)
    # the same draw again, straight from the engine, for the token ids
    steps = list(engine.generate(prompt_ids, 8, 1.0, 1.0, 0, torch.Generator().manual_seed(3)))
    gen_ids = [s.token_id for s in steps if s.token_id != engine.tokenizer.eos_token_id]
    assert choice["text"].startswith(PROMPT) and gen_ids
    assert lp["token_logprobs"][0] is None and len(lp["tokens"]) == len(lp["text_offset"]) == P + len(gen_ids)
    ids = torch.tensor([prompt_ids + gen_ids])
    expected = logprobs_of(engine.model, ids, torch.ones_like(ids))[0].tolist()
    assert lp["token_logprobs"][1:] == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_serve_text_offsets_point_at_each_token(served, name):
    """Legacy completions convention: text[text_offset[i]:][:len(tokens[i])] == tokens[i], prompt and completion
    alike (a byte-level token carries its leading space)."""
    _, client = served(name, trained=True)
    body = client.post("/v1/completions", json={"model": "policy", "prompt": "Say hello to Ada, please.\n",
                                                "max_tokens": 12, "temperature": 0, "logprobs": 0, "echo": True}).json()
    choice = body["choices"][0]
    text, lp = choice["text"], choice["logprobs"]
    assert any(t.startswith(" ") for t in lp["tokens"][-6:]), lp["tokens"]  # the answer has space-led tokens
    wrong = [(tok, off) for tok, off in zip(lp["tokens"], lp["text_offset"])
             if tok and "\ufffd" not in tok and text[off:off + len(tok)] != tok]  # skip specials, partial bytes
    assert not wrong, (wrong, text)


@pytest.mark.parametrize("name", FAMILIES)
def test_serve_chat_uses_the_family_template(served, name):
    engine, client = served(name)
    messages = [{"role": "user", "content": "Say hello to Bo, please."}]
    resp = client.post("/v1/chat/completions", json={"model": "policy", "messages": messages, "max_tokens": 6,
                                                      "seed": 1, "logprobs": True})
    if SPECS[name].chat_template is None:
        assert resp.status_code == 400 and "chat template" in resp.json()["error"]["message"]
        return
    body = resp.json()
    ids = engine.tokenizer(engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                           add_special_tokens=False)["input_ids"]
    assert body["usage"]["prompt_tokens"] == len(ids)
    if name == "llama3":
        assert ids.count(engine.tokenizer.bos_token_id) == 1  # the template's BOS, not doubled
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] - (body["choices"][0]["finish_reason"] == "stop")


@pytest.mark.parametrize("name", FAMILIES)
def test_serve_stream_equals_plain_with_byte_level_tokens(served, name):
    """A random byte-level model emits single bytes of multi-byte characters (decoded alone they are U+FFFD);
    the streamed pieces must still add up to the plain response, for every draw."""
    _, client = served(name)
    differ = []
    for seed in range(16):
        common = {"model": "policy", "prompt": "Unicode: café, 東京 ☕ and", "max_tokens": 24, "seed": seed,
                  "temperature": 1.0}
        plain = client.post("/v1/completions", json=common).json()["choices"][0]["text"]
        resp = client.post("/v1/completions", json={**common, "stream": True})
        chunks = [line[len("data: "):] for line in resp.text.split("\n\n") if line.startswith("data: ")]
        assert chunks[-1] == "[DONE]"
        streamed = "".join(json.loads(c)["choices"][0]["text"] for c in chunks[:-1])
        if streamed != plain:
            differ.append((seed, streamed, plain))
    assert not differ


# ------------------------------------------------------------------------- several criteria, combined rewards
@pytest.mark.slow
@pytest.mark.parametrize("combine", ["gated", "lagrangian"])
@pytest.mark.parametrize("name, fmt", CASES, ids=CASE_IDS)
def test_per_criterion_heads_and_combined_rewards(tmp_path, family_dir, family_data, sft_policy, name, fmt, combine):
    """A rubric file (the family's pairs judged twice: helpfulness as given, harmlessness the other way round with
    safety labels) trains one model with a head per criterion on the real tokenizer and chat template; GRPO then
    optimises the two heads combined, reading every sampled token through them."""
    from rlhfkit.policy import ppo
    from rlhfkit.reward import train as rtrain

    family, data = case(family_dir, family_data, name)
    pairs = [json.loads(line) for line in Path(data.path("preferences", fmt)).read_text().splitlines()]
    rubric = [{**r, "criterion": "helpfulness"} for r in pairs]
    rubric += [{**r, "chosen": r["rejected"], "rejected": r["chosen"], "criterion": "harmlessness",
                "chosen_safe": True, "rejected_safe": False} for r in pairs]
    (tmp_path / "rubric.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rubric))
    policy = sft_policy(name)
    summary = rtrain.main(rtrain.RewardConfig(
        model=str(policy), data=str(tmp_path / "rubric.jsonl"), criteria=["helpfulness", "harmlessness"],
        safety_loss_weight=1.0, output_dir=str(tmp_path / "rm"), max_steps=6, batch_size=8, learning_rate=3e-3,
        eval_fraction=0.0, **QUIET))
    assert_finite_metrics(tmp_path / "rm", 6)
    assert summary["pairs"] == 2 * len(pairs)
    prompts = [json.loads(line) for line in Path(data.path("prompts", fmt)).read_text().splitlines()]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({**p, "risky": i % 2 == 0}) + "\n"
                                                    for i, p in enumerate(prompts)))
    rm = tmp_path / "rm"
    out = tmp_path / "grpo"
    ppo.main(ppo.PPOConfig(
        model=str(policy), data=str(tmp_path / "prompts.jsonl"), output_dir=str(out), advantage="grpo",
        rewards={"helpfulness": f"{rm}#helpfulness", "harmlessness": f"{rm}#harmlessness"}, combine=combine,
        samples_per_prompt=2, max_steps=2, batch_size=4, learning_rate=1e-3, max_new_tokens=24, temperature=0.7,
        ppo_epochs=1, seed=1, **QUIET))
    rows = assert_finite_metrics(out, 2)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # sampled and re-scored tokens line up
    assert all(math.isfinite(r["reward/helpfulness"]) and math.isfinite(r["reward/harmlessness"]) for r in rows)
    if combine == "gated":
        assert all(r["combine/safety_fraction"] >= r["combine/risky_fraction"] > 0 for r in rows)
    else:
        assert all(r["combine/cost"] == pytest.approx(-r["reward/harmlessness"], abs=1e-5) for r in rows)
    assert changed_tensors(policy, out) > 0
