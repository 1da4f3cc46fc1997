"""What a run prints: one concise line per log step, and rich consoles that do not wrap outside a terminal.

Under SLURM or a pipe (stdout not a terminal) the progress bar is not drawn; instead every log step prints one line
through :mod:`logging` (so it also lands in Hydra's ``<job>.log``)::

    step 120/400 loss 0.5320 | task0 0.2104 task1 0.3216 | w 0.48 0.52 | 15.2 it/s eta 0:00:18

and every evaluation one line with each task's main metric. ``logger.console`` chooses: ``auto`` (default: lines
when no bar is shown, that is when stdout is not a terminal or ``trainer.progress=false``), ``always`` (also under
the bar, printed above it) or ``never``; :func:`logs_above` keeps other log records from cutting through the bar.
:func:`make_console` gives the end-of-run report a console that, outside a terminal, neither wraps long paths at 80
columns nor highlights them.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from rich.console import Console

log = logging.getLogger("corrjax.train.loop")

# Console width outside a terminal: wide enough for the results table and any run directory path.
WIDE = 200
# Per-task entries on a line up to this many tasks (CelebA's 40 would not be concise).
MAX_TASKS_ON_A_LINE = 8


def make_console(file: Any = None) -> Console:
    """A rich console on ``file`` (default stdout); outside a terminal: :data:`WIDE` columns, soft wrapping (a long
    path stays on one line) and no highlighting (no escape codes in log files)."""
    console = Console(file=file)
    if console.is_terminal or console.is_jupyter:
        return console
    return Console(file=file, width=WIDE, soft_wrap=True, highlight=False, emoji=False)


def lines_enabled(mode: str, bar_shown: bool) -> bool:
    """Whether to print a line per log step: ``always``; ``never``; ``auto`` when no progress bar is shown."""
    if mode == "always":
        return True
    if mode == "never":
        return False
    if mode == "auto":
        return not bar_shown
    raise ValueError(f"`logger.console`={mode!r} must be one of auto, always, never")


def _fmt(value: Any, digits: int = 4) -> str:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return "?"
    return f"{x:.{digits}g}" if abs(x) >= 1e4 or (x != 0 and abs(x) < 1e-3) else f"{x:.{digits}f}"


def step_line(
    step: int,
    max_steps: int,
    record: Mapping[str, Any],
    tasks: Sequence[str],
    *,
    it_per_s: float | None = None,
    eta_s: float | None = None,
) -> str:
    """``step 120/400 loss 0.5320 | task0 0.2104 task1 0.3216 | w 0.48 0.52 | 15.2 it/s eta 0:00:18`` from a
    logged ``train/`` record: the summed loss, each task's loss and learned weight (up to
    :data:`MAX_TASKS_ON_A_LINE` tasks), the speed and the time left."""
    parts = [f"step {step}/{max_steps} loss {_fmt(record.get('train/loss'))}"]
    if len(tasks) <= MAX_TASKS_ON_A_LINE:
        losses = [f"{t} {_fmt(record[f'train/{t}/loss'])}" for t in tasks if f"train/{t}/loss" in record]
        if losses:
            parts.append(" ".join(losses))
        weights = [_fmt(record[f"train/weights/{t}"], 2) for t in tasks if f"train/weights/{t}" in record]
        if weights:
            parts.append("w " + " ".join(weights))
    speed = []
    if it_per_s is not None:
        speed.append(f"{it_per_s:.1f} it/s")
    if eta_s is not None:
        speed.append(f"eta {datetime.timedelta(seconds=round(eta_s))}")
    if speed:
        parts.append(" ".join(speed))
    return " | ".join(parts)


_MAIN_METRICS = ("accuracy", "rmse", "pearson", "loss")


def eval_line(step: int, max_steps: int, record: Mapping[str, Any], tasks: Sequence[str]) -> str:
    """``eval 200/400 loss 0.5120 | task0 rmse 0.3100 task1 accuracy 0.9300`` from an evaluation record: the
    summed loss and, up to :data:`MAX_TASKS_ON_A_LINE` tasks, each task's first metric among accuracy, rmse,
    pearson, loss."""
    prefix = next((k.split("/", 1)[0] for k in record if k.endswith("/loss") and k.count("/") == 1), "eval")
    parts = [f"{prefix} {step}/{max_steps} loss {_fmt(record.get(f'{prefix}/loss'))}"]
    if len(tasks) <= MAX_TASKS_ON_A_LINE:
        cells = []
        for t in tasks:
            m = next((m for m in _MAIN_METRICS if f"{prefix}/{t}/{m}" in record), None)
            if m is not None:
                cells.append(f"{t} {m} {_fmt(record[f'{prefix}/{t}/{m}'])}")
        if cells:
            parts.append(" ".join(cells))
    return " | ".join(parts)


class StepLines:
    """Prints the lines of a run: :meth:`train` at log steps, :meth:`eval` at evaluations. With a live progress
    bar (``progress`` given and shown) a line is printed above the bar through its console; otherwise it is
    logged at INFO (logger ``corrjax.train.loop``)."""

    def __init__(self, tasks: Sequence[str], max_steps: int, batch_size: int, progress: Any = None) -> None:
        self.tasks, self.max_steps, self.batch_size = list(tasks), int(max_steps), int(batch_size)
        self.progress = progress

    def _emit(self, line: str) -> None:
        if self.progress is not None and not self.progress.disable:
            self.progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            log.info("%s", line)

    def train(self, step: int, record: Mapping[str, Any], *, examples_per_s: float | None = None) -> None:
        rate = None if examples_per_s is None else examples_per_s / max(self.batch_size, 1)
        eta = None if not rate else (self.max_steps - step) / rate
        self._emit(step_line(step, self.max_steps, record, self.tasks, it_per_s=rate, eta_s=eta))

    def eval(self, step: int, record: Mapping[str, Any]) -> None:
        if record:
            self._emit(eval_line(step, self.max_steps, record, self.tasks))


@contextlib.contextmanager
def logs_above(progress: Any) -> Iterator[None]:
    """While ``progress`` (an entered rich ``Progress``) draws its bar, :mod:`logging`'s stream handlers on stdout
    and stderr (Hydra's console handler) write through rich's proxies, so a log record is printed above the bar
    instead of into it; restored on exit."""
    from rich.file_proxy import FileProxy

    swapped = []
    if not progress.disable:
        proxies = [f for f in (sys.stdout, sys.stderr) if isinstance(f, FileProxy)]
        handlers = {h for name in (None, *logging.root.manager.loggerDict) for h in logging.getLogger(name).handlers}
        for h in handlers:
            if type(h) is logging.StreamHandler:
                proxy = next((f for f in proxies if h.stream is f.rich_proxied_file), None)
                if proxy is not None:
                    swapped.append((h, h.setStream(proxy)))
    try:
        yield
    finally:
        for h, stream in swapped:
            h.setStream(stream)
