"""AI feedback: answer parsing, position debiasing, soft labels, judge backends (cache, retries), the simulated
playground judge, critique -> revision chains, the feedback store and the `rlhfkit cai` stage."""

import json
import math
import random
import subprocess
import sys

import httpx
import pytest

from rlhfkit.data.preference import PreferencePair, read_preferences
from rlhfkit.errors import UserError
from rlhfkit.feedback.ai import (AILabel, ai_preferences, critique_revision_chains, debias, label_rows,
                                 margin_from_prob, strength_from_prob)
from rlhfkit.feedback.constitution import load_constitution
from rlhfkit.feedback.judges import CachedBackend, LMJudge, OpenAIBackend, parse_choice, prob_from_logprobs
from rlhfkit.feedback.protocols import Comparison
from rlhfkit.playground.ai_judge import PlaygroundJudge, judge_score, read_response
from rlhfkit.playground.tasks import lookup

C = load_constitution()
HARMLESS = C.principle("harmless")
STEAL = "how do i steal a car ?"
REFUSAL = "sorry , i can not help with that . stealing is wrong and can hurt people ."
COMPLY = "sure , happy to help ! here is how to steal a car : first you get ready , then you do it . good luck !"


# ------------------------------------------------------------------------------------------- the arithmetic
def test_two_option_logprobs_become_a_probability():
    # softmax over the two options: exp(-1) / (exp(-1) + exp(-2)) = 1 / (1 + e^-1) = sigma(1)
    assert prob_from_logprobs([-1.0, -2.0]) == pytest.approx(1 / (1 + math.exp(-1)))
    assert prob_from_logprobs([-30.0, -30.0]) == pytest.approx(0.5)
    assert prob_from_logprobs([-900.0, -0.1]) == pytest.approx(0.0, abs=1e-12)  # no overflow


@pytest.mark.parametrize("text, p", [("A", 1.0), (" (B) because it refuses", 0.0), ("Response A is better", 1.0),
                                     ("option b", 0.0), ("Both are fine", None), ("", None), ("Banana", None)])
def test_a_generated_answer_is_parsed_or_abstains(text, p):
    assert parse_choice(text) == p


def test_custom_options_are_parsed_by_their_text():
    assert parse_choice("first one", ["first", "second"]) == 1.0
    assert parse_choice("second", ["first", "second"]) == 0.0
    assert parse_choice("neither", ["first", "second"]) is None


def test_asking_both_orders_cancels_position_bias():
    # a judge gives A 0.9 when A is shown first, and B 0.3 when B is shown first (so A 0.7 when second):
    # P(A better) = (0.9 + 0.7) / 2 = 0.8; the position bias is (0.9 - 0.7) / 2 = 0.1
    prob, bias = debias(0.9, 0.3)
    assert prob == pytest.approx(0.8) and bias == pytest.approx(0.1)
    assert debias(1.0, 1.0) == (0.5, 0.5)  # "always the first one": no preference left
    assert debias(0.9, None) == (0.9, None) and debias(None, 0.3) == (pytest.approx(0.7), None)
    assert debias(None, None) == (None, None)


def test_margins_and_strengths_come_from_the_judges_confidence():
    assert margin_from_prob(0.8, 3.0) == pytest.approx(math.log(4))  # log(0.8 / 0.2)
    assert margin_from_prob(0.2, 3.0) == pytest.approx(math.log(4))
    assert margin_from_prob(0.9999, 3.0) == 3.0
    assert [strength_from_prob(p) for p in (0.95, 0.8, 0.65, 0.55)] == [
        "significantly_better", "better", "slightly_better", "negligible"]


def _label(prob, a="good answer", b="bad answer"):
    return AILabel(STEAL, a, b, "harmless", prob, prob, 1 - prob if prob is not None else None, 0.0, ("rule", "rule"))


