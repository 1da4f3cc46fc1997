"""Metric writers of process 0: ``metrics.jsonl``, ``metrics.csv``, TensorBoard, and ``summary.json``.

Every destination of a run's metrics is a :class:`Writer`: ``write_scalars(step, {name: value})``,
``write_image(step, name, image)``, ``write_hparams(hparams)``, ``write_summary(summary)``, ``flush()`` and
``close()``. Here: :class:`JsonlWriter` (``metrics.jsonl``), :class:`CsvWriter` (one wide ``metrics.csv``) and
:class:`TensorBoardWriter` (``tb/``); :mod:`corrjax.train.trackers` adds Weights & Biases and MLflow.
:class:`MetricsWriter` fans a logged record out to them and, at the steps ``logger.matrix_every`` picks, renders each
square matrix of the record (the ``(T, T)`` task-gradient cosines, the correlations of task predictions and
errors, ...) once as a heatmap image for the writers that show images. :func:`open_metrics_writer` builds it from
the ``logger`` config.

Metrics arrive as flat ``{name: value}`` dicts with names like ``train/loss`` or ``eval/<task>/accuracy``; values
are Python/NumPy scalars or small arrays. ``metrics.jsonl`` keeps whole records, matrices included as nested lists
at every logged step (what ``plots/`` and a resumed run read back); ``metrics.csv``, TensorBoard, W&B and MLflow get
the scalars at every logged step and the matrices as images at ``logger.matrix_every``. Non-finite numbers are
written as ``null`` (JSON) or an empty cell (CSV) so the files stay strict.
"""

from __future__ import annotations

import abc
import csv
import io
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
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


