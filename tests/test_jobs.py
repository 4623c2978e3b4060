"""The demo's job runner: dependency order, results handed on, stages side by side in worker processes, the
rerun rule, and one clear error for a failed stage."""

import json
import os
import signal
import time

import pytest

from rlhfkit.errors import UserError
from rlhfkit.jobs import Done, Job, Result, run_jobs


def add(a, b):
    return a + b


def stamp(path, name, seconds):
    """Write when this job ran; the side-by-side test reads the intervals."""
    start = time.time()
    time.sleep(seconds)
    with open(path, "a") as f:
        f.write(json.dumps({"name": name, "start": start, "end": time.time()}) + "\n")
    return name


def reused(value):
    return Done(value, ran=False)


def record_redo(value, redo=False):
    return (value, redo)


def fail_user():
    print("something the stage printed before failing")
    raise UserError("the data file has no rows; pass --data with a non-empty file")


def fail_bug():
    return 1 / 0


def killed():
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize("workers", [1, 2])
def test_results_flow_along_dependencies(workers):
    jobs = [Job("c", add, (Result("a"), Result("b"))), Job("a", add, (1, 2)), Job("b", add, (Result("a"), 10))]
    results, wall = run_jobs(jobs, workers=workers)
    assert results == {"a": 3, "b": 13, "c": 16}
    assert set(wall) == {"a", "b", "c"}


def torch_threads(seconds=0.0):
    import torch

    time.sleep(seconds)
    return torch.get_num_threads()


def test_a_job_alone_gets_every_core_and_side_by_side_jobs_share_them(monkeypatch):
    """first runs alone (nothing else ready): nothing can start beside it, so it has both cores; x and y run
    together on one each; last, alone again, has both."""
    import rlhfkit.jobs as jobs_module

    monkeypatch.setattr(jobs_module, "available_cores", lambda: 2)
    jobs = [Job("first", torch_threads), Job("x", torch_threads, (0.5,), needs=("first",)),
            Job("y", torch_threads, (0.5,), needs=("first",)), Job("last", torch_threads, needs=("x", "y"))]
    results, _ = run_jobs(jobs, workers=2)
    assert results == {"first": 2, "x": 1, "y": 1, "last": 2}


def test_independent_jobs_run_side_by_side_and_dependents_after(tmp_path):
    log = tmp_path / "times.jsonl"
    jobs = [Job("x", stamp, (str(log), "x", 1.5)), Job("y", stamp, (str(log), "y", 1.5)),
            Job("z", stamp, (str(log), "z", 0.0), needs=("x", "y"))]
    run_jobs(jobs, workers=2, threads=1)
    t = {r["name"]: r for r in map(json.loads, log.read_text().splitlines())}
    assert t["x"]["start"] < t["y"]["end"] and t["y"]["start"] < t["x"]["end"]  # overlapped
    assert t["z"]["start"] >= max(t["x"]["end"], t["y"]["end"])


@pytest.mark.parametrize("workers", [1, 2])
def test_a_stage_downstream_of_one_that_ran_is_told_to_redo(workers):
    jobs = [Job("cached", reused, (1,)), Job("fresh", add, (1, 1)),
            Job("after_cached", record_redo, (Result("cached"),), redo=True),
            Job("after_fresh", record_redo, (Result("fresh"),), redo=True),
            Job("after_both", record_redo, (0,), needs=("cached", "fresh"), redo=True)]
    results, wall = run_jobs(jobs, workers=workers)
    assert results["after_cached"] == (1, False) and results["after_fresh"] == (2, True)
    assert results["after_both"] == (0, True)
    assert "cached" not in wall and "fresh" in wall  # wall seconds only for what ran
    results, _ = run_jobs(jobs, workers=workers, rebuild=True)
    assert results["after_cached"] == (1, True)


def test_a_failed_stage_names_itself_and_its_log_and_stops_the_rest(tmp_path):
    never = tmp_path / "never.jsonl"
    jobs = [Job("bad", fail_user), Job("later", stamp, (str(never), "later", 0.0), needs=("bad",))]
    with pytest.raises(UserError, match=r"demo stage bad: the data file has no rows; pass --data .*bad\.log"):
        run_jobs(jobs, workers=2, log_dir=tmp_path / "logs")
    assert "something the stage printed" in (tmp_path / "logs" / "bad.log").read_text()
    assert not never.exists()
    # a bug is not the user's: its traceback comes back
    with pytest.raises(RuntimeError, match=r"(?s)demo stage oops failed.*ZeroDivisionError"):
        run_jobs([Job("oops", fail_bug)], workers=2)
    # in one process the error is raised as it is
    with pytest.raises(UserError, match="the data file has no rows"):
        run_jobs(jobs, workers=1)


def test_a_worker_killed_from_outside_fails_the_demo_instead_of_hanging(tmp_path):
    never = tmp_path / "never.jsonl"
    jobs = [Job("victim", killed), Job("later", stamp, (str(never), "later", 0.0), needs=("victim",))]
    with pytest.raises(RuntimeError, match="demo stage victim: its worker process died .* --workers 1"):
        run_jobs(jobs, workers=2)
    assert not never.exists()


def test_bad_job_graphs_are_refused_before_anything_runs():
    with pytest.raises(ValueError, match="unknown jobs"):
        run_jobs([Job("a", add, (Result("missing"), 1))])
    with pytest.raises(ValueError, match="cycle"):
        run_jobs([Job("a", add, (Result("b"), 1)), Job("b", add, (Result("a"), 1))])
    with pytest.raises(ValueError, match="repeat"):
        run_jobs([Job("a", add, (1, 1)), Job("a", add, (1, 1))])