def test_label_rows_are_trl_rows_the_trainers_read(tmp_path):
    labels = [_label(0.8), _label(0.3, "x one", "y two"), _label(0.5), _label(None), _label(0.55, "p", "q")]
    rows, report = label_rows(labels, "judge-1", min_confidence=0.1, max_margin=3.0, conversational=False)
    assert report == {"rows": 2, "ties": 2, "abstained": 1}
    assert rows[0]["chosen"] == "good answer" and rows[0]["preference_prob"] == pytest.approx(0.8)
    assert rows[1]["chosen"] == "y two" and rows[1]["preference_prob"] == pytest.approx(0.7)
    assert rows[1]["margin"] == pytest.approx(math.log(0.7 / 0.3), abs=1e-5)
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = read_preferences(str(path))
    assert all(isinstance(p, PreferencePair) and p.source == "ai" and p.annotator == "ai:judge-1" for p in pairs)
    assert pairs[0].margin == pytest.approx(math.log(4), abs=1e-5)
    conv, _ = label_rows(labels[:1], "j")
    assert conv[0]["prompt"] == [{"role": "user", "content": STEAL}]
    assert conv[0]["chosen"] == [{"role": "assistant", "content": "good answer"}]


# ------------------------------------------------------------------------------------------------ LM judge
class ScriptedBackend:
    """Option log-probs that favour the text containing 'refuse' by 2 nats, plus 1 nat for position A."""

    name = "scripted"

    def __init__(self, logprobs=True):
        self.logprobs, self.calls = logprobs, []

    def option_logprobs(self, prompts, options):
        self.calls.append(("option_logprobs", list(prompts)))
        if not self.logprobs:
            return [None] * len(prompts)
        out = []
        for p in prompts:
            first = p.split("(A) ")[1].split("\n")[0]
            second = p.split("(B) ")[1].split("\n")[0]
            out.append([-3.0 + 2 * ("refuse" in first) + 1.0, -3.0 + 2 * ("refuse" in second)])
        return out

    def generate(self, prompts, max_tokens, temperature):
        self.calls.append(("generate", list(prompts)))
        return ["(B)" if "refuse" in p.split("(B) ")[-1].split("\n")[0] else "no idea" for p in prompts]


def test_the_lm_judge_asks_the_principles_question_and_reads_logprobs():
    backend = ScriptedBackend()
    judge = LMJudge(backend, C)
    text = judge.comparison_text(Comparison(STEAL, "i refuse", "sure", HARMLESS))
    assert HARMLESS.comparison in text and text.endswith("The answer is: (") and "(A) i refuse" in text
    (label,) = ai_preferences(judge, C, [(STEAL, "i refuse", "sure")], random.Random(0), principle="harmless")
    # shown first: sigma(2 + 1) ; shown second: P(sure first wins) = sigma(1 - 2) -> P(refuse) = sigma(1)
    assert label.prob_a_first == pytest.approx(1 / (1 + math.exp(-3)))
    assert label.prob_a == pytest.approx((1 / (1 + math.exp(-3)) + 1 / (1 + math.exp(-1))) / 2)
    assert label.position_bias > 0 and label.methods == ("logprobs", "logprobs")


def test_without_logprobs_the_judge_parses_text_and_may_abstain():
    judge = LMJudge(ScriptedBackend(logprobs=False), C)
    verdicts = judge.compare([Comparison(STEAL, "sure", "i refuse", HARMLESS),
                              Comparison(STEAL, "i refuse", "sure", HARMLESS)])
    assert (verdicts[0].prob_first, verdicts[0].method) == (0.0, "text")
    assert (verdicts[1].prob_first, verdicts[1].method) == (None, "none")


def test_the_disk_cache_makes_a_rerun_cost_nothing(tmp_path):
    backend = ScriptedBackend()
    cached = CachedBackend(backend, tmp_path)
    judge = LMJudge(cached, C)
    pairs = [(STEAL, "i refuse", "sure"), (STEAL, "sure", "ok i refuse")]
    first = ai_preferences(judge, C, pairs, random.Random(0), "harmless")
    assert cached.misses == 4 and len(backend.calls) == 1
    rerun_backend = ScriptedBackend()
    rerun = ai_preferences(LMJudge(CachedBackend(rerun_backend, tmp_path), C), C, pairs, random.Random(0), "harmless")
    assert rerun_backend.calls == [] and rerun == first
    # a new prompt goes to the backend alone
    more = CachedBackend(rerun_backend, tmp_path)
    ai_preferences(LMJudge(more, C), C, pairs + [(STEAL, "refuse!", "no")], random.Random(0), "harmless")
    assert more.hits == 4 and more.misses == 2 and len(rerun_backend.calls[0][1]) == 2


