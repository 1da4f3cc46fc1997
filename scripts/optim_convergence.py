"""Convergence comparison for corrjax.optim (reported in README.md, not asserted): where variance adaptation helps.

1. Noisy quadratic ``f(theta) = 0.5 sum_i h_i theta_i^2`` with per-example gradient noise whose scale differs
   across coordinates (low-curvature coordinates are the noisiest). Each optimiser gets its best learning rate from a
   small grid; we report the final expected loss (mean over seeds).
2. A small classifier: an MLP on scikit-learn's bundled ``digits`` (8x8 images, offline), batch 32; final train
   loss and test accuracy (mean over seeds), best learning rate per optimiser from a small grid.

Run: ``.venv/bin/python scripts/optim_convergence.py`` (prints Markdown tables; ``--quick`` for fewer seeds/steps).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import optax

import corrjax.optim as co


def _optimisers(lr: float) -> dict[str, optax.GradientTransformationExtraArgs]:
    return {
        "sgd": optax.sgd(lr),
        "sgd+momentum": optax.sgd(lr, momentum=0.9),
        "adam": optax.adam(lr),
        "msvag (ema)": co.msvag(lr),
        "svag (ema)": co.svag(lr),
        "msvag (batch)": co.msvag(lr, source="batch"),
    }


NAMES = list(_optimisers(0.1))
BATCH_NEEDS_MOMENTS = {"msvag (batch)"}


def _table(headers, rows) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ noisy quadratic


def noisy_quadratic(steps: int, seeds: int, *, conditioned: bool = False) -> str:
    """``conditioned=False``: curvatures 1e-2..1, noise std 1/sqrt(h) (slow, noisy directions dominate the loss).
    ``conditioned=True``: curvatures 0.5..1 and noise std 3 (the optimum is reached early and the noise floor of a
    constant learning rate dominates)."""
    d, batch = 100, 16
    if conditioned:
        h = jnp.linspace(0.5, 1.0, d)
        sigma = jnp.full(d, 3.0)
    else:
        h = jnp.logspace(-2, 0, d)  # curvatures
        sigma = 1.0 / jnp.sqrt(h)  # per-example noise std: large where curvature is low
    theta0 = jnp.ones(d) * 3.0
    loss = lambda th: 0.5 * jnp.sum(h * th**2)
    lrs = [0.01, 0.03, 0.1, 0.3, 1.0]

    def run(name, lr, key):
        tx = _optimisers(lr)[name]

        def step(carry, k):
            th, s = carry
            per = h * th + sigma * jax.random.normal(k, (batch, d))  # per-example gradients
            mean = per.mean(0)
            extra = {}
            if name in BATCH_NEEDS_MOMENTS:
                extra = {"sum_sq_diff_grads": jnp.sum((per - mean) ** 2, 0), "sample_size": batch}
            u, s = tx.update(mean, s, th, **extra)
            return (optax.apply_updates(th, u), s), None

        (th, _), _ = jax.lax.scan(step, (theta0, tx.init(theta0)), jax.random.split(key, steps))
        return loss(th)

    rows = []
    for name in NAMES:
        best = (np.inf, None)
        for lr in lrs:
            f = jax.jit(jax.vmap(lambda k, name=name, lr=lr: run(name, lr, k)))
            vals = np.asarray(f(jax.random.split(jax.random.key(0), seeds)))
            v = float(np.nanmean(np.where(np.isfinite(vals), vals, np.nan))) if np.isfinite(vals).any() else np.inf
            if v < best[0]:
                best = (v, lr)
        rows.append([name, f"{best[0]:.4g}", best[1]])
    return _table(["optimiser", f"final loss after {steps} steps (mean of {seeds} seeds)", "best lr"], rows)


# ------------------------------------------------------------------------------------------------ digits classifier


def digits(steps: int, seeds: int) -> str:
    from flax import nnx
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int32)
    perm = np.random.default_rng(0).permutation(len(x))
    x, y = x[perm], y[perm]
    xtr, ytr, xte, yte = jnp.asarray(x[:1400]), jnp.asarray(y[:1400]), jnp.asarray(x[1400:]), jnp.asarray(y[1400:])
    batch = 32
    lrs = [0.01, 0.03, 0.1, 0.3, 1.0]

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(64, 64, rngs=rngs)
            self.l2 = nnx.Linear(64, 10, rngs=rngs)

        def __call__(self, z):
            return self.l2(nnx.relu(self.l1(z)))

    graphdef, _ = nnx.split(MLP(nnx.Rngs(0)), nnx.Param)

    def loss_one(p, xi, yi):
        return optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, p)(xi), yi)

    def loss_batch(p, xb, yb):
        return optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, p)(xb), yb).mean()

    init_params = [nnx.split(MLP(nnx.Rngs(seed)), nnx.Param)[1] for seed in range(seeds)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *init_params)
    keys = jax.random.split(jax.random.key(100), seeds)

    def run(name, lr):
        """Final train loss and test accuracy for every seed (one compile, vmapped over seeds)."""
        tx = _optimisers(lr)[name]

        def train(params, key):
            def step(carry, k):
                p, s = carry
                idx = jax.random.choice(k, xtr.shape[0], (batch,), replace=False)
                xb, yb = xtr[idx], ytr[idx]
                if name in BATCH_NEEDS_MOMENTS:
                    g, ssd, n = co.per_example_moments(loss_one, p, xb, yb)
                    u, s = tx.update(g, s, p, sum_sq_diff_grads=ssd, sample_size=n)
                else:
                    u, s = tx.update(jax.grad(loss_batch)(p, xb, yb), s, p)
                return (optax.apply_updates(p, u), s), None

            (p, _), _ = jax.lax.scan(step, (params, tx.init(params)), jax.random.split(key, steps))
            acc = jnp.mean(jnp.argmax(nnx.merge(graphdef, p)(xte), -1) == yte)
            return loss_batch(p, xtr, ytr), acc

        tr, acc = jax.jit(jax.vmap(train))(stacked, keys)
        return np.stack([np.asarray(tr), np.asarray(acc)], axis=1)

    rows = []
    for name in NAMES:
        best = None
        for lr in lrs:
            res = run(name, lr)
            tr, acc = float(np.mean(res[:, 0])), float(np.mean(res[:, 1]))
            if np.isfinite(tr) and (best is None or tr < best[0]):
                best = (tr, acc, lr)
        rows.append([name, f"{best[0]:.4f}", f"{best[1]:.3f}", best[2]])
    return _table(
        ["optimiser", f"train loss after {steps} steps (mean of {seeds} seeds)", "test accuracy", "best lr"], rows
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=["quadratic", "conditioned", "digits"], default=None)
    args = parser.parse_args()
    q_steps, q_seeds = (300, 8) if args.quick else (1000, 32)
    c_steps, c_seeds = (200, 2) if args.quick else (1000, 4)
    if args.only in (None, "quadratic"):
        print("### Noisy quadratic, ill-conditioned (h in [1e-2, 1], noise std 1/sqrt(h))\n")
        print(noisy_quadratic(q_steps, q_seeds), flush=True)
    if args.only in (None, "conditioned"):
        print("\n### Noisy quadratic, well-conditioned and noise-dominated (h in [0.5, 1], noise std 3)\n")
        print(noisy_quadratic(q_steps, q_seeds, conditioned=True), flush=True)
    if args.only in (None, "digits"):
        print("\n### Digits MLP (64-64-10), batch 32\n")
        print(digits(c_steps, c_seeds), flush=True)


if __name__ == "__main__":
    main()
