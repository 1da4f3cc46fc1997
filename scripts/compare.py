"""Turn a Hydra multirun folder into a comparison table: mean +- std over seeds, per-task metrics, Delta_m%.

    python scripts/compare.py multirun/multidigits_mtl/<stamp> [--baseline-dir multirun/<stl stamp>]
                              [--baseline-group "mtl=ew"] [--metrics accuracy rmse] [--out DIR]

Every job folder with a ``summary.json`` of a finished run is one run; runs are grouped by their Hydra overrides
without ``seed`` (the "method": the overrides that vary across the sweep), and each ``eval/<task>/<metric>`` is
reported as mean +- sample std (ddof=1) over the group's seeds. Job folders without a ``summary.json`` (a failed or
still running job) and runs whose summary says ``"completed": false`` (stopped by a signal, ``trainer.stop_after`` or
non-finite losses) are left out and listed on stderr and under ``excluded`` in ``comparison.json``.

Delta_m% is LibMTL's multi-task improvement (Maninis et al. 2019; Lin & Zhang 2023):
``100 / T * sum_t mean_k s_k (M_{m,t,k} - M_{b,t,k}) / |M_{b,t,k}|`` with ``s_k = +1`` for metrics where higher is
better (accuracy, pearson) and ``-1`` where lower is better (rmse, loss); positive means better than the baseline
(LibMTL divides by ``M_b`` itself; the two agree for positive baselines). The baseline ``M_b`` is, per task, the
mean over seeds of single-task runs (``--baseline-dir``: a multirun of runs with ``tasks=[<one task>]``), or a group
of the same sweep (``--baseline-group``). The std of Delta_m% is over the group's runs, each run's Delta_m% against
the same baseline. Writes ``comparison.md``, ``comparison.json`` and ``comparison.png`` into the folder (or
``--out``) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import yaml

HIGHER_IS_BETTER = {"accuracy": True, "auc": True, "gauc": True, "pearson": True, "rmse": False, "loss": False}
DEFAULT_METRICS = ("accuracy", "rmse")


def scan_runs(folder: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """``(runs, excluded)``: ``[{"dir", "overrides": {key: value}, "summary"}]`` for every finished run under
    ``folder``, and ``[{"dir", "reason"}]`` for job folders (those with a ``.hydra`` folder or a summary) that have no
    summary or whose summary says the run did not complete. A summary without ``completed`` counts as finished."""
    runs, excluded = [], []
    folder = Path(folder)
    jobs = {p.parent for p in folder.rglob("summary.json")} | {p.parent for p in folder.rglob(".hydra") if p.is_dir()}
    for job in sorted(jobs):
        summary_path = job / "summary.json"
        if not summary_path.exists():
            excluded.append({"dir": str(job), "reason": "no summary.json (failed or unfinished job)"})
            continue
        summary = json.loads(summary_path.read_text())
        if summary.get("completed") is False:
            why = f"did not complete (stopped at step {summary.get('step', '?')}"
            if summary.get("stopped_by_signal"):
                why += f" by {summary['stopped_by_signal']}"
            if summary.get("error"):
                why += f": {summary['error']}"
            excluded.append({"dir": str(job), "reason": why + ")"})
            continue
        overrides_file = job / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
        pairs = dict(o.lstrip("+~").split("=", 1) for o in overrides or [] if "=" in o)
        runs.append({"dir": job, "overrides": pairs, "summary": summary})
    return runs, excluded


def warn_excluded(excluded: list[dict[str, str]], stream=None) -> None:
    """One stderr line per job folder left out, so that a shorter table does not go unnoticed."""
    stream = stream or sys.stderr
    for e in excluded:
        stream.write(f"compare: left out {e['dir']}: {e['reason']}\n")


def load_runs(folder: str | Path) -> list[dict[str, Any]]:
    """The finished runs of :func:`scan_runs`; the job folders left out are listed on stderr."""
    runs, excluded = scan_runs(folder)
    warn_excluded(excluded)
    return runs


IGNORED = ("seed", "hydra.run.dir", "hydra.sweep.dir")


def varying_keys(runs: list[dict[str, Any]]) -> list[str]:
    """Override keys (other than the seed) whose value differs between runs: they name the methods."""
    keys = sorted({k for r in runs for k in r["overrides"]} - set(IGNORED))
    return [k for k in keys if len({r["overrides"].get(k) for r in runs}) > 1]


def method_key(overrides: dict[str, str], keys: list[str]) -> str:
    return " ".join(f"{k}={overrides.get(k, '-')}" for k in keys) or "(all runs)"


def task_metrics(summary: dict[str, Any], metrics: tuple[str, ...]) -> dict[tuple[str, str], float]:
    """``{(task, metric): value}`` of the summary's ``eval/<task>/<metric>`` entries. A metric that is present but
    ``null`` (the run's value was NaN or infinite; ``summary.json`` stores those as ``null``) is NaN, so that it
    propagates into the group's mean instead of silently dropping that seed."""
    out = {}
    for task in summary.get("tasks", []):
        for m in metrics:
            key = f"eval/{task}/{m}"
            if key in summary:
                v = summary[key]
                out[(task, m)] = float("nan") if v is None else float(v)
    return out


def group(runs: list[dict[str, Any]], metrics: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Per method: the number of runs, per (task, metric) the list of values over its runs, and each run's own
    ``{(task, metric): value}`` (``per_run``, for per-run Delta_m%)."""
    groups: dict[str, dict[str, Any]] = {}
    keys = varying_keys(runs)
    for run in runs:
        name = method_key(run["overrides"], keys)
        g = groups.setdefault(name, {"runs": 0, "values": defaultdict(list), "loss": [], "per_run": [], "seeds": []})
        g["runs"] += 1
        own = task_metrics(run["summary"], metrics)
        g["per_run"].append(own)
        for key, v in own.items():
            g["values"][key].append(v)
        if "eval/loss" in run["summary"]:
            v = run["summary"]["eval/loss"]
            g["loss"].append(float("nan") if v is None else float(v))
        g["seeds"].append(run["overrides"].get("seed", run["summary"].get("seed")))
    return groups


def mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, float)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else float("nan")


def delta_m(method: dict[tuple[str, str], float], baseline: dict[tuple[str, str], float]) -> float:
    """LibMTL's Delta_m% of per-(task, metric) means against the baseline's (NaN if a task lacks a baseline)."""
    per_task: dict[str, list[float]] = defaultdict(list)
    for (task, metric), value in method.items():
        base = baseline.get((task, metric))
        if base is None or base == 0:
            per_task[task].append(float("nan"))
            continue
        sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
        per_task[task].append(sign * (value - base) / abs(base))
    if not per_task:
        return float("nan")
    return 100.0 * float(np.mean([np.mean(v) for v in per_task.values()]))


def baseline_from_single_task(runs: list[dict[str, Any]], metrics: tuple[str, ...]) -> dict[tuple[str, str], float]:
    """Per (task, metric), the mean over the single-task runs (those whose summary lists exactly one task)."""
    values: dict[tuple[str, str], list[float]] = defaultdict(list)
    for run in runs:
        if len(run["summary"].get("tasks", [])) == 1:
            for key, v in task_metrics(run["summary"], metrics).items():
                values[key].append(v)
    return {k: float(np.mean(v)) for k, v in values.items()}


def fmt(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def compare(
    folder: str | Path,
    *,
    metrics: tuple[str, ...] = DEFAULT_METRICS,
    baseline_dir: str | Path | None = None,
    baseline_group: str | None = None,
) -> dict[str, Any]:
    """The comparison as a dict: columns, and rows of method, seeds, per-column mean/std, eval loss, Delta_m%.

    Raises ``ValueError`` for an unknown metric, a folder without finished runs or without any of the metrics, a
    ``baseline_group`` that is not a method of the sweep, and a ``baseline_dir`` without single-task runs.
    """
    unknown = [m for m in metrics if m not in HIGHER_IS_BETTER]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {sorted(HIGHER_IS_BETTER)}")
    if baseline_dir is not None and baseline_group is not None:
        raise ValueError("give --baseline-dir or --baseline-group, not both")
    runs, excluded = scan_runs(folder)
    warn_excluded(excluded)
    if not runs:
        raise ValueError(f"no finished run (summary.json) under {folder}")
    groups = group(runs, metrics)
    columns = sorted({k for g in groups.values() for k in g["values"]})
    if not columns:
        raise ValueError(f"no eval/<task>/<metric> for the metrics {list(metrics)} in the runs under {folder}")
    baseline: dict[tuple[str, str], float] = {}
    if baseline_dir is not None:
        base_runs, base_excluded = scan_runs(baseline_dir)
        warn_excluded(base_excluded)
        baseline = baseline_from_single_task(base_runs, metrics)
        if not baseline:
            raise ValueError(
                f"--baseline-dir {baseline_dir}: no finished single-task run (a summary listing one task) with the "
                f"metrics {list(metrics)}"
            )
        missing = sorted({t for t, _ in columns} - {t for t, _ in baseline})
        if missing:
            sys.stderr.write(f"compare: --baseline-dir has no single-task run of {missing}; their Δm% is n/a\n")
    elif baseline_group is not None:
        if baseline_group not in groups:
            raise ValueError(f"--baseline-group {baseline_group!r} is not a method of this sweep: {sorted(groups)}")
        baseline = {k: float(np.mean(v)) for k, v in groups[baseline_group]["values"].items()}
    rows = []
    for name, g in groups.items():
        means = {k: float(np.mean(v)) for k, v in g["values"].items()}
        row = {"method": name, "seeds": g["runs"], "loss": mean_std(g["loss"]) if g["loss"] else (math.nan, math.nan)}
        row["metrics"] = {f"{t}/{m}": mean_std(g["values"][(t, m)]) for t, m in columns if (t, m) in g["values"]}
        row["delta_m"] = delta_m(means, baseline) if baseline else float("nan")
        per_run = [delta_m(own, baseline) for own in g["per_run"]] if baseline else []
        row["delta_m_std"] = float(np.std(per_run, ddof=1)) if len(per_run) > 1 else float("nan")
        seeds = [s for s in g["seeds"] if s is not None]
        if len(set(map(str, seeds))) < len(seeds):
            sys.stderr.write(
                f"compare: {name} has runs with the same seed ({sorted(map(str, seeds))}): are several sweeps "
                "under this folder? Its seeds column counts runs.\n"
            )
        rows.append(row)
    rows.sort(key=lambda r: r["method"])
    return {
        "columns": [f"{t}/{m}" for t, m in columns],
        "rows": rows,
        "has_baseline": bool(baseline),
        "excluded": excluded,
    }


def to_markdown(result: dict[str, Any]) -> str:
    cols = result["columns"]
    head = ["method", "seeds", *cols, "eval loss"] + (["Δm%"] if result["has_baseline"] else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        cells = [r["method"], str(r["seeds"])]
        cells += [fmt(*r["metrics"].get(c, (math.nan, math.nan))) for c in cols]
        cells.append(fmt(*r["loss"]))
        if result["has_baseline"]:
            dm, ds = r["delta_m"], r["delta_m_std"]
            cells.append("n/a" if math.isnan(dm) else (f"{dm:+.2f}" if math.isnan(ds) else f"{dm:+.2f} ± {ds:.2f}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: str | Path) -> Path:
    """Bar chart per column (mean with std error bars), one group of bars per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = result["columns"]
    rows = result["rows"]
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 0.5 * len(rows) + 2), squeeze=False)
    for ax, col in zip(axes[0], cols, strict=True):
        means = [r["metrics"].get(col, (math.nan, math.nan))[0] for r in rows]
        stds = [np.nan_to_num(r["metrics"].get(col, (math.nan, math.nan))[1]) for r in rows]
        ax.barh(range(len(rows)), means, xerr=stds, color="tab:blue", alpha=0.8)
        ax.set_yticks(range(len(rows)), [r["method"] for r in rows] if ax is axes[0][0] else [""] * len(rows))
        ax.set_title(col)
        finite = [m for m in means if np.isfinite(m)]
        if finite:
            lo, hi = min(finite), max(finite)
            pad = 0.1 * (hi - lo) + 1e-3
            ax.set_xlim(lo - pad - max(stds), hi + pad + max(stds))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--baseline-dir", help="a multirun of single-task runs (tasks=[<one task>])")
    parser.add_argument("--baseline-group", help='a method of this sweep, as the table names it, e.g. "mtl=ew"')
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS), choices=sorted(HIGHER_IS_BETTER))
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.baseline_dir is not None and args.baseline_group is not None:
        parser.error("give --baseline-dir or --baseline-group, not both")
    if not Path(args.folder).is_dir():
        parser.error(f"no such folder: {args.folder}")
    if args.baseline_dir is not None and not Path(args.baseline_dir).is_dir():
        parser.error(f"--baseline-dir: no such folder: {args.baseline_dir}")
    try:
        result = compare(
            args.folder, metrics=tuple(args.metrics), baseline_dir=args.baseline_dir, baseline_group=args.baseline_group
        )
    except ValueError as e:
        parser.error(str(e))
    out = Path(args.out or args.folder)
    out.mkdir(parents=True, exist_ok=True)
    md = to_markdown(result)
    (out / "comparison.md").write_text(md)
    (out / "comparison.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    plot(result, out / "comparison.png")
    sys.stdout.write(md + f"\nwritten to {out}/comparison.{{md,json,png}}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
