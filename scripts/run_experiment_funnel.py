"""ESMM vs a naive CVR model vs MMoE/PLE on the synthetic purchase funnel, and ESMM under several aggregators.

    python scripts/run_experiment_funnel.py [--seeds 0 1 2] [--steps 1500] [--models esmm naive mmoe ple] \
        [--mtl ew pcgrad mgda nash_mtl upgrad cagrad] [--sweep-seeds 0 1 2] [--readme README.md] [-- <overrides>]
    python scripts/run_experiment_funnel.py --skip-models --sweep-dir multirun/funnel_esmm/<stamp>  # tabulate only

**Models** (in this process, ``experiment=funnel_esmm`` composed with each model's overrides; each run is built by
:func:`corrjax.train.setup.build` and trained by its own train step, as ``scripts/train.py`` trains it):

- ``esmm``: ESMM (``model=esmm``, ``tasks=[click,purchase]``): CTR and CTCVR losses on every impression;
- ``naive``: a CVR model trained on clicked impressions only (``model=hps``, ``tasks=[cvr]``: the ``cvr`` label is
  missing on unclicked impressions), the sample-selection-biased baseline of the ESMM paper;
- ``mmoe``, ``ple``: MMoE and PLE on ``tasks=[click,cvr]`` (CTR on all impressions, CVR on clicked ones): the usual
  multi-task recipe, which shares experts but still fits CVR to the clicked sample;
- ``esmm_mmoe``: ESMM with an MMoE body (its CTR and CVR networks are MMoE's two tasks).

Every model has the same embedding front (8-wide tables over user, item, category, segment, history; price). On the
test split: AUC and GAUC (per-user AUC weighted by impressions, Zhou et al. 2018) of pCTR on clicks (all
impressions), of pCVR on purchases among clicked impressions (the observable CVR AUC), of pCTCVR (ESMM's output, or
pCTR x pCVR) on purchases (all impressions); and, against the generator's ground truth on **all** impressions, the
AUC of pCVR on the counterfactual conversion labels (``dataset.would_purchase``), the mean of pCVR minus the true
CVR (the selection bias; also on unclicked impressions alone) and its RMSE. AUC and GAUC are
:func:`corrjax.stats.roc_auc` / :func:`corrjax.stats.gauc` when present, else scikit-learn on the host.

**Aggregators**: a Hydra multirun ``scripts/train.py -m experiment=funnel_esmm mtl=<...> seed=<...>`` (ESMM), each
finished run rebuilt from its ``.hydra/config.yaml``, its last checkpoint restored and scored as above; mean +- std
over seeds.

The tables go to ``funnel_esmm.md`` in the sweep folder and, with ``--readme``, into the README between the markers
``<!-- funnel:models:start/end -->`` and ``<!-- funnel:aggregators:start/end -->``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep_dirs import new_sweep_dir

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("run_experiment_funnel")

MODELS: dict[str, list[str]] = {
    "esmm": ["model=esmm", "tasks=[click,purchase]"],
    "naive": ["model=hps", "tasks=[cvr]", "model.backbone.hidden=[64]", "model.head_hidden=[32]"],
    "mmoe": [
        "model=mmoe",
        "tasks=[click,cvr]",
        "model.num_experts=4",
        "model.expert.hidden=[32]",
        "model.tower_hidden=[16]",
    ],
    "ple": [
        "model=ple",
        "tasks=[click,cvr]",
        "model.num_levels=1",
        "model.expert.hidden=[32]",
        "model.tower_hidden=[16]",
    ],
    "esmm_mmoe": [
        "model=esmm",
        "tasks=[click,purchase]",
        "model.body={_target_: corrjax.models.MMoE, _partial_: true, expert: {_target_: corrjax.models.MLP,"
        " _partial_: true, in_features: null, hidden: [32]}, num_experts: 4, gate_in_features: null,"
        " tower_hidden: [16]}",
    ],
}
LABELS = {
    "esmm": "ESMM",
    "naive": "naive CVR (clicked only)",
    "mmoe": "MMoE [click, cvr]",
    "ple": "CGC/PLE-1 [click, cvr]",
    "esmm_mmoe": "ESMM, MMoE body",
}
COLUMNS = (
    ("ctr_auc", "CTR AUC"),
    ("ctr_gauc", "CTR GAUC"),
    ("cvr_auc", "CVR AUC (clicked)"),
    ("cvr_gauc", "CVR GAUC (clicked)"),
    ("ctcvr_auc", "CTCVR AUC"),
    ("ctcvr_gauc", "CTCVR GAUC"),
    ("cvr_auc_all", "CVR AUC (all, true labels)"),
    ("cvr_bias", "pCVR - true CVR (all)"),
    ("cvr_bias_unclicked", "(unclicked)"),
    ("cvr_rmse", "RMSE vs true CVR"),
)


# --------------------------------------------------------------------------------------------------- AUC and GAUC
def auc_functions():
    """``(auc(scores, labels), gauc(scores, labels, groups, num_groups), source)``: corrjax.stats's if present."""
    try:
        import jax

        from corrjax.stats import gauc as cj_gauc
        from corrjax.stats import roc_auc as cj_auc

        def padded(s, y, g=None):
            # Rows padded with zero weight to a multiple of 2**16: one compiled program for every subset size.
            n = len(s)
            size = -(-n // 65536) * 65536
            pad = lambda a, dt: np.concatenate([np.asarray(a, dt), np.zeros(size - n, dt)])
            w = pad(np.ones(n), np.float32)
            return pad(s, np.float32), pad(np.asarray(y) > 0.5, np.float32), w, None if g is None else pad(g, np.int32)

        auc_jit = jax.jit(cj_auc)
        gauc_jit = jax.jit(cj_gauc, static_argnums=3)

        def auc(s, y):
            s, y, w, _ = padded(s, y)
            return float(auc_jit(s, y, w))

        def gauc(s, y, g, k):
            s, y, w, g = padded(s, y, g)
            return float(gauc_jit(s, y, g, k, w))

        return auc, gauc, "corrjax.stats.roc_auc / gauc"
    except ImportError:
        from sklearn.metrics import roc_auc_score

        def auc(s, y):
            y = np.asarray(y) > 0.5
            return float(roc_auc_score(y, s)) if 0 < y.sum() < y.size else math.nan

        def gauc(s, y, g, k):
            num = den = 0.0
            for u in np.unique(g):
                sel = g == u
                a = auc(s[sel], y[sel])
                if not math.isnan(a):
                    num, den = num + sel.sum() * a, den + sel.sum()
            return num / den if den else math.nan

        return auc, gauc, "scikit-learn roc_auc_score (host)"


# ------------------------------------------------------------------------------------------------ model runs
def train_and_predict(cfg: Any) -> tuple[dict[str, np.ndarray], Any, float]:
    """Trains ``cfg`` as the loop does (one device) and returns the test outputs, the test set and the seconds."""
    import jax

    from corrjax.data import BatchIterator
    from corrjax.train.setup import build

    setup = build(cfg)
    tc = cfg.trainer
    state = setup.init_state()
    train_step = jax.jit(setup.train_step, donate_argnums=0)
    iterator = BatchIterator(setup.train_data, int(tc.batch_size), seed=setup.seed, prefetch=0)
    start = time.perf_counter()
    for _ in range(int(tc.max_steps)):
        state, _metrics = train_step(state, next(iterator))
    outputs = predict(setup, state)
    iterator.close()
    return outputs, setup.eval_data, time.perf_counter() - start


def score_run(out: dict[str, np.ndarray], data: Any, auc, gauc) -> dict[str, float]:
    """The table's metrics of one run's test outputs (logits) against the test split and its ground truth."""
    sig = lambda z: 1.0 / (1.0 + np.exp(-z.astype(np.float64)))
    click = np.asarray(data.arrays["click"]) > 0.5
    purchase = np.asarray(data.arrays["purchase"]) > 0.5
    users = np.asarray(data.arrays["x"]["user_id"])
    num_users = next(f.vocab_size for f in data.features if f.name == "user_id")
    p_ctr = sig(out["click"]) if "click" in out else None
    p_cvr = sig(out["cvr"])
    p_ctcvr = sig(out["purchase"]) if "purchase" in out else (p_ctr * p_cvr if p_ctr is not None else None)
    m: dict[str, float] = {}
    if p_ctr is not None:
        m["ctr_auc"], m["ctr_gauc"] = auc(p_ctr, click), gauc(p_ctr, click, users, num_users)
    m["cvr_auc"] = auc(p_cvr[click], purchase[click])
    m["cvr_gauc"] = gauc(p_cvr[click], purchase[click], users[click], num_users)
    if p_ctcvr is not None:
        m["ctcvr_auc"], m["ctcvr_gauc"] = auc(p_ctcvr, purchase), gauc(p_ctcvr, purchase, users, num_users)
    m["cvr_auc_all"] = auc(p_cvr, data.would_purchase)
    err = p_cvr - data.true_cvr
    m["cvr_bias"], m["cvr_bias_unclicked"] = float(err.mean()), float(err[~click].mean())
    m["cvr_rmse"] = float(np.sqrt(np.mean(err**2)))
    return m


def run_models(models: list[str], seeds: list[int], steps: int | None, overrides: list[str]) -> dict[str, Any]:
    from hydra import compose, initialize_config_dir

    from corrjax.train.config import register_configs

    register_configs()
    auc, gauc, source = auc_functions()
    results: dict[str, list[dict[str, float]]] = {}
    seconds: dict[str, list[float]] = {}
    info: dict[str, Any] = {}
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3", job_name="funnel_models"):
        for name in models:
            for seed in seeds:
                extra = [f"trainer.max_steps={steps}"] if steps else []
                cfg = compose(
                    "train", overrides=["experiment=funnel_esmm", *MODELS[name], f"seed={seed}", *extra, *overrides]
                )
                out, data, secs = train_and_predict(cfg)
                m = score_run(out, data, auc, gauc)
                log.info("%s seed %d (%.0f s): %s", name, seed, secs, {k: round(v, 4) for k, v in m.items()})
                results.setdefault(name, []).append(m)
                seconds.setdefault(name, []).append(secs)
                info = {k: data.info[k] for k in ("ctr", "cvr_on_clicks", "true_cvr_mean", "selection_bias")}
                info["max_steps"] = int(cfg.trainer.max_steps)
                info["batch_size"] = int(cfg.trainer.batch_size)
    return {"results": results, "seconds": seconds, "auc_source": source, "test_info": info, "seeds": seeds}


def fmt(values: list[float], digits: int = 4) -> str:
    v = np.asarray([x for x in values if not math.isnan(x)], np.float64)
    if v.size == 0:
        return "-"
    std = v.std(ddof=1) if v.size > 1 else 0.0
    return f"{v.mean():.{digits}f} ± {std:.{digits}f}"


def models_table(study: dict[str, Any]) -> str:
    info = study["test_info"]
    lines = [
        f"Test split (50k impressions of the default world): CTR {info['ctr']:.3f}, observed CVR on clicks "
        f"{info['cvr_on_clicks']:.3f}, true CVR over all impressions {info['true_cvr_mean']:.3f} (selection bias of "
        f"the clicked sample {info['selection_bias']:+.3f}). {info['max_steps']} steps of batch "
        f"{info['batch_size']}; mean ± std over seeds {', '.join(map(str, study['seeds']))}; AUC/GAUC by "
        f"{study['auc_source']}.",
        "",
        "| model | " + " | ".join(c for _, c in COLUMNS) + " | s/run |",
        "|---|" + "---|" * (len(COLUMNS) + 1),
    ]
    for name, runs in study["results"].items():
        cells = [fmt([r.get(k, math.nan) for r in runs]) for k, _ in COLUMNS]
        secs = np.mean(study["seconds"][name])
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + f" | {secs:.0f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ aggregator sweep
def run_sweep(mtl: list[str], seeds: list[int], steps: int | None, overrides: list[str]) -> Path:
    base = new_sweep_dir(ROOT / "multirun" / "funnel_esmm")
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "train.py"),
        "-m",
        "experiment=funnel_esmm",
        f"mtl={','.join(mtl)}",
        f"seed={','.join(map(str, seeds))}",
        f"hydra.sweep.dir={base}",
        *([f"trainer.max_steps={steps}"] if steps else []),
        *overrides,
    ]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return base


