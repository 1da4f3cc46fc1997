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

    With ``C`` the cosine matrix of the non-zero task gradients, ``x`` solves the bordered system
    ``[[C, 1], [1^T, 0]] [x; -c] = [0; 1]`` (the paper's difference form: ``U^T x`` is the min-norm point of the
    affine hull of the unit gradients), by an eigendecomposition, when that system is numerically non-singular (its
    smallest eigenvalue in modulus above ``10 (T + 1) eps`` of the largest); otherwise ``x = C^+ 1`` (eigenvalues
    below ``10 T eps max(lambda)`` dropped, JAX's ``pinv`` cut). Then ``a_i = x_i / |g_i|`` (0 for zero gradients) and
    ``a / sum(a)`` (all zeros when ``sum(a)`` is exactly 0). Only the fallback computes the second eigendecomposition
    (a ``lax.cond``; under ``vmap`` both run).
    """
    g = jnp.asarray(gramian)
    t = g.shape[0]
    dtype = g.dtype
    eps = float(jnp.finfo(dtype).eps)
    ok = jnp.all(jnp.isfinite(g))
    g = jnp.where(ok, (g + g.T) / 2, jnp.eye(t, dtype=dtype))
    diag = jnp.diag(g)
    live = diag > 0
    lf = live.astype(dtype)
    norms = jnp.sqrt(jnp.where(live, diag, 1.0))
    both = live[:, None] & live[None, :]
    cos = jnp.where(both, g / jnp.outer(norms, norms), 0.0)
    # the bordered matrix; a zero-gradient task is decoupled (unit diagonal, no border), so its x_i is 0
    bordered = jnp.zeros((t + 1, t + 1), dtype)
    bordered = bordered.at[:t, :t].set(cos + jnp.diag(1.0 - lf)).at[:t, t].set(lf).at[t, :t].set(lf)
    sig, vec_b = jnp.linalg.eigh(bordered)
    abs_sig = jnp.abs(sig)
    regular = jnp.min(abs_sig) > 10.0 * (t + 1) * eps * jnp.max(abs_sig)

    def difference_form(_: None) -> Array:
        # [x; -c] = M^{-1} e_{T+1} = V diag(1 / sigma) V^T e_{T+1}
        return (vec_b[:t] @ (vec_b[t] / jnp.where(regular, sig, 1.0))) * lf

    def pseudo_inverse(_: None) -> Array:
        lam, vec = jnp.linalg.eigh(cos)
        keep = lam > 10.0 * t * eps * jnp.max(lam)
        inv = jnp.where(keep, 1.0 / jnp.where(keep, lam, 1.0), 0.0)
        proj = vec.T @ lf
        # components of 1 at rounding level along kept eigenvectors are 0 (1 orthogonal to C's range gives x = 0, the
        # zero update, instead of amplified noise)
        proj = jnp.where(jnp.abs(proj) <= 10.0 * t * eps * jnp.sqrt(t), 0.0, proj)
        return vec @ (inv * proj)

    x = jax.lax.cond(regular, difference_form, pseudo_inverse, None)
    a = jnp.where(live, x / norms, 0.0)
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
    ``sum_t a_t = 1``: the paper's closed form ``a = G^{-1} |g| / (1^T G^{-1} |g|)`` (TorchJD's IMTL-G weighting).
    It is computed, from the cosines (so the weights' direction does not depend on the gradients' scales), in the
    paper's difference form ``alpha_{2:T} = g_1 U'^T (D U'^T)^{-1}`` (rows of ``U'`` and ``D``: ``u_1 - u_t`` and
    ``g_1 - g_t``), written symmetrically as the bordered system ``[[C, 1], [1^T, 0]] [b; -c] = [0; 1]``: ``U^T b``
    is the min-norm point of the affine hull of the unit gradients, and ``d`` its multiple with ``sum_t a_t = 1``.
    Near a Pareto-stationary point (0 nearly in the hull of the gradients) ``C`` is nearly singular, but this system
    is well conditioned, so float32 gives the exact answer there too (``d`` tends to 0; the pseudo-inverse of ``C``
    would drop the near-null direction that carries the answer). Output scale: weights sum to 1 (the paper's); they
    may be negative.

    Where the bordered system is singular to working precision (the differences ``u_1 - u_t`` linearly dependent:
    duplicated tasks, ``T > d + 1``), the pseudo-inverse is used, ``b = C^+ 1`` (eigenvalues below ``10 T eps`` of
    the largest dropped, the rank cut of JAX's ``pinv``): then ``d ∝ U^+ 1``, the minimum-norm direction whose
    projections on the unit gradients are closest to equal (all 1, in least squares). This is the mean of identical
    gradients and a useful update for ``T > d + 1`` (more tasks than parameters, where exact equal projections would
    force ``d = 0``). Where the system is regular but 0 is in the affine hull (an exactly Pareto-stationary point, or
    ``T = d + 1`` generic gradients) the exact answer ``d = 0`` is returned. Zero-gradient tasks get weight 0; if
    ``sum_t a_t`` is exactly 0 the update is 0.

    Reference: Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021 (Sec. 3.2, gradient balance).
    """
    return from_weighting(imtl_g_weighting())
