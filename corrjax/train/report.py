"""The end-of-run printout: where the outputs are and a short per-task results table (rich)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from corrjax.data import TaskSpec

_METRICS = ("loss", "accuracy", "auc", "gauc", "rmse", "pearson")


def results_table(summary: dict[str, Any], tasks: Sequence[TaskSpec]) -> Table:
    """One row per task with its evaluation metrics, then the summed ``eval/loss``."""
    table = Table(title=f"eval after {summary.get('step', '?')} steps")
    table.add_column("task")
    present = [m for m in _METRICS if any(f"eval/{t.name}/{m}" in summary for t in tasks)]
    for m in present:
        table.add_column(m, justify="right")
    for t in tasks:
        cells = []
        for m in present:
            v = summary.get(f"eval/{t.name}/{m}")
            cells.append("" if v is None else f"{v:.4f}")
        table.add_row(t.name, *cells)
    if "eval/loss" in summary:
        table.add_row("[bold]sum", f"{summary['eval/loss']:.4f}", *[""] * (len(present) - 1))
    return table


def print_report(run_dir: str | Path, summary: dict[str, Any], tasks: Sequence[TaskSpec], console=None) -> None:
    console = console or Console()
    run_dir = Path(run_dir)
    console.print(results_table(summary, tasks))
    if summary.get("nonfinite_total"):
        console.print(f"skipped non-finite steps: {summary['nonfinite_total']}")
    console.print(f"outputs in [bold]{run_dir}[/bold]")
    for name in ("summary.json", "metrics.jsonl", "tb", "plots", "checkpoints"):
        if (run_dir / name).exists():
            console.print(f"  {run_dir / name}")