def predict(setup: Any, state: Any) -> dict[str, np.ndarray]:
    """The eval split's outputs ``{name: (n,)}`` of ``state`` (one device, in order)."""
    import jax

    from corrjax.train.evaluate import iterate_in_order

    eval_step, outputs = jax.jit(setup.eval_step), []
    for batch, mask in iterate_in_order(setup.eval_data, int(setup.cfg.trainer.eval_batch_size), 1):
        out = jax.device_get(eval_step(state, {"x": batch["x"]}))
        outputs.append({k: np.asarray(v)[mask] for k, v in out.items()})
    return {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}


def score_checkpoint(run_dir: Path, auc, gauc) -> dict[str, float]:
    """Rebuilds a finished Hydra run from its ``.hydra/config.yaml``, restores its last checkpoint (the loop saves
    one at the last step) and scores its test outputs like the model runs. The scores are kept in the run's
    ``funnel_scores.json`` and read from there next time (so several sweep folders can be scored in parallel and
    tabulated together)."""
    cache = run_dir / "funnel_scores.json"
    if cache.exists():
        return json.loads(cache.read_text())
    from omegaconf import OmegaConf

    from corrjax.train import checkpoint
    from corrjax.train.setup import build

    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    setup = build(cfg)
    ckpt = checkpoint.Checkpointer(run_dir / "checkpoints", async_save=False)
    try:
        state = ckpt.restore(checkpoint.abstract_like(setup.init_state())).state
    finally:
        ckpt.close()
    scores = score_run(predict(setup, state), setup.eval_data, auc, gauc)
    cache.write_text(json.dumps(scores))
    return scores


