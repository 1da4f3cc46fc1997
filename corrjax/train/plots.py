"""PNG plots of a run (matplotlib, Agg backend): heatmaps of task matrices and curves of logged metrics.

``plot_run`` reads the records of ``metrics.jsonl`` and the final summary and writes ``plots/`` in the run dir:
one heatmap per square task matrix in the summary (task-gradient cosines, correlation of task predictions and of
task errors, CKA) and one curve per training/evaluation scalar family (loss per task, accuracy/RMSE per task,
learned task weights).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

log = logging.getLogger(__name__)


def _heatmap_figure(matrix: Any, labels: Sequence[str], title: str, *, vmin, vmax, col_labels=None, max_inches=None):
    m = np.asarray(matrix, dtype=float)
    col_labels = list(labels) if col_labels is None else list(col_labels)
    cell = 0.6 if max_inches is None else min(0.6, max_inches / max(len(labels), len(col_labels), 1))
    fig, ax = plt.subplots(figsize=(1.6 + cell * len(col_labels), 1.0 + cell * len(labels)))
    im = ax.imshow(m, vmin=vmin, vmax=vmax, cmap="coolwarm" if vmin < 0 else "viridis")
    ax.set_xticks(range(len(col_labels)), col_labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    if max(m.shape) <= 12:
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                if np.isfinite(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def heatmap(
    matrix: Any,
    labels: Sequence[str],
    title: str,
    path: str | Path,
    *,
    vmin=-1.0,
    vmax=1.0,
    col_labels: Sequence[str] | None = None,
) -> Path:
    """Writes an annotated heatmap (rows ``labels``, columns ``col_labels`` or the same); NaN cells are blank."""
    fig = _heatmap_figure(matrix, labels, title, vmin=vmin, vmax=vmax, col_labels=col_labels)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def matrix_axes(key: str, shape: tuple[int, ...], tasks: Sequence[str]) -> tuple[list[str], list[str], float]:
    """``(row labels, column labels, vmin)`` of the logged matrix ``key``: task names where a side has ``len(tasks)``
    entries, ``e<i>`` for experts (``expert``/``gate`` matrices), indices otherwise; ``vmin`` 0 for the non-negative
    CKA and gate matrices, -1 for cosines and correlations."""
    rows = list(tasks) if shape[0] == len(tasks) else [str(i) for i in range(shape[0])]
    cols = list(tasks) if shape[1] == len(tasks) else [str(i) for i in range(shape[1])]
    if "expert" in key or "gate" in key:
        cols = [f"e{i}" for i in range(shape[1])]
        rows = rows if "gate" in key else cols
    return rows, cols, 0.0 if ("cka" in key or "gate" in key) else -1.0


def heatmap_image(matrix: Any, key: str, tasks: Sequence[str] = ()) -> np.ndarray:
    """The heatmap of the logged matrix ``key`` (labelled by :func:`matrix_axes`) as an ``(H, W, 3)`` uint8 RGB
    array, for TensorBoard / W&B / MLflow images (at most ~770 pixels a side: 40 tasks fit)."""
    m = np.asarray(matrix, dtype=float)
    rows, cols, vmin = matrix_axes(key, m.shape, tasks)
    fig = _heatmap_figure(m, rows, key, vmin=vmin, vmax=1.0, col_labels=cols, max_inches=8.0)
    fig.set_dpi(80)
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image


def curves(records: Sequence[dict[str, Any]], keys: Sequence[str], title: str, path: str | Path) -> Path | None:
    """Writes one line per key of ``records`` (the ``metrics.jsonl`` objects) against ``step``."""
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = 0
    for key in keys:
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if pts:
            steps, values = zip(*pts, strict=True)
            ax.plot(steps, values, label=key, marker="." if len(pts) < 30 else None)
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_run(run_dir: str | Path, records: Sequence[dict[str, Any]], summary: dict[str, Any], tasks: Sequence[str]):
    """Writes the run's heatmaps and curves to ``run_dir/plots`` and returns their paths."""
    out = Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    steps = [str(k) for k in summary.get("eval/shared_cka_steps", [])]
    for key, value in summary.items():
        try:
            m = np.asarray(value, dtype=float) if isinstance(value, list) else None
        except (TypeError, ValueError):
            m = None
        if m is None or m.ndim != 2:
            continue
        rows, cols, vmin = matrix_axes(key, m.shape, tasks)
        if key == "eval/shared_cka_over_training" and len(steps) == m.shape[0]:
            rows = cols = steps
        name = key.replace("/", "_") + ".png"
        paths.append(heatmap(m, rows, key, out / name, vmin=vmin, col_labels=cols))
    scalar_keys = sorted({k for r in records for k, v in r.items() if isinstance(v, (int, float)) and k != "step"})
    families: dict[str, list[str]] = {}
    for key in scalar_keys:
        split, _, rest = key.partition("/")
        # <split>/<task>/<metric> -> one curve per task; <split>/weights/<task> (learned task weights) -> one figure
        metric = "weights" if rest.startswith("weights/") else key.rsplit("/", 1)[-1]
        families.setdefault(f"{split}_{metric}", []).append(key)
    for name, keys in families.items():
        p = curves(records, keys, name, out / f"curve_{name}.png")
        if p is not None:
            paths.append(p)
    return paths
