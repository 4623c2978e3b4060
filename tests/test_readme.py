"""Every command in README.md's bash blocks is run here (the two make targets are run by CI)."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BIN = Path(sys.executable).parent


def bash_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    # a comment starts at a "#" that begins a word, as in bash (DIR#head inside a word is not one)
    lines = [re.sub(r"(^|\s)#.*$", "", ln).strip() for block in blocks for ln in block.splitlines()]
    return [ln for ln in lines if ln]


def test_readme_opens_with_the_two_make_commands():
    assert bash_commands()[:2] == ["make demo", "make test"]
    makefile = (README.parent / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)


def test_every_readme_command_is_known():
    for cmd in bash_commands()[2:]:
        assert cmd.split()[0] in ("rlhfkit", "accelerate"), f"README command not covered by this test: {cmd}"


@pytest.mark.slow
def test_readme_commands_run(tmp_path, tiny_model, sft_file):
    # the paths the README uses, as `make demo` leaves them
    (tmp_path / "runs" / "demo" / "data").mkdir(parents=True)
    shutil.copytree(tiny_model, tmp_path / "runs" / "demo" / "base")
    shutil.copy(sft_file, tmp_path / "runs" / "demo" / "data" / "sft.jsonl")
    hhh_world(tmp_path / "runs" / "demo" / "hhh", tiny_model)
    shutil.copytree(README.parent / "examples", tmp_path / "examples")  # the launch configs, as in a clone
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "CUDA_VISIBLE_DEVICES": ""}
    for cmd in bash_commands()[2:]:
        proc = subprocess.run(shlex.split(cmd), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{cmd}\n{proc.stderr[-3000:]}"
    assert (tmp_path / "runs" / "my-sft" / "checkpoints" / "step-40").is_dir()
    assert (tmp_path / "runs" / "my-sft-ddp" / "model.safetensors").is_file()
    assert (tmp_path / "runs" / "my-sft-fsdp" / "model.safetensors").is_file()


def hhh_world(root: Path, model: Path) -> None:
    """What `make demo DEMO_ARGS=--hhh` leaves in runs/demo/hhh for the README's HHH commands, small: the SFT model
    (here the tiny model), prompt files and the rubric labels, judged by the playground's per-criterion annotators."""
    import json
    import random

    from rlhfkit.playground.preferences import label_criteria
    from rlhfkit.playground.responses import HHH_BALANCED, sample_pair
    from rlhfkit.playground.tasks import HHH_KIND_WEIGHTS, make_prompts

    shutil.copytree(model, root / "sft")
    (root / "data").mkdir(parents=True)
    splits = make_prompts(0, 48, 8, 8, HHH_KIND_WEIGHTS)
    for name in ("train", "val"):
        (root / "data" / f"prompts_{name}.jsonl").write_text(
            "".join(json.dumps(p.to_dict()) + "\n" for p in splits[name]))
    rng = random.Random(0)
    rows, _ = label_criteria([(p, *sample_pair(p, rng, HHH_BALANCED)) for p in splits["train"] * 2], seed=0)
    (root / "data" / "rubric_train.jsonl").write_text("".join(json.dumps(r) + "\n" for c in rows for r in rows[c]))


def test_readme_images_exist():
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README.read_text())
    assert images, "the README shows what the demo's report looks like"
    for path in images:
        assert (README.parent / path).is_file(), path
