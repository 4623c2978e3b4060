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
