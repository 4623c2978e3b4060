"""The package's dependency rule, checked on the source with every import counted (function-local ones too):
layers import only downward, there are no cycles, losses import only torch, nothing imports the entry points, and
only evaluation, the simulated annotators and labelling simulation reach the hidden gold judge.
docs/ARCHITECTURE.md draws the layers."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "rlhfkit"

# Lowest first. A module belongs to the layer of the longest prefix that names it; it may import its own layer and
# the ones below, never one above. Command modules that are entry points of their own (the `data`, `label`, `cai`
# stages, the CAI experiment) sit at the edge with the pipeline and the server.
LAYERS: list[tuple[str, ...]] = [
    ("rlhfkit", "rlhfkit.errors", "rlhfkit.compat"),
    # the over-optimisation statistics (curve fits, the monitor PPO runs) are evaluation's, but pure math
    ("rlhfkit.losses", "rlhfkit.eval.overopt"),
    ("rlhfkit.data",),
    ("rlhfkit.config",),
    ("rlhfkit.models",),
    ("rlhfkit.train", "rlhfkit.generation"),
    ("rlhfkit.reward", "rlhfkit.policy"),
    ("rlhfkit.feedback",),
    ("rlhfkit.playground",),
    ("rlhfkit.judging",),
    ("rlhfkit.eval",),
    ("rlhfkit.pipeline", "rlhfkit.demo_hhh", "rlhfkit.rounds", "rlhfkit.demo_rounds", "rlhfkit.serve", "rlhfkit.label", "rlhfkit.cai", "rlhfkit.data.convert",
     "rlhfkit.eval.cai_playground", "rlhfkit.feedback.web"),
    ("rlhfkit.cli", "rlhfkit.__main__"),
]
ENTRY_POINTS = ("rlhfkit.cli", "rlhfkit.__main__", "rlhfkit.pipeline", "rlhfkit.rounds", "rlhfkit.feedback.web", "rlhfkit.label",
                "rlhfkit.cai", "rlhfkit.data.convert", "rlhfkit.eval.cai_playground")
# who may import an entry point: the CLI dispatches to every stage by name; the `label serve` command runs the web app
# the demo's rounds experiment runs the rounds loop
MAY_IMPORT_ENTRY = {"rlhfkit.label": ("rlhfkit.feedback.web",), "rlhfkit.demo_rounds": ("rlhfkit.rounds",)}

GOLD = ("rlhfkit.playground.gold",)
# evaluation, the simulated annotators, labelling simulation (pairs labelled by them; `label simulate`), and the two
# programs that run those beside training (the demo pipeline and the `label` command)
MAY_REACH_GOLD = ("rlhfkit.eval", "rlhfkit.playground.gold", "rlhfkit.playground.annotators",
                  "rlhfkit.playground.preferences", "rlhfkit.playground.simulate", "rlhfkit.pipeline", "rlhfkit.demo_hhh",
                  "rlhfkit.label", "rlhfkit.rounds", "rlhfkit.demo_rounds")


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


MODULES = all_modules()


def resolve(name: str) -> str | None:
    """The rlhfkit module an imported name refers to (a `from pkg import submodule` counts as the submodule)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(mod: str) -> set[str]:
    """Every rlhfkit module `mod` imports, at any depth of its code (function-local imports included)."""
    path = MODULES[mod]
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "rlhfkit":
                target = resolve(name)
                if target is not None and target != mod and not mod.startswith(target + "."):
                    out.add(target)
    return out


GRAPH = {mod: imports_of(mod) for mod in MODULES}


