"""One prepared benchmark of corrjax on whatever accelerator is present (section "device:<device>" of BENCHMARKS.md).

On ``jax.devices()[0]`` it measures, each part on its own and reporting its failure in the tables instead of stopping:

- ``peak``: the device's peak FLOP/s (bf16, TF32/float32) and memory bandwidth from a table of known devices (H100
  SXM/PCIe, H200, A100, TPU v4/v5e/v5p/v6e), next to a measured large matmul and a measured streaming kernel (the
  fallback peaks of an unknown device);
- ``stats``: the GEMM-bound :func:`corrjax.stats.cov` and :func:`corrjax.stats.corrcoef` on ``n x d`` data (2^17 x
  1024 by default) in float32 and bfloat16, as achieved TFLOP/s (``2 n d^2`` FLOPs) and % of the dtype's peak;
- ``ranks``: :func:`corrjax.stats.spearmanr` (``n x 64``) and :func:`corrjax.stats.kendalltau` (``n``) against
  ``scipy.stats`` on the CPU, on the same data;
- ``mtl``: a multi-task step (MLP trunk, ``T`` linear heads, task Jacobian by ``T``-batched VJPs
  (:func:`corrjax.mtl.value_and_task_grad`), UPGrad or PCGrad, SGD) against the summed-loss step and the FLOP bound
  ``(1 + 2T) / 3``, with the trunk computed in float32 and in bfloat16, and the summed step's TFLOP/s (XLA's cost
  analysis) against the peak;
- ``input``: :class:`corrjax.data.BatchIterator` on a generated CelebA-like image source with 0 and N grain worker
  processes against the CelebA preset's train step (scripts/bench_data.py's ``image_pipeline``).

``--budget`` seconds bound the whole run (parts that would start after it are reported as skipped); the default fits
~8 minutes on a GPU. ``--reduced`` runs tiny sizes (< 30 s on a CPU, the test of this script). The section, headed
with the device and the JAX version, replaces the one for the same device in ``--out`` (default BENCHMARKS.md).

    python scripts/bench_device.py                      # on the accelerator; writes BENCHMARKS.md
    python scripts/bench_device.py --reduced --out /tmp/b.md
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib

from corrjax import mtl, stats

# Peak dense FLOP/s (TFLOP/s) and memory bandwidth (TB/s) from the vendors' data sheets (without sparsity).
# Keys are matched as lower-case substrings of ``device_kind``, first match wins (so "h100 pcie" precedes "h100").
PEAKS: dict[str, dict[str, float]] = {
    "h100 pcie": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0, "hbm": 2.0},
    "h100 nvl": {"bf16": 835.0, "tf32": 418.0, "fp32": 60.0, "hbm": 3.9},
    "h100": {"bf16": 989.0, "tf32": 495.0, "fp32": 67.0, "hbm": 3.35},  # SXM5 80 GB ("NVIDIA H100 80GB HBM3")
    "h200": {"bf16": 989.0, "tf32": 495.0, "fp32": 67.0, "hbm": 4.8},
    "a100-sxm4-40gb": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5, "hbm": 1.555},
    "a100 80gb pcie": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5, "hbm": 1.935},
    "a100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5, "hbm": 2.039},  # SXM4 80 GB
    "tpu v4": {"bf16": 275.0, "hbm": 1.2},
    "tpu v5 lite": {"bf16": 197.0, "hbm": 0.819},  # v5e
    "tpu v5e": {"bf16": 197.0, "hbm": 0.819},
    "tpu v5p": {"bf16": 459.0, "hbm": 2.765},
    "tpu v5": {"bf16": 459.0, "hbm": 2.765},  # v5p reports "TPU v5"
    "tpu v6 lite": {"bf16": 918.0, "hbm": 1.64},  # v6e (Trillium)
    "tpu v6e": {"bf16": 918.0, "hbm": 1.64},
}

SIZES = {
    "full": {
        "stats": (2**17, 1024),
        "ranks": (2**16, 64),
        "kendall": 2**20,
        "matmul": 8192,
        "stream": 2**28,
        "mtl": {
            "batch": 1024,
            "d_in": 512,
            "widths": (2048, 2048, 1024),
            "tasks": (8, 32),
            "methods": ("upgrad", "pcgrad"),
        },
        "input": {"workers": [0, min(8, max(1, (os.cpu_count() or 2) // 2))], "batches": 12, "batch": 256},
    },
    "reduced": {
        "stats": (2**10, 64),
        "ranks": (512, 8),
        "kendall": 2**10,
        "matmul": 256,
        "stream": 2**20,
        "mtl": {"batch": 32, "d_in": 16, "widths": (32,), "tasks": (4,), "methods": ("upgrad",)},
        "input": {"workers": [0], "batches": 2, "batch": 16},
    },
}


def device_peaks(kind: str) -> dict[str, float] | None:
    """The :data:`PEAKS` entry matching ``kind`` (``device_kind``), or None for an unknown device."""
    low = kind.lower()
    for key, peaks in PEAKS.items():
        if key in low:
            return peaks
    return None


def slug(kind: str) -> str:
    """A section-marker-safe name of a device kind: ``'NVIDIA H100 80GB HBM3'`` -> ``'nvidia-h100-80gb-hbm3'``."""
    return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-") or "device"


class Budget:
    """Seconds left of ``--budget``; a part starts only while some are left."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.perf_counter() + seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter()