class AppendOnlyFile:
    """Appends whole lines to a file, each with a single ``os.write`` on an ``O_APPEND`` descriptor: a line reaches
    the file whole or (after a kill inside the write) as a torn last line that the readers drop; never interleaved
    with another writer's bytes, never left in a user-space buffer. ``fsync`` is left to :meth:`close` (a kill loses
    nothing the kernel has; a power cut may)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    @property
    def closed(self) -> bool:
        return self._fd is None

    def write(self, data: bytes) -> None:
        if self._fd is None:
            raise ValueError(f"{self.path} is closed")
        written = os.write(self._fd, data)
        while written < len(data):  # a short write (a full disk, a signal): finish the line, do not start another
            written += os.write(self._fd, data[written:])

    def close(self) -> None:
        """Syncs and closes the descriptor (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class JsonlAppender(AppendOnlyFile):
    """One JSON object per line, appended as :class:`AppendOnlyFile` does (a torn last line is dropped by
    :func:`truncate_jsonl` and :func:`read_jsonl`)."""

    def append(self, record: dict[str, Any]) -> None:
        self.write((json.dumps(record) + "\n").encode())


def scalars_of(metrics: Mapping[str, Any]) -> dict[str, float | int]:
    """The real scalars of a record (ints stay ints; NaN/inf kept as floats); arrays and strings left out."""
    out: dict[str, float | int] = {}
    for key, value in metrics.items():
        if isinstance(value, (str, bytes)) or value is None:
            continue
        arr = np.asarray(value)
        if arr.ndim or not (np.issubdtype(arr.dtype, np.number) and not np.iscomplexobj(arr)):
            continue
        out[key] = arr.item() if np.issubdtype(arr.dtype, np.integer) else float(arr)
    return out


def matrices_of(metrics: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The 2-D numeric arrays of a record (task matrices such as ``train/grad_cosine``, ``eval/pred_corr``)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, (str, bytes, Mapping)) or value is None or np.ndim(value) != 2:
            continue
        try:
            out[key] = np.asarray(value, dtype=float)
        except (TypeError, ValueError):
            continue
    return out


class Writer(abc.ABC):
    """One destination of a run's metrics (the interface every writer of :class:`MetricsWriter` implements).

    Only :meth:`write_scalars` and :meth:`close` are required; a writer that cannot show images, hyperparameters or
    a final summary inherits the no-op methods. :meth:`write` is what :class:`MetricsWriter` calls with a whole
    logged record; by default it passes the record's scalars to :meth:`write_scalars` (:class:`JsonlWriter`
    overrides it to keep the whole record)."""

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Writes one logged record (scalars and arrays) at ``step``."""
        scalars = scalars_of(metrics)
        if scalars:
            self.write_scalars(step, scalars)

    @abc.abstractmethod
    def write_scalars(self, step: int, scalars: Mapping[str, float | int]) -> None:
        """Writes ``{name: value}`` scalars at ``step``."""

    def write_image(self, step: int, name: str, image: np.ndarray) -> None:  # noqa: B027 (optional, no-op)
        """Writes an ``(H, W, 3)`` uint8 RGB image (a heatmap of the matrix ``name``) at ``step``."""

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:  # noqa: B027
        """Records the run's flattened config (``{"optim.learning_rate": 0.001, ...}``) and ``tags``."""

    def write_summary(self, summary: Mapping[str, Any]) -> None:  # noqa: B027
        """Records the final summary (``summary.json``'s contents) of the run."""

    def flush(self) -> None:  # noqa: B027
        """Pushes buffered data to its destination."""

    @abc.abstractmethod
    def close(self) -> None:
        """Flushes and releases the writer (idempotent)."""


class JsonlWriter(Writer):
    """``metrics.jsonl``: one JSON object per logged step, the whole record (matrices as nested lists), appended
    by :class:`JsonlAppender`."""

    def __init__(self, path: str | Path) -> None:
        self._out = JsonlAppender(path)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._out.append({"step": int(step), **to_jsonable(dict(metrics))})

    def write_scalars(self, step: int, scalars: Mapping[str, float | int]) -> None:
        self.write(step, scalars)

    def close(self) -> None:
        self._out.close()


class CsvWriter(Writer):
    """One wide ``metrics.csv``: a ``step`` column, then one column per scalar metric in sorted order, one row per
    logged step (empty cells for metrics not logged at that step, and for NaN/inf).

    The column order depends only on the set of metric names, so two runs of one config have the same header. A
    record with a metric the header lacks rewrites the file once with the wider header (atomically, as
    :func:`write_atomic`); rows are appended with one ``os.write`` each like ``metrics.jsonl``'s. Matrices are not
    written (they are in ``metrics.jsonl``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._columns: list[str] = []
        if self.path.exists() and self.path.stat().st_size:
            header, _ = _read_csv_rows(self.path)
            self._columns = header[1:]
        self._file = AppendOnlyFile(self.path)

    @staticmethod
    def _line(cells: Sequence[Any]) -> str:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(cells)
        return buf.getvalue()

    @staticmethod
    def _cell(value: Any) -> Any:
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return ""
        return repr(value) if isinstance(value, float) else value

    def write_scalars(self, step: int, scalars: Mapping[str, float | int]) -> None:
        if self._file.closed:
            raise ValueError(f"{self.path} is closed")
        new = set(scalars) - set(self._columns)
        if new:
            self._widen(sorted(set(self._columns) | new))
        self._file.write(self._line([int(step), *(self._cell(scalars.get(c)) for c in self._columns)]).encode())

    def _widen(self, columns: list[str]) -> None:
        """Rewrites the file with the header ``step, *columns`` (the old rows moved to their columns)."""
        rows = _read_csv_rows(self.path)[1] if self.path.exists() and self.path.stat().st_size else []
        text = self._line(["step", *columns]) + "".join(
            self._line([row.get("step", ""), *(row.get(c, "") for c in columns)]) for row in rows
        )
        self._file.close()
        write_atomic(self.path, text)
        self._columns = columns
        self._file = AppendOnlyFile(self.path)

    def close(self) -> None:
        self._file.close()


def _read_csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """``(header, rows)`` of a :class:`CsvWriter` file; a last line without its newline (torn by a kill) dropped."""
    text = path.read_text()
    if text and not text.endswith("\n"):
        log.warning("%s: dropping a torn last line (a run killed while writing it)", path)
        text = text[: text.rfind("\n") + 1]
    reader = csv.reader(io.StringIO(text))
    header = next(reader, [])
    return header, [dict(zip(header, row, strict=False)) for row in reader]


def read_csv(path: str | Path) -> list[dict[str, float | int | None]]:
    """The rows of a :class:`CsvWriter` file as ``{"step": int, name: float or None}`` dicts (empty cells
    None)."""
    _, rows = _read_csv_rows(Path(path))
    parse = lambda v: None if v == "" else float(v)
    return [{k: (int(v) if k == "step" else parse(v)) for k, v in row.items()} for row in rows]


def truncate_csv(path: str | Path, last_step: int) -> None:
    """Drops the rows of ``metrics.csv`` with ``step > last_step`` and a torn last line (a resumed run), atomically."""
    path = Path(path)
    if not path.exists() or not path.stat().st_size:
        return
    header, rows = _read_csv_rows(path)
    keep = [r for r in rows if r.get("step", "") != "" and int(r["step"]) <= last_step]
    write_atomic(path, CsvWriter._line(header) + "".join(CsvWriter._line([r.get(c, "") for c in header]) for r in keep))


class TensorBoardWriter(Writer):
    """TensorBoard event files in ``logdir`` (tensorboardX): scalars, heatmap images, and the config in the HParams
    dashboard (against the metrics ``hparam_metrics``)."""

    def __init__(
        self,
        logdir: str | Path,
        *,
        purge_step: int | None = None,
        hparam_metrics: Sequence[str] = ("train/loss", "eval/loss"),
    ) -> None:
        """``purge_step``: a resumed run's first new step; TensorBoard hides the earlier attempt's events from that
        step on."""
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(logdir=str(logdir), purge_step=purge_step)
        self.hparam_metrics = tuple(hparam_metrics)
        self._closed = False

    def write_scalars(self, step: int, scalars: Mapping[str, float | int]) -> None:
        for key, value in scalars.items():
            self._tb.add_scalar(key, float(value), global_step=int(step))

    def write_image(self, step: int, name: str, image: np.ndarray) -> None:
        self._tb.add_image(name, np.asarray(image), global_step=int(step), dataformats="HWC")

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        from tensorboardX.summary import hparams as hparams_summary

        values = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in hparams.items()}
        for summary in hparams_summary(values, {m: float("nan") for m in self.hparam_metrics}):
            self._tb.file_writer.add_summary(summary)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        lines = [f"| {k} | {v} |" for k, v in sorted(scalars_of(summary).items())]
        if lines:
            self._tb.add_text("summary", "| metric | value |\n|---|---|\n" + "\n".join(lines))

    def flush(self) -> None:
        self._tb.flush()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._tb.close()


class MetricsWriter(Writer):
    """Process 0's writers behind one :class:`Writer`: each logged record goes to every writer, and at the steps
    ``matrix_every`` picks (:func:`corrjax.train.loop.every`: multiples of it and ``last_step``; 0: never) each
    2-D matrix of the record is rendered once as a heatmap (:func:`corrjax.train.plots.heatmap_image`, rows and
    columns labelled with ``labels`` where their size matches) and handed to every writer's :meth:`write_image`.

    ``MetricsWriter(run_dir, jsonl=..., csv=..., tensorboard=...)`` opens the file writers in ``run_dir``
    (``metrics.jsonl``, ``metrics.csv``, ``tb/``); ``extra`` adds others (W&B, MLflow)."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        jsonl: bool = True,
        tensorboard: bool = True,
        csv: bool = False,
        purge_step: int | None = None,
        extra: Sequence[Writer] = (),
        labels: Sequence[str] = (),
        matrix_every: int = 0,
        last_step: int | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.writers: list[Writer] = []
        if jsonl:
            self.writers.append(JsonlWriter(self.run_dir / "metrics.jsonl"))
        if csv:
            self.writers.append(CsvWriter(self.run_dir / "metrics.csv"))
        if tensorboard:
            self.writers.append(TensorBoardWriter(self.run_dir / "tb", purge_step=purge_step))
        self.writers.extend(extra)
        self.labels, self.matrix_every, self.last_step = list(labels), int(matrix_every), last_step

    def _images_due(self, step: int) -> bool:
        period = self.matrix_every  # corrjax.train.loop.every's rule
        due = period > 0 and (step % period == 0 or step == self.last_step)
        return due and any(type(w).write_image is not Writer.write_image for w in self.writers)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        for w in self.writers:
            w.write(step, metrics)
        if self._images_due(step):
            from corrjax.train import plots

            for key, matrix in matrices_of(metrics).items():
                image = plots.heatmap_image(matrix, key, self.labels)
                for w in self.writers:
                    w.write_image(step, key, image)

    def write_scalars(self, step: int, scalars: Mapping[str, float | int]) -> None:
        for w in self.writers:
            w.write_scalars(step, scalars)

    def write_image(self, step: int, name: str, image: np.ndarray) -> None:
        for w in self.writers:
            w.write_image(step, name, image)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        for w in self.writers:
            w.write_hparams(hparams)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        for w in self.writers:
            w.write_summary(summary)

    def flush(self) -> None:
        for w in self.writers:
            w.flush()

    def close(self) -> None:
        """Closes every writer (all of them, even when one fails; the first error is raised after)."""
        error = None
        for w in self.writers:
            try:
                w.close()
            except Exception as e:  # close the others, then report
                log.exception("closing %s failed", type(w).__name__)
                error = error or e
        if error is not None:
            raise error


WRITER_KEYS = ("jsonl", "csv", "tensorboard", "wandb", "mlflow")
CONSOLE_MODES = ("auto", "always", "never")


def check_logger(logger: Any) -> None:
    """Raises ``ValueError`` naming the key for a ``logger`` config the writers cannot run with: a
    ``logger.console`` outside auto/always/never, a negative ``logger.matrix_every``, or ``logger.wandb.enabled``
    / ``logger.mlflow.enabled`` without their package installed (the message names the extra to install)."""
    console = logger.get("console", "auto")
    if console not in CONSOLE_MODES:
        raise ValueError(f"`logger.console`={console!r} must be one of {', '.join(CONSOLE_MODES)}")
    every_ = logger.get("matrix_every")
    if every_ is not None and every_ < 0:
        raise ValueError(f"`logger.matrix_every`={every_} must be >= 0 (0: never; null: at evaluation steps)")
    from corrjax.train import trackers

    for key in ("wandb", "mlflow"):
        node = logger.get(key)
        if node is not None and node.get("enabled"):
            trackers.require(key)


def open_metrics_writer(
    run_dir: str | Path,
    cfg: Any,
    *,
    labels: Sequence[str] = (),
    start: int = 0,
    resume: bool = False,
) -> MetricsWriter:
    """Process 0's :class:`MetricsWriter` for the run in ``run_dir`` as ``cfg.logger`` says (``logger.jsonl``,
    ``logger.csv``, ``logger.tensorboard``, ``logger.wandb.enabled``, ``logger.mlflow.enabled``); a resumed run
    (``resume`` with its checkpoint at ``start``) first drops the file records past ``start`` and hides the
    TensorBoard events there, and W&B / MLflow continue the same run. Matrices go out as images every
    ``logger.matrix_every`` steps (null: ``trainer.eval_every``) and at ``trainer.max_steps``. The flattened config
    and ``tags`` are recorded (:meth:`Writer.write_hparams`) when the run starts from step 0."""
    from corrjax.train import trackers

    logger, run_dir = cfg.logger, Path(run_dir)
    check_logger(logger)
    if resume:
        truncate_jsonl(run_dir / "metrics.jsonl", start)
        truncate_csv(run_dir / "metrics.csv", start)
    extra: list[Writer] = []
    writer = None
    try:
        for key in ("wandb", "mlflow"):
            node = logger.get(key)
            if node is not None and node.get("enabled"):
                extra.append(trackers.open_tracker(key, run_dir, cfg, resume=resume))
        matrix_every = logger.get("matrix_every")
        writer = MetricsWriter(
            run_dir,
            jsonl=bool(logger.get("jsonl", True)),
            csv=bool(logger.get("csv", False)),
            tensorboard=bool(logger.get("tensorboard", True)),
            purge_step=start + 1 if resume else None,
            extra=extra,
            labels=labels,
            matrix_every=cfg.trainer.eval_every if matrix_every is None else matrix_every,
            last_step=cfg.trainer.max_steps,
        )
    except BaseException:
        for w in extra:
            w.close()
        raise
    if start == 0:
        writer.write_hparams({**trackers.flat_config(cfg), "tags": ",".join(trackers.tags_of(cfg))})
    return writer


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
