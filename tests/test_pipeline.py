"""The demo's labelling stage on a tiny world (through the feedback store) and its claim checks."""

import json

import pytest

from rlhfkit.pipeline import check_claims, collect_labels

pytest.importorskip("sqlalchemy", reason="the labelling stage needs the `web` extra: pip install -e '.[web]'")


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    from rlhfkit.playground.tasks import make_prompts
    from rlhfkit.playground.world import WorldSpec, build_initial_model

    root = tmp_path_factory.mktemp("demo")
    (root / "data").mkdir()
    splits = make_prompts(seed=0, n_train=12, n_val=8, n_test=1)
    for split in ("train", "val"):
        (root / "data" / f"prompts_{split}.jsonl").write_text(
            "".join(json.dumps(p.to_dict()) + "\n" for p in splits[split]))
    # an untrained model samples word salad: the annotators judge whatever they are shown
    build_initial_model(root / "sft", WorldSpec(hidden_size=32, num_layers=1, num_heads=2))
    return root


def test_collect_labels_with_overlap_merges_votes_and_reuses_the_same_plan(tiny_world):
    plan = {"train": (4, 1, 2), "val": (2, 1, 2)}
    assert collect_labels(tiny_world, 0, quick=True, redo=False, plan=plan, overlap=3) is not None
    report = json.loads((tiny_world / "data" / "labels.json").read_text())
    gen = report["train-generator"]
    assert gen["items"] == 24 and gen["judgments"] == 3 * 24
    # one row or one counted reason per training item (majority vote); held-out pairs keep one judgment each
    assert gen["rows"] + sum(gen["left_out"].values()) == gen["items"]
    val = report["val-generator"]
    assert val["judgments"] == val["items"] == 16 and val["rows"] + sum(val["left_out"].values()) == 16
    train = [json.loads(x) for x in (tiny_world / "data" / "preferences_train.jsonl").read_text().splitlines()]
    assert len(train) == report["train_rows"] and all(len(r["annotator"].split("+")) == 3 for r in train)
    assert collect_labels(tiny_world, 0, quick=True, redo=False, plan=plan, overlap=3) is None  # reused
    assert collect_labels(tiny_world, 0, quick=True, redo=False, plan={**plan, "val": (2, 1, 3)}, overlap=3)
    again = json.loads((tiny_world / "data" / "labels.json").read_text())
    assert again["val-generator"]["items"] == 24 and again["overlap"] == 3


def test_generator_labels_come_first_on_their_own_and_an_sft_relabel_keeps_one_store(tiny_world, tmp_path):
    """The demo labels the generator pairs beside pretraining (collect_generator_labels), then the SFT samples
    (collect_labels) into the same store; labelling the SFT samples again (a new SFT model) starts a fresh store,
    so it never holds two models' projects, and the generator labels come out the same."""
    from rlhfkit.feedback.service import FeedbackService
    from rlhfkit.feedback.store import open_store
    from rlhfkit.pipeline import collect_generator_labels

    import shutil

    world = tmp_path / "world"  # the prompts and the SFT model, without the labels an earlier test made
    shutil.copytree(tiny_world / "sft", world / "sft")
    (world / "data").mkdir()
    for split in ("train", "val"):
        shutil.copy(tiny_world / "data" / f"prompts_{split}.jsonl", world / "data")
    tiny_world = world
    plan = {"train": (4, 1, 2), "val": (2, 1, 2)}
    data = tiny_world / "data"
    assert collect_generator_labels(tiny_world, 0, False, plan) is not None
    assert not (data / "preferences_train.jsonl").exists()  # the SFT samples are not labelled yet
    generator = (data / "generator_train.jsonl").read_text()
    assert collect_labels(tiny_world, 0, quick=True, redo=False, plan=plan) is not None
    assert collect_generator_labels(tiny_world, 0, False, plan) is None  # reused, and labels.json kept
    assert collect_labels(tiny_world, 0, quick=True, redo=False, plan=plan) is None
    first = (data / "preferences_train.jsonl").read_text()
    assert first.endswith(generator)  # the SFT samples' rows, then the generator pairs'
    names = sorted(p.name for p in FeedbackService(open_store(str(tiny_world / "feedback.db"))).projects())
    assert names == ["train-generator", "train-sft", "val-generator", "val-sft"]
    # a new SFT model: its samples are labelled again, in a fresh store with the same generator labels
    assert collect_labels(tiny_world, 0, quick=True, redo=True, plan=plan) is not None
    names = sorted(p.name for p in FeedbackService(open_store(str(tiny_world / "feedback.db"))).projects())
    assert names == ["train-generator", "train-sft", "val-generator", "val-sft"]
    assert (data / "generator_train.jsonl").read_text() == generator
    assert (data / "preferences_train.jsonl").read_text() == first  # the same model: the same labels


