"""`rlhfkit rounds` on tiny Qwen2 / Llama 3 / GPT-2 models with real byte-level BPE tokenizers and chat templates:
a person (a thread through the service API, as the web app does it) labels each round while the loop waits, and
the loop exports, refits the reward ensemble and trains the policy with PPO. Chat families run conversational
(items show the user's text; rows are chat messages, templated by the trainers), GPT-2 as plain text; Qwen2 runs
two rounds, the second ordered by the first round's ensemble (BALD)."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

import pytest

from rlhfkit.errors import UserError
import torch

from realistic.families import Family, FamilyData
from realistic.test_stages import assert_plain_transformers_loads, changed_tensors, read_jsonl

pytest.importorskip("sqlalchemy", reason="rounds need the `web` extra: pip install -e '.[web]'")

PROMPTS_PER_ROUND, SAMPLES, BUDGET, POLICY_STEPS = 4, 3, 6, 2
TWO_ROUNDS = "qwen2"


def prompts_file(family: Family, data: FamilyData, out: Path) -> tuple[Path, set[str]]:
    """The round prompts and the user texts they hold. A chat family gets its chat prompts' last user turns,
    alternately as plain strings and as one-turn conversations (rounds reads both as the user's text); GPT-2 its
    plain-text prompts."""
    if not family.has_template:
        texts = [r["prompt"] for r in data.rows[("prompts", "text")]]
        return data.path("prompts", "text"), set(texts)
    texts = [r["prompt"][-1]["content"] for r in data.rows[("prompts", "messages")]]
    rows = [{"prompt": t if i % 2 == 0 else [{"role": "user", "content": t}]} for i, t in enumerate(texts)]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out, set(texts)


def settings(family: Family, prompts: Path, out: Path, rounds: int) -> dict[str, Any]:
    quiet = {"report_to": ["jsonl"], "progress": False}
    return {
        "output_dir": str(out), "sft_model": str(family.path), "prompts": str(prompts), "eval_prompts": "",
        "rounds": rounds, "prompts_per_round": PROMPTS_PER_ROUND, "samples_per_prompt": SAMPLES,
        "labels_per_round": BUDGET, "labellers": ["people"], "poll_seconds": 0.1, "max_wait_s": 60, "conversational": family.has_template,
        "queue": "bald", "random_share": 0.0, "reprioritise_every": 3, "overlap_share": 0.0, "max_new_tokens": 12,
        "reward": {"ensemble_size": 2, "batch_size": 4, "max_length": 256, "max_steps": 4, "normalize_samples": 8,
                   "save_every": 2, **quiet},
        "reward_epochs": 0, "policy": "ppo", "policy_steps": POLICY_STEPS,
        "ppo": {"advantage": "grpo", "batch_size": 2, "samples_per_prompt": 2, "minibatches": 1, "save_every": 1,
                "max_new_tokens": 12, "learning_rate": 1e-3, **quiet},
    }


class Person:
    """Labels each round of the run up to its budget, always preferring the longer response (so the export's
    direction can be checked), recording the items in the order they were served. Each answer waits until the
    loop has reported the one before (its `progress` line), as it would between a person's clicks: the loop then
    sees every label count, and reorders the queue at each multiple of reprioritise_every."""

    WAITING = re.compile(r"round (\d+): (\d+)/\d+ labels")

    def __init__(self, db: str, run: str):
        self.db, self.run, self.stop = db, run, threading.Event()
        self.served: dict[int, list[int]] = {}
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._label, daemon=True)
        self.reported: set[tuple[int, int]] = set()
        self.news = threading.Condition()

    def progress(self, message: str) -> None:
        """The loop's progress callback."""
        if m := self.WAITING.match(message):
            with self.news:
                self.reported.add((int(m[1]), int(m[2])))
                self.news.notify_all()

    def _label(self) -> None:
        from rlhfkit.feedback.service import FeedbackService
        from rlhfkit.feedback.store import open_store

        try:
            svc = FeedbackService(open_store(self.db))
            uid = svc.ensure_user("pat").id
            while not self.stop.is_set():
                task = None
                for project in svc.round_projects(self.run):
                    labels = svc.progress(project.id).labels
                    if labels < BUDGET:
                        with self.news:
                            if not self.news.wait_for(lambda: (project.round, labels) in self.reported, 0.05):
                                continue
                        task = svc.next_task(uid, project.id)
                    if task is not None:
                        break
                if task is None:
                    self.stop.wait(0.05)
                    continue
                a, b = task.responses
                svc.submit(uid, task.assignment_id, f"pat-{task.assignment_id:08d}",
                           outcome="A" if len(a) >= len(b) else "B", strength="better")
                self.served.setdefault(task.project.round, []).append(task.item_id)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def __enter__(self) -> Person:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


@pytest.mark.slow  # 25-55 s a family (qwen2 runs two rounds): 1.5-2 min for the three on two busy cores
@pytest.mark.timeout(300)
def test_rounds_label_refit_and_train_on_a_real_family(tmp_path, family, family_data):
    from rlhfkit.config import from_dict
    from rlhfkit.data.preference import read_preferences
    from rlhfkit.feedback.service import FeedbackService
    from rlhfkit.feedback.store import open_store
    from rlhfkit.reward.acquisition import acquisition_scores
    from rlhfkit.rounds import RoundsConfig, main

    data = family_data(family)
    prompts, user_texts = prompts_file(family, data, tmp_path / "prompts.jsonl")
    n_rounds = 2 if family.name == TWO_ROUNDS else 1
    out = tmp_path / "run"
    cfg = from_dict(RoundsConfig, settings(family, prompts, out, n_rounds), "test")
    out.mkdir()  # the person opens the store as soon as they start, before the loop has made the run directory
    with Person(cfg.db_path(), cfg.run_name()) as person:
        try:
            summary = main(cfg, progress=person.progress)
        except UserError:  # the loop gave up waiting: say why the person stopped, if they did
            assert person.error is None, person.error
            raise
    assert person.error is None, person.error
    svc = FeedbackService(open_store(cfg.db_path()))
    records = summary["rounds"]
    assert [r["round"] for r in records] == list(range(1, n_rounds + 1))
    policy_dir = family.path
    for r, record in zip(range(1, n_rounds + 1), records):
        rdir = out / f"round-{r}"
        project = svc.project(f"run-round-{r}")
        # the items show the user's text, never a chat template's rendering, and are the round's candidates
        candidates = read_jsonl(rdir / "candidates.jsonl")
        item_prompts = [p for _, p in svc.item_prompts(project.id)]
        assert len(item_prompts) == record["items"]["items"] > 0
        assert set(item_prompts) == {c["prompt"] for c in candidates} and set(item_prompts) <= user_texts
        assert record["labels"]["labels"] == BUDGET == len(person.served[r])
        assert record["sample"]["policy"] == str(policy_dir)  # each round samples the policy the last one trained

        # every label so far, as chat messages for a chat family and plain strings for GPT-2
        rows = read_jsonl(rdir / "preferences.jsonl")
        assert len(rows) == record["export"]["rows"] == BUDGET * r and {row["round"] for row in rows} == set(
            range(1, r + 1))
        for row in rows:
            if family.has_template:
                assert row["prompt"] == [{"role": "user", "content": row["prompt"][0]["content"]}]
                assert [m["role"] for m in row["chosen"] + row["rejected"]] == ["assistant", "assistant"]
                prompt, chosen, rejected = (row["prompt"][0]["content"], row["chosen"][0]["content"],
                                            row["rejected"][0]["content"])
            else:
                prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
                assert all(isinstance(x, str) for x in (prompt, chosen, rejected))
            assert prompt in user_texts and len(chosen) >= len(rejected)  # the person's answer, the right way up
        # the reward stage's reader takes the file as it is
        pairs = read_preferences(str(rdir / "preferences.jsonl"))
        assert len(pairs) == len(rows)
        assert all(isinstance(p.prompt, list) == family.has_template for p in pairs)

        # the reward ensemble refitted on them, and the policy trained against it
        reward = json.loads((rdir / "reward" / "summary.json").read_text())
        assert record["reward"]["rows"] == BUDGET * r and reward["ensemble_size"] == 2
        # each member trained its steps on the labels and was normalised on the policy's own samples
        assert all(m["steps"] == 4 and m["pairs"] > 0 and "normalisation" in m for m in reward["members"])
        assert all((rdir / "reward" / f"member-{m}" / "model.safetensors").is_file() for m in range(2))
        assert record["policy"]["steps"] == POLICY_STEPS
        assert_plain_transformers_loads(rdir / "policy", family)
        assert changed_tensors(policy_dir, rdir / "policy") > 0
        policy_dir = rdir / "policy"

    if n_rounds == 2:
        # round 1 had no model to ask; round 2 serves first the items the round-1 ensemble knows least about
        assert records[0]["labels"]["queue_updates"] == [] and records[1]["labels"]["queue_updates"]
        probs = torch.load(out / "round-2" / "queue.pt")
        ids = [i for i, _ in svc.item_prompts(svc.project("run-round-2").id)]
        assert probs.shape == (2, len(ids))
        scores = acquisition_scores(probs, "bald", None)
        # random_share 0: until the first reorder (at 3 labels) the items go out in BALD order
        top = sorted(range(len(ids)), key=lambda i: (-float(scores[i]), i))[:3]
        assert person.served[2][:3] == [ids[i] for i in top]
