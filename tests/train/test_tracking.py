"""The loop's small collaborators: the periodic-work rule, the representation tracker, the train record and the
summary builder shared by the loop and the ensemble."""

from __future__ import annotations

import signal

import numpy as np
import pytest

from corrjax.train import tracking
from corrjax.train.loop import every


@pytest.mark.parametrize(
    "period, last, want",
    [(3, 10, [3, 6, 9, 10]), (5, 10, [5, 10]), (1, 10, list(range(1, 11))), (0, 10, []), (4, None, [4, 8])],
)
def test_every_is_multiples_and_the_last_step(period, last, want):
    assert [s for s in range(1, 11) if every(s, period, last)] == want


def test_tracker_snapshots_resume_and_drop_the_interrupted_attempts(tmp_path):
    folder = tmp_path / "representations"
    first = tracking.RepresentationTracker(folder)
    for k in (2, 4, 6):
        first.add(k, np.full((5, 3), float(k), np.float32))
    first.add(6, np.full((5, 3), 6.0, np.float32))  # a finished run re-evaluated: replaced, not duplicated
    assert [k for k, _ in first.history] == [2, 4, 6]
    assert sorted(p.name for p in folder.iterdir()) == ["2.npy", "4.npy", "6.npy"]

    resumed = tracking.RepresentationTracker(folder)
    resumed.load(4)  # the checkpoint was at step 4: the snapshot at 6 belongs to the interrupted attempt
    assert [k for k, _ in resumed.history] == [2, 4]
    assert sorted(p.name for p in folder.iterdir()) == ["2.npy", "4.npy"]
    np.testing.assert_array_equal(resumed.history[1][1], np.full((5, 3), 4.0, np.float32))
    other = tracking.RepresentationTracker(folder, write=False)  # another process reads and removes nothing
    other.load(2)
    assert [k for k, _ in other.history] == [2] and len(list(folder.iterdir())) == 2


def test_tracker_summary_needs_two_evaluations():
    t = tracking.RepresentationTracker()
    rng = np.random.default_rng(0)
    t.add(3, rng.normal(size=(16, 4)))
    assert t.summary() == {}
    t.add(6, rng.normal(size=(16, 4)))
    out = t.summary()
    assert out["eval/shared_cka_steps"] == [3, 6]
    cka = np.asarray(out["eval/shared_cka_over_training"])
    assert cka.shape == (2, 2) and np.allclose(np.diag(cka), 1.0, atol=1e-5)


def test_train_record_and_summary():
    record = tracking.train_record(
        {"train/loss": 1.5, "train/finite": True}, examples_per_s=10.0, nonfinite_total=np.int32(2)
    )
    assert record == {"train/loss": 1.5, "train/examples_per_s": 10.0, "train/nonfinite_total": 2}
    summary = tracking.summary(
        step=4,
        completed=False,
        signum=signal.SIGTERM,
        num_params=7,
        nonfinite_total=2,
        wall_time_s=0.5,
        tasks=["a"],
        last_train=record,
        last_eval={"eval/loss": 0.25},
        seed=3,
    )
    assert summary["stopped_by_signal"] == "SIGTERM" and summary["seed"] == 3 and summary["eval/loss"] == 0.25
    assert summary["train/loss"] == 1.5 and summary["tasks"] == ["a"] and not summary["completed"]