def test_reward_model_claim_reports_its_standard_error_and_pairs():
    def claim(acc):
        rm = {"gold_accuracy": acc, "gold_accuracy_se": 0.016, "pairs": 680}
        return [c for c in check_claims({"policies": {}, "reward_model": rm}) if "reward model" in c["claim"]][0]

    assert claim(0.762) == {"claim": "the reward model agrees with the gold judge on ≥ 75% of held-out pairs",
                            "ok": True, "value": "0.762 ± 0.016 on 680 pairs"}
    assert claim(0.749)["ok"] is False


def test_kl_cut_claims_need_a_fall_beyond_noise_and_the_monitor_on_the_cut_run_only():
    def claims(proxy, gold, se, cut_flag=True, default_flag=False):
        over = {"kl_cut": {"proxy_delta": proxy, "gold_delta": gold, "gold_delta_se": se,
                           "monitor_flagged": cut_flag, "default_monitor_flagged": default_flag}}
        got = check_claims({"policies": {}, "overoptimization": over})
        return [c["ok"] for c in got if "leash cut" in c["claim"]] + [c["ok"] for c in got if "monitor" in c["claim"]]

    assert claims(0.5, -0.38, 0.1) == [True, True]
    assert claims(0.5, -0.15, 0.1) == [False, True]  # within 2 standard errors of SFT: not shown
    assert claims(-0.1, -0.5, 0.1) == [False, True]  # the proxy fell too: a worse policy, not reward hacking
    assert claims(0.5, -0.5, 0.1, cut_flag=True, default_flag=True) == [True, False]
    assert claims(0.5, -0.5, 0.1, cut_flag=False) == [True, False]


def test_a_negative_worker_count_is_refused_naming_the_flag(tmp_path):
    from rlhfkit.errors import ConfigError
    from rlhfkit.pipeline import DemoConfig, main

    with pytest.raises(ConfigError, match=r"--workers -2: give 0"):
        main(DemoConfig(output_dir=str(tmp_path / "demo"), quick=True, workers=-2, hhh=False, rounds=False))
    assert not (tmp_path / "demo").exists()  # refused before anything was built


def test_the_rounds_runs_survive_a_change_of_progress_bars_or_workers(tmp_path):
    from rlhfkit.pipeline import rounds_setup_job

    plan = {"reliability": {"gold_items": 2}}
    rounds = tmp_path / "rounds"
    rounds.mkdir()
    (rounds / "gold_pairs.jsonl").write_text('{"a": 1}\n{"a": 2}\n')
    (rounds / "gold_items.jsonl").write_text('{"b": 1}\n')
    (rounds / "active-0").mkdir()  # a finished run of the study
    # the stamp an earlier demo wrote: the plan, the runs' shared settings and the seed
    (rounds / "plan.json").write_text(json.dumps(
        {"plan": plan, "base": {"labellers": ["simulated"], "reward": {"ensemble_size": 3}}, "seed": 0}))
    base = {"labellers": ["simulated"], "reward": {"ensemble_size": 3, "progress": True}}
    assert rounds_setup_job(tmp_path, plan, base, seed=0) == 2
    assert (rounds / "active-0").exists()
    quiet = {**base, "reward": {"ensemble_size": 3, "progress": False}}
    assert rounds_setup_job(tmp_path, plan, quiet, seed=0) == 2
    assert (rounds / "active-0").exists()


