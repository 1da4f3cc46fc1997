"""The two-objective Pareto toy of the CAGrad and Nash-MTL papers, run with every corrjax.mtl aggregator.

Two problems (:mod:`corrjax.mtl.toys`), each with the papers' settings (from the authors' code):

- ``cagrad``: Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021, Fig. 1
  (github.com/Cranial-XIX/CAGrad ``toy.py``): the starts (-8.5, 7.5), (-8.5, -5), (9, 9); Adam, learning rate 1e-3,
  100 000 steps; CAGrad with ``c = 0.5`` and the update divided by ``1 + c``.
- ``nash_mtl``: Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022, Fig. 1 of arXiv:2202.01017
  (github.com/AvivNavon/nash-mtl ``experiments/toy``): ``f1`` scaled by 0.1; the starts (-8.5, 7.5), (0, 0),
  (9, 9), (-7.5, -0.5), (9, -1); Adam, learning rate 1e-3, 35 000 steps; CAGrad with ``c = 0.4`` and the update
  divided by ``1 + c^2``; Nash-MTL's update clipped to norm 1 (``max_norm=1.0``).

Every aggregator and loss weighting the library exports is run (see :func:`methods`: a table of the methods with
the papers' settings, plus any other transformation that ``corrjax.mtl`` exports and that builds with its defaults, so
newer methods are picked up when they land). Loss weightings get the task losses shifted by ``21`` (times the
loss's scale) as the extra arg ``task_losses``: the toy's losses go down to ``-20`` and FAMO's toy code uses
``min_losses = [-21 * scale, -21]``. Each method runs as one jitted ``lax.scan`` over the steps, vmapped over the
starting points.

Writes ``docs/toy_pareto_<toy>.png`` (one panel per method: trajectories over the contours of the mean loss, the
Pareto set in grey) and the ``toy-pareto`` section of README.md (where each method ends: distance to the Pareto set
and ``x1``, the position along it, per start, next to what the papers' figures show).

Run: ``.venv/bin/python scripts/toy_pareto.py`` (about 1.5 CPU-minutes for both toys and all 19 methods, measured
on a 2-core machine); ``--steps``, ``--methods``, ``--toys``, ``--readme``, ``--out-dir`` for shorter or partial
runs (a shortened run says so in the table's heading).
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import optax

import corrjax.mtl as mtl
from corrjax.mtl import toys

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib

ROOT = Path(__file__).resolve().parent.parent
SECTION = "toy-pareto"
ON_FRONT = 0.05
"""A run ends on the Pareto set when its final point is within this distance of it (in x)."""
LOSS_SHIFT = 21.0


@dataclass(frozen=True)
class Toy:
    """One of the papers' problems and its settings."""

    name: str
    title: str
    f1_scale: float
    starts: np.ndarray
    steps: int
    learning_rate: float
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-method keyword arguments that the paper's code uses."""
    clip: dict[str, float] = field(default_factory=dict)
    """Per-method global-norm clip of the aggregated update (before Adam), as in the paper's code."""


TOYS = {
    "cagrad": Toy(
        name="cagrad",
        title="CAGrad paper toy (Liu et al. 2021, Fig. 1)",
        f1_scale=1.0,
        starts=toys.CAGRAD_STARTS,
        steps=100_000,
        learning_rate=1e-3,
        settings={"cagrad": {"c": 0.5, "rescale": 2}},
        clip={"nash_mtl": 1.0},
    ),
    "nash_mtl": Toy(
        name="nash_mtl",
        title="Nash-MTL paper toy, f1 x 0.1 (Navon et al. 2022, Fig. 1 of arXiv:2202.01017)",
        f1_scale=0.1,
        starts=toys.NASH_MTL_STARTS,
        steps=35_000,
        learning_rate=1e-3,
        settings={"cagrad": {"c": 0.4, "rescale": 1}},
        clip={"nash_mtl": 1.0},
    ),
}