def layer_of(mod: str) -> int:
    best, best_len = None, -1
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (mod == prefix or mod.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    assert best is not None, f"{mod} is in no layer: add it to LAYERS"
    return best


def test_there_is_something_to_check():
    assert len(MODULES) >= 60 and sum(len(v) for v in GRAPH.values()) >= 150
    # function-local imports are seen: serve imports the generation module only inside a method
    assert "rlhfkit.generation" in GRAPH["rlhfkit.serve"]


def test_no_module_imports_a_layer_above_its_own():
    bad = [f"{mod} (layer {layer_of(mod)}) imports {dep} (layer {layer_of(dep)})"
           for mod, deps in GRAPH.items() for dep in sorted(deps) if layer_of(dep) > layer_of(mod)]
    assert not bad, "\n".join(bad)


def test_there_are_no_import_cycles():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            # a package's __init__ re-exporting its own modules is not a cycle between concerns
            outside = [m for m in component if not any(m.startswith(o + ".") for o in component if o != m)]
            if len(outside) > 1:
                cycles.append(sorted(component))

    for mod in sorted(GRAPH):
        if mod not in index:
            visit(mod)
    assert not cycles, cycles


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The two checks above fail when they should: the judge protocols importing the playground's judge (which
    imports them) is an upward import and a cycle."""
    monkeypatch.setitem(GRAPH, "rlhfkit.feedback.protocols",
                        GRAPH["rlhfkit.feedback.protocols"] | {"rlhfkit.playground.ai_judge"})
    with pytest.raises(AssertionError, match="feedback.protocols .* imports rlhfkit.playground.ai_judge"):
        test_no_module_imports_a_layer_above_its_own()
    with pytest.raises(AssertionError, match="'rlhfkit.feedback.protocols', 'rlhfkit.playground.ai_judge'"):
        test_there_are_no_import_cycles()


def test_losses_import_only_torch_and_the_standard_library():
    allowed = {"torch", "__future__", "dataclasses", "math", "typing", "enum", "functools"}
    for mod, path in MODULES.items():
        if not mod.startswith("rlhfkit.losses"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for name in names:
                top = name.split(".")[0]
                assert top in allowed or name.startswith("rlhfkit.losses"), f"{mod} imports {name}"


def test_nothing_imports_the_entry_points():
    bad = []
    for mod, deps in GRAPH.items():
        for dep in deps:
            entry = next((e for e in ENTRY_POINTS if dep == e or dep.startswith(e + ".")), None)
            if entry is None or mod == entry or mod.startswith(entry + ".") or mod == "rlhfkit.__main__":
                continue
            if entry in MAY_IMPORT_ENTRY.get(mod, ()):
                continue
            bad.append(f"{mod} imports {dep}")
    assert not bad, bad


def test_no_module_imports_by_name_to_hide_from_these_checks():
    """importlib / __import__ would hide an import from the graph; only the CLI dispatches to stages by name."""
    for mod, path in MODULES.items():
        if mod == "rlhfkit.cli":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
                assert called not in ("import_module", "__import__"), f"{mod} imports a module by name"


def reaches(mod: str, targets: tuple[str, ...]) -> list[str] | None:
    """An import path from mod to one of targets, or None."""
    seen, frontier = {mod: [mod]}, [mod]
    while frontier:
        nxt = []
        for m in frontier:
            for dep in GRAPH[m]:
                if dep not in seen:
                    seen[dep] = seen[m] + [dep]
                    if dep.startswith(targets):
                        return seen[dep]
                    nxt.append(dep)
        frontier = nxt
    return None


# Training code must never see the hidden gold judge: the reward model has to learn its taste from noisy labels, and
# over-optimisation is measured against a judge the optimiser cannot see.
def test_only_eval_annotators_and_labelling_simulation_reach_the_gold_judge():
    bad = []
    for mod in MODULES:
        if mod.startswith(MAY_REACH_GOLD) or mod.startswith(GOLD):
            continue
        path = reaches(mod, GOLD)
        if path is not None:
            bad.append(" -> ".join(path))
    assert not bad, "\n".join(bad)
    # and the rule is not vacuous: the annotators and evaluation do reach it
    assert reaches("rlhfkit.playground.annotators", GOLD) and reaches("rlhfkit.eval.playground", GOLD)


def test_importing_the_trainers_does_not_load_the_gold_judge():
    code = ("import sys, rlhfkit.policy.sft, rlhfkit.policy.ppo, rlhfkit.policy.dpo, rlhfkit.reward.train, "
            "rlhfkit.generation, rlhfkit.feedback.service, rlhfkit.playground.world, rlhfkit.train;"
            "print([m for m in sys.modules if m.startswith(%r)])" % GOLD)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
