"""`rlhfkit <stage> [--config FILE.yaml] [--field value ...]`: parse the stage's config dataclass, call main(cfg).

Thin on purpose: a stage is a module with a config dataclass and main(cfg). Stage modules are imported only
when that stage runs, so `rlhfkit --help` does not pay for torch."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from typing import Any

from rlhfkit import __version__
from rlhfkit.config import format_help, parse_args
from rlhfkit.errors import UserError

# name -> (module, config class, one-line summary). The pipeline order, as a user reads it.
STAGES: dict[str, tuple[str, str, str]] = {
    "data": ("rlhfkit.data.convert", "ConvertConfig",
             "convert public data sets (oasst1, SHP, summarize-from-feedback, PKU-SafeRLHF, HelpSteer2) to rlhfkit's formats"),
    "sft": ("rlhfkit.policy.sft", "SFTConfig", "supervised fine-tuning on demonstrations (prompt/completion or messages)"),
    "reward": ("rlhfkit.reward.train", "RewardConfig", "reward model (or ensemble) on preference pairs and K-way rankings"),
    "ppo": ("rlhfkit.policy.ppo", "PPOConfig", "PPO against a reward model (or GRPO / RLOO / REINFORCE), KL-penalised to the reference"),
    "best-of-n": ("rlhfkit.policy.best_of_n", "BestOfNConfig", "sample n responses per prompt, keep the reward model's favourite"),
    "dpo": ("rlhfkit.policy.dpo", "DPOConfig", "preference optimisation without a reward model: DPO, cDPO, IPO, SimPO, KTO, ORPO"),
    "online-dpo": ("rlhfkit.policy.online_dpo", "OnlineDPOConfig",
                   "iterative DPO: each round samples pairs from the policy, a reward model labels them, DPO trains"),
    "rounds": ("rlhfkit.rounds", "RoundsConfig",
               "human-in-the-loop rounds: sample -> label (people, simulated, AI) -> reward refit -> policy, resumable"),
    "label": ("rlhfkit.label", "LabelConfig",
              "human feedback: create projects, add users, serve the labelling app, export, simulate annotators"),
    "cai": ("rlhfkit.cai", "CAIConfig",
            "Constitutional AI: critique -> revision SFT data, and AI preference labels (RLAIF) from a judge"),
    "eval": ("rlhfkit.eval.winrate", "EvalConfig",
             "win rate of a policy against a baseline (AI judge, reward model or gold), position-swapped, with a CI"),
    "serve": ("rlhfkit.serve", "ServeConfig", "OpenAI-compatible HTTP server (completions, chat, logprobs, streaming)"),
    "demo": ("rlhfkit.pipeline", "DemoConfig", "the built-in playground pipeline end to end on a CPU"),
    "plan": ("rlhfkit.plan", "PlanConfig",
             "per-GPU memory of a stage under DDP, FSDP, ZeRO-2/3, LoRA, QLoRA, from the model's shape (no GPU)"),
}


def _usage() -> str:
    width = max(len(n) for n in STAGES)
    lines = [
        f"rlhfkit {__version__}: reinforcement learning from human feedback, end to end.",
        "",
        "usage: rlhfkit <stage> [--config FILE.yaml] [--key value ...]",
        "       rlhfkit <stage> --help      (every field of that stage, with its documentation)",
        "",
        "stages:",
    ]
    lines += [f"  {name.ljust(width)}  {summary}" for name, (_, _, summary) in STAGES.items()]
    return "\n".join(lines) + "\n"


def _load_stage(name: str) -> tuple[Any, type]:
    module_name, cls_name, _ = STAGES[name]
    module = importlib.import_module(module_name)
    return module, getattr(module, cls_name)


def _leave_process_group() -> bool:
    """Under `accelerate launch`, leave the process group before the interpreter exits. Left to interpreter
    teardown, gloo's threads can be destroyed while still joinable, and one process of a 2-process CPU run
    aborted ("terminate called without an active exception") after its work was done. True when a group was
    left."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        return True
    return False


def _exit_launched_process(code: int) -> None:
    """End a process started by `accelerate launch` / torchrun once its work is done and saved, without the
    interpreter's teardown. Leaving the process group was not enough: objects that outlive it (a device mesh, a
    sharded module's pending work) still own gloo threads, and destroying them while the interpreter clears its
    modules aborted one process of a finished 2-process CPU run now and then (SIGABRT, "terminate called without
    an active exception"), which fails the whole launch. Everything a normal exit does for the user still runs
    first, while the interpreter is whole: the atexit handlers (trackers, logging), then the streams are flushed.
    Only in a launched process: a command run in-process (tests, notebooks) returns normally."""
    if not os.environ.get("TORCHELASTIC_RUN_ID"):
        return
    import atexit

    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing left to flush into
            pass
    os._exit(code)


def _quiet_deepspeed_on_cpu() -> None:
    """Accelerate imports DeepSpeed whenever it is installed, and DeepSpeed then warns on every command of a
    machine without a GPU that it chose its CPU accelerator. Name that choice for it (what it would pick anyway).
    Only when DeepSpeed is installed and the choice is not named already."""
    if "DS_ACCELERATOR" in os.environ or importlib.util.find_spec("deepspeed") is None:
        return
    import torch

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in STAGES:
        import difflib

        close = difflib.get_close_matches(name, list(STAGES), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        sys.stderr.write(f"rlhfkit: unknown stage '{name}'.{hint} Stages: {', '.join(STAGES)}.\n")
        return 2
    # one process speaks: under `accelerate launch` the others only report warnings
    level = os.environ.get("RLHFKIT_LOG", "INFO") if os.environ.get("RANK", "0") == "0" else "WARNING"
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # bitsandbytes (imported with peft) warns on every command that an optional CPU 4-bit kernel package is absent
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    _quiet_deepspeed_on_cpu()
    try:
        module, cfg_cls = _load_stage(name)
        if "-h" in rest or "--help" in rest:
            sys.stdout.write(format_help(cfg_cls, f"rlhfkit {name}", STAGES[name][2]))
            return 0
        # a stage may bring its own argv shape (`rlhfkit label create ...` puts a command first)
        parse = getattr(module, "parse_stage_args", None)
        cfg = parse(rest) if parse is not None else parse_args(cfg_cls, rest, prog=f"rlhfkit {name}")
        module.main(cfg)
        if _leave_process_group():
            _exit_launched_process(0)
    except UserError as exc:
        sys.stderr.write(f"rlhfkit {name}: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"rlhfkit {name}: interrupted; rerun with --resume to continue from the last checkpoint.\n")
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