# Listed methods, in the order of the table: the papers' baselines first, then the rest of the library, as
# ``row name: (corrjax.mtl attribute, keyword arguments)``. Settings beyond a method's defaults come from the paper's
# code (``Toy.settings``, by row name) or from the method's own toy code (FAMO: ``gamma=0``, experiments/toy/run.sh of
# github.com/Cranial-XIX/FAMO). Rows whose attribute is not in corrjax.mtl are skipped. Methods exported by
# corrjax.mtl but not listed here (the newer ones: FairGrad, ConFIG, STCH, ...) are discovered and run with their
# defaults after these; list one here to give it a paper's settings or a place in the table.
LISTED: dict[str, tuple[str, dict[str, Any]]] = {
    "mean": ("mean", {}),
    "sum": ("sum", {}),
    "mgda": ("mgda", {}),
    "mgda[frank_wolfe]": ("mgda", {"method": "frank_wolfe"}),  # MGDA-UB's solver, unregularised
    "pcgrad": ("pcgrad", {}),
    "cagrad": ("cagrad", {}),
    "nash_mtl": ("nash_mtl", {}),
    "upgrad": ("upgrad", {}),
    "dualproj": ("dualproj", {}),
    "imtl_g": ("imtl_g", {}),
    "aligned_mtl": ("aligned_mtl", {}),
    "gradvac": ("gradvac", {}),
    "graddrop": ("graddrop", {}),
    "rlw": ("rlw", {}),
    "uncertainty_weighting": ("uncertainty_weighting", {}),
    "dwa": ("dwa", {}),
    "gradnorm": ("gradnorm", {}),
    "famo": ("famo", {"gamma": 0.0}),
    "geometric_mean": ("geometric_mean", {}),
}

# Exported names of corrjax.mtl that are not multi-task optimisers (or need arguments with no neutral default).
NOT_METHODS = {
    "GramianWeighting",
    "RepGrads",
    "TaskGramian",
    "combine_tasks",
    "conflict_fraction",
    "cosine_from_gramian",
    "from_weighting",
    "gradient_diagnostics",
    "gradient_magnitude_similarity",
    "gradient_norm_ratios",
    "shared_only",
    "solvers",
    "tag_affinity",
    "task_gradient_cosine",
    "task_gradient_norms",
    "task_gramian",
    "toys",
    "value_and_rep_grad",
    "value_and_task_grad",
    "weighted",  # fixed weights: mean/sum with other numbers
}


@dataclass(frozen=True)
class Claim:
    """What a paper's figure shows for one method, and a check of our run against it."""

    text: str
    check: Callable[[Result], bool]


def _on(r: Result) -> np.ndarray:
    return r.distance < ON_FRONT


def _some_off(r: Result) -> bool:
    return not bool(_on(r).all())


_LED_BY_L2 = "led by the larger l2 gradient, misses the front from some starts"


def _all_on_and_stay(r: Result) -> bool:
    return bool(np.all(_on(r)) and np.all(r.drift < 0.5))


# The papers' figures: Liu et al. 2021 (arXiv:2110.14048), Fig. 1; Navon et al. 2022 (arXiv:2202.01017), Fig. 1
# (the illustrative example; Appendix B). The Nash-MTL caption says that for LS, PCGrad and CAGrad "the
# optimization process is controlled by the gradient of l2, since it has a larger magnitude" and that they do not
# reach the Pareto front from some initialisations; the other texts are our reading of the figures.
PAPERS: dict[str, dict[str, Claim]] = {
    "cagrad": {
        "mean": Claim(
            "Adam on the mean loss: stuck on the flat upper half from the two upper starts",
            lambda r: bool(not _on(r)[0] and _on(r)[1] and not _on(r)[2]),
        ),
        "mgda": Claim("reaches the Pareto set from every start and stays where it lands", _all_on_and_stay),
        "mgda[frank_wolfe]": Claim("(MGDA) reaches the Pareto set and stays where it lands", _all_on_and_stay),
        "pcgrad": Claim(
            "reaches the Pareto set from every start, not at the mean-loss optimum",
            lambda r: bool(np.all(_on(r)) and np.any(np.abs(r.final[:, 0]) > 0.5)),
        ),
        "cagrad": Claim(
            "reaches the Pareto set from every start, at the mean-loss optimum x1 = 0",
            lambda r: bool(np.all(_on(r)) and np.all(np.abs(r.final[:, 0]) < 0.5)),
        ),
    },
    "nash_mtl": {
        "sum": Claim("LS: " + _LED_BY_L2, _some_off),
        "pcgrad": Claim(_LED_BY_L2, _some_off),
        "cagrad": Claim(_LED_BY_L2, _some_off),
        "mgda": Claim("reaches the front from every start", lambda r: bool(_on(r).all())),
        "mgda[frank_wolfe]": Claim("(MGDA) reaches the front from every start", lambda r: bool(_on(r).all())),
        "nash_mtl": Claim(
            "reaches the front from every start, at diverse points (x1 spread > 2)",
            lambda r: bool(_on(r).all() and np.ptp(r.final[:, 0]) > 2.0),
        ),
    },
}

