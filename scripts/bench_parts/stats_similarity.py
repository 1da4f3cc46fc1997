"""soft_rank (time, memory) and streaming minibatch CKA (vs the GEMMs it needs).

Part of ``scripts/bench_stats.py``; ``run()`` returns Markdown. Run standalone while developing:

    .venv/bin/python scripts/bench_parts/stats_similarity.py [--quick]

The PyTorch ``torchsort`` package is the natural peer for ``soft_rank``; when it is not importable (its build needs
a CUDA toolchain here) the peer is a float64 NumPy/SciPy implementation of the same projection: ``np.argsort`` plus
SciPy's compiled pool-adjacent-violators (``scipy.optimize.isotonic_regression``) per row, in the same process.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import benchlib

import corrjax.stats as cs

logger = logging.getLogger("bench_stats.similarity")


def _soft_rank_numpy(x: np.ndarray, eps: float) -> np.ndarray:
    """float64 reference: per row, sort, PAV (SciPy), unsort (Blondel et al. 2020, Prop. 3)."""
    out = np.empty(x.shape, np.float64)
    n = x.shape[1]
    rho = np.arange(n, 0, -1, dtype=np.float64)
    for i, row in enumerate(np.asarray(x, np.float64) / eps):
        perm = np.argsort(-row, kind="stable")
        s = row[perm]
        fit = scipy.optimize.isotonic_regression(s - rho, increasing=False).x
        out[i, perm] = s - fit
    return out


def _torchsort():
    try:
        import torch
        import torchsort
    except Exception as e:  # ImportError, or a broken extension build
        return None, f"{type(e).__name__}: {e}"
    return (torch, torchsort), None


def _soft_rank_section(batch: int, n: int, repeats: int) -> str:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, n)).astype(np.float32)
    xj = jax.device_put(x)
    eps = 1.0
    rank = {
        r: jax.jit(lambda v, r=r: cs.soft_rank(v, regularization_strength=eps, regularization=r)) for r in ("l2", "kl")
    }
    grad = jax.jit(jax.grad(lambda v: jnp.sum(cs.soft_rank(v, regularization_strength=eps) ** 2)))

    calls = {
        "corrjax soft_rank l2 (jit, float32)": lambda: rank["l2"](xj),
        "corrjax soft_rank kl (jit, float32)": lambda: rank["kl"](xj),
        "corrjax soft_rank l2 forward + backward": lambda: grad(xj),
        "NumPy argsort + SciPy PAV per row (float64)": lambda: _soft_rank_numpy(x, eps),
    }
    peer, why = _torchsort()
    if peer is not None:
        torch, torchsort = peer
        xt = torch.from_numpy(x)
        calls["torchsort.soft_rank (float32)"] = lambda: torchsort.soft_rank(xt, regularization_strength=eps)
    wall = {k: benchlib.timeit(f, repeats=repeats)["median"] for k, f in calls.items()}
    cpu = {k: benchlib.cpu_seconds(f, repeats) for k, f in calls.items()}
    ref_key = "NumPy argsort + SciPy PAV per row (float64)"
    ref = _soft_rank_numpy(x, eps)
    err = float(np.max(np.abs(np.asarray(rank["l2"](xj)) - ref)))
    rows = [[k, wall[k] * 1e3, wall[ref_key] / wall[k], cpu[k] * 1e3, cpu[ref_key] / cpu[k]] for k in calls]
    l2 = "corrjax soft_rank l2 (jit, float32)"
    if peer is not None:
        ts = "torchsort.soft_rank (float32)"
        peer_line = f"torchsort takes {wall[ts] / wall[l2]:.2f}x the corrjax l2 wall time."
    else:
        peer_line = f"torchsort is not available here ({why}); the float64 NumPy/SciPy reference is the peer."

    # Memory: what XLA allocates besides inputs/outputs, at two row lengths (linear in n means no n x n buffer).
    mem = []
    for m in (n, 4 * n):
        spec = jax.ShapeDtypeStruct((batch, m), jnp.float32)
        ma = jax.jit(lambda v: cs.soft_rank(v)).lower(spec).compile().memory_analysis()
        temp = getattr(ma, "temp_size_in_bytes", float("nan"))
        mem.append(
            [f"({batch}, {m})", batch * m * 4 / 2**20, temp / 2**20, temp / (batch * m * 4), batch * m * m * 4 / 2**30]
        )

    logger.info("soft_rank %dx%d: %.1f ms (numpy/scipy %.1f ms)", batch, n, wall[l2] * 1e3, wall[ref_key] * 1e3)
    return "\n".join(
        [
            f"### soft_rank, ({batch}, {n}) float32, regularization_strength={eps}",
            "",
            benchlib.table(
                ["implementation", "median wall ms", "wall speed-up", "median CPU ms (all threads)", "CPU speed-up"],
                rows,
            ),
            "",
            "Speed-ups are relative to the NumPy/SciPy reference (> 1: corrjax faster).",
            "",
            f"{peer_line} Max abs difference of the float32 l2 ranks from the float64 reference: {err:.2e}.",
            "",
            "Compiled temporary memory (XLA `memory_analysis().temp_size_in_bytes`) grows linearly with the row "
            "length: O(n) per row, no `n x n` matrix (the last column is what one would cost).",
            "",
            benchlib.table(["input", "input MiB", "temp MiB", "temp / input", "an n x n per row, GiB"], mem),
        ]
    )


def _cka_section(n: int, width: int, layers: int, batches: int, repeats: int) -> str:
    rng = np.random.default_rng(1)
    acts_x = [jax.device_put(rng.standard_normal((n, width)).astype(np.float32)) for _ in range(layers)]
    acts_y = [jax.device_put(rng.standard_normal((n, width)).astype(np.float32)) for _ in range(layers)]
    update = jax.jit(cs.cka_update)
    state0 = cs.cka_init(layers, layers)

    def stream():
        state = state0
        for _ in range(batches):
            state = update(state, acts_x, acts_y)
        return state

    hp = jax.lax.Precision.HIGHEST

    @jax.jit
    def gemms_only(xs, ys):
        """The GEMMs minibatch CKA needs: one (n, n) Gram per layer and the (P, n^2) x (n^2, Q) product."""
        gx = jnp.stack([jnp.matmul(a, a.T, precision=hp).ravel() for a in xs])
        gy = jnp.stack([jnp.matmul(b, b.T, precision=hp).ravel() for b in ys])
        return jnp.matmul(gx, gy.T, precision=hp)

    t_stream = benchlib.timeit(stream, repeats=repeats)["median"] / batches
    t_gemm = benchlib.timeit(lambda: gemms_only(acts_x, acts_y), repeats=repeats)["median"]
    c_stream = benchlib.cpu_seconds(stream, repeats) / batches
    c_gemm = benchlib.cpu_seconds(lambda: gemms_only(acts_x, acts_y), repeats)
    flops = 2 * layers * 2 * n * n * width + 2 * layers * layers * n * n
    rows = [
        [
            "cka_update (jit), per minibatch",
            t_stream * 1e3,
            flops / t_stream / 1e9,
            t_gemm / t_stream,
            c_gemm / c_stream,
        ],
        ["its GEMMs alone (Grams + pair product)", t_gemm * 1e3, flops / t_gemm / 1e9, 1.0, 1.0],
    ]
    logger.info("cka_update %d layers, n=%d: %.1f ms (GEMMs %.1f ms)", layers, n, t_stream * 1e3, t_gemm * 1e3)
    return "\n".join(
        [
            f"### Streaming minibatch CKA, {layers} x {layers} layers, minibatch n={n}, width {width}",
            "",
            f"Per minibatch: 2 x {layers} Gram matrices `(n, n)` and one `({layers}, n^2) x (n^2, {layers})` product; "
            "the unbiased centring and the HSIC sums are elementwise/O(n^2) work on top.",
            "",
            benchlib.table(
                ["computation", "wall ms", "GFLOP/s", "fraction of GEMM-only rate (wall)", "(CPU time)"], rows
            ),
            "",
            f"Streaming over {batches} minibatches runs at **{t_gemm / t_stream:.0%}** (wall) / "
            f"**{c_gemm / c_stream:.0%}** (CPU time) of the rate of the GEMMs it needs (same process, same data).",
        ]
    )


def run(quick: bool = False) -> str:
    if quick:
        parts = [_soft_rank_section(64, 200, 3), _cka_section(64, 32, 4, 3, 3)]
    else:
        parts = [_soft_rank_section(1024, 1000, 7), _cka_section(512, 256, 10, 5, 5)]
    return "\n\n".join(["## Soft ranks and minibatch CKA", "", *parts])


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    print(benchlib.machine_line(["scipy"]))
    print(run(quick="--quick" in sys.argv))
