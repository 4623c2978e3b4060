"""`rlhfkit rounds` on a tiny playground world: the loop end to end, its errors, people labelling while it waits,
and resume after SIGKILL during labelling, reward refit and policy training (same labels, same final weights)."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.config import from_dict, save_config
from rlhfkit.errors import ConfigError, UserError

pytest.importorskip("sqlalchemy", reason="rounds need the `web` extra: pip install -e '.[web]'")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from rlhfkit.playground.tasks import make_prompts
    from rlhfkit.playground.world import WorldSpec, build_initial_model

    root = tmp_path_factory.mktemp("rounds-world")
    splits = make_prompts(seed=0, n_train=16, n_val=6, n_test=1)
    for split in ("train", "val"):
        (root / f"prompts_{split}.jsonl").write_text("".join(json.dumps(p.to_dict()) + "\n" for p in splits[split]))
    # an untrained model samples word salad: varied responses, which is all the loop needs
    build_initial_model(root / "sft", WorldSpec(hidden_size=32, num_layers=1, num_heads=2))
    return root


def settings(world: Path, out: Path, **over) -> dict:
    base = {
        "output_dir": str(out), "sft_model": str(world / "sft"), "prompts": str(world / "prompts_train.jsonl"),
        "eval_prompts": str(world / "prompts_val.jsonl"), "rounds": 2, "prompts_per_round": 8,
        "samples_per_prompt": 3, "labels_per_round": 12, "queue": "bald", "reprioritise_every": 4,
        "overlap_share": 0.25, "labellers": ["simulated"], "simulated_annotators": 4,
        "reward": {"ensemble_size": 2, "batch_size": 4, "max_length": 96, "normalize_samples": 8, "save_every": 2,
                   "report_to": ["jsonl"], "progress": False},
        "reward_epochs": 0,
        "ppo": {"advantage": "grpo", "batch_size": 2, "samples_per_prompt": 2, "minibatches": 1, "save_every": 1,
                "max_new_tokens": 12, "report_to": ["jsonl"], "progress": False},
        "policy_steps": 3, "eval_samples": 1, "gold_eval": True, "max_new_tokens": 12,
    }
    base["reward"]["max_steps"] = 4
    for k, v in over.items():
        base[k] = v
    return base


def make(world: Path, out: Path, **over):
    from rlhfkit.rounds import RoundsConfig

    return from_dict(RoundsConfig, settings(world, out, **over), "test")


def test_the_loop_runs_rounds_end_to_end_and_records_each(world, tmp_path):
    from rlhfkit.rounds import main

    summary = main(make(world, tmp_path / "run"))
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    for r in summary["rounds"]:
        assert r["labels"]["labels"] >= 12 and r["items"]["overlap_items"] > 0
        assert r["export"]["rows"] > 0 and r["reward"]["steps"] == 4
        assert r["policy"]["steps"] == 3 and {"gold_score", "gold_score_se", "proxy", "kl"} <= set(r["eval"])
    r1, r2 = summary["rounds"]
    assert r2["sample"]["policy"].endswith("round-1/policy")  # round 2 samples the policy round 1 trained
    assert r2["export"]["rows"] > r1["export"]["rows"]  # every label so far
    assert r1["labels"]["queue_updates"] == [] and r2["labels"]["queue_updates"]  # round 1 has no model to ask
    rows = [json.loads(x) for x in (tmp_path / "run" / "round-2" / "preferences.jsonl").read_text().splitlines()]
    assert {r["round"] for r in rows} == {1, 2} and all(0.0 <= r["confidence"] <= 1.0 for r in rows)
    reliability = json.loads((tmp_path / "run" / "round-2" / "reliability.json").read_text())
    assert len(reliability["annotators"]) == 4
    # the store holds the rounds as projects of the run, which is what the admin page shows
    from rlhfkit.feedback.service import FeedbackService
    from rlhfkit.feedback.store import open_store

    svc = FeedbackService(open_store(str(tmp_path / "run" / "feedback.db")))
    assert [p.round for p in svc.round_projects("run")] == [1, 2]
    # rerun: every step is done, nothing is repeated
    again = main(make(world, tmp_path / "run"))
    assert again["rounds"] == summary["rounds"]


def test_an_ai_judge_and_simulated_people_share_the_budget_and_online_dpo_trains(world, tmp_path):
    from rlhfkit.rounds import main

    out = tmp_path / "mixed"
    cfg = make(world, out, rounds=1, labellers=["simulated", "ai"], policy="online-dpo", policy_steps=2,
               online_dpo={"rounds": 1, "prompts_per_round": 4, "batch_size": 2, "max_new_tokens": 12,
                           "report_to": ["jsonl"], "progress": False})
    r = main(cfg)["rounds"][0]
    annotators = {json.loads(x)["annotator"] for x in (out / "round-1" / "preferences.jsonl").read_text().splitlines()}
    assert any(a.startswith("ai-") for a in annotators) and any(a.startswith("sim-") for a in annotators)
    assert r["labels"]["labels"] >= 12 and r["policy"]["stage"] == "online-dpo"
    assert (out / "round-1" / "policy" / "model.safetensors").is_file()


def test_candidates_keep_the_sampled_text_and_drop_only_repeats():
    from rlhfkit.rounds import candidate_pairs, distinct_responses

    assert distinct_responses([" 42", "42", " 41\n", "   ", ""]) == [" 42", " 41\n"]
    assert candidate_pairs([{"prompt": "q", "responses": ["a", "b", "c"]}]) == [("q", "a", "b"), ("q", "a", "c"),
                                                                                ("q", "b", "c")]


def test_bad_settings_are_errors_that_name_the_fix(world, tmp_path):
    from rlhfkit.rounds import main

    with pytest.raises(ConfigError, match="ensemble-size 2 or more"):
        make(world, tmp_path / "a", reward={"ensemble_size": 1}).validate()
    with pytest.raises(ConfigError, match="labellers must name"):
        make(world, tmp_path / "a", labellers=["crowd"]).validate()
    with pytest.raises(ConfigError, match="samples_per_prompt must be at least 2"):
        make(world, tmp_path / "a", samples_per_prompt=1).validate()
    bad = tmp_path / "prompts.jsonl"
    bad.write_text(json.dumps({"prompt": "first ?"}) + "\n" + json.dumps({"prompt": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "second ?"}]}) + "\n")
    with pytest.raises(UserError, match=r"prompts.jsonl.*(row|line) 2.*prompt"):
        main(make(world, tmp_path / "c", prompts=str(bad)))
    assert not (tmp_path / "c" / "state.json").exists()  # refused before anything ran
    bad.write_text(json.dumps({"prompt": [{"role": "user", "content": "first ?"}]}) + "\n")
    with pytest.raises(UserError, match="conversational"):
        main(make(world, tmp_path / "d", prompts=str(bad), conversational=False))
    out = tmp_path / "b"
    cfg = make(world, out, rounds=1, policy="none", eval_prompts="")
    main(cfg)
    with pytest.raises(ConfigError, match="labels_per_round"):
        main(make(world, out, rounds=1, policy="none", eval_prompts="", labels_per_round=20))


def test_people_label_in_the_store_while_the_loop_waits(world, tmp_path):
    """labellers people: the loop waits on the store; a person (here a thread through the service API, as the web
    app does it) labels the round's items, and the loop goes on to the reward fit."""
    from rlhfkit.feedback.service import FeedbackService
    from rlhfkit.feedback.store import open_store
    from rlhfkit.rounds import main

    out = tmp_path / "people"
    cfg = make(world, out, rounds=1, policy="none", eval_prompts="", labellers=["people"], poll_seconds=0.2,
               labels_per_round=6, max_wait_s=60)
    out.mkdir()  # the person opens the store at once, before the loop has made the run directory
    stop = threading.Event()

    def person() -> None:
        svc = FeedbackService(open_store(str(out / "feedback.db")))
        uid = svc.ensure_user("alice").id
        while not stop.is_set():
            try:
                project = svc.project("people-round-1")
            except Exception:  # noqa: BLE001 - not created yet
                stop.wait(0.1)
                continue
            task = svc.next_task(uid, project.id)
            if task is None:
                stop.wait(0.1)
                continue
            svc.submit(uid, task.assignment_id, f"alice-{task.assignment_id:08d}", outcome="A", strength="better")

    t = threading.Thread(target=person, daemon=True)
    t.start()
    try:
        summary = main(cfg)
    finally:
        stop.set()
        t.join(5)
    r = summary["rounds"][0]
    assert r["labels"]["labels"] >= 6 and r["reward"]["rows"] >= 6
    # nobody labelling: the loop gives up after max_wait_s with an error that says how to go on
    idle = make(world, tmp_path / "idle", rounds=1, policy="none", eval_prompts="", labellers=["people"],
                poll_seconds=0.1, max_wait_s=0.5)
    with pytest.raises(UserError, match="no new label in 0.5 s.*rerun the same command"):
        main(idle)


