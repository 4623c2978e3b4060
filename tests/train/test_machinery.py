import json

import pytest

from rlhfkit.errors import TrainingDiverged
from rlhfkit.train import EpochSampler, check_finite, checkpoint_dirs, latest_checkpoint
from rlhfkit.train.metrics import truncate_jsonl
from rlhfkit.train.run import lr_lambda


def test_sampler_resumes_mid_epoch_exactly():
    a = EpochSampler(7, seed=3)
    first = a.next_indices(5)
    state = a.state_dict()
    rest = a.next_indices(12)  # crosses into epochs 1 and 2
    b = EpochSampler(7, seed=3)
    b.load_state_dict(state)
    assert b.next_indices(12) == rest
    assert sorted(first + rest[:2]) == list(range(7))  # epoch 0 is a permutation
    assert sorted(rest[2:9]) == list(range(7))  # so is epoch 1, in a different order
    assert rest[2:9] != first + rest[:2]


def test_sampler_refuses_different_data():
    a = EpochSampler(7, seed=3)
    b = EpochSampler(8, seed=3)
    with pytest.raises(ValueError, match="same data"):
        b.load_state_dict(a.state_dict())


def test_nan_guard_names_step_and_metric():
    check_finite({"loss": 1.0, "note": "x"}, step=3)
    with pytest.raises(TrainingDiverged, match=r"step 12: metric 'loss' is nan"):
        check_finite({"loss": float("nan")}, step=12)
    with pytest.raises(TrainingDiverged, match=r"metric 'kl' is inf"):
        check_finite({"loss": 0.0, "kl": float("inf")}, step=1)


def test_truncate_jsonl_drops_steps_after_the_checkpoint_and_torn_lines(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    truncate_jsonl(p, 3)
    assert [json.loads(line)["step"] for line in p.read_text().splitlines()] == [1, 2, 3]


def test_incomplete_checkpoint_dirs_are_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step-2", "step-10", ".tmp-step-12", "step-x"):
        (root / name).mkdir(parents=True)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-2", "step-10"]
    assert latest_checkpoint(tmp_path).name == "step-10"


def test_lr_schedules_by_hand():
    lin = lr_lambda("linear", warmup=2, total=10)
    assert [lin(s) for s in (0, 1, 2, 6, 10)] == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.0])
    cos = lr_lambda("cosine", warmup=0, total=10)
    assert [cos(s) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    assert lr_lambda("constant", 0, 10)(9) == 1.0
