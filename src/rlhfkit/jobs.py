"""Dependency-ordered jobs, run side by side in worker processes (`rlhfkit demo --workers`).

The demo's stages train and sample tiny models, whose matrix products gain little from a second thread: on a
2-core machine one pretraining run took 17.4 s on two threads and 20.0 s on one, while two one-thread runs side by
side took 20.1 s together. So independent stages run at once, each in its own process on its share of the cores,
instead of one after another on all of them. With one worker every job runs in this process, in order.

A job is a module-level function with its arguments; `Result(name)` anywhere in the arguments stands for another
job's return value (and makes that job a dependency). A job that reuses a finished run returns `Done(value,
ran=False)`; a job declared with `redo=True` is called with `redo=` whether any job it needs ran, so a stage
downstream of one that just ran runs again even when its own config is unchanged."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rlhfkit.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Result:
    """Placeholder for the return value of job `name`."""

    name: str


@dataclass
class Done:
    """What a job may return instead of a plain value: ran=False when it reused a finished run; wall holds the
    seconds of named sub-stages it timed itself."""

    value: Any = None
    ran: bool = True
    wall: dict[str, float] = field(default_factory=dict)


@dataclass
class Job:
    name: str
    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    needs: tuple[str, ...] = ()
    """Jobs that must finish first, beside those named by Result placeholders."""
    redo: bool = False
    """Call fn with redo= (rebuild, or any needed job ran)."""


@dataclass
class _Failure:
    message: str
    user_error: bool
    trace: str


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_workers() -> int:
    """One worker per core, at most 4 (the demo rarely has more than four stages ready at once)."""
    return max(1, min(4, available_cores()))


def _refs(value: Any) -> set[str]:
    if isinstance(value, Result):
        return {value.name}
    if isinstance(value, (list, tuple)):
        return set().union(*map(_refs, value)) if value else set()
    if isinstance(value, dict):
        return set().union(*map(_refs, value.values())) if value else set()
    return set()


def _resolve(value: Any, results: dict[str, Any]) -> Any:
    if isinstance(value, Result):
        return results[value.name]
    if isinstance(value, list):
        return [_resolve(v, results) for v in value]
    if isinstance(value, tuple):
        return tuple(_resolve(v, results) for v in value)
    if isinstance(value, dict):
        return {k: _resolve(v, results) for k, v in value.items()}
    return value


def _dependencies(jobs: list[Job]) -> dict[str, set[str]]:
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"job names repeat: {sorted(n for n in set(names) if names.count(n) > 1)}")
    deps = {j.name: set(j.needs) | _refs(j.args) | _refs(j.kwargs) for j in jobs}
    for name, d in deps.items():
        unknown = d - set(names)
        if unknown:
            raise ValueError(f"job {name!r} needs unknown jobs {sorted(unknown)}")
    # a cycle would leave jobs that never become ready: find it before running anything
    done: set[str] = set()
    while len(done) < len(deps):
        ready = {n for n, d in deps.items() if n not in done and d <= done}
        if not ready:
            raise ValueError(f"jobs {sorted(set(deps) - done)} depend on each other in a cycle")
        done |= ready
    return deps


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # only settable before the first parallel region
        torch.set_num_interop_threads(1)
    # as in the CLI: bitsandbytes (imported with peft) warns in every process that an optional CPU kernel is absent;
    # the feedback store's schema migrations log each step at INFO
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _call(fn: Callable[..., Any], args: tuple, kwargs: dict, log_path: str | None, threads: int | None = None
          ) -> Any:
    """Run one job in a worker on `threads` torch threads (None: the worker's own), its output (prints,
    logging, progress bars) going to its log file. A failure comes back as a _Failure: an exception object may
    not survive pickling, its message and traceback do."""
    start = time.time()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    try:
        if log_path is None:
            out = fn(*args, **kwargs)
        else:
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "w", buffering=1) as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                handler = logging.StreamHandler(f)
                handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
                root = logging.getLogger()
                root.addHandler(handler)
                root.setLevel(logging.INFO)
                try:
                    out = fn(*args, **kwargs)
                finally:
                    root.removeHandler(handler)
    except BaseException as e:  # noqa: BLE001 -- reported to the parent, which raises it there
        return _Failure(str(e) or type(e).__name__, isinstance(e, UserError), traceback.format_exc()), 0.0
    return out, time.time() - start


def run_jobs(jobs: list[Job], workers: int = 1, threads: int | None = None, log_dir: Path | None = None,
             rebuild: bool = False, progress: bool = False) -> tuple[dict[str, Any], dict[str, float]]:
    """Run every job once its dependencies finished, up to `workers` at a time, ready jobs taken in the order
    given (so list the longest chain first). Returns each job's value and the wall seconds of those that ran (and
    of the sub-stages they timed). With workers > 1 each job runs in a spawned process on `threads` torch threads
    (default: the cores shared out), its output written to log_dir/<name>.log. The first failure stops the rest
    and is raised: a UserError as a UserError naming the job and its log, anything else as a RuntimeError with
    the worker's traceback."""
    deps = _dependencies(jobs)
    by_name = {j.name: j for j in jobs}
    results: dict[str, Any] = {}
    ran: dict[str, bool] = {}
    wall: dict[str, float] = {}
    pending = [j.name for j in jobs]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="demo", unit="stage")

    def arguments(job: Job) -> tuple[tuple, dict]:
        kwargs = _resolve(job.kwargs, results)
        if job.redo:
            kwargs = {**kwargs, "redo": rebuild or any(ran[d] for d in deps[job.name])}
        return _resolve(job.args, results), kwargs

    def finish(name: str, out: Any, seconds: float) -> None:
        if isinstance(out, _Failure):
            where = f" (its log: {log_dir / f'{name}.log'})" if log_dir is not None and workers > 1 else ""
            if out.user_error:
                raise UserError(f"demo stage {name}: {out.message}{where}")
            raise RuntimeError(f"demo stage {name} failed{where}:\n{out.trace}")
        done = out if isinstance(out, Done) else Done(out)
        results[name], ran[name] = done.value, done.ran
        wall.update(done.wall)
        if done.ran:
            wall[name] = round(seconds, 1)
        if bar is not None:
            bar.update(1)
        log.info("%s %s in %.1f s", name, "finished" if done.ran else "reused", seconds)

    try:
        if workers <= 1:
            while pending:
                name = next(n for n in pending if deps[n] <= set(results))  # the graph has no cycle
                pending.remove(name)
                args, kwargs = arguments(by_name[name])
                start = time.time()
                finish(name, by_name[name].fn(*args, **kwargs), time.time() - start)
            return results, wall
        cores = available_cores()
        threads = threads or max(1, cores // workers)
        # a pool that notices a worker killed from outside (out of memory, kill -9): the job fails with
        # BrokenProcessPool instead of waiting for an answer forever
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_worker_init, initargs=(threads,))
        running: dict[Future, str] = {}
        try:
            while pending or running:
                ready = [n for n in pending if deps[n] <= set(results)]
                for name in ready[: workers - len(running)]:
                    pending.remove(name)
                    args, kwargs = arguments(by_name[name])
                    path = str(log_dir / f"{name}.log") if log_dir is not None else None
                    # a job that starts with nothing beside it and nothing else ready has the machine to itself
                    # until it ends (only its end can make another job ready): it gets every core
                    alone = not running and len(ready) == 1
                    job_threads = max(threads, cores) if alone else threads
                    running[pool.submit(_call, by_name[name].fn, args, kwargs, path, job_threads)] = name
                    log.info("%s started (running: %s)", name, ", ".join(running.values()))
                    if bar is not None:
                        bar.set_postfix_str(", ".join(running.values()))
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    name = running.pop(future)
                    try:
                        out, seconds = future.result()
                    except BrokenProcessPool:
                        raise RuntimeError(f"demo stage {name}: its worker process died (killed from outside, or "
                                           "out of memory); rerun the demo to continue from the finished stages, "
                                           "with --workers 1 if memory is short") from None
                    finish(name, out, seconds)
        except BaseException:
            # stop the other stages now rather than after they finish (their finished runs are kept)
            for process in list(getattr(pool, "_processes", {}).values()):
                process.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        return results, wall
    finally:
        if bar is not None:
            bar.close()