# ----------------------------------------------------------------------------------- OpenAI-compatible HTTP
def _backend(handler, **kw):
    sleeps = []
    b = OpenAIBackend("http://judge.test/v1", "m", api_key_env="RLHFKIT_TEST_KEY", transport=httpx.MockTransport(handler),
                      sleep=sleeps.append, **kw)
    return b, sleeps


def test_the_http_backend_retries_with_exponential_backoff(monkeypatch):
    monkeypatch.setenv("RLHFKIT_TEST_KEY", "sk-test")
    seen = []

    def handler(request):
        seen.append(request)
        if len(seen) == 1:
            raise httpx.ConnectTimeout("slow", request=request)
        if len(seen) == 2:
            return httpx.Response(503, text="busy")
        if len(seen) == 3:
            return httpx.Response(429, headers={"retry-after": "7"}, text="slow down")
        body = json.loads(request.content)
        return httpx.Response(200, json={"choices": [{"index": i, "text": f"out {i}"} for i, _ in enumerate(body["prompt"])]})

    backend, sleeps = _backend(handler, backoff_s=0.5, max_retries=4)
    assert backend.generate(["a", "b"], 5, 0.0) == ["out 0", "out 1"]
    assert sleeps == [0.5, 1.0, 7.0]  # 0.5 * 2^k, and Retry-After when it is longer
    assert seen[-1].headers["authorization"] == "Bearer sk-test"
    assert json.loads(seen[-1].content)["model"] == "m"


def test_the_http_backend_gives_up_with_one_clear_error():
    backend, sleeps = _backend(lambda r: httpx.Response(500, text="down"), max_retries=2)
    with pytest.raises(UserError, match=r"did not answer after 3 tries \(last error: HTTP 500"):
        backend.generate(["a"], 5, 0.0)
    assert len(sleeps) == 2
    bad, _ = _backend(lambda r: httpx.Response(404, json={"error": {"message": "no model m"}}))
    with pytest.raises(UserError, match="refused the request .HTTP 404: no model m"):
        bad.generate(["a"], 5, 0.0)


def test_completions_echo_scores_exactly_the_option_tokens():
    def handler(request):
        body = json.loads(request.content)
        assert body["echo"] is True and body["logprobs"] == 0
        choices = []
        for i, text in enumerate(body["prompt"]):
            ctx = len("ctx (")
            # tokens: "ctx", " (", option, generated token
            lp = -1.0 if text.endswith("A") else -2.5
            choices.append({"index": i, "text": text + " x", "logprobs": {
                "text_offset": [0, 3, ctx, len(text)], "token_logprobs": [None, -0.5, lp, -9.0]}})
        return httpx.Response(200, json={"choices": choices})

    backend, _ = _backend(handler, batch_size=3)
    assert backend.option_logprobs(["ctx (", "ctx ("], ["A", "B"]) == [[-1.0, -2.5], [-1.0, -2.5]]
    assert backend.requests == 2  # 4 prompt+option strings in batches of 3


def test_chat_top_logprobs_without_the_options_fall_back():
    def handler(request):
        top = [{"token": " A", "logprob": -0.2}, {"token": "hello", "logprob": -2.0}]
        return httpx.Response(200, json={"choices": [{"index": 0, "message": {"content": "A"},
                                                      "logprobs": {"content": [{"token": "A", "top_logprobs": top}]}}]})

    backend, _ = _backend(handler, endpoint="chat")
    assert backend.option_logprobs(["q"], ["A", "B"]) == [None]  # B not among the top log-probs
    assert backend.option_logprobs(["q"], ["A", "hello"]) == [[-0.2, -2.0]]


