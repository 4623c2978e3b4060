"""DESIGN.md's dependency rule, checked on the source: losses import only torch; data and models never import
the algorithms, the web app or the CLI; nothing imports cli, pipeline or feedback.web."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "rlhfkit"


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def modules(sub: str = "") -> list[Path]:
    return sorted((PKG / sub).rglob("*.py"))


def test_there_is_something_to_check():
    assert len(modules("losses")) >= 3 and len(modules()) >= 15


def test_losses_import_only_torch_and_the_standard_library():
    allowed_third_party = {"torch"}
    for path in modules("losses"):
        for name in imports_of(path):
            top = name.split(".")[0]
            if top == "rlhfkit":
                assert name.startswith("rlhfkit.losses"), f"{path.name} imports {name}"
            elif top not in allowed_third_party:
                assert top in {"__future__", "dataclasses", "math", "typing", "enum", "functools"}, \
                    f"{path.name} imports {name}"


def test_data_and_models_do_not_import_algorithms():
    banned = ("rlhfkit.policy", "rlhfkit.reward", "rlhfkit.feedback.web", "rlhfkit.cli", "rlhfkit.pipeline")
    for path in modules("data") + [PKG / "models.py"]:
        for name in imports_of(path):
            assert not name.startswith(banned), f"{path.relative_to(PKG)} imports {name}"


def test_nothing_imports_the_entry_points():
    banned = ("rlhfkit.cli", "rlhfkit.pipeline", "rlhfkit.feedback.web")
    for path in modules():
        rel = path.relative_to(PKG).as_posix()
        if rel in ("cli.py", "__main__.py") or rel.startswith("feedback/web"):
            continue
        for name in imports_of(path):
            assert not name.startswith(banned), f"{rel} imports {name}"


# Training code must never see the hidden gold judge (or the annotators built on it): the reward model has to
# learn its taste from noisy labels, and over-optimisation is measured against a judge the optimiser cannot see.
GOLD = ("rlhfkit.playground.gold", "rlhfkit.playground.annotators")
MAY_SEE_GOLD = ("eval/", "playground/gold.py", "playground/annotators.py", "playground/preferences.py",
                "feedback/", "pipeline.py")


def test_training_code_never_imports_the_gold_judge():
    for path in modules():
        rel = path.relative_to(PKG).as_posix()
        if rel.startswith(MAY_SEE_GOLD):
            continue
        for name in imports_of(path):
            assert not name.startswith(GOLD), f"{rel} imports {name}"
        relative = [n for n in ast.walk(ast.parse(path.read_text()))
                    if isinstance(n, ast.ImportFrom) and n.level > 0 and (n.module or "").startswith(("gold", "annotators"))]
        assert not relative, f"{rel} imports the gold judge relatively"


def test_importing_the_trainers_does_not_load_the_gold_judge():
    import subprocess
    import sys

    code = ("import sys, rlhfkit.policy.sft, rlhfkit.policy.rollout, rlhfkit.playground.world, rlhfkit.train;"
            "print([m for m in sys.modules if m.startswith(%r) or m.startswith(%r)])" % GOLD)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