KILLER = r"""
import os, sys
from rlhfkit.config import load_config
from rlhfkit.rounds import RoundsConfig, main
where, after = sys.argv[2], int(sys.argv[3])
calls = [0]
def kill_after(fn, match=None):
    def wrapped(*a, **k):
        out = fn(*a, **k)
        if match is None or match in str(a[0]):
            calls[0] += 1
            if calls[0] == after:
                os._exit(137)  # SIGKILL's exit status: no cleanup, no finally
        return out
    return wrapped
if where == "labels":
    from rlhfkit.feedback import service
    original = service.FeedbackService.submit
    def submit(self, *a, **k):
        calls[0] += 1
        if calls[0] == after:
            os._exit(137)  # before the answer is stored: an assignment is left open
        return original(self, *a, **k)
    service.FeedbackService.submit = submit
else:
    from rlhfkit.train import run
    run.save_checkpoint = kill_after(run.save_checkpoint, where)
main(load_config(RoundsConfig, sys.argv[1]))
"""


def _run_killed(cfg_path: Path, where: str, after: int) -> int:
    env = {**os.environ, "RLHFKIT_LOG": "WARNING"}
    return subprocess.run([sys.executable, "-c", KILLER, str(cfg_path), where, str(after)], env=env,
                          capture_output=True, text=True).returncode


