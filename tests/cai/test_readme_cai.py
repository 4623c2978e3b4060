"""The README's `cai` / `eval` / `serve` commands (a ```text block, since `serve` runs until stopped) run here on
tiny stand-ins for the demo's models, with the server started in the background on a free port."""

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_commands() -> list[str]:
    section = README.read_text().split("## AI feedback, win rates and serving", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```text\n(.*?)```", section, flags=re.S)
    return [ln.split("#")[0].strip() for block in blocks for ln in block.splitlines() if ln.startswith("rlhfkit ")]


def test_the_readme_shows_each_new_stage():
    stages = {cmd.split()[1] for cmd in readme_commands()}
    assert stages == {"cai", "serve", "eval"}


def test_readme_cai_eval_serve_commands_run(tmp_path, monkeypatch):
    pytest.importorskip("fastapi")
    from cai.cai_helpers import free_port, make_playground_model, wait_until_serving, write_prompts

    from rlhfkit.cli import main

    demo = tmp_path / "runs" / "demo"
    make_playground_model(demo / "sft", seed=0)
    shutil.copytree(demo / "sft", demo / "dpo")
    (demo / "data").mkdir()
    for split in ("train", "val", "test"):
        write_prompts(demo / "data" / f"prompts_{split}.jsonl", 4, split)
    (tmp_path / "runs" / "label").mkdir()
    monkeypatch.chdir(tmp_path)
    port = free_port()
    server = None
    try:
        for cmd in readme_commands():
            cmd = cmd.replace("8000", str(port))
            argv = shlex.split(cmd)[1:] + (["--max-new-tokens", "8"] if argv_needs_short(cmd) else [])
            if argv[0] == "serve":
                server = subprocess.Popen([sys.executable, "-m", "rlhfkit", *argv], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL)
                wait_until_serving(f"http://127.0.0.1:{port}", server)
                continue
            assert main(argv) == 0, cmd
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    assert (tmp_path / "runs" / "cai" / "sl" / "chains.jsonl").is_file()
    assert (tmp_path / "runs" / "cai" / "labels-http" / "preferences.jsonl").is_file()
    assert (tmp_path / "runs" / "eval-dpo" / "summary.json").is_file()


def argv_needs_short(cmd: str) -> bool:
    """Sampling commands get a short response budget here; the README's are the real defaults."""
    return cmd.split()[1] in ("cai", "eval")