MIN_TIME = {"value": 0.05}  # seconds a timed call is looped to; 0 in --reduced


def timed(fn: Callable[[], Any], repeats: int, min_time: float) -> float:
    """Median seconds of a warm call of ``fn`` (compiled first)."""
    return benchlib.timeit(fn, repeats=repeats, warmup=1, min_time=min(min_time, MIN_TIME["value"]))["median"]


def fmt_err(err: BaseException) -> str:
    return f"failed: {type(err).__name__}: {str(err).splitlines()[0][:100] if str(err) else ''}"


# ----------------------------------------------------------------------------------------------------------------------
# Parts. Each returns (headers, rows, notes) and raises nothing the caller does not catch.


def part_peak(sz: dict, peaks: dict | None, repeats: int) -> tuple[list, list, str]:
    m = sz["matmul"]
    rows = []
    for name, dtype in (("bf16", jnp.bfloat16), ("fp32", jnp.float32)):
        a = jax.random.normal(jax.random.key(0), (m, m), dtype)
        mm = jax.jit(lambda a, b: a @ b)
        t = timed(lambda a=a, mm=mm: mm(a, a), repeats, 0.05)
        measured = 2 * m**3 / t / 1e12
        sheet = (peaks or {}).get(name) or ((peaks or {}).get("tf32") if name == "fp32" else None)
        rows.append([f"matmul {m}^3 {name}", measured, sheet or "n/a", f"{measured / sheet:.0%}" if sheet else "n/a"])
    x = jnp.ones((sz["stream"],), jnp.float32)
    stream = jax.jit(lambda x: x * 2.0 + 1.0)
    t = timed(lambda: stream(x), repeats, 0.05)
    bw = 2 * x.nbytes / t / 1e12
    sheet = (peaks or {}).get("hbm")
    rows.append(
        [f"stream x*2+1 ({x.nbytes >> 20} MiB) TB/s", bw, sheet or "n/a", f"{bw / sheet:.0%}" if sheet else "n/a"]
    )
    note = (
        "Data-sheet peaks: dense, no sparsity; the fp32 row compares with the TF32 tensor-core peak on GPUs, where "
        "XLA's default precision lets float32 matmuls use TF32, and TPUs run float32 matmuls as bf16 passes."
        if peaks
        else "Unknown device: no data-sheet peaks; the measured matmul and stream rows serve as the peaks below."
    )
    return ["kernel", "measured TFLOP/s (TB/s)", "data-sheet peak", "% of peak"], rows, note


