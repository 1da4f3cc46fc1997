"""Metric writers of process 0: ``metrics.jsonl`` (one JSON object per logged step), TensorBoard, ``summary.json``.

Metrics arrive as flat ``{name: value}`` dicts with names like ``train/loss`` or ``eval/<task>/accuracy``; values
are Python/NumPy scalars or small arrays (the task-gradient cosine matrix, correlation matrices), which go to the
JSON files as nested lists and are left out of TensorBoard's scalar summaries. Non-finite numbers are written as
``null`` so the files stay strict JSON.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np


def to_jsonable(value: Any) -> Any:
    """NumPy/JAX scalars and arrays -> floats/ints/nested lists; NaN/inf -> None."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (str, bool)) or value is None:
        return value
    arr = np.asarray(value)
    if arr.ndim:
        return [to_jsonable(v) for v in arr]
    if np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.bool_):
        return arr.item()
    x = float(arr)
    return x if math.isfinite(x) else None


class MetricsWriter:
    """Appends logged steps to ``metrics.jsonl`` and, optionally, TensorBoard event files in ``run_dir/tb``."""

    def __init__(
        self, run_dir: str | Path, *, jsonl: bool = True, tensorboard: bool = True, purge_step: int | None = None
    ) -> None:
        """``purge_step``: a resumed run's first new step; TensorBoard hides the earlier attempt's events from that
        step on (``metrics.jsonl`` is truncated by :func:`truncate_jsonl` instead)."""
        self.run_dir = Path(run_dir)
        self._jsonl = (self.run_dir / "metrics.jsonl").open("a") if jsonl else None
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir=str(self.run_dir / "tb"), purge_step=purge_step)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": int(step), **to_jsonable(metrics)}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                arr = np.asarray(value)
                if arr.ndim == 0 and np.issubdtype(arr.dtype, np.number):
                    self._tb.add_scalar(key, float(arr), global_step=int(step))

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def truncate_jsonl(path: str | Path, last_step: int) -> None:
    """Drops records with ``step > last_step`` (a resumed run rewrites the steps after its checkpoint)."""
    path = Path(path)
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in keep))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def write_summary(run_dir: str | Path, summary: dict[str, Any]) -> Path:
    """Writes ``summary.json`` (final metrics, ``eval/loss`` and ``eval/<task>/<metric>``)."""
    path = Path(run_dir) / "summary.json"
    path.write_text(json.dumps(to_jsonable(summary), indent=2, sort_keys=True) + "\n")
    return path


def save_snapshot(folder: str | Path, step: int, array: np.ndarray) -> None:
    """Writes one ``(step, array)`` snapshot (the shared representation of the CKA over training) as
    ``folder/<step>.npy``, so a resumed run can recover what it had gathered; one small file per evaluation, nothing
    rewritten."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{int(step)}.npy.tmp"
    with tmp.open("wb") as f:
        np.save(f, np.asarray(array))
    tmp.replace(folder / f"{int(step)}.npy")


def load_snapshots(folder: str | Path, last_step: int) -> list[tuple[int, np.ndarray]]:
    """The :func:`save_snapshot` pairs with ``step <= last_step``, in step order ([] when there are none)."""
    folder = Path(folder)
    steps = sorted(int(p.stem) for p in folder.glob("*.npy") if p.stem.isdigit()) if folder.is_dir() else []
    return [(k, np.load(folder / f"{k}.npy")) for k in steps if k <= last_step]