# ----------------------------------------------------------------------------- the simulated playground judge
def test_the_playground_judge_prefers_refusing_a_harmful_request_whatever_the_order():
    judge = PlaygroundJudge(C)
    (label,) = ai_preferences(judge, C, [(STEAL, COMPLY, REFUSAL)], random.Random(0), "harmless")
    assert label.prob_a < 0.05 and label.position_bias > 0  # it has a position bias, which debiasing removes
    same = ai_preferences(judge, C, [(STEAL, REFUSAL, REFUSAL)], random.Random(0), "harmless")[0]
    assert same.prob_a_first > 0.5 and same.prob_a == pytest.approx(0.5)


def test_the_playground_judge_agrees_with_gold_on_most_pairs_but_not_all():
    from rlhfkit.playground.gold import gold_breakdown, gold_score
    from rlhfkit.playground.responses import BALANCED, sample_pair
    from rlhfkit.playground.tasks import make_prompts

    judge = PlaygroundJudge(C)
    prompts = make_prompts(0, 300, 10, 10)["train"]
    rng = random.Random(1)
    pairs = [(p, *sample_pair(p, rng, BALANCED)) for p in prompts]
    labels = ai_preferences(judge, C, [(p.text, a, b) for p, a, b in pairs], random.Random(2))
    decided = [(lab.prob_a > 0.5, gold_score(p, a) > gold_score(p, b)) for lab, (p, a, b) in zip(labels, pairs)
               if abs(gold_score(p, a) - gold_score(p, b)) > 0.25 and lab.prob_a != 0.5]
    agreement = sum(x == y for x, y in decided) / len(decided)
    assert 0.8 < agreement < 0.97, agreement  # a useful judge, not a copy of gold
    # one documented difference: sloppy arithmetic (off by one counts as right), which gold calls wrong
    plus = lookup("what is 3 plus 4 ?")
    assert read_response(plus, "3 plus 4 is 8 .").correct is True
    assert gold_breakdown(plus, "3 plus 4 is 8 .").task < 0
    # and verbosity: it pays 0.03 a token with no length budget, where gold charges 0.1 a token past its budget
    # (20 tokens for arithmetic)
    answer, closer = "great question ! 3 plus 4 is 7 . ", "hope this helps !"  # 13 tokens together
    padding = "to add them , start at three and count up four more on your fingers . "  # 16 tokens, no stock filler
    short, long = answer + closer, answer + padding + closer  # 13 and 29 tokens
    assert gold_breakdown(plus, short).length == 0 and gold_breakdown(plus, long).length == pytest.approx(-0.9)
    assert gold_score(plus, long) < gold_score(plus, short)
    assert judge_score(plus, long) - judge_score(plus, short) == pytest.approx(16 * 0.03)
    # a stock filler sentence (11 tokens) it does charge, as its concise principle says: -0.5, less 0.03 a token
    rambling = answer + "well , let me think about this for a moment . " + closer
    assert judge_score(plus, rambling) - judge_score(plus, short) == pytest.approx(-0.5 + 11 * 0.03)


def test_the_playground_judge_refuses_non_playground_prompts():
    with pytest.raises(UserError, match="only judges playground prompts"):
        PlaygroundJudge(C).compare([Comparison("what is the meaning of life ?", "a", "b", HARMLESS)])


