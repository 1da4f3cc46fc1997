"""Pairwise-complete rank correlations with NaN: corrjax.stats.nancorrcoef(method='spearman' | 'kendall') vs pandas'
DataFrame.corr(method=...).

Part of ``scripts/bench_stats.py``; ``run()`` returns Markdown. float32 data with 10% of the entries missing at random
(every pair of columns has its own complete rows, so every pair is ranked again, as pandas does); every 4th column
has heavy ties. pandas runs in the same process on the same data (float64, its only path). Standalone:
``.venv/bin/python scripts/bench_parts/stats_missing_ranks.py [--quick]``.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import jax
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import benchlib

import corrjax.stats as cs

logger = logging.getLogger("bench_stats.missing_ranks")


def _data(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x[:, ::4] = np.round(x[:, ::4] * 4)
    x[rng.random((n, d)) < 0.1] = np.nan
    return x


def _compare(method: str, n: int, d: int, repeats: int) -> tuple[list, float]:
    x = _data(n, d)
    xj = jax.device_put(x)
    ours = jax.jit(lambda a: cs.nancorrcoef(a, method=method))
    df = pd.DataFrame(x.astype(np.float64))
    t_ours = benchlib.timeit(lambda: ours(xj), repeats=repeats)["median"]
    t_pd = benchlib.timeit(lambda: df.corr(method=method), repeats=max(1, repeats // 2), warmup=0)["median"]
    err = float(np.nanmax(np.abs(np.asarray(ours(xj), np.float64) - df.corr(method=method).to_numpy())))
    logger.info("%s %dx%d: ours %.2f s, pandas %.2f s (max |err| %.1e)", method, n, d, t_ours, t_pd, err)
    rows = [
        [f"corrjax nancorrcoef(method='{method}') (jit), {n}x{d}", t_ours * 1e3, t_pd / t_ours],
        [f"pandas DataFrame.corr('{method}'), {n}x{d}", t_pd * 1e3, 1.0],
    ]
    return rows, err


def run(quick: bool = False) -> str:
    """Runs the pairwise-complete rank benchmarks; returns a Markdown fragment."""
    warnings.simplefilter("ignore")
    repeats = 3
    spearman = [(5_000, 8)] if quick else [(10_000, 64), (100_000, 64)]
    kendall = [(2_000, 4)] if quick else [(10_000, 16)]
    rows, errs = [], []
    for n, d in spearman:
        r, e = _compare("spearman", n, d, repeats)
        rows += r
        errs.append(e)
    for n, d in kendall:
        r, e = _compare("kendall", n, d, repeats)
        rows += r
        errs.append(e)
    return "\n\n".join(
        [
            "### Pairwise-complete rank correlations with NaN (nancorrcoef method='spearman' / 'kendall'), float32",
            "10% of the entries missing, every 4th column heavily tied; pandas ranks each pair's complete rows again "
            "(O(d^2 n log n)). corrjax sorts each column once and, per column, reads the ranks among every pair's "
            "complete rows from running counts of the other columns' masks (O(d^2 n) after d sorts); Kendall "
            "counts each pair's discordances in O(n log n) with the incomplete rows masked. max |ours - pandas| = "
            f"{max(errs):.1e}.",
            benchlib.table(["what", "median wall ms", "speed-up vs pandas (x)"], rows),
        ]
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    print(benchlib.machine_line(["pandas"]))
    print(run(quick="--quick" in sys.argv))