def part_stats(sz: dict, peaks: dict, repeats: int) -> tuple[list, list, str]:
    n, d = sz["stats"]
    rows = []
    x32 = jax.random.normal(jax.random.key(1), (n, d), jnp.float32) * 3.0 + 10.0
    for dname, x in (("float32", x32), ("bfloat16", x32.astype(jnp.bfloat16))):
        for fname, fn in (("cov", stats.cov), ("corrcoef", stats.corrcoef)):
            f = jax.jit(fn)
            t = timed(lambda f=f, x=x: f(x), repeats, 0.05)
            tflops = 2 * n * d * d / t / 1e12
            peak = peaks.get("bf16" if dname == "bfloat16" else "tf32") or peaks.get("fp32")
            gbs = x.nbytes / t / 1e9
            rows.append([f"{fname} {n}x{d}", dname, t * 1e3, tflops, f"{tflops / peak:.0%}" if peak else "n/a", gbs])
    note = (
        "FLOPs counted as 2 n d^2 (the Gram matrix; centring and scaling are O(n d)); `input GB/s` = the data read "
        "once per call. bfloat16 inputs accumulate in float32 (corrjax.stats' contract)."
    )
    return ["function", "dtype", "ms", "TFLOP/s", "% of peak", "input GB/s"], rows, note


def part_ranks(sz: dict, repeats: int) -> tuple[list, list, str]:
    import scipy.stats

    n, d = sz["ranks"]
    rng = np.random.default_rng(2)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x[:, 1] = np.round(x[:, 1], 1)  # ties
    rows = []
    xd = jax.device_put(x)
    sp = jax.jit(lambda a: stats.spearmanr(a).statistic)
    t_ours = timed(lambda: sp(xd), repeats, 0.05)
    t0 = time.perf_counter()
    ref = scipy.stats.spearmanr(x).statistic
    t_scipy = time.perf_counter() - t0
    err = float(np.max(np.abs(np.asarray(sp(xd), np.float64) - ref)))
    rows.append([f"spearmanr {n}x{d}", t_ours * 1e3, t_scipy * 1e3, t_scipy / t_ours, f"{err:.1e}"])
    m = sz["kendall"]
    a, b = rng.standard_normal(m).astype(np.float32), rng.standard_normal(m).astype(np.float32)
    b = np.round(a + b, 1)
    ad, bd = jax.device_put(a), jax.device_put(b)
    kt = jax.jit(lambda a, b: stats.kendalltau(a, b).statistic)
    t_ours = timed(lambda: kt(ad, bd), repeats, 0.05)
    t0 = time.perf_counter()
    ref = scipy.stats.kendalltau(a, b).statistic
    t_scipy = time.perf_counter() - t0
    err = abs(float(kt(ad, bd)) - ref)
    rows.append([f"kendalltau n={m}", t_ours * 1e3, t_scipy * 1e3, t_scipy / t_ours, f"{err:.1e}"])
    note = "scipy runs once on the host CPU (float32 data, computed in float64 by scipy); `max abs diff` vs scipy."
    return ["function", "device ms", "scipy CPU ms", "speed-up", "max abs diff"], rows, note


def _mtl_problem(cfg: dict, num_tasks: int, compute_dtype: Any):
    """Params, data and the ``(T,)`` task-loss function of an MLP trunk with ``T`` linear heads."""
    keys = iter(jax.random.split(jax.random.key(3), 16))
    widths = (cfg["d_in"], *cfg["widths"])
    trunk = [
        {"w": jax.random.normal(next(keys), (a, b)) / np.sqrt(a), "b": jnp.zeros(b)}
        for a, b in itertools.pairwise(widths)
    ]
    heads = {
        "w": jax.random.normal(next(keys), (widths[-1], num_tasks)) / np.sqrt(widths[-1]),
        "b": jnp.zeros(num_tasks),
    }
    x = jax.random.normal(next(keys), (cfg["batch"], cfg["d_in"]))
    y = jax.random.normal(next(keys), (cfg["batch"], num_tasks))

    def losses(params, x, y):
        h = x.astype(compute_dtype)
        for layer in params["trunk"]:
            h = jax.nn.relu(h @ layer["w"].astype(compute_dtype) + layer["b"].astype(compute_dtype))
        out = h.astype(jnp.float32) @ params["heads"]["w"] + params["heads"]["b"]
        return jnp.mean((out - y) ** 2, axis=0)

    return {"trunk": trunk, "heads": heads}, x, y, losses


