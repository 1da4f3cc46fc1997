"""The MMoE paper's synthetic study: shared-bottom vs OMoE vs MMoE as the task correlation falls.

    python scripts/run_experiment_mmoe.py [--seeds 0 1 2 3 4] [--correlations 1.0 0.9 0.5 0.0] [--steps 3000] \
        [--workers 2] [-- <hydra overrides>]
    python scripts/run_experiment_mmoe.py --ensemble 50 --workers 2 --seeds $(seq 0 199)  # 50 seeds per program
    python scripts/run_experiment_mmoe.py --sweep-dir multirun/mmoe_synthetic/<stamp> [<stamp2> ...]  # tabulate only

Runs one local Hydra multirun of ``experiment=mmoe_synthetic`` over models x correlations x seeds (one process,
jobs in sequence; ``--workers N`` splits the seeds over N multiruns at once, one sweep folder each), then writes
``mmoe_synthetic.md`` and ``mmoe_synthetic.png`` into the (first) sweep folder. ``--ensemble K`` trains K seeds of
one model and correlation at once instead (:func:`corrjax.train.ensemble.train_seeds`: the same train step for
every seed inside one compiled program, each seed reading its own data in its own order, so seed ``s`` computes what
the Hydra run with ``seed=s`` computes, up to rounding); a 200-seed study then takes about an hour on two cores
instead of three and a half. Its runs go to
``<sweep>/<model>/corr<c>/seed<s>`` with the same files, and re-running with ``--sweep-into`` that folder skips the
runs that finished. Ma et al.
(KDD 2018, Fig. 3-4) compare average loss curves: shared-bottom degrades as the correlation falls while MMoE is
robust to it. Every run evaluates the test loss (the sum of the two tasks' MSE) every ``trainer.eval_every`` steps,
so the tables report, per model and correlation, mean +- std over seeds of

- the mean test loss over the run (the area under the loss curve divided by its length: how fast the model learns),
- the test loss at the end of the run (and at ``--budgets`` steps, if given),

plus the paired ratio ``loss(lowest correlation) / loss(correlation 1)`` over seeds (one seed draws the same sine
constants and input directions at every correlation, so the ratio isolates the correlation's effect). A last section
gives the correlation's effect with 95% bootstrap intervals over seeds: per model the paired difference and ratio,
and between models the difference of their effects (one seed draws the same problem for every model). Several sweep
folders (say, seeds run in parallel on two cores) are tabulated together. The figure shows the mean test-loss curves,
one panel per correlation, and the mean loss over the run against the correlation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import fmt, load_runs
from sweep_dirs import new_sweep_dir

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("hps", "omoe", "mmoe")
LABELS = {"hps": "shared-bottom", "omoe": "OMoE", "mmoe": "MMoE"}
NOISE_FLOOR_NOTE = "(the noise floor, 2 noise_std^2, is 0.02 at the preset's noise_std = 0.1)"

# {model: {correlation: {seed: (steps (k,), test losses (k,))}}}
Curves = dict[str, dict[float, dict[int, tuple[np.ndarray, np.ndarray]]]]


def load_curves(*sweeps: Path) -> Curves:
    """The test-loss curve of every finished run of the sweeps (from ``metrics.jsonl``, else the final summary).
    Runs whose summary says ``"completed": false`` (stopped early, or non-finite losses) and job folders without a
    summary are left out and listed on stderr (:func:`compare.load_runs`).

    Raises ``ValueError`` when two runs share a model, correlation and seed (the sweeps overlap).
    """
    curves: Curves = defaultdict(lambda: defaultdict(dict))
    origin: dict[tuple[str, float, int], Path] = {}
    for run in (run for sweep in sweeps for run in load_runs(sweep)):
        if run["summary"].get("eval/loss") is None:
            continue
        model = run["overrides"].get("model", "hps")
        corr = float(run["overrides"].get("data.correlation", "nan"))
        seed = int(run["overrides"].get("seed", 0))
        if (model, corr, seed) in origin:
            raise ValueError(
                f"model={model} data.correlation={corr:g} seed={seed} appears twice: {origin[model, corr, seed]} "
                f"and {run['dir']}; tabulate sweeps with disjoint seeds"
            )
        origin[model, corr, seed] = run["dir"]
        points = {}
        metrics = run["dir"] / "metrics.jsonl"
        if metrics.exists():
            for line in metrics.read_text().splitlines():
                rec = json.loads(line)
                if rec.get("eval/loss") is not None:
                    points[int(rec["step"])] = float(rec["eval/loss"])
        points.setdefault(int(run["summary"].get("step", 0)), float(run["summary"]["eval/loss"]))
        steps = np.asarray(sorted(points))
        curves[model][corr][seed] = (steps, np.asarray([points[s] for s in steps]))
    return curves


def _ordered(curves: Curves) -> list[str]:
    return [m for m in MODELS if m in curves] + sorted(set(curves) - set(MODELS))


def _at(step: int):
    def value(steps: np.ndarray, loss: np.ndarray) -> float:
        hit = np.nonzero(steps == step)[0]
        return float(loss[hit[0]]) if hit.size else math.nan

    return value


def _per_seed(curves: Curves, model: str, corr: float, value) -> dict[int, float]:
    """``{seed: value(steps, losses)}`` of one model at one correlation."""
    return {s: value(*curve) for s, curve in curves[model].get(corr, {}).items()}


def _table(curves: Curves, corrs: list[float], value) -> str:
    """Rows: models; columns: correlations, then the paired ratio lowest / highest correlation."""
    lo, hi = min(corrs), max(corrs)
    head = ["model", *[f"corr {c:g}" for c in corrs]]
    if len(corrs) > 1:
        head.append(f"corr {lo:g} / corr {hi:g}")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model in _ordered(curves):
        per = {c: _per_seed(curves, model, c, value) for c in corrs}
        cells = []
        for c in corrs:
            v = np.asarray([x for x in per[c].values() if not math.isnan(x)], float)
            cells.append(fmt(v.mean(), v.std(ddof=1) if v.size > 1 else math.nan) if v.size else "n/a")
        if len(corrs) > 1:
            seeds = sorted(set(per[lo]) & set(per[hi]))
            r = np.asarray([per[lo][s] / per[hi][s] for s in seeds], float)
            r = r[np.isfinite(r)]
            cells.append((f"{r.mean():.2f}" + (f" ± {r.std(ddof=1):.2f}" if r.size > 1 else "")) if r.size else "n/a")
        lines.append(f"| {LABELS.get(model, model)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bootstrap_ci(x: np.ndarray, stat=np.mean, level: float = 0.95, resamples: int = 10_000) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat`` over the rows of ``x`` (seeded: the same input gives the same CI)."""
    x = np.asarray(x, float)
    if x.shape[0] < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(0)
    draws = stat(x[rng.integers(0, x.shape[0], (resamples, x.shape[0]))], axis=1)
    tail = (1.0 - level) / 2.0
    return float(np.quantile(draws, tail)), float(np.quantile(draws, 1.0 - tail))


