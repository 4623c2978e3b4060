"""README's "Bring your own model and data" commands, run as written on tiny stand-ins: `my-qwen` (Qwen2, ChatML),
`my-gpt2` (no template) and files shaped like the public data sets they name (UltraFeedback as a DatasetDict with
its six splits, the Orca DPO pairs as Parquet, HH transcripts gzipped, SHP's JSON Lines in a .json file, oasst1 as
Parquet)."""

from __future__ import annotations

import gzip
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from data.test_convert import OASST, SHP
from data.test_formats import orca_row, ultrafeedback_row

README = Path(__file__).resolve().parents[2] / "README.md"

QUESTIONS = [("What is 3 + 4?", "3 + 4 = 7.", "It is 8."), ("Name a fruit.", "An apple.", "A chair."),
             ("Say hi to Ada.", "Hi, Ada!", "Go away."), ("What colour is the sky?", "Blue, on a clear day.", "Green."),
             ("Is water wet?", "Yes, it makes things wet.", "No idea."), ("Count to three.", "1, 2, 3.", "3, 2, 1.")]


def readme_commands() -> list[str]:
    section = README.read_text().split("## Bring your own model and data", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```text\n(.*?)```", section, flags=re.S)
    return [ln.strip() for block in blocks for ln in block.splitlines() if ln.startswith("rlhfkit ")]


def write_inputs(root: Path, family_dir) -> None:
    from datasets import Dataset, DatasetDict

    shutil.copytree(family_dir("qwen2").path, root / "my-qwen")
    shutil.copytree(family_dir("gpt2").path, root / "my-gpt2")
    rows = [ultrafeedback_row(q, good, bad) for q, good, bad in QUESTIONS * 4]
    rows[3] = ultrafeedback_row(*QUESTIONS[3], score_chosen=6.0, score_rejected=6.0)  # a tie, as the set has
    sft = [{"prompt": r["prompt"], "prompt_id": r["prompt_id"], "messages": r["messages"]} for r in rows]
    gen = [{"prompt": r["prompt"], "prompt_id": r["prompt_id"], "messages": r["messages"]} for r in rows[:6]]
    DatasetDict({"train_prefs": Dataset.from_list(rows), "test_prefs": Dataset.from_list(rows[:6]),
                 "train_sft": Dataset.from_list(sft), "test_sft": Dataset.from_list(sft[:6]),
                 "train_gen": Dataset.from_list(gen), "test_gen": Dataset.from_list(gen)}
                ).save_to_disk(str(root / "ultrafeedback"))
    Dataset.from_list([orca_row(question=q) | {"chosen": good, "rejected": bad} for q, good, bad in QUESTIONS * 3]
                      ).to_parquet(str(root / "orca_dpo_pairs.parquet"))
    (root / "hh-rlhf").mkdir()
    with gzip.open(root / "hh-rlhf" / "train.jsonl.gz", "wt", encoding="utf-8") as fh:
        for q, good, bad in QUESTIONS * 3:
            shared = f"\n\nHuman: {q}\n\nAssistant:"
            fh.write(json.dumps({"chosen": f"{shared} {good}", "rejected": f"{shared} {bad}"}) + "\n")
    (root / "shp").mkdir()
    (root / "shp" / "askscience_train.json").write_text("".join(json.dumps(r) + "\n" for r in SHP * 4))
    (root / "oasst1").mkdir()
    Dataset.from_list(OASST).to_parquet(str(root / "oasst1" / "train.parquet"))


@pytest.mark.slow
def test_bring_your_own_model_and_data_commands_run(tmp_path, family_dir, monkeypatch, caplog):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhfkit.cli import main

    commands = readme_commands()
    assert {c.split()[1] for c in commands} >= {"sft", "reward", "dpo", "ppo", "data"}
    write_inputs(tmp_path, family_dir)
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("WARNING", logger="rlhfkit"):
        for cmd in commands:
            argv = shlex.split(cmd)[1:] + ["--progress", "false"] * (shlex.split(cmd)[1] != "data")
            assert main(argv) == 0, cmd
    for run in ("qwen-sft", "qwen-dpo", "qwen-grpo", "orca-dpo", "hh-dpo"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "runs" / run))  # plain transformers loads each
    for run in ("qwen-rm", "shp-rm"):
        AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "runs" / run))
    # the UltraFeedback tie (row 4 of each split) was dropped and said so, by the reward and the DPO runs
    dropped = [r.getMessage() for r in caplog.records if "score_chosen equals score_rejected" in r.getMessage()]
    assert len(dropped) >= 2 and all("left out 1 of" in m and "rows [4]" in m for m in dropped), dropped
    assert (tmp_path / "data" / "shp.jsonl").read_text().count("\n") > 0
    assert (tmp_path / "data" / "oasst1_rankings.jsonl").read_text().count('"ranking"') >= 1
