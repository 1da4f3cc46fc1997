"""spearmanr, kendalltau and rankdata vs scipy.stats (and jax.scipy.stats.rankdata), plus a small scaling table.

Part of ``scripts/bench_stats.py``; ``run()`` returns Markdown. float32 throughout, medians of repeated runs, the
peers run in the same process on the same data. Standalone: ``.venv/bin/python scripts/bench_parts/stats_ranks.py``
prints the fragment (``--quick`` for small sizes).
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats as ss

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import benchlib

import corrjax.stats as cs

logger = logging.getLogger("bench_stats.ranks")


def _ms(t: float) -> float:
    return t * 1e3


def _spearman(n: int, d: int, repeats: int) -> tuple[list, float]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x[:, ::4] = np.round(x[:, ::4] * 4)  # every 4th column has heavy ties
    xj = jax.device_put(x)
    ours = jax.jit(cs.spearmanr)
    sort = jax.jit(lambda a: jnp.sort(a, axis=0))
    t_ours = benchlib.timeit(lambda: ours(xj), repeats=repeats)["median"]
    t_sp = benchlib.timeit(lambda: ss.spearmanr(x), repeats=repeats)["median"]
    t_sort = benchlib.timeit(lambda: sort(xj), repeats=repeats)["median"]
    err = float(np.max(np.abs(np.asarray(ours(xj).statistic) - ss.spearmanr(x.astype(np.float64)).statistic)))
    c_ours, c_sp = benchlib.cpu_seconds(lambda: ours(xj), 3), benchlib.cpu_seconds(lambda: ss.spearmanr(x), 3)
    rows = [
        [f"corrjax.stats.spearmanr (jit), {n}x{d}", _ms(t_ours), t_sp / t_ours, _ms(c_ours), c_sp / c_ours],
        [f"scipy.stats.spearmanr, {n}x{d}", _ms(t_sp), 1.0, _ms(c_sp), 1.0],
        [f"jnp.sort(x, axis=0) alone, {n}x{d}", _ms(t_sort), t_sp / t_sort, "", ""],
    ]
    logger.info("spearmanr %dx%d: ours %.0f ms, scipy %.0f ms (max |err| %.1e)", n, d, t_ours * 1e3, t_sp * 1e3, err)
    return rows, err


def _kendall(n: int, repeats: int) -> tuple[list, float]:
    rng = np.random.default_rng(1)
    x = rng.standard_normal(n).astype(np.float32)
    y = (x + rng.standard_normal(n)).astype(np.float32)
    xj, yj = jax.device_put(x), jax.device_put(y)
    ours = jax.jit(cs.kendalltau)
    t_ours = benchlib.timeit(lambda: ours(xj, yj), repeats=repeats)["median"]
    t_sp = benchlib.timeit(lambda: ss.kendalltau(x, y), repeats=repeats)["median"]
    err = abs(float(ours(xj, yj).statistic) - ss.kendalltau(x.astype(np.float64), y.astype(np.float64)).statistic)
    c_ours, c_sp = benchlib.cpu_seconds(lambda: ours(xj, yj), 3), benchlib.cpu_seconds(lambda: ss.kendalltau(x, y), 3)
    rows = [
        [f"corrjax.stats.kendalltau (jit), n={n:.0e}", _ms(t_ours), t_sp / t_ours, _ms(c_ours), c_sp / c_ours],
        [f"scipy.stats.kendalltau, n={n:.0e}", _ms(t_sp), 1.0, _ms(c_sp), 1.0],
    ]
    logger.info("kendalltau n=%d: ours %.0f ms, scipy %.0f ms", n, t_ours * 1e3, t_sp * 1e3)
    return rows, err


def _rankdata(n: int, d: int, repeats: int) -> list:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((n, d)).astype(np.float32)
    xj = jax.device_put(x)
    ours = jax.jit(cs.rankdata)
    peer = jax.jit(lambda a: jax.scipy.stats.rankdata(a, axis=0))
    t_ours = benchlib.timeit(lambda: ours(xj), repeats=repeats)["median"]
    t_sp = benchlib.timeit(lambda: ss.rankdata(x, axis=0), repeats=repeats)["median"]
    t_jx = benchlib.timeit(lambda: peer(xj), repeats=max(1, repeats // 2))["median"]
    return [
        [f"corrjax.stats.rankdata (jit), {n}x{d}", _ms(t_ours), t_sp / t_ours, "", ""],
        [f"scipy.stats.rankdata(axis=0), {n}x{d}", _ms(t_sp), 1.0, "", ""],
        [f"jax.scipy.stats.rankdata(axis=0) (jit), {n}x{d}", _ms(t_jx), t_sp / t_jx, "", ""],
    ]


def run(quick: bool = False) -> str:
    """Runs the rank benchmarks; returns a Markdown fragment."""
    warnings.simplefilter("ignore")
    repeats = 3 if quick else 5
    n_sp, d_sp, n_kt = (20_000, 16, 100_000) if quick else (100_000, 64, 1_000_000)
    sp_rows, sp_err = _spearman(n_sp, d_sp, repeats)
    kt_rows, kt_err = _kendall(n_kt, repeats)
    rk_rows = _rankdata(n_sp, d_sp, repeats)
    scale = []
    for n, d in [(5_000, 16), (20_000, 16)] if quick else [(10_000, 64), (100_000, 16), (100_000, 64)]:
        rows, _ = _spearman(n, d, 3)
        scale.append([f"spearmanr {n}x{d}", rows[0][1], rows[1][1], rows[0][2]])
    for n in [10_000] if quick else [100_000]:
        rows, _ = _kendall(n, 3)
        scale.append([f"kendalltau n={n:.0e}", rows[0][1], rows[1][1], rows[0][2]])
    headers = ["what", "median wall ms", "wall speed-up vs scipy (x)", "CPU ms (all threads)", "CPU-time ratio (x)"]
    return "\n\n".join(
        [
            "### Rank statistics (spearmanr, kendalltau, rankdata), float32",
            f"Targets: spearmanr {n_sp}x{d_sp} at least as fast as scipy (>= 1x); kendalltau n={n_kt:.0e} within 5x of "
            "scipy (>= 0.2x). Every 4th spearman column has heavy ties. max |rho - scipy float64| = "
            f"{sp_err:.1e}, |tau - scipy float64| = {kt_err:.1e}. The CPU-time ratio (process CPU time, all threads, "
            "scipy / ours) is less distorted than wall time when other processes load the machine. How spearmanr "
            "ranks: order-preserving uint32 keys, a key-only sort (XLA's CPU fast path; sorts carrying a payload are "
            "5-10x slower) and a branch-free binary search for each value's position, one column at a time in a "
            "`lax.map` from n = 4096 on, so that the column's sorted keys (400 KB) stay in cache during the search; "
            "ranking all 64 columns in one vectorised pass measured 1.15 s against 0.73 s for the per-column loop "
            "(one core). The sort itself is now most of the time; a GPU (none was lent to this project) sorts "
            "these columns in milliseconds.",
            benchlib.table(headers, sp_rows + kt_rows + rk_rows),
            "Scaling (3 repeats):",
            benchlib.table(["what", "corrjax ms", "scipy ms", "speed-up (x)"], scale),
        ]
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    print(benchlib.machine_line(["scipy"]))
    print(run(quick="--quick" in sys.argv))