def correlation_effect(curves: Curves, lo: float, hi: float, value) -> dict[str, dict[int, float]]:
    """Per model, ``{seed: loss(lo) - loss(hi)}`` over the seeds run at both correlations."""
    out = {}
    for model in _ordered(curves):
        a, b = _per_seed(curves, model, lo, value), _per_seed(curves, model, hi, value)
        out[model] = {s: a[s] - b[s] for s in sorted(set(a) & set(b)) if math.isfinite(a[s] - b[s])}
    return out


def _interval(x: np.ndarray, digits: int, sign: str = "+") -> str:
    """``mean [lo, hi]`` with the 95% bootstrap interval; ``sign="+"`` prints signed differences."""
    lo, hi = bootstrap_ci(x)
    f = f"{sign}.{digits}f"
    return f"{x.mean():{f}} [{lo:{f}}, {hi:{f}}]" if x.size > 1 else "n/a"


def _effect_tables(curves: Curves, corrs: list[float], sections: list[tuple[str, Any]]) -> str:
    """The correlation's effect per model and its difference between models, with 95% bootstrap intervals."""
    lo, hi = min(corrs), max(corrs)
    names = [title.split(" (")[0].lower() for title, _ in sections]
    head = ["model", "seeds"]
    for name in names:
        head += [f"{name}: difference", f"{name}: ratio", f"{name}: seeds worse"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    effects = [correlation_effect(curves, lo, hi, value) for _, value in sections]
    for model in _ordered(curves):
        row = [LABELS.get(model, model), str(len(effects[0][model]))]
        for (_, value), effect in zip(sections, effects, strict=True):
            d = np.asarray(list(effect[model].values()))
            a, b = _per_seed(curves, model, lo, value), _per_seed(curves, model, hi, value)
            r = np.asarray([a[s] / b[s] for s in effect[model]])
            row += [_interval(d, 4), _interval(r, 2, sign=""), f"{int((d > 0).sum())}/{d.size}"]
        lines.append("| " + " | ".join(row) + " |")
    text = "\n".join(lines) + "\n"
    ref = "mmoe" if "mmoe" in curves else None
    others = [m for m in _ordered(curves) if m != ref]
    if ref and others:
        head = ["effect minus MMoE's", "seeds", *[f"{name}: difference" for name in names]]
        rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for model in others:
            paired = [sorted(set(effect[model]) & set(effect[ref])) for effect in effects]
            cells = [
                _interval(np.asarray([effect[model][s] - effect[ref][s] for s in seeds]), 4)
                for effect, seeds in zip(effects, paired, strict=True)
            ]
            rows.append(f"| {LABELS.get(model, model)} | {len(paired[0])} | " + " | ".join(cells) + " |")
        text += "\n" + "\n".join(rows) + "\n"
    return text


def tabulate(*sweeps: Path, budgets: list[int] | None = None) -> tuple[str, Curves]:
    """Markdown tables (mean loss over the run, final loss, loss at ``budgets``, the correlation's effect with
    bootstrap intervals) and the curves of finished sweeps."""
    curves = load_curves(*sweeps)
    if not curves:
        raise ValueError(f"no finished run with a test loss under {', '.join(map(str, sweeps))}")
    corrs = sorted({c for m in curves.values() for c in m}, reverse=True)
    runs = [curve for m in curves.values() for by_seed in m.values() for curve in by_seed.values()]
    seeds = max((len(by_seed) for m in curves.values() for by_seed in m.values()), default=0)
    last = max((int(s[-1]) for s, _ in runs), default=0)
    evals = sorted({int(x) for s, _ in runs for x in s})
    sections = [
        (
            f"Mean test loss over the run (the {len(evals)} evaluations at steps {evals[0] if evals else 0}-{last}; "
            "the area under the loss curve, lower is better)",
            lambda steps, loss: float(np.mean(loss)),
        ),
        (f"Test loss at step {last} (the end of the run)", lambda steps, loss: float(loss[-1])),
    ]
    for b in sorted(set(budgets or []) - {last}):
        sections.append((f"Test loss at step {b}", _at(b)))
    parts = [
        f"Test loss = the sum of the two tasks' MSE {NOISE_FLOOR_NOTE}; mean ± std over {seeds} seeds; the last "
        "column is the paired ratio over seeds (same seed: same problem apart from the correlation).\n"
    ]
    for title, value in sections:
        parts.append(f"{title}:\n\n{_table(curves, corrs, value)}")
    if len(corrs) > 1:
        lo, hi = min(corrs), max(corrs)
        parts.append(
            f"The correlation's effect, paired by seed: loss at corr {lo:g} minus loss at corr {hi:g} (positive: the "
            f"model degrades), their ratio, and how many seeds degrade; mean [95% bootstrap interval] over seeds. "
            f"Below, each model's effect minus MMoE's on the same seeds (positive: the model degrades more than "
            f"MMoE).\n\n{_effect_tables(curves, corrs, sections[:2])}"
        )
    return "\n".join(parts), curves


def plot(curves: Curves, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corrs = sorted({c for m in curves.values() for c in m}, reverse=True)
    fig, axes = plt.subplots(1, len(corrs) + 1, figsize=(3.2 * (len(corrs) + 1), 3.2))
    for ax in axes[1:-1]:
        ax.sharey(axes[0])
    for model in _ordered(curves):
        label = LABELS.get(model, model)
        for ax, c in zip(axes, corrs, strict=False):
            by_seed = curves[model].get(c, {})
            if not by_seed:
                continue
            steps = sorted(set.intersection(*(set(s.tolist()) for s, _ in by_seed.values())))
            mean = [np.mean([loss[list(s).index(t)] for s, loss in by_seed.values()]) for t in steps]
            ax.plot(steps, mean, label=label)
            ax.set_title(f"correlation {c:g}")
        cs = [c for c in corrs if curves[model].get(c)]
        aucs = [[float(np.mean(loss)) for _, loss in curves[model][c].values()] for c in cs]
        std = [np.std(a, ddof=1) if len(a) > 1 else 0.0 for a in aucs]
        axes[-1].errorbar(cs, [np.mean(a) for a in aucs], yerr=std, marker="o", capsize=3, label=label)
    for ax in axes[:-1]:
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("test loss (sum of MSE), mean over seeds")
    axes[0].legend()
    axes[-1].set_xlabel("task correlation")
    axes[-1].set_title("mean test loss over the run")
    axes[-1].invert_xaxis()
    axes[-1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def study_overrides(models: list[str], corrs: list[float], seeds: list[int], args: argparse.Namespace) -> list[str]:
    """The study's Hydra overrides: with several values a key is swept (a multirun's command line); with one value
    each, they are what that run's job records in ``.hydra/overrides.yaml``."""
    out = ["experiment=mmoe_synthetic", f"model={','.join(models)}", f"data.correlation={','.join(map(str, corrs))}"]
    out += [f"seed={','.join(map(str, seeds))}", *args.overrides]
    if args.steps is not None:
        out.append(f"trainer.max_steps={args.steps}")
    return out


def _sweep_command(sweep: Path, seeds: list[int], args: argparse.Namespace) -> list[str]:
    overrides = study_overrides(args.models, args.correlations, seeds, args)
    return [sys.executable, str(ROOT / "scripts" / "train.py"), "-m", *overrides, f"hydra.sweep.dir={sweep}"]


def run_sweeps(sweeps: list[Path], groups: list[list[int]], args: argparse.Namespace) -> None:
    """One Hydra multirun (or, with ``--ensemble``, one ensemble worker) per seed group. A single group runs in the
    foreground; several run at once, each pinned to its share of this process's CPUs (where the OS allows) and
    logging to ``<sweep>/study.log`` (ensemble workers share one sweep folder: ``study-<k>.log``)."""
    command = _ensemble_command if args.ensemble else _sweep_command
    if len(sweeps) == 1 and args.ensemble:
        run_ensembles(sweeps[0], groups[0], args)
        return
    if len(sweeps) == 1:
        cmd = _sweep_command(sweeps[0], groups[0], args)
        print("running:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
        return
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    procs = []
    for k, (sweep, seeds) in enumerate(zip(sweeps, groups, strict=True)):
        share = set(cpus[k :: len(sweeps)])
        pin = (lambda share=share: os.sched_setaffinity(0, share)) if share else None
        cmd = command(sweep, seeds, args)
        log_path = sweep / (f"study-{k}.log" if args.ensemble else "study.log")
        print(f"worker {k} (CPUs {sorted(share) or 'any'}), log {log_path}:", " ".join(cmd), flush=True)
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, preexec_fn=pin)
        procs.append((proc, log_path))
    failed = [str(path) for proc, path in procs if proc.wait() != 0]
    if failed:
        raise SystemExit(f"a sweep failed; see {', '.join(failed)}")


def _finished(run: Path) -> bool:
    summary = run / "summary.json"
    return summary.exists() and bool(json.loads(summary.read_text()).get("completed"))


def run_ensembles(sweep: Path, seeds: list[int], args: argparse.Namespace) -> None:
    """Every model and correlation over ``seeds``, ``args.ensemble`` seeds at a time, into ``sweep``; runs that
    finished already (a completed ``summary.json``) are skipped."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from corrjax.train.config import register_configs
    from corrjax.train.ensemble import train_seeds

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3", job_name="mmoe_ensemble"):
        for model in args.models:
            for corr in args.correlations:
                todo = [s for s in seeds if not _finished(sweep / model / f"corr{corr:g}" / f"seed{s}")]
                for k in range(0, len(todo), args.ensemble):
                    chunk = todo[k : k + args.ensemble]
                    overrides = [study_overrides([model], [corr], [s], args) for s in chunk]
                    # An unfinished run of an earlier invocation is trained again from scratch: its partial results
                    # are replaced (the ensemble keeps no checkpoints to resume from).
                    cfg = compose(config_name="train", overrides=[*overrides[0], "trainer.overwrite=true"])
                    dirs = [sweep / model / f"corr{corr:g}" / f"seed{s}" for s in chunk]
                    t0 = time.perf_counter()
                    train_seeds(cfg, chunk, dirs, overrides)
                    print(
                        f"model={model} corr={corr:g} seeds {chunk[0]}..{chunk[-1]} ({len(chunk)}): "
                        f"{time.perf_counter() - t0:.0f} s",
                        flush=True,
                    )
    GlobalHydra.instance().clear()


def _ensemble_command(sweep: Path, seeds: list[int], args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--no-table", "--sweep-into", str(sweep)]
    cmd += ["--ensemble", str(args.ensemble)]
    cmd += ["--models", *args.models, "--correlations", *map(str, args.correlations), "--seeds", *map(str, seeds)]
    if args.steps is not None:
        cmd += ["--steps", str(args.steps)]
    return [*cmd, "--", *args.overrides]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--correlations", nargs="+", type=float, default=[1.0, 0.9, 0.5, 0.0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--steps", type=int, default=None, help="override trainer.max_steps")
    p.add_argument("--budgets", nargs="+", type=int, default=[1000], help="also tabulate the test loss at these steps")
    p.add_argument(
        "--workers", type=int, default=1, help="split the seeds over this many multiruns run at once, one per CPU share"
    )
    p.add_argument("--out", default=str(ROOT / "multirun" / "mmoe_synthetic"), help="parent of new sweep folders")
    p.add_argument("--sweep-dir", nargs="+", help="tabulate existing sweeps (together) instead of running one")
    p.add_argument(
        "--ensemble",
        type=int,
        default=0,
        metavar="K",
        help="train K seeds at once (corrjax.train.ensemble) instead of Hydra multiruns; 0: multiruns",
    )
    p.add_argument(
        "--sweep-into",
        metavar="DIR",
        help="with --ensemble: train into this folder (skipping finished runs) and tabulate it, no new folder",
    )
    p.add_argument("--no-table", action="store_true", help=argparse.SUPPRESS)  # ensemble workers: train only
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = p.parse_args(argv)
    if args.sweep_dir:
        sweeps = [Path(d) for d in args.sweep_dir]
        missing = [str(d) for d in sweeps if not d.is_dir()]
        if missing:
            p.error(f"--sweep-dir: no such folder: {', '.join(missing)}")
    else:
        if args.workers < 1:
            p.error(f"--workers must be positive, got {args.workers}")
        if args.ensemble < 0:
            p.error(f"--ensemble must be >= 0, got {args.ensemble}")
        if args.sweep_into and not args.ensemble:
            p.error("--sweep-into needs --ensemble K (Hydra multiruns always start a fresh folder)")
        groups = [g for g in (args.seeds[k :: args.workers] for k in range(args.workers)) if g]
        if args.ensemble:  # one folder; the workers write disjoint runs into it
            sweep = Path(args.sweep_into) if args.sweep_into else new_sweep_dir(Path(args.out))
            sweep.mkdir(parents=True, exist_ok=True)
            sweeps = [sweep] * len(groups)
        else:
            sweeps = [new_sweep_dir(Path(args.out)) for _ in groups]
        run_sweeps(sweeps, groups, args)
        if args.no_table:
            return 0
        sweeps = sweeps[:1] if args.ensemble else sweeps
    try:
        md, curves = tabulate(*sweeps, budgets=args.budgets)
    except ValueError as e:
        p.error(str(e))
    out = sweeps[0]
    (out / "mmoe_synthetic.md").write_text(md)
    plot(curves, out / "mmoe_synthetic.png")
    print(md)
    print(f"written to {out}/mmoe_synthetic.{{md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