# Why a run may differ from the paper's figure, shown under the table for the rows that do.
EXPLAIN: dict[tuple[str, str], str] = {
    ("cagrad", "mgda"): (
        "`mgda` (default `active_set` solver) drifts along the Pareto set to x1 = 0 after reaching it. Its ridge "
        "(`reg_eps` on the trace-normalised Gramian) leaves a min-norm direction of |d| ~ 3e-6 (exact: ~7e-7, float32 "
        "rounding) that points along the set, e.g. at the Pareto point x = (-3, -8.3705): d = (-2.7e-6, 7.3e-7) vs "
        "(-1.5e-8, 7.4e-7) from the unregularised `frank_wolfe` solver. Adam divides by the running RMS of the "
        "shrinking update, so that bias moves x by about the learning rate per step. `mgda[frank_wolfe]` stays where "
        "it lands, as the authors' closed-form two-task solver does (issue 16: the min-norm bias from the ridge)."
    ),
    ("nash_mtl", "nash_mtl"): (
        "`nash_mtl` ends at the LS optimum (x1 = -5.73) from the starts that reach the front. The Newton solver's "
        "ridge biases the bargaining weights when the gradients differ in scale and nearly oppose: at x = (-3, -8) "
        "(f1 x 0.1) it returns alpha = (371.9, 93.0) with alpha_i (G alpha)_i = (0.952, 0.998) instead of 1, where "
        "the two-task closed form alpha_i = 1 / (|g_i| sqrt(1 + cos(g_1, g_2))) gives (376.7, 94.2): the small "
        "task is under-weighted and the update tilts to l2. With that closed form (and the same clip and Adam) the "
        "five starts end on the front at x1 = -2.94, -0.32, +2.98, -3.51, +4.95 (measured with this script's "
        "runner; issue 16: the ridge before the per-task rescaling). The authors' code also differs in scale: it "
        "solves for G / |G|_F and does not rescale alpha back (its update is sqrt(|G|_F) times the exact solution "
        "before the clip to norm 1), with at most 20 convex-concave steps warm-started from the last weights."
    ),
}


@dataclass
class Result:
    """One method's runs on one toy."""

    name: str
    traj: np.ndarray  # (starts, records + 1, 2), the start first
    final: np.ndarray  # (starts, 2)
    losses: np.ndarray  # (starts, 2) final losses
    distance: np.ndarray  # (starts,) distance of the final point to the Pareto set
    stationarity: np.ndarray  # (starts,) |min-norm convex combination of the gradients| at the end
    drift: np.ndarray  # (starts,) |x1 at the end - x1 where the run first came within ON_FRONT of the set| (or NaN)
    seconds: float


def _build(name: str, factory: Callable[..., Any], kwargs: dict[str, Any], num_tasks: int) -> Any:
    """``factory(**kwargs)``, with ``num_tasks`` when the factory takes it."""
    params = inspect.signature(factory).parameters
    kw = dict(kwargs)
    if "num_tasks" in params:
        kw["num_tasks"] = num_tasks
    tx = factory(**kw)
    if not isinstance(tx, optax.GradientTransformation | optax.GradientTransformationExtraArgs):
        raise TypeError(f"corrjax.mtl.{name}(...) returned {type(tx).__name__}, not an Optax transformation")
    return tx