def test_importing_the_simulated_judge_does_not_load_the_gold_judge():
    code = ("import sys, rlhfkit.playground.ai_judge, rlhfkit.feedback.ai;"
            "print([m for m in sys.modules if m.endswith(('playground.gold', 'playground.annotators'))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_critique_revision_turns_compliance_into_a_refusal_and_keeps_the_chain():
    judge = PlaygroundJudge(C)
    rude = "ugh . 3 plus 4 is 7 . whatever ."
    chains = critique_revision_chains(judge, C, [STEAL, "what is 3 plus 4 ?"], [COMPLY, rude], rounds=2,
                                      rng=random.Random(0), principle="harmless")
    steal, plus = chains
    assert steal["initial"] == COMPLY and len(steal["steps"]) == 2
    assert "harmful" in steal["steps"][0]["critique"]
    assert read_response(lookup(STEAL), steal["final"]).refused and "here is how" not in steal["final"]
    assert steal["steps"][1]["critique"] == "no issue found ." and steal["steps"][1]["revision"] == steal["final"]
    assert plus["final"] == rude  # nothing harmful to fix under this principle
    polite = critique_revision_chains(judge, C, ["what is 3 plus 4 ?"], [rude], 1, random.Random(0), "respectful")[0]
    assert "7" in polite["final"] and "ugh" not in polite["final"] and "whatever" not in polite["final"]


# ------------------------------------------------------------------------------------ the feedback store
def test_ai_judgments_go_into_the_feedback_store_beside_human_ones(tmp_path):
    pytest.importorskip("sqlalchemy")
    from rlhfkit.feedback.ai import AIAnnotator, label_store_project
    from rlhfkit.feedback.export import export_rows
    from rlhfkit.feedback.service import FeedbackService
    from rlhfkit.feedback.store import open_store

    svc = FeedbackService(open_store(str(tmp_path / "fb.db")), rng=random.Random(0))
    pairs = [(STEAL, COMPLY, REFUSAL), ("what is 3 plus 4 ?", "3 plus 4 is 7 .", "3 plus 4 is 2 .")]
    out = label_store_project(svc, "cai", AIAnnotator(PlaygroundJudge(C), C), random.Random(0), pairs=pairs,
                              sources=("m", "m"))
    assert out["stored"] == {"B": 1, "A": 1}
    again = label_store_project(svc, "cai", AIAnnotator(PlaygroundJudge(C), C), random.Random(0))
    assert again["stored"] == {}  # nothing left for the AI judge: no duplicates
    # a person judges the same items (2 annotators per item)
    human = svc.ensure_user("ann")
    while (task := svc.next_task(human.id, svc.project("cai").id)) is not None:
        svc.submit(human.id, task.assignment_id, f"human-{task.assignment_id:06d}", outcome="A", strength="better")
    rows, _ = export_rows(svc, "cai")
    assert sorted(r["annotator"] for r in rows) == ["ai-judge", "ai-judge", "ann", "ann"]
    ai_steal = [r for r in rows if r["annotator"] == "ai-judge" and r["prompt"] == STEAL][0]
    assert ai_steal["chosen"] == REFUSAL
    with pytest.raises(UserError, match="does not exist"):
        label_store_project(svc, "missing", AIAnnotator(PlaygroundJudge(C), C), random.Random(0))


def test_labels_already_judged_are_stored_without_asking_the_judge_again(tmp_path):
    pytest.importorskip("sqlalchemy")
    from rlhfkit.feedback.ai import AIAnnotator, label_store_project
    from rlhfkit.feedback.service import FeedbackService
    from rlhfkit.feedback.store import open_store

    class Counting(PlaygroundJudge):
        calls = 0

        def compare(self, items):
            Counting.calls += len(items)
            return super().compare(items)

    svc = FeedbackService(open_store(str(tmp_path / "fb.db")), rng=random.Random(0))
    judge = Counting(C)
    pairs = [(STEAL, COMPLY, REFUSAL), ("what is 3 plus 4 ?", "3 plus 4 is 7 .", "3 plus 4 is 2 .")]
    labels = ai_preferences(judge, C, pairs, random.Random(0), "harmless")
    assert Counting.calls == 4
    out = label_store_project(svc, "cai", AIAnnotator(judge, C), random.Random(0), pairs=pairs, known=labels)
    assert Counting.calls == 4 and sum(out["stored"].values()) == 2


# --------------------------------------------------------------------------------------------- the stage
@pytest.fixture(scope="module")
def playground_model(tmp_path_factory):
    from cai.cai_helpers import make_playground_model, write_prompts

    root = tmp_path_factory.mktemp("cai")
    return make_playground_model(root / "policy"), write_prompts(root / "prompts.jsonl", 6)


def test_cai_label_writes_ai_preference_rows_and_stores_them(tmp_path, playground_model):
    from rlhfkit.cli import main

    model, prompts = playground_model
    out = tmp_path / "labels"
    args = ["cai", "label", "--model", str(model), "--prompts", str(prompts), "--output-dir", str(out),
            "--max-new-tokens", "10", "--samples-per-prompt", "3", "--store", str(tmp_path / "fb.db")]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs"] == 18 and summary["rows"] + summary["ties"] + summary["abstained"] == 18
    assert summary["methods"] == {"rule": 36} and summary["store"]["stored"]
    pairs = read_preferences(str(out / "preferences.jsonl"))
    assert len(pairs) == summary["rows"] and all(p.source == "ai" and p.margin is not None for p in pairs)
    judged = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    assert len(judged) == 18 and all(j["principle"] in {p.id for p in C.principles} for j in judged)
    assert main(args) == 2  # refuses to overwrite without --overwrite


def test_cai_revise_writes_sft_rows_and_the_chains(tmp_path, playground_model):
    from rlhfkit.cli import main
    from rlhfkit.data.sft import read_sft_examples
    from rlhfkit.models import load_tokenizer

    model, prompts = playground_model
    out = tmp_path / "revise"
    assert main(["cai", "revise", "--model", str(model), "--prompts", str(prompts), "--output-dir", str(out),
                 "--max-new-tokens", "10", "--rounds", "3"]) == 0
    chains = [json.loads(line) for line in (out / "chains.jsonl").read_text().splitlines()]
    assert len(chains) == 6 and all(len(c["steps"]) == 3 for c in chains)
    rows = [json.loads(line) for line in (out / "sft.jsonl").read_text().splitlines()]
    assert [r["completion"][0]["content"] for r in rows] == [c["final"] for c in chains]
    examples, _ = read_sft_examples(str(out / "sft.jsonl"), load_tokenizer(str(model)), 256)  # what SFT trains on
    assert len(examples) == 6


@pytest.mark.parametrize("args, words", [
    (["cai", "label", "--prompts", "p.jsonl", "--output-dir", "o"], ["--model"]),
    (["cai", "revise", "--model", "m", "--output-dir", "o"], ["--prompts"]),
    (["cai", "critique"], ["unknown cai command 'critique'"]),
    (["cai", "label", "--model", "m", "--prompts", "p", "--output-dir", "o", "--judge.backend", "openai"],
     ["--judge.base-url"]),
    (["cai", "label", "--model", "m", "--prompts", "p", "--output-dir", "o", "--min-confidence", "0.7"],
     ["min_confidence"]),
])
def test_cai_config_errors_name_the_flag(capsys, args, words):
    from rlhfkit.cli import main

    assert main(args) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, err


def test_an_unknown_principle_is_named(tmp_path, playground_model, capsys):
    from rlhfkit.cli import main

    model, prompts = playground_model
    assert main(["cai", "label", "--model", str(model), "--prompts", str(prompts), "--output-dir",
                 str(tmp_path / "o"), "--principle", "funny"]) == 2
    assert "no principle 'funny'" in capsys.readouterr().err


def test_a_local_hugging_face_model_can_be_the_judge(tmp_path, playground_model):
    """--judge.backend hf: comparisons from the model's option log-probs, critiques and revisions generated; the
    on-disk cache answers the rerun."""
    from rlhfkit.cli import main

    model, prompts = playground_model
    common = ["--model", str(model), "--prompts", str(prompts), "--max-new-tokens", "6", "--judge.backend", "hf",
              "--judge.model", str(model), "--judge.max-new-tokens", "6", "--judge.device", "cpu"]
    assert main(["cai", "label", "--output-dir", str(tmp_path / "l"), *common]) == 0
    summary = json.loads((tmp_path / "l" / "summary.json").read_text())
    assert summary["methods"] == {"logprobs": 2 * summary["pairs"]} and summary["judge"].startswith("hf:")
    assert summary["judge_cache"]["misses"] == 2 * summary["pairs"]
    assert main(["cai", "revise", "--output-dir", str(tmp_path / "r"), *common]) == 0
    chains = [json.loads(line) for line in (tmp_path / "r" / "chains.jsonl").read_text().splitlines()]
    assert len(chains) == 6 and all(isinstance(c["steps"][0]["critique"], str) for c in chains)
    # a random model may write an empty revision; the response is then kept, never erased
    assert all(c["final"] == (c["steps"][0]["revision"] or c["initial"]) and c["final"] for c in chains)
    assert main(["cai", "label", "--output-dir", str(tmp_path / "l"), "--overwrite", *common]) == 0
    assert json.loads((tmp_path / "l" / "summary.json").read_text())["judge_cache"]["misses"] == 0
