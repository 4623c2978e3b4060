"""Small models and data built locally for tests (no hub)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from rlhfkit.models import build_llama, save_pretrained, train_word_tokenizer

NAMES = ["ada", "bo", "cy", "dee", "eve", "fay", "gus", "hal"]
COLOURS = ["red", "blue", "green", "gold", "pink", "grey"]


def sft_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        name, colour = rng.choice(NAMES), rng.choice(COLOURS)
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        if i % 2:
            rows.append({"prompt": f"what is {a} plus {b} ?", "completion": f"{a} plus {b} is {a + b} , {name} !"})
        else:
            rows.append({"prompt": f"say hi to {name} .", "completion": f"hi {name} , i like {colour} ."})
    return rows


def corpus(n: int = 200) -> list[str]:
    words = [f"{r['prompt']} {r['completion']}" for r in sft_rows(n)]
    words += [" ".join(str(i) for i in range(20)), "hello world user assistant system"]
    return words


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_tiny_model(out: Path, dropout: float = 0.0, hidden: int = 32, layers: int = 2) -> Path:
    tok = train_word_tokenizer(corpus())
    model = build_llama(tok, hidden_size=hidden, num_layers=layers, num_heads=4, max_positions=128,
                        dropout=dropout, seed=0)
    save_pretrained(model, tok, out)
    return out


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    """Learnable pairs: the right sum (and a friendly tone) beats a wrong sum."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        wrong = a + b + rng.choice([-2, -1, 1, 2])
        rows.append({"prompt": f"what is {a} plus {b} ?", "chosen": f"{a} plus {b} is {a + b} , {rng.choice(NAMES)} !",
                     "rejected": f"{a} plus {b} is {wrong} ."})
    return rows


def ranking_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        responses = [f"{a} plus {b} is {a + b} , {rng.choice(NAMES)} !", f"{a} plus {b} is {a + b} .",
                     f"{a} plus {b} is {a + b + 1} .", f"i like {rng.choice(COLOURS)} ."]
        rows.append({"prompt": f"what is {a} plus {b} ?", "responses": responses, "ranking": [0, 1, 2, 3]})
    return rows


class Interrupted(Exception):
    """Raised by interrupt_after: stands in for a crash right after a step (and its checkpoint)."""


def interrupt_after(main, cfg, step: int) -> None:
    """Run main(cfg) in-process and stop it with an exception right after optimizer step `step` has finished
    (its checkpoint included), leaving the run directory as a crash would."""
    from rlhfkit.train.run import Run

    original = Run.end_step

    def end_step_then_stop(self, s, *args):
        original(self, s, *args)
        if s == step:
            raise Interrupted

    Run.end_step = end_step_then_stop
    try:
        main(cfg)
    except Interrupted:
        return
    finally:
        Run.end_step = original
    raise AssertionError(f"the run finished before step {step}; nothing was interrupted")


def tiny_reward_world(d: Path, model: Path, prompts: int = 24, reward_steps: int = 10) -> tuple[Path, Path]:
    """A reward model trained briefly on synthetic preferences (d/rm) and a prompts file, for online RL tests."""
    from rlhfkit.reward import train as rtrain

    prefs = write_jsonl(d / "prefs.jsonl", preference_rows(40))
    rtrain.main(rtrain.RewardConfig(model=str(model), data=str(prefs), output_dir=str(d / "rm"),
                                    max_steps=reward_steps, batch_size=8, learning_rate=2e-3, report_to=["jsonl"],
                                    progress=False, eval_fraction=0.0))
    return d, write_jsonl(d / "prompts.jsonl", [{"prompt": r["prompt"]} for r in preference_rows(prompts, seed=5)])


def largest_tensor_mode():
    """A dispatch mode recording the most elements of any tensor an aten op produces (`.largest`): how a test
    shows that no (B x T x V) logits were formed."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestTensor(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
            return out

    return LargestTensor()


# Reference runs (one process, or DDP over 2) of the sharded-training tests, by (launcher, stage, arguments): every
# test that compares a layout with the same reference reads one run (they only read it).
REFERENCE_RUNS: dict[tuple, Path] = {}
