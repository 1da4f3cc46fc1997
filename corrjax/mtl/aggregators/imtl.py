"""IMTL-G: the combination with equal projections on every task's unit gradient."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from corrjax.mtl.aggregators._base import GramianWeighting, from_weighting, nan_if_nonfinite

Array = jax.Array


def imtl_g_weights(gramian: Array) -> Array:
    """IMTL-G's weights ``a`` (shape ``(T,)``, summing to 1) from the ``(T, T)`` Gramian; see :func:`imtl_g`.

    ``b = C^+ 1`` with ``C`` the cosine matrix of the non-zero task gradients (an eigendecomposition; eigenvalues below
    ``10 T eps max(lambda)`` are dropped, JAX's ``pinv`` cut), ``a_i = b_i / |g_i|`` (0 for zero gradients) and
    ``a / sum(a)`` (all zeros when ``sum(a)`` is exactly 0).
    """
    g = jnp.asarray(gramian)
    t = g.shape[0]
    ok = jnp.all(jnp.isfinite(g))
    g = jnp.where(ok, (g + g.T) / 2, jnp.eye(t, dtype=g.dtype))
    diag = jnp.diag(g)
    live = diag > 0
    norms = jnp.sqrt(jnp.where(live, diag, 1.0))
    both = live[:, None] & live[None, :]
    cos = jnp.where(both, g / jnp.outer(norms, norms), 0.0)
    lam, vec = jnp.linalg.eigh(cos)
    keep = lam > 10.0 * t * jnp.finfo(g.dtype).eps * jnp.max(lam)
    inv = jnp.where(keep, 1.0 / jnp.where(keep, lam, 1.0), 0.0)
    proj = vec.T @ live.astype(g.dtype)
    # components of 1 at rounding level along kept eigenvectors are 0 (1 orthogonal to C's range gives b = 0, the
    # zero update, instead of amplified noise)
    proj = jnp.where(jnp.abs(proj) <= 10.0 * t * jnp.finfo(g.dtype).eps * jnp.sqrt(t), 0.0, proj)
    b = vec @ (inv * proj)
    a = jnp.where(live, b / norms, 0.0)
    total = jnp.sum(a)
    w = jnp.where(total != 0, a / jnp.where(total != 0, total, 1.0), 0.0)
    return jnp.where(ok, w, jnp.nan)


def imtl_g_weighting() -> GramianWeighting:
    """IMTL-G's weights from the Gramian (see :func:`imtl_g`)."""

    def update(g: Array, state: Any, t: int, **_: Any) -> tuple[Array, Any]:
        return nan_if_nonfinite(imtl_g_weights(g), g), state

    return GramianWeighting(init=optax.EmptyState, update=update)


def imtl_g() -> optax.GradientTransformationExtraArgs:
    """IMTL-G: the combination ``d = sum_t a_t g_t``, ``sum_t a_t = 1``, whose projections on every unit gradient
    ``u_t = g_t / |g_t|`` are equal (``u_s . d = u_t . d``).

    The conditions read ``U d = c 1`` with ``U`` the unit gradients as rows; with ``d = U^T b`` they are ``C b = c 1``
    for the cosine matrix ``C = U U^T``, so ``b = C^{-1} 1`` up to scale and ``a_t = b_t / |g_t|``, normalised to
    ``sum_t a_t = 1``: the paper's closed form ``a = G^{-1} |g| / (1^T G^{-1} |g|)`` (TorchJD's IMTL-G weighting),
    computed from the cosines so the weights' direction does not depend on the gradients' scales. Output scale: weights
    sum to 1 (the paper's); they may be negative.

    Singular cases use the pseudo-inverse, ``b = C^+ 1`` (eigenvalues below ``10 T eps`` of the largest are dropped,
    the rank cut of JAX's ``pinv``; near-duplicate tasks above that cut keep the exact inverse): then
    ``d ∝ U^+ 1``, the minimum-norm direction whose projections on the unit gradients are closest to equal
    (all 1, in least squares). This is exact IMTL-G when the unit gradients are linearly independent, the mean of
    identical gradients, and a useful update for ``T > d`` (more tasks than parameters, where exact equal
    projections would force ``d = 0``). Zero-gradient tasks get weight 0; if ``sum_t a_t`` is exactly 0 the update
    is 0.

    Reference: Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021 (Sec. 3.2, gradient balance).
    """
    return from_weighting(imtl_g_weighting())
