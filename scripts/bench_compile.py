"""Compile time of the train step against the number of tasks T and of experts E; writes BENCHMARKS.md's section.

For each model config (``configs/model/{hps,mmoe,cgc,ple}.yaml``) and each ``T`` (regression tasks on 100 input
features, as ``data=synthetic``) or number of experts ``E``, the train step of :mod:`corrjax.train.step` (EW
aggregator, Adam) is built and measured as ``jax.jit(step).trace(state, batch)`` (Python tracing: where loops over
experts, heads and losses cost), ``.lower()`` and ``.compile()`` (XLA), each in a fresh jit so no cache is reused.
``--json out.json`` saves the numbers; ``--baseline before.json`` adds them as "before" columns (measured on the code
before experts, heads and losses were stacked: ``git stash`` / an older checkout running this same script).

    python scripts/bench_compile.py --json /tmp/after.json --baseline scripts/bench_parts/compile_before.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib

import corrjax.mtl
from corrjax.data import TaskSpec
from corrjax.models import shared_mask
from corrjax.train import builders, state, step, tasks

log = logging.getLogger("bench_compile")
ROOT = Path(__file__).resolve().parent.parent
D, N = 100, 64
# (model, T, E): T sweeps at the presets' expert counts (E = 8 for MMoE), then E sweeps at T = 8 (E is MMoE's
# num_experts, CGC's num_shared_experts with one task expert each).
GRID = [
    *[("hps", t, None) for t in (2, 8, 32)],
    *[("mmoe", t, None) for t in (2, 8, 32)],
    *[("mmoe", 8, e) for e in (2, 32)],
    *[("ple", t, None) for t in (2, 8)],
    ("cgc", 8, 32),
]
QUICK = [("hps", 2, None), ("mmoe", 2, 2), ("ple", 2, None)]


def _one_batched_pullback() -> None:
    """Makes :func:`corrjax.mtl.value_and_task_grad` pull all ``T`` tasks back in one ``vmap`` (its accelerator
    default, ``task_batch_size=T``): on CPU it defaults to ``T`` unrolled pullbacks, whose compile time grows with
    ``T`` whatever the model (HPS at T = 32 compiled in ~300 s on the loaded 2-core machine) and hides the model's
    share."""
    original = corrjax.mtl.value_and_task_grad

    def batched(*args, **kwargs):
        kwargs.setdefault("task_batch_size", 1 << 20)
        return original(*args, **kwargs)

    corrjax.mtl.value_and_task_grad = batched


def build_step(model: str, num_tasks: int, num_experts: int | None):
    """The jitted-to-be train step, its initial state and a batch, for ``num_tasks`` regression tasks."""
    specs = tuple(TaskSpec(f"t{i}", "regression", 1) for i in range(num_tasks))
    cfg = OmegaConf.load(ROOT / "configs" / "model" / f"{model}.yaml")
    if num_experts is not None:
        cfg["num_experts" if model in ("mmoe", "omoe") else "num_shared_experts"] = num_experts
    net = builders.build_model(cfg, specs, (D,), seed=0)
    mask = shared_mask(net)
    graphdef, params, rest = state.split_model(net)
    tx = optax.chain(corrjax.mtl.shared_only(corrjax.mtl.mean(), mask), optax.adam(1e-3))
    fn = step.make_train_step(graphdef, specs, tasks.task_loss_fns(specs), tx, mask)
    st = state.create_state(params, rest, tx, seed=0)
    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.normal(size=(N, D)), jnp.float32)}
    batch.update({t.name: jnp.asarray(rng.normal(size=N), jnp.float32) for t in specs})
    return fn, st, batch


def measure(model: str, num_tasks: int, num_experts: int | None) -> dict[str, float]:
    fn, st, batch = build_step(model, num_tasks, num_experts)
    t0 = time.perf_counter()
    traced = jax.jit(fn).trace(st, batch)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    lowered.compile()
    t3 = time.perf_counter()
    return {"trace_s": t1 - t0, "lower_s": t2 - t1, "compile_s": t3 - t2, "total_s": t3 - t0}


def key(model: str, t: int, e: int | None) -> str:
    return f"{model}/T={t}/E={'preset' if e is None else e}"


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, help="save the measurements here")
    p.add_argument("--baseline", type=Path, help="measurements of the code before, for the 'before' columns")
    p.add_argument("--quick", action="store_true", help="three small configs (a smoke test), no BENCHMARKS.md")
    p.add_argument("--no-write", action="store_true", help="do not write BENCHMARKS.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    grid = QUICK if args.quick else GRID
    _one_batched_pullback()
    results = {}
    t_start = time.perf_counter()
    for model, t, e in grid:
        results[key(model, t, e)] = r = measure(model, t, e)
        log.info("%-22s trace %.2fs lower %.2fs compile %.2fs", key(model, t, e), *list(r.values())[:3])
    log.info("total %.1fs", time.perf_counter() - t_start)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if not (args.quick or args.no_write):
        before = json.loads(args.baseline.read_text()) if args.baseline else {}
        benchlib.write_section("compile", section(results, before, grid))
    return results


def section(results, before, grid) -> str:
    rows = []
    for model, t, e in grid:
        k = key(model, t, e)
        r, b = results[k], before.get(k)
        row = [model, t, "preset" if e is None else e]
        if b:
            row += [b["trace_s"], b["compile_s"], b["total_s"]]
        row += [r["trace_s"], r["compile_s"], r["total_s"]]
        if b:
            row.append(b["total_s"] / r["total_s"])
        rows.append(row)
    head = ["model", "T", "E"]
    if before:
        head += ["before trace s", "before compile s", "before total s"]
    head += ["trace s", "compile s", "total s"]
    if before:
        head.append("before / after")
    return "\n\n".join(
        [
            "## Train-step compile time against T and experts (`scripts/bench_compile.py`)",
            benchlib.machine_line(["flax", "optax"]),
            f"`jax.jit(train_step).trace(state, batch)` (Python tracing), `.lower()` and `.compile()` (XLA; total = "
            f"trace + lower + compile), each in a fresh jit, for T regression tasks on {D} features, batch {N}, EW + "
            "Adam, all T tasks pulled back in one vmap (`task_batch_size=T`, the accelerator default). E is MMoE's "
            "`num_experts` or CGC's `num_shared_experts` (preset: the config's, MMoE 8, PLE 2 shared "
            "+ 1 per task over 2 levels). *Before*: experts, gates, heads and per-task losses as Python loops over "
            "modules (`nnx.List`/`nnx.Dict`); *after*: one stacked module per expert group, gate set and head group "
            "(built under `nnx.vmap`, applied with one `jax.vmap`), losses vectorised per kind group.",
            benchlib.table(head, rows),
        ]
    )


if __name__ == "__main__":
    main()
