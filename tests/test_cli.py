import subprocess
import sys
import textwrap

from rlhfkit.cli import STAGES, main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "rlhfkit", *args], capture_output=True, text=True, timeout=300)


def test_top_level_help_lists_stages(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for stage in STAGES:
        assert f"  {stage}" in out


def test_stage_help_lists_fields_with_docs(capsys):
    assert main(["sft", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--max-steps INT" in out and "Optimizer steps to run" in out and "--packing BOOL" in out


def test_unknown_stage_suggests(capsys):
    assert main(["stf"]) == 2
    assert "did you mean 'sft'" in capsys.readouterr().err.lower()


def test_typo_in_config_is_a_one_line_error(tmp_path):
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(textwrap.dedent("""
        model: m
        data: d
        output_dir: o
        learnig_rate: 0.001
    """))
    proc = run_cli("sft", "--config", str(cfg))
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr
    assert err.splitlines()[-1].startswith("rlhfkit sft: error: unknown config key 'learnig_rate'")
    assert "did you mean 'learning_rate'" in err


def test_bad_data_row_names_file_row_field(tmp_path, tiny_model):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "hi", "completion": "yo"}\n{"prompt": "hi"}\n')
    proc = run_cli("sft", "--model", str(tiny_model), "--data", str(data), "--output-dir", str(tmp_path / "run"))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"{data}, row 2, field 'completion': missing" in proc.stderr


LAUNCHED_STAGE = '''
import atexit, dataclasses, os, sys
import torch.distributed as dist

@dataclasses.dataclass
class Cfg:
    out: str = ""

def main(cfg):
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    dist.all_reduce(__import__("torch").ones(3))
    atexit.register(lambda: open(cfg.out, "w").write(f"atexit ran; group left: {not dist.is_initialized()}"))
    sys.stdout.write("written, never flushed by the stage")
'''


def test_a_launched_process_ends_after_its_exit_handlers_without_interpreter_teardown(tmp_path):
    """Under `accelerate launch` the command ends with os._exit once the group is left (gloo objects destroyed in
    interpreter teardown aborted finished runs). Nothing a normal exit does for the user may be lost: the atexit
    handlers run while the group is already left, buffered output reaches the pipe, the exit status is 0. Run
    in-process (no launcher), main returns as before."""
    (tmp_path / "fake_stage.py").write_text(LAUNCHED_STAGE)
    script = ("import sys; from rlhfkit import cli\n"
              "cli.STAGES['fake'] = ('fake_stage', 'Cfg', 'a stage that uses a process group')\n"
              f"code = cli.main(['fake', '--out', {str(tmp_path / 'exit.txt')!r}])\n"
              "sys.exit(7)  # reached only when main returned\n")
    import os

    base = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RUN_ID"}
    base["PYTHONPATH"] = os.pathsep.join([str(tmp_path), base.get("PYTHONPATH", "")])
    launched = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                              env={**base, "TORCHELASTIC_RUN_ID": "test"}, cwd=tmp_path)
    assert launched.returncode == 0, launched.stderr[-2000:]
    assert launched.stdout == "written, never flushed by the stage"
    assert (tmp_path / "exit.txt").read_text() == "atexit ran; group left: True"

    (tmp_path / "exit.txt").unlink()
    in_process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                                env=base, cwd=tmp_path)
    assert in_process.returncode == 7, in_process.stderr[-2000:]
    assert (tmp_path / "exit.txt").read_text() == "atexit ran; group left: True"