def test_sft_samples_shared_out_over_jobs_are_labelled_as_if_drawn_in_one(tiny_world, tmp_path):
    """The demo draws the SFT samples in label_samples jobs side by side (sampling_parts shares the (split,
    round) draws out by their size) and hands them to the label job: the labels are byte for byte those of
    collect_labels drawing every sample itself, and a job finding the labels up to date draws nothing."""
    import shutil

    from rlhfkit.pipeline import label_job, label_samples_job, sampling_parts

    plan = {"train": (4, 3, 1), "val": (2, 2, 1)}
    parts = sampling_parts(plan, {"train": 12, "val": 8}, 2)
    # every draw once; the three train draws (48 samples each) and two val draws (16 each) shared out: 48 + 48 on one, 48 + 16 + 16 on the other
    assert sorted(u for p in parts for u in p) == [("train", 0), ("train", 1), ("train", 2), ("val", 0), ("val", 1)]
    assert sorted(sum(plan[s][0] * {"train": 12, "val": 8}[s] for s, _ in p) for p in parts) == [80, 96]
    assert sampling_parts(plan, {"train": 12, "val": 8}, 9) == [[u] for u in
                                                                  [("train", 0), ("train", 1), ("train", 2),
                                                                   ("val", 0), ("val", 1)]]
    assert len(sampling_parts({"train": (4, 1, 1), "val": (2, 0, 1)}, {"train": 12, "val": 8}, 4)) == 1

    worlds = []
    for name in ("one", "split"):
        world = tmp_path / name
        shutil.copytree(tiny_world / "sft", world / "sft")
        (world / "data").mkdir(parents=True)
        for split in ("train", "val"):
            shutil.copy(tiny_world / "data" / f"prompts_{split}.jsonl", world / "data")
        worlds.append(world)
    one, split = worlds
    assert collect_labels(one, 0, quick=False, redo=False, plan=plan) is not None
    samples = [label_samples_job(split, 0, False, plan, 1, part, redo=False) for part in parts]
    assert all(s.ran for s in samples) and sorted(k for s in samples for k in s.value) == sorted(
        u for p in parts for u in p)
    assert label_job(split, 0, False, plan, 1, [s.value for s in samples], redo=True).ran
    for f in ("preferences_train.jsonl", "preferences_val.jsonl"):
        assert (split / "data" / f).read_text() == (one / "data" / f).read_text()
    # up to date: no samples drawn, the labels reused
    again = label_samples_job(split, 0, False, plan, 1, parts[0], redo=False)
    assert not again.ran and again.value is None
    assert not label_job(split, 0, False, plan, 1, [again.value], redo=False).ran


def test_quick_stage_settings_must_name_a_stage_of_the_presets():
    from rlhfkit.errors import ConfigError
    from rlhfkit.pipeline import check_presets, demo_presets

    shipped = demo_presets()
    assert shipped["quick_stages"]["reward"]["likelihood_fit_pairs"] < 4096  # what the quick members fit on
    with pytest.raises(ConfigError, match=r"quick_stages names \['rewards'\].*e\.g\. reward"):
        check_presets({"reward": {}, "quick": {}, "quick_stages": {"rewards": {"batch_size": 8}}})
    with pytest.raises(ConfigError, match=r"quick_stages names \['quick'\]"):
        check_presets({"reward": {}, "quick": {}, "quick_stages": {"quick": {}}})


def test_reward_members_on_samples_drawn_once_match_the_ensemble_trained_in_one_run(tmp_path):
    """The demo trains the ensemble's members as jobs side by side, their normalisation samples drawn once by
    reward_samples_job: each member is the one rtrain.main trains (same weights, same normalisation), a member
    handed no samples draws the same ones itself, and finished members make the samples job draw nothing."""
    from dataclasses import replace

    import torch
    from safetensors.torch import load_file

    from rlhfkit.pipeline import reward_member_job, reward_samples_job
    from rlhfkit.reward import train as rtrain
    from tests.helpers import make_tiny_model, preference_rows, write_jsonl

    model = make_tiny_model(tmp_path / "m")
    prefs = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(24))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in preference_rows(6, seed=5)])
    cfg = rtrain.RewardConfig(model=str(model), data=str(prefs), output_dir=str(tmp_path / "one_run"), max_steps=3,
                              batch_size=8, ensemble_size=2, normalize_prompts=str(prompts), normalize_samples=8,
                              normalize_max_new_tokens=8, report_to=["jsonl"], progress=False, eval_fraction=0.0)
    rtrain.main(cfg)
    jobs = replace(cfg, output_dir=str(tmp_path / "jobs"))
    drawn = reward_samples_job(jobs, redo=False)
    # drawn for unfinished members, but not "ran": nothing upstream changed, so they are any earlier run's samples
    assert drawn.value is not None and not drawn.ran and "reward_samples" in drawn.wall
    assert reward_member_job(jobs, 0, drawn.value, redo=False).ran
    assert reward_member_job(jobs, 1, None, redo=False).ran  # draws its own
    for i in (0, 1):
        one, split = tmp_path / "one_run" / f"member-{i}", tmp_path / "jobs" / f"member-{i}"
        a, b = load_file(one / "model.safetensors"), load_file(split / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert json.loads((one / "config.json").read_text()) == json.loads((split / "config.json").read_text())
        norm = [json.loads((d / "summary.json").read_text())["normalisation"] for d in (one, split)]
        assert norm[0] == norm[1] and norm[0]
    again = reward_samples_job(jobs, redo=False)
    assert again.value is None and not again.ran and not again.wall  # every member finished: nothing drawn
    assert not reward_member_job(jobs, 0, again.value, redo=False).ran
    upstream = reward_samples_job(jobs, redo=True)  # the SFT model changed: drawn again, and the members follow
    assert upstream.ran and upstream.value == drawn.value