def _weights(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(d / "model.safetensors"))


@pytest.mark.slow
def test_killed_anywhere_the_rerun_ends_with_the_same_labels_and_weights(world, tmp_path):
    from rlhfkit.rounds import main

    reference = tmp_path / "reference"
    main(make(world, reference))
    # round 2's labelling (the active queue reorders every 4 labels), a reward member's second checkpoint,
    # and the policy's second checkpoint
    for where, after in (("labels", 17), ("reward", 5), ("policy", 5)):
        out = tmp_path / f"killed-{where}"
        cfg = make(world, out)
        out.mkdir()
        save_config(cfg, out / "start.yaml")
        assert _run_killed(out / "start.yaml", where, after) == 137, where
        assert "eval" not in json.loads((out / "state.json").read_text())["done"].get("2", []), where
        main(cfg)
        for r in (1, 2):
            got = (out / f"round-{r}" / "preferences.jsonl").read_text()
            want = (reference / f"round-{r}" / "preferences.jsonl").read_text()
            assert got.replace(str(out.name), "") == want.replace(str(reference.name), ""), (where, r)
            for sub in ("reward/member-0", "reward/member-1", "policy"):
                a, b = _weights(out / f"round-{r}" / sub), _weights(reference / f"round-{r}" / sub)
                assert a.keys() == b.keys()
                assert all(torch.equal(a[k], b[k]) for k in a), (where, r, sub)
