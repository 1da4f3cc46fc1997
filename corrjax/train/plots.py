"""PNG plots of a run (matplotlib, Agg backend): heatmaps of task matrices and curves of logged metrics.

``plot_run`` reads the records of ``metrics.jsonl`` and the final summary and writes ``plots/`` in the run dir:
one heatmap per square task matrix in the summary (task-gradient cosines, correlation of task predictions and of
task errors, CKA) and one curve per training/evaluation scalar family (loss per task, accuracy/RMSE per task).
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


def heatmap(matrix: Any, labels: Sequence[str], title: str, path: str | Path, *, vmin=-1.0, vmax=1.0) -> Path:
    """Writes an annotated ``(T, T)`` heatmap; NaN (undefined) cells are shown blank."""
    m = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(labels), 1.0 + 0.6 * len(labels)))
    im = ax.imshow(m, vmin=vmin, vmax=vmax, cmap="coolwarm")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    if len(labels) <= 12:
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                if np.isfinite(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


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
    for key, value in summary.items():
        try:
            m = np.asarray(value, dtype=float) if isinstance(value, list) else None
        except (TypeError, ValueError):
            m = None
        if m is not None and m.ndim == 2 and m.shape[0] == m.shape[1] == len(tasks):
            vmin = 0.0 if "cka" in key else -1.0
            paths.append(heatmap(m, tasks, key, out / (key.replace("/", "_") + ".png"), vmin=vmin))
    scalar_keys = sorted({k for r in records for k, v in r.items() if isinstance(v, (int, float)) and k != "step"})
    families: dict[str, list[str]] = {}
    for key in scalar_keys:
        metric = key.rsplit("/", 1)[-1]
        split = key.split("/", 1)[0]
        families.setdefault(f"{split}_{metric}", []).append(key)
    for name, keys in families.items():
        p = curves(records, keys, name, out / f"curve_{name}.png")
        if p is not None:
            paths.append(p)
    return paths
