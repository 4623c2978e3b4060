"""The plumbing every trainer shares and nothing algorithmic: run directory, Accelerator, optimizer and
schedule, resume, metrics, progress bar, checkpoints. Trainers call it; the training loop stays in the trainer."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from rlhfkit.compat import reset_accelerator_state
from rlhfkit.config import TrainConfig, load_yaml, save_config, to_dict
from rlhfkit.errors import ConfigError, UserError
from rlhfkit.train.checkpoint import checkpoint_dirs, latest_intact_checkpoint, load_checkpoint, save_checkpoint
from rlhfkit.train.metrics import MetricsLogger, check_finite
from rlhfkit.train.sampler import EpochSampler
from rlhfkit.train.seeding import set_seed
from rlhfkit.train import sharding, zero

log = logging.getLogger(__name__)

# Keys that may change between a run and its resume without breaking exactness.
RESUME_MAY_CHANGE = {"resume", "max_steps", "progress", "log_every", "save_every", "keep_checkpoints",
                     "eval_every", "report_to", "overwrite"}
# Test hook: SIGKILL this process right after optimizer step N (after its checkpoint, if one is due).
KILL_ENV = "RLHFKIT_KILL_AFTER_STEP"


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _same_value(a: Any, b: Any) -> bool:
    """Config values equal, a path given as ./r1 or as /abs/.../r1 included (both name the same place)."""
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str) and a and b and (os.sep in a + b or a.startswith(".")):
        return os.path.realpath(a) == os.path.realpath(b)
    return False


def lr_lambda(schedule: str, warmup: int, total: int):
    def fn(step: int) -> float:  # step counts optimizer steps already taken
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":  # lm-human-preferences anneals the learning rate linearly to 0
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


class Run:
    """One training run in cfg.output_dir. Create it first thing in a stage's main(cfg)."""

    def __init__(self, cfg: TrainConfig, stage: str):
        from accelerate import Accelerator

        cfg.validate()
        self.cfg, self.stage = cfg, stage
        self.dir = Path(cfg.output_dir)
        mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.precision]
        # Accelerate only forms a gloo process group on a GPU-less host when told cpu=True; without it each
        # process launched by `accelerate launch --multi_gpu` would silently train alone.
        multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
        cpu = cfg.cpu or (multi and not torch.cuda.is_available())
        self._ds_launch = zero.launcher_uses_deepspeed()
        self.zero = zero.stage_wanted(cfg.sharding)
        self._zero_section = zero.zero_section_from_launcher() if self._ds_launch else None
        if self.zero:
            zero.check_usable(cfg, self.zero)
            if not torch.cuda.is_available():
                os.environ.setdefault("DS_ACCELERATOR", "cpu")
        reset_accelerator_state()  # an earlier run in this process must not fix this run's precision
        # rlhfkit builds the DeepSpeed engine itself (train.zero); Accelerate only forms the process group, so it
        # is not shown the launcher's DeepSpeed flag (restored after: a later run in this process, such as online
        # DPO's next round, reads it again)
        hidden = os.environ.pop("ACCELERATE_USE_DEEPSPEED", None) if self._ds_launch else None
        try:
            self.accelerator = Accelerator(cpu=cpu, mixed_precision=mixed)
        finally:
            if hidden is not None:
                os.environ["ACCELERATE_USE_DEEPSPEED"] = hidden
        if cpu and multi and "OMP_NUM_THREADS" not in os.environ:
            # N processes x all-cores threads each oversubscribe the CPU; OpenMP spin-waiting then makes every
            # step many times slower. Split the cores between the processes instead.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["WORLD_SIZE"])))
        self.is_main = self.accelerator.is_main_process
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.fsdp = self._use_fsdp()
        if self.zero and self.world == 1:
            if zero.offloads_optimizer(self._zero_section):
                log.warning("DeepSpeed ZeRO: one process, so rlhfkit trains unsharded and without the launch "
                            "config's CPU offload (rlhfkit runs DeepSpeed with 2 or more processes)")
            else:
                log.info("DeepSpeed ZeRO: one process, nothing to partition; training unsharded")
            self.zero = 0
        self.skeleton: sharding.Skeleton | None = None
        self.resume_from = self._check_run_dir()
        set_seed(cfg.seed)
        if self.is_main:
            save_config(cfg, self.dir / "config.yaml")
        self.accelerator.wait_for_everyone()
        self.metrics = MetricsLogger(
            self.dir, cfg.report_to, enabled=self.is_main,
            resume_step=self._resume_step(), run_name=f"{stage}:{self.dir.name}", config=to_dict(cfg),
        )
        self._bar = None
        self._start_time = time.time()
        self._kill_after = int(os.environ.get(KILL_ENV, "0") or 0)

    @property
    def layout(self) -> str:
        """How checkpoints hold the model and optimizer: whole ("full"), FSDP shards, or DeepSpeed partitions."""
        return "fsdp" if self.fsdp else "deepspeed" if self.zero else "full"

    def _use_fsdp(self) -> bool:
        wanted = self.cfg.sharding == "fsdp" or (self.cfg.sharding == "auto" and sharding.fsdp_from_launcher())
        if (wanted and self.zero) or (self.zero and sharding.fsdp_from_launcher()) or (
                self.cfg.sharding == "fsdp" and self._ds_launch):
            raise UserError(f"--sharding {self.cfg.sharding} contradicts the launch config (FSDP and DeepSpeed "
                            "cannot both shard one run); use --sharding auto to follow the launch config.")
        if wanted:
            sharding.check_shardable(self.cfg)
        if wanted and self.world == 1:
            log.info("sharding: one process, nothing to shard; training unsharded")
            return False
        if wanted and os.environ.get("FSDP_VERSION", "2") != "2":
            log.warning("the launch config asks for FSDP version %s; rlhfkit shards with FSDP2 (fully_shard)",
                        os.environ["FSDP_VERSION"])
        return wanted

    # ------------------------------------------------------------------------------------------- run dir
    def _check_run_dir(self) -> Path | None:
        """What --output-dir holds decides how the run starts: nothing (start), a run stopped before its first
        checkpoint (nothing to lose: start again, with or without --resume), checkpoints (--resume continues from
        the newest intact one, falling back past damaged ones), or a finished run (--resume or --overwrite)."""
        cfg = self.cfg
        if self.dir.exists() and not self.dir.is_dir():
            raise UserError(f"--output-dir {self.dir} is a file, not a directory; choose another --output-dir.")
        overwrite = getattr(cfg, "overwrite", False)
        if cfg.resume and overwrite:
            raise ConfigError("--resume and --overwrite contradict each other: --resume continues the run in "
                              "output_dir, --overwrite replaces it; pass one of them.")
        has_run = (self.dir / "config.yaml").exists()
        finished = (self.dir / "summary.json").exists() or (self.dir / "config.json").exists()
        if cfg.resume:
            ckpt, damaged = latest_intact_checkpoint(self.dir)  # verifies checksums: only when resuming
            for line in damaged:
                log.warning("--resume: skipping damaged checkpoint %s", line)
            if ckpt is None:
                if damaged:
                    raise UserError(f"--resume: no intact checkpoint in {self.dir} ({damaged[-1]}); start again "
                                    "with --overwrite.")
                if finished:
                    raise UserError(f"--resume: {self.dir} holds a finished run with no checkpoint to continue "
                                    "from; set save_every > 0 next time, or start again with --overwrite.")
                if has_run:
                    log.warning("--resume: %s holds a run stopped before its first checkpoint; starting it again "
                                "from step 0", self.dir)
                else:
                    log.warning("--resume given but %s holds no run yet; starting from scratch", self.dir)
                return None
            saved = load_yaml(self.dir / "config.yaml")
            self._check_same_config(saved)
            step = self._checkpoint_step(ckpt)
            if step > cfg.max_steps:
                raise UserError(f"--resume: the newest checkpoint of {self.dir} is at step {step}, past --max-steps "
                                f"{cfg.max_steps}; a run cannot be shortened after the fact. Raise --max-steps to "
                                f"{step} or more, or start again with --overwrite.")
            self._saved_max_steps = int(saved.get("max_steps", cfg.max_steps))
            return ckpt
        if has_run and not overwrite:
            if not checkpoint_dirs(self.dir) and not finished:
                log.warning("%s holds a %s run stopped before its first checkpoint (nothing to resume); starting "
                            "it again", self.dir, self.stage)
                return None
            raise UserError(
                f"{self.dir} already holds a {self.stage} run; pass --resume to continue it, --overwrite to "
                "replace it, or choose another --output-dir."
            )
        if has_run and overwrite and self.is_main:
            import shutil

            shutil.rmtree(self.dir / "checkpoints", ignore_errors=True)
        return None

    @staticmethod
    def _checkpoint_step(ckpt: Path) -> int:
        import json

        return int(json.loads((ckpt / "trainer_state.json").read_text())["step"])

    def _check_same_config(self, saved: dict[str, Any]) -> None:
        now, before = _flatten(to_dict(self.cfg)), _flatten(saved)
        changed = sorted(k for k in now.keys() | before.keys()
                         if k.split(".")[0] not in RESUME_MAY_CHANGE and not _same_value(now.get(k), before.get(k)))
        if changed:
            detail = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:5])
            raise ConfigError(
                f"--resume: the config differs from the one {self.dir} was started with ({detail}); resume with "
                "the same settings (only max_steps, logging and checkpoint cadence may change)."
            )

    def _resume_step(self) -> int | None:
        if self.resume_from is None:
            return None
        import json

        return json.loads((self.resume_from / "trainer_state.json").read_text())["step"]

    # --------------------------------------------------------------------------------------- optimisation
    def optimizer_and_schedule(self, model: torch.nn.Module) -> tuple[torch.optim.Optimizer, Any]:
        cfg = self.cfg
        params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]  # norms and biases are not decayed
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if self.zero:  # DeepSpeed drops empty groups (LoRA has no biases), which the schedule must not count
            groups = [g for g in groups if g["params"]]
        if self.zero and zero.offloads_optimizer(self._zero_section):
            # ZeRO-Offload steps the optimizer on the CPU: DeepSpeed's vectorised CPU AdamW (the same update as
            # torch's AdamW up to float rounding; built on first use)
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                         eps=cfg.adam_eps, adamw_mode=True)
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lr_lambda(cfg.lr_schedule, cfg.warmup_steps, cfg.max_steps))
            return optimizer, scheduler
        optimizer = torch.optim.AdamW(
            groups,
            lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
            # one fused kernel over all parameters instead of a loop of small ops per tensor (Hugging Face
            # Trainer's default optimizer too); the same update up to float rounding. Sharded (DTensor)
            # parameters take the multi-tensor path.
            **({"foreach": True} if self.fsdp or self.zero else {"fused": True}),
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(cfg.lr_schedule, cfg.warmup_steps, cfg.max_steps)
        )
        return optimizer, scheduler

    def prepare(self, *objs: Any) -> Any:
        return self.accelerator.prepare(*objs)

    def resume(self, model: Any, optimizer: Any, scheduler: Any, restore_rng: bool = True) -> dict[str, Any] | None:
        """Load the newest complete checkpoint when --resume found one; returns its trainer_state or None."""
        if self.resume_from is None:
            return None
        try:
            state = load_checkpoint(self.resume_from, self.accelerator, model, optimizer, scheduler, restore_rng,
                                    layout=self.layout)
        except (OSError, RuntimeError, ValueError, KeyError, EOFError) as exc:
            raise UserError(f"--resume: could not load {self.resume_from} ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}); delete that checkpoint directory to "
                            "resume from the one before, or start again with --overwrite.") from None
        if getattr(self, "_saved_max_steps", self.cfg.max_steps) != self.cfg.max_steps:
            # Extended (--max-steps raised on resume): the schedule is the one a run started with the new max_steps
            # follows, from the resumed step on; so the learning rate moves to that schedule's value here, at once
            # (a linear decay that had reached 0 starts again from its value at this step of the longer run).
            for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
                group["lr"] = base * fn(scheduler.last_epoch)
            scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
            log.info("--max-steps raised from %d to %d: the learning-rate schedule now spans %d steps",
                     self._saved_max_steps, self.cfg.max_steps, self.cfg.max_steps)
        log.info("resumed from %s (step %d)", self.resume_from, state["step"])
        return state

    def begin(self, model: Any, num_items: int) -> tuple[Any, Any, Any, EpochSampler, int]:
        """Optimizer and schedule, Accelerate wrapping, the data sampler, and --resume: everything a trainer does
        between building its model and its first step. Returns (model, optimizer, scheduler, sampler,
        start_step) with the progress bar started and the model in train mode."""
        if self.cfg.gradient_checkpointing:
            from rlhfkit.models import enable_gradient_checkpointing

            enable_gradient_checkpointing(model)
        if self.fsdp:
            # the optimizer must hold the sharded parameters, so it is made after fully_shard; the model is not
            # given to Accelerate (on a CPU it would wrap it in DDP)
            self.skeleton = sharding.Skeleton(model) if self.is_main else None
            sharding.shard(model, self.world, self.accelerator.device,
                           reshard_after_forward=sharding.reshard_from_launcher(True))
            optimizer, scheduler = self.optimizer_and_schedule(model)
        elif self.zero:
            # the LR schedule drives the optimizer's parameter groups, which DeepSpeed's ZeRO optimizer keeps
            self.skeleton = sharding.Skeleton(model) if self.is_main and self.zero == 3 else None
            optimizer, scheduler = self.optimizer_and_schedule(model)
            model, optimizer = zero.wrap(model, optimizer, self.cfg, self.zero, self._zero_section)
            log.info("DeepSpeed ZeRO-%d over %d processes", self.zero, self.world)
        else:
            optimizer, scheduler = self.optimizer_and_schedule(model)
            model, optimizer = self.prepare(model, optimizer)
        sampler = EpochSampler(num_items, self.cfg.seed)
        start_step = 0
        resumed = self.resume(model, optimizer, scheduler)
        self.resumed_state = resumed  # trainers restore their own controllers from it
        if resumed is not None:
            sampler.load_state_dict(resumed["sampler"])
            start_step = resumed["step"]
        self.progress(start_step)
        model.train()
        self.maybe_compile(self.accelerator.unwrap_model(model))
        return model, optimizer, scheduler, sampler, start_step

    def maybe_compile(self, module: Any) -> Any:
        """With cfg.compile, compile `module`'s forward in place (nn.Module.compile: the module, its parameters
        and its state_dict keys stay as they are, so saving, checkpoints and unwrap_model are unaffected)."""
        if self.cfg.compile and getattr(module, "_compiled_call_impl", None) is None:
            module.compile()
        return module

    @contextlib.contextmanager
    def micro_step(self, model: Any, index: int, count: int) -> Iterator[None]:
        """Context for micro-batch `index` of `count` in one optimizer step: gradients are all-reduced only
        on the last one (DDP no_sync), and autocast follows cfg.precision."""
        if self.fsdp:  # reduce-scatter the gradients only after the last micro-batch
            model.set_requires_gradient_sync(index == count - 1)
            sync = contextlib.nullcontext()
        elif self.zero:  # the engine accumulates until step_optimizer (managed_gradient_accumulation: false)
            sync = contextlib.nullcontext()
        else:
            sync = contextlib.nullcontext() if index == count - 1 else self.accelerator.no_sync(model)
        with sync, self.accelerator.autocast():
            yield

    def backward(self, model: Any, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss (gradients accumulate until step_optimizer)."""
        if self.zero:
            model.backward(loss, scale_wrt_gas=False)
        else:
            self.accelerator.backward(loss)

    def discard_gradients(self, model: Any, optimizer: Any) -> None:
        """Drop the gradients accumulated since the last optimizer step without taking it."""
        if self.zero:
            model.zero_grad()
        optimizer.zero_grad(set_to_none=True)

    def gathered(self, model: Any) -> Any:
        """Context for sampling and evaluation: a sharded model's weights gathered whole for the block (each
        process may then run any number of forwards); nothing for an unsharded one."""
        return zero.gathered(model) if self.zero else sharding.gathered(model)

    def gathered_all(self, models: list[Any]) -> Any:
        """`gathered` for several models at once (frozen networks sharded beside the trained one)."""
        return sharding.gathered_all(models, zero.gathered if self.zero else sharding.gathered)

    def all_sum(self, value: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(value, dtype=torch.float64, device=self.accelerator.device).clone()
        if self.world > 1:
            t = self.accelerator.reduce(t, reduction="sum")
        return t

    def shard(self, items: list[Any]) -> list[Any]:
        """This process's share of a global batch (strided, so every share has the same size)."""
        if len(items) % self.world:
            raise ValueError(f"global batch of {len(items)} does not split over {self.world} processes")
        return items[self.rank :: self.world]

    def step_optimizer(self, model: Any, optimizer: Any, scheduler: Any, step: int, advance_schedule: bool = True
                       ) -> float:
        """Clip, then step, unless the gradient is NaN/inf: then stop before the weights are corrupted, so the
        newest checkpoint is still a good place to resume from. Under DeepSpeed the engine's step reduces,
        clips and updates at once, so a non-finite norm stops the run after that update instead, before any
        checkpoint holds it."""
        if self.zero:
            grad_norm = zero.grad_norm_and_step(model)
            check_finite({"grad_norm": grad_norm}, step)
            if advance_schedule:
                scheduler.step()
            return grad_norm
        if self.fsdp:
            grad_norm = sharding.grad_norm(list(model.parameters()), self.cfg.max_grad_norm)
        elif self.cfg.max_grad_norm > 0:
            grad_norm = float(self.accelerator.clip_grad_norm_(model.parameters(), self.cfg.max_grad_norm))
        else:
            norms = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
            grad_norm = float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
        check_finite({"grad_norm": grad_norm}, step)
        optimizer.step()
        if advance_schedule:  # PPO takes several optimizer steps per rollout step and anneals per rollout step
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm

    # ------------------------------------------------------------------------------------ logging, saving
    def progress(self, start_step: int, desc: str | None = None) -> None:
        from tqdm.auto import tqdm

        import sys

        # in a log file (CI, nohup) a bar redrawn ten times a second is noise: redraw every 30 s there
        interval = 0.2 if sys.stderr.isatty() else 30.0
        self._bar = tqdm(total=self.cfg.max_steps, initial=start_step, desc=desc or self.stage, unit="step",
                         disable=not (self.cfg.progress and self.is_main), dynamic_ncols=True,
                         mininterval=interval)

    def log(self, step: int, metrics: dict[str, Any], headline: tuple[str, ...] = ()) -> None:
        """Guard against NaN/inf on every call; write to the sinks every log_every steps and at the end."""
        metrics = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
        check_finite(metrics, step)
        if step % self.cfg.log_every == 0 or step == self.cfg.max_steps or any(k.startswith("eval/") for k in metrics):
            metrics.setdefault("elapsed_s", round(time.time() - self._start_time, 3))
            self.metrics.log(step, metrics)
        if self._bar is not None and headline:
            self._bar.set_postfix({k: f"{metrics[k]:.4g}" for k in headline if k in metrics}, refresh=False)

    def end_step(self, step: int, model: Any, optimizer: Any, scheduler: Any,
                 trainer_state: dict[str, Any]) -> None:
        """Advance the bar, write a checkpoint when due, and honour the kill hook used by the resume tests."""
        if self._bar is not None:
            self._bar.update(1)
        if self.cfg.save_every and step % self.cfg.save_every == 0:
            save_checkpoint(self.dir, step, self.accelerator, model, optimizer, scheduler, trainer_state,
                            keep=self.cfg.keep_checkpoints, layout=self.layout)
        if self._kill_after and step == self._kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    def finish(self, model: Any, tokenizer: Any | None, summary: dict[str, Any] | None = None) -> None:
        """Save the final model in Hugging Face format into output_dir and close the sinks."""
        from rlhfkit.models import save_pretrained

        if self._bar is not None:
            self._bar.close()
        self.accelerator.wait_for_everyone()
        if self.fsdp:  # gathered to the main process and saved as the plain model
            state = sharding.full_state(model)
            model = self.skeleton.filled(state) if self.is_main else None
        elif self.zero == 3:
            state = zero.full_state(model)
            model = self.skeleton.filled(state) if self.is_main else None
        if self.is_main:
            save_pretrained(self.accelerator.unwrap_model(model), tokenizer, self.dir)
            if summary is not None:
                import json

                (self.dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self.metrics.close()
        self.accelerator.wait_for_everyone()