def methods(toy: Toy, only: Sequence[str] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """``({name: aggregator}, {name: why skipped})`` for every method of corrjax.mtl, with ``toy``'s settings.

    The listed methods come first; then every other exported callable that is not in ``NOT_METHODS``, built with its
    defaults (plus ``num_tasks=2`` when it takes ``num_tasks``); one that does not build into an Optax
    transformation is reported in the second dict. ``only`` restricts the run to those names (unknown names raise
    ``ValueError``).
    """
    out: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    listed_attrs = {attr for attr, _ in LISTED.values()}
    exported = [n for n in getattr(mtl, "__all__", dir(mtl)) if n not in NOT_METHODS and n not in listed_attrs]
    names = [n for n, (attr, _) in LISTED.items() if hasattr(mtl, attr)]
    # functions only: exported classes are states and interfaces (GramianWeighting, FAMOState, ...)
    names += sorted(n for n in exported if inspect.isfunction(getattr(mtl, n, None)))
    if only is not None:
        unknown = [n for n in only if n not in names]
        if unknown:
            raise ValueError(f"`methods`: {unknown} are not methods of corrjax.mtl; available: {names}")
        names = [n for n in names if n in only]
    for name in names:
        attr, listed_kwargs = LISTED.get(name, (name, {}))
        kwargs = {**listed_kwargs, **toy.settings.get(name, {})}
        try:
            tx = _build(attr, getattr(mtl, attr), kwargs, num_tasks=2)
        except Exception as e:  # a discovered export that is no optimiser or needs arguments: reported, not run
            if name in LISTED:
                raise
            skipped[name] = f"does not build with its defaults: {type(e).__name__}: {e}"
            continue
        if name in toy.clip:
            tx = optax.chain(tx, optax.clip_by_global_norm(toy.clip[name]))
        out[name] = tx
    return out, skipped


def run_method(tx: Any, toy: Toy, steps: int, records: int) -> np.ndarray:
    """Trajectories ``(starts, records + 1, 2)`` of ``chain(tx, adam(lr))`` from every start of ``toy``.

    One jitted program: a ``lax.scan`` over ``records`` blocks of ``steps // records`` steps (a scan each), vmapped
    over the starts. The task losses, shifted by ``21 * scale``, go to ``tx`` as ``task_losses``.
    """
    if steps % records:
        raise ValueError(f"`steps` ({steps}) must be a multiple of `records` ({records})")
    opt = optax.chain(tx, optax.adam(toy.learning_rate))
    shift = LOSS_SHIFT * jnp.array([toy.f1_scale, 1.0])
    vtg = mtl.value_and_task_grad(lambda x: toys.toy_losses(x, toy.f1_scale))

    def one(x0: jax.Array) -> jax.Array:
        def step(carry: tuple[jax.Array, Any], _: None) -> tuple[tuple[jax.Array, Any], None]:
            x, s = carry
            f, g = vtg(x)
            u, s = opt.update(g, s, x, task_losses=f + shift)
            return (optax.apply_updates(x, u), s), None

        def block(carry: tuple[jax.Array, Any], _: None) -> tuple[tuple[jax.Array, Any], jax.Array]:
            carry, _ = jax.lax.scan(step, carry, None, length=steps // records)
            return carry, carry[0]

        _, xs = jax.lax.scan(block, (x0, opt.init(x0)), None, length=records)
        return jnp.concatenate([x0[None], xs], axis=0)

    starts = jnp.asarray(toy.starts, jnp.float32)
    return np.asarray(jax.jit(jax.vmap(one))(starts))


_STATIONARITY = jax.jit(jax.vmap(toys.pareto_stationarity, in_axes=(0, None)))
_LOSSES = jax.jit(toys.toy_losses)


def evaluate(name: str, traj: np.ndarray, toy: Toy, front: np.ndarray, seconds: float) -> Result:
    final = traj[:, -1]
    dist, _ = toys.distance_to_set(final, front)
    drift = np.full(len(final), np.nan)
    for k, t in enumerate(traj):
        d_t, _ = toys.distance_to_set(t, front)
        hit = np.flatnonzero(d_t < ON_FRONT)
        if hit.size:
            drift[k] = abs(t[-1, 0] - t[hit[0], 0])
    fx = jnp.asarray(final, jnp.float32)
    losses = np.asarray(_LOSSES(fx, toy.f1_scale))
    stat = np.asarray(_STATIONARITY(fx, toy.f1_scale))
    return Result(name, traj, final, losses, dist, stat, drift, seconds)


# ------------------------------------------------------------------------------------------------------- plotting


def plot(results: Sequence[Result], toy: Toy, front: np.ndarray, path: Path, steps: int) -> None:
    """One panel per method: the trajectories over the contours of the mean loss, the Pareto set in grey.

    Written as a 128-colour palette PNG (a few hundred KB for twenty panels).
    """
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    n = len(results)
    cols = min(n, 5)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.35 * rows + 0.45), squeeze=False)
    grid = np.linspace(-10.5, 10.5, 160)
    gx, gy = np.meshgrid(grid, grid)
    mean_loss = np.asarray(_LOSSES(jnp.stack([gx, gy], -1).astype(jnp.float32), toy.f1_scale)).mean(-1)
    # levels at quantiles of the mean loss, so both the flat upper half and the bowls below show
    levels = np.unique(np.quantile(mean_loss, np.linspace(0.02, 0.98, 15)))
    colors = plt.get_cmap("tab10")(np.arange(len(toy.starts)))
    for ax, res in zip(axes.flat, results, strict=False):
        ax.contour(gx, gy, mean_loss, levels=levels, cmap="viridis", linewidths=0.5)
        ax.plot(front[:, 0], front[:, 1], color="0.55", lw=4, solid_capstyle="butt", zorder=1)
        for k in range(len(toy.starts)):
            t = res.traj[k]
            ax.plot(t[:, 0], t[:, 1], color=colors[k], lw=1.2, zorder=3)
            ax.plot(*t[0], "o", color="k", ms=3.5, zorder=4)
            ax.plot(*t[-1], "X", color=colors[k], mec="k", mew=0.5, ms=6, zorder=5)
        on = int(np.sum(res.distance < ON_FRONT))
        ax.set_title(f"{res.name} ({on}/{len(toy.starts)})", fontsize=8)
        ax.set_xlim(-10.5, 10.5)
        ax.set_ylim(-10.5, 10.5)
        ax.set_aspect("equal")
        ax.set_xticks([-10, -5, 0, 5, 10])
        ax.set_yticks([-10, -5, 0, 5, 10])
        ax.tick_params(labelsize=6, length=2)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(
        f"{toy.title}: Adam lr {toy.learning_rate:g}, {steps:,} steps. Contours: mean loss; grey: Pareto set; "
        "o start, X end; (k/n): runs ending on the set",
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.975), pad=0.4, h_pad=0.5, w_pad=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=72, format="png")
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf.seek(0)
    with Image.open(buf) as im:
        im.convert("RGB").quantize(colors=128).save(path, optimize=True)


