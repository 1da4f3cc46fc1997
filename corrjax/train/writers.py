"""Metric writers of process 0: ``metrics.jsonl`` (one JSON object per logged step), TensorBoard, ``summary.json``.

Metrics arrive as flat ``{name: value}`` dicts with names like ``train/loss`` or ``eval/<task>/accuracy``; values
are Python/NumPy scalars or small arrays (the task-gradient cosine matrix, correlation matrices), which go to the
JSON files as nested lists and are left out of TensorBoard's scalar summaries. Non-finite numbers are written as
``null`` so the files stay strict JSON.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


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


class JsonlAppender:
    """Appends one JSON object per line to a file, each line with a single ``os.write`` on an ``O_APPEND``
    descriptor: a line reaches the file whole or (after a kill inside the write) as a torn last line that
    :func:`truncate_jsonl` and :func:`read_jsonl` drop; never interleaved with another writer's bytes, never left in
    a user-space buffer. ``fsync`` is left to :meth:`close` (a kill loses nothing the kernel has; a power cut may)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def append(self, record: dict[str, Any]) -> None:
        if self._fd is None:
            raise ValueError(f"{self.path} is closed")
        data = (json.dumps(record) + "\n").encode()
        written = os.write(self._fd, data)
        while written < len(data):  # a short write (a full disk, a signal): finish the line, do not start another
            written += os.write(self._fd, data[written:])

    def close(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class MetricsWriter:
    """Appends logged steps to ``metrics.jsonl`` (:class:`JsonlAppender`) and, optionally, TensorBoard event files in
    ``run_dir/tb``."""

    def __init__(
        self, run_dir: str | Path, *, jsonl: bool = True, tensorboard: bool = True, purge_step: int | None = None
    ) -> None:
        """``purge_step``: a resumed run's first new step; TensorBoard hides the earlier attempt's events from that
        step on (``metrics.jsonl`` is truncated by :func:`truncate_jsonl` instead)."""
        self.run_dir = Path(run_dir)
        self._jsonl = JsonlAppender(self.run_dir / "metrics.jsonl") if jsonl else None
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir=str(self.run_dir / "tb"), purge_step=purge_step)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": int(step), **to_jsonable(metrics)}
        if self._jsonl is not None:
            self._jsonl.append(record)
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


def _parse_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """``(line, record)`` pairs of a JSON-lines file. A last line that does not parse (a record torn by a kill
    inside its write) is dropped with a warning; an unparsable line before the last raises ``ValueError`` naming the
    file and line (that is not what a kill leaves, and dropping it would hide lost records)."""
    text = path.read_text()
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line:
            continue
        try:
            out.append((line, json.loads(line)))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                log.warning("%s: dropping a torn last line (%d bytes; a run killed while writing it)", path, len(line))
                continue
            raise ValueError(f"{path}:{i + 1}: not a JSON record ({e}); fix or remove that line") from e
    return out


def truncate_jsonl(path: str | Path, last_step: int) -> None:
    """Drops records with ``step > last_step`` (a resumed run rewrites the steps after its checkpoint) and a torn
    last line; the file is replaced atomically (a temporary file renamed over it), so a kill leaves the old or the
    new file, never a half-written one."""
    path = Path(path)
    if not path.exists():
        return
    keep = [line for line, record in _parse_lines(path) if record["step"] <= last_step]
    write_atomic(path, "".join(line + "\n" for line in keep))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (a torn last line dropped, see :func:`truncate_jsonl`)."""
    return [record for _, record in _parse_lines(Path(path))]


def write_atomic(path: str | Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file in the same folder, fsynced and renamed over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_summary(run_dir: str | Path, summary: dict[str, Any]) -> Path:
    """Writes ``summary.json`` (final metrics, ``eval/loss`` and ``eval/<task>/<metric>``), atomically."""
    path = Path(run_dir) / "summary.json"
    write_atomic(path, json.dumps(to_jsonable(summary), indent=2, sort_keys=True) + "\n")
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


def truncate_snapshots(folder: str | Path, last_step: int) -> None:
    """Deletes the :func:`save_snapshot` files with ``step > last_step`` (a resumed run evaluates those steps again)
    and temporary files a kill left."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        step = path.name.split(".", 1)[0]
        if path.name.endswith(".npy.tmp") or (path.suffix == ".npy" and step.isdigit() and int(step) > last_step):
            path.unlink()