def sweep_table(folder: Path) -> tuple[str, dict[str, Any]]:
    """The aggregator table of a finished sweep: every run's last checkpoint scored against the ground truth."""
    from compare import scan_runs

    auc, gauc, source = auc_functions()
    runs, excluded = scan_runs(folder)
    groups: dict[str, list[dict[str, float]]] = {}
    for r in runs:
        m = score_checkpoint(Path(r["dir"]), auc, gauc)
        log.info("%s: %s", r["dir"], {k: round(v, 4) for k, v in m.items()})
        groups.setdefault(r["overrides"].get("mtl", "ew"), []).append(m)
    counts = sorted({len(g) for g in groups.values()})
    shown = folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder
    lines = [
        f"`{shown}`: {len(runs)} runs"
        + (f", {len(excluded)} excluded" if excluded else "")
        + f"; {'/'.join(map(str, counts))} seeds per aggregator, mean ± std; AUC/GAUC by {source}.",
        "",
        "| mtl | " + " | ".join(c for _, c in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for name in sorted(groups):
        cells = [fmt([r.get(k, math.nan) for r in groups[name]]) for k, _ in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines), groups


def write_section(path: Path, key: str, body: str) -> None:
    start, end = f"<!-- funnel:{key}:start -->", f"<!-- funnel:{key}:end -->"
    text = path.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{path} lacks the markers {start} ... {end}")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{body}\n{end}{tail}")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["esmm", "naive", "mmoe", "ple", "esmm_mmoe"], choices=MODELS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--mtl", nargs="+", default=["ew", "pcgrad", "mgda", "nash_mtl", "upgrad", "cagrad"])
    p.add_argument("--sweep-seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="trainer.max_steps (default: the preset's)")
    p.add_argument("--skip-models", action="store_true")
    p.add_argument("--skip-sweep", action="store_true")
    p.add_argument("--sweep-dir", help="tabulate this finished sweep instead of running one")
    p.add_argument("--readme", help="write the tables into this README's funnel sections")
    p.add_argument("--out", default=None, help="where to write funnel_esmm.md/.json (default: the sweep folder)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    sections: dict[str, str] = {}
    record: dict[str, Any] = {}
    if not args.skip_models:
        study = run_models(args.models, args.seeds, args.steps, args.overrides)
        sections["models"] = models_table(study)
        record["models"] = study
        print(sections["models"])
    folder = None
    if args.sweep_dir:
        folder = Path(args.sweep_dir).resolve()
    elif not args.skip_sweep:
        folder = run_sweep(args.mtl, args.sweep_seeds, args.steps, args.overrides)
    if folder is not None:
        sections["aggregators"], record["aggregators"] = sweep_table(folder)
        print(sections["aggregators"])
    out = Path(args.out) if args.out else (folder or new_sweep_dir(ROOT / "multirun" / "funnel_esmm"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "funnel_esmm.md").write_text("\n\n".join(sections.values()) + "\n")
    (out / "funnel_esmm.json").write_text(json.dumps(record, indent=1, default=float))
    if args.readme:
        for key, body in sections.items():
            write_section(Path(args.readme), key, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