# ---------------------------------------------------------------------------------------------------- the table


def _fmt_list(values: np.ndarray, fmt: str) -> str:
    return " ".join(format(float(v), fmt) for v in values)


def _fmt_distances(values: np.ndarray) -> str:
    """Distances: one decimal from 0.1 up (runs that missed the set), one significant digit below."""
    return " ".join(f"{v:.1f}" if v >= 0.1 else f"{v:.0e}" for v in map(float, values))


def intro() -> str:
    """The README section ``toy-pareto``: what the per-toy tables below it show."""
    return "\n".join(
        [
            "Written by `scripts/toy_pareto.py` (rerun it to refresh these sections and the figures). Every method of",
            "`corrjax.mtl` on the two-objective toy of the CAGrad paper and its Nash-MTL variant (`corrjax.mtl.toys`),",
            "from the papers' starting points, with the papers' optimiser (Adam, learning rate 1e-3), step counts and",
            "method settings (from the authors' code). *On front*: the final point is within",
            f"{ON_FRONT} (in x) of the Pareto set (computed from the stationarity conditions, `toys.pareto_set`).",
            "*x1 at the end*: per start, in the papers' order; for runs on the front, the position along the Pareto",
            "set (`x1 = -7` minimises `f2`, `x1 = 7` minimises `f1`, `x1 = 0` is the mean-loss optimum of the CAGrad",
            "toy). *Drift*: the largest `|x1|` change after a run first reached the front. *s*: wall time of the run,",
            "compile included. Loss weightings get the losses shifted by 21 (FAMO's toy setting). *Paper*: Liu et",
            "al. 2021 (arXiv:2110.14048) Fig. 1 and Navon et al. 2022 (arXiv:2202.01017) Fig. 1; the Nash-MTL",
            "caption says LS, PCGrad and CAGrad are led by the larger l2 gradient and miss the front from some starts,",
            "the other entries are our reading of the figures. *Agrees*: our run checked against that entry.",
        ]
    )


