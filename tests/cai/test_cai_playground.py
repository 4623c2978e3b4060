"""The playground CAI experiment script end to end at toy sizes (the real numbers come from
`python -m rlhfkit.eval.cai_playground` on `rlhfkit demo`'s base model; see README)."""

import json


def test_the_cai_experiment_runs_end_to_end_and_reports_every_number(tmp_path):
    from cai.cai_helpers import make_playground_model, write_prompts

    from rlhfkit.eval.cai_playground import CAIExperimentConfig, main

    base = make_playground_model(tmp_path / "base")
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 24), ("val", 8), ("test", 8)):
        write_prompts(data / f"prompts_{split}.jsonl", n, split)
    cfg = CAIExperimentConfig(base=str(base), data=str(data), output_dir=str(tmp_path / "out"), sft_steps=2,
                              sl_cai_steps=2, revision_rounds=1, policy_rounds=1, generator_rounds=1, reward_steps=2,
                              dpo_steps=2, best_of_n=2, eval_prompts=8)
    summary = main(cfg)
    assert summary == json.loads((tmp_path / "out" / "summary.json").read_text())
    train = summary["labels"]["train"]
    assert train["rows"] > 0 and 0.0 <= train["ai_vs_gold"]["agreement"] <= 1.0
    assert set(summary["policies"]) == {"sft_helpful_only", "sl_cai", "dpo_ai_labels", "sl_cai_then_dpo_ai",
                                        "best_of_2_ai_rm"}
    for p in summary["policies"].values():
        assert 0.0 <= p["unsafe_rate"] <= 1.0 and p["n"] == 8
    assert summary["policies"]["sft_helpful_only"]["win_rate_vs_sft"] == 0.5
    rows = [json.loads(line) for line in (tmp_path / "out" / "data" / "preferences_ai_train.jsonl").read_text().splitlines()]
    assert all(r["source"] == "ai" for r in rows)
