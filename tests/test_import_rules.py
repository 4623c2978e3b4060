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
