"""What a run records, built the same way by the loop and the seed ensemble: the logged train record, the final
summary, and the CKA-over-training history of the shared representation.

:func:`train_record` turns a step's device metrics (host copies) into the ``train/`` record of ``metrics.jsonl``;
:func:`summary` assembles ``summary.json``; :class:`RepresentationTracker` keeps the shared representation of a fixed
eval subset at every evaluation (one ``representations/<step>.npy`` snapshot each when given a folder, so that a
resumed run's matrix covers the evaluations before the interruption) and reports the ``(K, K)`` CKA between them.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from corrjax.train import evaluate, writers


def train_record(metrics: Mapping[str, Any], *, examples_per_s: float, nonfinite_total: int) -> dict[str, Any]:
    """The ``train/`` record of a logged step from its host metrics (the step's ``train/finite`` flag dropped)."""
    record = {k: v for k, v in metrics.items() if k != "train/finite"}
    record["train/examples_per_s"] = float(examples_per_s)
    record["train/nonfinite_total"] = int(nonfinite_total)
    return record


class RepresentationTracker:
    """The shared representation at every evaluation, for the CKA over training.

    Args:
      folder: where snapshots go (``<folder>/<step>.npy``); None keeps them in memory only.
      write: whether this process writes the snapshots (process 0).
    """

    def __init__(self, folder: str | Path | None = None, *, write: bool = True) -> None:
        self.folder = None if folder is None else Path(folder)
        self.write = write
        self.history: list[tuple[int, np.ndarray]] = []

    def load(self, last_step: int) -> None:
        """Recovers the snapshots up to ``last_step`` (a resumed run's checkpoint step, 0 when there was none) and
        drops those past it (an interrupted attempt's, as ``metrics.jsonl`` drops its records past the checkpoint)."""
        if self.folder is None or not self.folder.is_dir():
            return
        self.history = writers.load_snapshots(self.folder, last_step)
        if self.write:
            writers.truncate_snapshots(self.folder, last_step)

    def add(self, step: int, shared: np.ndarray) -> None:
        """Records the representation at ``step`` (replacing one at the same step: a finished run re-evaluated)."""
        if self.history and self.history[-1][0] == step:
            self.history.pop()
        self.history.append((int(step), np.asarray(shared)))
        if self.folder is not None and self.write:
            writers.save_snapshot(self.folder, step, self.history[-1][1])

    def summary(self) -> dict[str, Any]:
        """``eval/shared_cka_steps`` and ``eval/shared_cka_over_training`` once there are two evaluations."""
        if len(self.history) < 2:
            return {}
        return {
            "eval/shared_cka_steps": [k for k, _ in self.history],
            "eval/shared_cka_over_training": evaluate.cka_over_training([r for _, r in self.history]),
        }


def summary(
    *,
    step: int,
    completed: bool,
    num_params: int,
    nonfinite_total: int,
    wall_time_s: float,
    tasks: Sequence[str],
    last_train: Mapping[str, Any],
    last_eval: Mapping[str, Any],
    tracker: RepresentationTracker | None = None,
    signum: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The final summary of a run: where it ended, why, its size and the last train and eval records (``extra``
    keys, such as an ensemble member's ``seed``, are added as given)."""
    out: dict[str, Any] = {
        "step": int(step),
        "completed": bool(completed),
        "stopped_by_signal": signal.Signals(signum).name if signum else None,
        "num_params": int(num_params),
        "nonfinite_total": int(nonfinite_total),
        "wall_time_s": float(wall_time_s),
        "tasks": list(tasks),
        **extra,
        **last_train,
        **last_eval,
    }
    if tracker is not None:
        out.update(tracker.summary())
    return out


class Throughput:
    """Examples per second over the steps since the last :meth:`rate` call."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = int(batch_size)
        self._start, self._steps = time.perf_counter(), 0

    def tick(self) -> None:
        """Counts one step."""
        self._steps += 1

    def rate(self) -> float:
        """Examples per second since the previous call (or creation), then starts a new window."""
        now = time.perf_counter()
        out = self._steps * self.batch_size / max(now - self._start, 1e-9)
        self._start, self._steps = now, 0
        return out