def _mtl_steps(
    losses: Callable, num_tasks: int, methods: tuple[str, ...]
) -> dict[str, tuple[Callable, optax.GradientTransformation]]:
    shared = {"trunk": True, "heads": False}
    sgd = optax.sgd(1e-3)

    def summed(state, x, y):
        params, opt = state
        g = jax.grad(lambda p: jnp.sum(losses(p, x, y)))(params)
        upd, opt = sgd.update(g, opt, params)
        return optax.apply_updates(params, upd), opt

    steps = {"summed loss": (summed, sgd)}
    vtg = mtl.value_and_task_grad(losses, shared=shared, task_batch_size=num_tasks)
    for name in methods:
        tx = optax.chain(mtl.shared_only(getattr(mtl, name)(), shared), sgd)

        def step(state, x, y, tx=tx):
            params, opt = state
            task_losses, g = vtg(params, x, y)
            upd, opt = tx.update(g, opt, params, task_losses=task_losses)
            return optax.apply_updates(params, upd), opt

        steps[name] = (step, tx)
    return steps


def part_mtl(sz: dict, peaks: dict, repeats: int, budget: Budget) -> tuple[list, list, str]:
    cfg = sz["mtl"]
    rows = []
    for num_tasks in cfg["tasks"]:
        for dname, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
            if budget.left() < 0:
                rows.append([num_tasks, dname, "skipped: budget", "", "", "", ""])
                continue
            params, x, y, losses = _mtl_problem(cfg, num_tasks, dtype)
            times, flops = {}, None
            for name, (step, tx) in _mtl_steps(losses, num_tasks, cfg["methods"]).items():
                try:
                    jstep = jax.jit(step, donate_argnums=0)
                    state = [(jax.tree.map(jnp.copy, params), tx.init(params))]
                    if name == "summed loss":
                        cost = jstep.lower(state[0], x, y).compile().cost_analysis()
                        cost = cost[0] if isinstance(cost, list | tuple) else cost
                        flops = float(cost.get("flops", 0.0)) if cost else None

                    def run(jstep=jstep, state=state):
                        state[0] = jstep(state[0], x, y)
                        return state[0]

                    times[name] = timed(run, repeats, 0.05)
                except Exception as err:  # reported in the table
                    times[name] = err
            base = times["summed loss"]
            bound = (1 + 2 * num_tasks) / 3
            for name, t in times.items():
                if isinstance(t, BaseException):
                    rows.append([num_tasks, dname, name, fmt_err(t), "", "", ""])
                    continue
                rel = t / base if not isinstance(base, BaseException) else float("nan")
                peak = peaks.get("bf16" if dtype == jnp.bfloat16 else "tf32") or peaks.get("fp32")
                util = f"{flops / t / 1e12 / peak:.0%}" if flops and peak and name == "summed loss" else ""
                rows.append(
                    [num_tasks, dname, name, t * 1e3, rel, f"{rel / bound:.2f}" if name != "summed loss" else "", util]
                )
    note = (
        f"MLP trunk {cfg['d_in']} -> {' -> '.join(map(str, cfg['widths']))}, batch {cfg['batch']}, T linear regression "
        "heads; params and SGD state float32, the trunk computed in the row's dtype. `/bound` = (step / summed) / "
        "((1 + 2T) / 3), the FLOP ratio of one forward + T backward passes to one forward + one backward. `% of "
        "peak` = the summed step's XLA cost-analysis FLOPs per second over the dtype's peak."
    )
    return ["T", "trunk dtype", "step", "ms", "x summed", "/bound", "% of peak"], rows, note


