"""Benchmarks for corrjax.mtl.solvers -> the "mtl_solvers" section of BENCHMARKS.md.

The weights that MGDA (one non-negative QP), DualProj (one dual-cone projection) and UPGrad (T projections under
``vmap``) compute from a ``T x T`` Gramian, with ``nonneg_qp``'s two exact methods: block principal pivoting (the
default) and the primal active set. Gramians come from random Jacobians ``(T, 4096)`` whose rows share a common
direction (aligned), nothing (independent), or a common direction with random signs (conflicting). The peer is
quadprog, the QP solver behind TorchJD's UPGrad/DualProj projector, called on the same problems from Python (one
solve per projection), as TorchJD does on the host.

Run: ``.venv/bin/python scripts/bench_solvers.py`` (``--quick`` for fewer sizes).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax
import jax.numpy as jnp
import numpy as np
from benchlib import machine_line, table, timeit, write_section

from corrjax.mtl import solvers

KINDS = ("aligned", "independent", "conflicting")


def gramian(t: int, kind: str, seed: int = 0) -> np.ndarray:
    """``J J^T`` of ``J = noise + s_t c``: a shared direction ``c`` (cosines ~0.5 between rows) with ``s_t = 1``
    (aligned) or random signs ``+-1`` (conflicting), or none (independent, cosines ~0)."""
    rng = np.random.default_rng(seed)
    j = rng.normal(size=(t, 4096))
    if kind != "independent":
        signs = np.sign(rng.normal(size=(t, 1))) if kind == "conflicting" else np.ones((t, 1))
        j = j + signs * rng.normal(size=(1, 4096))
    return (j @ j.T).astype(np.float32)


def jax_weights(method: str):
    """``(mgda, dualproj, upgrad)`` jitted ``G -> w``: the library's solvers with ``nonneg_qp(method=...)``."""

    def dualproj(g):
        return solvers.project_dual_cone(g, jnp.full(g.shape[0], 1.0 / g.shape[0], g.dtype), qp_method=method)

    def upgrad(g):  # as aggregators.dual_cone.upgrad_weighting: the mean of the T rows' projections
        rows = jnp.eye(g.shape[0], dtype=g.dtype) / g.shape[0]
        return jnp.sum(jax.vmap(lambda u: solvers.project_dual_cone(g, u, qp_method=method))(rows), axis=0)

    return {
        "mgda": jax.jit(lambda g: solvers.min_norm_simplex(g, qp_method=method)),
        "dualproj": jax.jit(dualproj),
        "upgrad": jax.jit(upgrad),
    }


def quadprog_weights():
    """The same problems with quadprog (``None`` if it is not installed)."""
    try:
        import quadprog
    except ImportError:
        return None

    def nonneg(q_mat, q_vec):
        t = len(q_vec)
        return quadprog.solve_qp(q_mat, -q_vec, np.eye(t), np.zeros(t))[0]

    def project(g, u):
        gn = (g + g.T) / (2 * np.trace(g)) + 1e-4 * np.eye(len(g))
        return u + nonneg(gn, gn @ u)

    def mgda(g):  # min_norm_simplex's problem: the exact min-norm point of the hull, no ridge
        # min 1/2 w^T G w s.t. 1^T w = 1 (quadprog's first constraint, an equality: meq=1), w >= 0, on G / (trace / T)
        # (the scale does not move the minimiser); quadprog needs G positive definite, as the benchmark's Gramians are
        t = len(g)
        c_mat = np.hstack([np.ones((t, 1)), np.eye(t)])
        b_vec = np.concatenate([[1.0], np.zeros(t)])
        return quadprog.solve_qp(g / (np.trace(g) / t), np.zeros(t), c_mat, b_vec, meq=1)[0]

    def dualproj(g):
        return project(g, np.full(len(g), 1.0 / len(g)))

    def upgrad(g):
        t = len(g)
        return sum(project(g, u) for u in np.eye(t) / t)

    return {"mgda": mgda, "dualproj": dualproj, "upgrad": upgrad}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="T in {8, 16} only; do not write BENCHMARKS.md")
    args = ap.parse_args()
    sizes = (8, 16) if args.quick else (4, 8, 16, 32)
    fast, slow, peer = jax_weights("block_pivoting"), jax_weights("active_set"), quadprog_weights()
    rows = []
    for t in sizes:
        for kind in KINDS:
            g64 = gramian(t, kind).astype(np.float64)
            g = jnp.asarray(g64, jnp.float32)
            for name in ("mgda", "dualproj", "upgrad"):
                w_fast, w_slow = np.asarray(fast[name](g)), np.asarray(slow[name](g))
                t_fast = timeit(lambda f=fast[name]: f(g), repeats=7, min_time=0.05)["min"]
                t_slow = timeit(lambda f=slow[name]: f(g), repeats=7, min_time=0.05)["min"]
                row = [t, kind, name, t_fast * 1e6, t_slow * 1e6, f"{t_slow / t_fast:.1f}x"]
                if peer is not None:
                    w_peer = peer[name](g64)
                    t_peer = timeit(lambda f=peer[name]: f(g64), repeats=7, min_time=0.05)["min"]
                    err = np.max(np.abs(w_fast - w_peer)) / max(np.max(np.abs(w_peer)), 1e-12)
                    row += [t_peer * 1e6, f"{t_peer / t_fast:.1f}x", f"{err:.1e}"]
                else:
                    row += ["n/a", "n/a", "n/a"]
                row.append(f"{np.max(np.abs(w_fast - w_slow)) / max(np.max(np.abs(w_slow)), 1e-12):.1e}")
                rows.append(row)
                print(" | ".join(str(x) for x in row), flush=True)
    headers = [
        "T",
        "Gramian",
        "weights",
        "block pivoting (us)",
        "active set (us)",
        "active set / block",
        "quadprog (us)",
        "quadprog / block",
        "rel. diff vs quadprog",
        "rel. diff vs active set",
    ]
    md = "\n\n".join(
        [
            "## corrjax.mtl.solvers: aggregator weights from the Gramian",
            machine_line(["quadprog"]),
            "Time of one jitted `G -> w` call (float32, single-threaded XLA; minimum over 7 repeats), the weights of "
            "MGDA (one non-negative QP), DualProj (one dual-cone projection) and UPGrad (T projections under `vmap`, "
            "the batch iterating until its slowest member converges) with `nonneg_qp`'s block principal pivoting "
            "(the default) and its primal active set. quadprog (the solver behind TorchJD's projector) solves the "
            "same problems in float64 from Python, one call per projection. Gramians of random `(T, 4096)` "
            "Jacobians whose rows share a direction (aligned), share nothing (independent), or share one with "
            "random signs (conflicting). The relative differences are max |w - w_ref| / max |w_ref| (float32 "
            "against quadprog's float64; the two JAX methods end on the same partition and differ only by rounding, "
            "as MGDA's block pivoting factors by Cholesky and the active set by LU). A jitted call's dispatch "
            "(~10 us) is in the JAX times; inside a compiled training step it is "
            "not.",
            table(headers, rows),
        ]
    )
    if not args.quick:
        write_section("mtl_solvers", md)
    print(md)


if __name__ == "__main__":
    main()