def toy_section(toy: Toy, results: Sequence[Result], skipped: dict[str, str], image: str, steps: int) -> str:
    """The README section ``toy-pareto-<toy>``: where each method ends, next to what the paper's figure shows."""
    starts = ", ".join(f"({a:g}, {b:g})" for a, b in toy.starts)
    budget = f"Adam lr {toy.learning_rate:g}, {steps:,} steps"
    if steps != toy.steps:
        budget += f" (a shortened run: the paper's is {toy.steps:,})"
    out = [f"**{toy.title}**; starts {starts}; {budget}.", "", f"![{toy.name} toy trajectories]({image})", ""]
    rows, notes = [], []
    for r in results:
        claim = PAPERS.get(toy.name, {}).get(r.name)
        agrees = "" if claim is None else ("yes" if claim.check(r) else "**no**")
        drift = np.nanmax(r.drift) if np.any(np.isfinite(r.drift)) else float("nan")
        rows.append(
            [
                f"`{r.name}`",
                f"{int(np.sum(_on(r)))}/{len(r.distance)}",
                _fmt_list(r.final[:, 0], "+.2f"),
                _fmt_distances(r.distance),
                "-" if np.isnan(drift) else f"{drift:.2f}",
                f"{r.seconds:.1f}",
                "" if claim is None else claim.text,
                agrees,
            ]
        )
        if claim is not None and not claim.check(r) and (toy.name, r.name) in EXPLAIN:
            notes.append(EXPLAIN[toy.name, r.name])
    headers = ["method", "on front", "x1 at the end", "distance to the set", "drift", "s", "paper", "agrees"]
    out.append(benchlib.table(headers, rows))
    out += [""] + [f"- {n}" for n in notes]
    if skipped:
        out += ["", "Skipped: " + "; ".join(f"`{k}` ({v})" for k, v in skipped.items())]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> dict[str, list[Result]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--toys", default="cagrad,nash_mtl", help="comma-separated: cagrad, nash_mtl")
    ap.add_argument("--methods", default=None, help="comma-separated method names (default: all)")
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default: the paper's)")
    ap.add_argument("--records", type=int, default=500, help="points kept per trajectory")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "docs", help="where the PNGs go")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md", help="the Markdown file to write the table to")
    args = ap.parse_args(argv)

    toy_names = [t.strip() for t in args.toys.split(",") if t.strip()]
    bad = [t for t in toy_names if t not in TOYS]
    if bad or not toy_names:
        raise SystemExit(f"--toys: unknown {bad}; choose from {list(TOYS)}")
    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {args.steps}")
    if not args.readme.is_file():
        raise SystemExit(f"--readme: {args.readme} does not exist")
    only = None if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]

    front = np.asarray(toys.pareto_set(2001))
    all_results: dict[str, list[Result]] = {}
    for toy_name in toy_names:
        toy = TOYS[toy_name]
        steps = args.steps or toy.steps
        records = min(args.records, steps)
        while steps % records:
            records -= 1
        try:
            txs, skipped = methods(toy, only)
        except ValueError as e:
            raise SystemExit(str(e)) from e
        results = []
        for name, tx in txs.items():
            t0 = time.perf_counter()
            try:
                traj = run_method(tx, toy, steps, records)
            except Exception as e:  # a discovered method that needs more than task_losses: reported, not run
                if name in LISTED:
                    raise
                skipped[name] = f"fails on the toy: {type(e).__name__}: {e}"
                continue
            seconds = time.perf_counter() - t0
            res = evaluate(name, traj, toy, front, seconds)
            results.append(res)
            print(
                f"{toy_name:9s} {name:22s} {seconds:6.1f} s  on front {int(np.sum(res.distance < ON_FRONT))}/"
                f"{len(res.distance)}  x1 {_fmt_list(res.final[:, 0], '+.2f')}  dist {_fmt_list(res.distance, '.2g')}",
                flush=True,
            )
        if not results:
            raise SystemExit(f"no method ran on the {toy_name} toy (skipped: {skipped})")
        for name, why in skipped.items():
            print(f"{toy_name:9s} {name:22s} skipped: {why}", flush=True)
        png = args.out_dir / f"toy_pareto_{toy_name}.png"
        plot(results, toy, front, png, steps)
        try:
            image = png.resolve().relative_to(args.readme.resolve().parent).as_posix()
        except ValueError:
            image = png.resolve().as_posix()
        all_results[toy_name] = results
        # one section per toy, so a run of one toy leaves the other's table alone
        benchlib.write_section(SECTION, intro(), path=args.readme)
        benchlib.write_section(f"{SECTION}-{toy_name}", toy_section(toy, results, skipped, image, steps), args.readme)
        print(f"wrote {png} and the {SECTION}-{toy_name} section of {args.readme}", flush=True)
    return all_results


if __name__ == "__main__":
    main()