def part_input(sz: dict, repeats: int, small: bool) -> tuple[list, list, str]:
    import bench_data

    cfg = sz["input"]
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    rows, step, label = bench_data.image_pipeline(
        cfg["workers"], cfg["batches"], cfg["batch"], repeats, mesh, small=small
    )
    out = [[w, host, dev, step, dev / step] for w, host, dev in rows]
    note = f"{label}; batch {cfg['batch']}. The pipeline keeps up where `device / step` >= 1."
    return (
        ["grain workers", "pipeline host ex/s", "pipeline device ex/s", "train step ex/s", "device / step"],
        out,
        note,
    )


# ----------------------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> str:
    """Runs every part within the budget and returns the Markdown section."""
    budget = Budget(args.budget)
    sz = SIZES["reduced" if args.reduced else "full"]
    repeats = 2 if args.reduced else args.repeats
    MIN_TIME["value"] = 0.0 if args.reduced else 0.05
    dev = jax.devices()[0]
    kind = dev.device_kind
    peaks = device_peaks(kind)
    sections = [
        f"## Device: {kind} ({dev.platform}, {jax.device_count()} device(s)), JAX {jax.__version__} "
        f"(`scripts/bench_device.py{' --reduced' if args.reduced else ''}`)",
        benchlib.machine_line(["flax", "optax", "grain", "scipy"]),
    ]
    measured_peaks: dict[str, float] = {}
    parts: list[tuple[str, Callable[[], tuple[list, list, str]]]] = [
        ("Peaks", lambda: part_peak(sz, peaks, repeats)),
        ("corrjax.stats GEMM-bound functions", lambda: part_stats(sz, peaks or measured_peaks, repeats)),
        ("Rank correlations vs scipy (CPU)", lambda: part_ranks(sz, repeats)),
        ("MTL step vs the summed-loss step", lambda: part_mtl(sz, peaks or measured_peaks, repeats, budget)),
        ("Input pipeline vs the train step", lambda: part_input(sz, repeats, args.reduced)),
    ]
    only = set(args.parts.split(",")) if args.parts else None
    keys = ["peak", "stats", "ranks", "mtl", "input"]
    for key, (title, fn) in zip(keys, parts, strict=True):
        if only is not None and key not in only:
            continue
        if budget.left() <= 0:
            sections += [f"### {title}", "skipped: the time budget (`--budget`) was spent"]
            continue
        t0 = time.perf_counter()
        try:
            headers, rows, note = fn()
            if key == "peak" and peaks is None:  # unknown device: the measured kernels stand in for the peaks
                measured_peaks.update(bf16=rows[0][1], fp32=rows[1][1], hbm=rows[2][1])
            sections += [f"### {title}", benchlib.table(headers, rows), note]
        except Exception as err:  # reported in the section
            traceback.print_exc()
            sections += [f"### {title}", benchlib.table(["part", "result"], [[key, fmt_err(err)]])]
        print(
            f"[bench_device] {key}: {time.perf_counter() - t0:.1f} s, {budget.left():.0f} s of budget left", flush=True
        )
    return "\n\n".join(sections)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reduced", action="store_true", help="tiny sizes (CPU, < 30 s): the test of this script")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run (parts after it: skipped)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--parts", default=None, help="comma-separated subset of peak,stats,ranks,mtl,input")
    ap.add_argument("--out", default=str(benchlib.BENCHMARKS), help="Markdown file whose device section is replaced")
    ap.add_argument("--no-write", action="store_true", help="print the section only")
    args = ap.parse_args(argv)
    markdown = run(args)
    print(markdown)
    if not args.no_write:
        benchlib.write_section(f"device:{slug(jax.devices()[0].device_kind)}", markdown, Path(args.out))
    return markdown


if __name__ == "__main__":
    main()
