"""Aligned-MTL: align the principal components of the task Jacobian."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from corrjax.mtl.aggregators._base import GramianWeighting, from_weighting, nan_if_nonfinite
from corrjax.mtl.aggregators.dual_cone import _pref

Array = jax.Array


def aligned_mtl_weighting(pref_vector: Any = None) -> GramianWeighting:
    """Aligned-MTL's weights from the Gramian (see :func:`aligned_mtl`)."""

    def update(g: Array, state: Any, t: int, **_: Any) -> tuple[Array, Any]:
        ok = jnp.all(jnp.isfinite(g))
        g_safe = jnp.where(ok, (g + g.T) / 2, jnp.eye(t, dtype=g.dtype))
        lam, v = jnp.linalg.eigh(g_safe)
        tol = jnp.max(lam) * t * jnp.finfo(g.dtype).eps
        keep = lam > tol
        inv_sqrt = jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, lam, 1.0)), 0.0)
        lam_min = jnp.min(jnp.where(keep, lam, jnp.inf))
        b = jnp.sqrt(lam_min) * (v * inv_sqrt) @ v.T
        b = jnp.where(jnp.any(keep), b, jnp.eye(t, dtype=g.dtype))
        return nan_if_nonfinite(b @ _pref(pref_vector, t, g.dtype), g), state

    return GramianWeighting(init=optax.EmptyState, update=update)


def aligned_mtl(pref_vector: Any = None) -> optax.GradientTransformationExtraArgs:
    """Aligned-MTL: make the task Jacobian's singular values equal, then combine.

    With ``G = V diag(lambda) V^T`` (eigenvalues below ``max(lambda) T eps`` dropped), the balance transform is
    ``B = sqrt(lambda_min) V diag(lambda)^{-1/2} V^T`` and ``d = J^T B p``: the stability-improved Jacobian
    ``B J`` has all singular values ``sqrt(lambda_min)`` (Algorithm 1, ``"min"`` scale). Output scale: preference
    weights ``p`` default to ``1/T`` (TorchJD's convention; LibMTL sums the rows of ``B``, i.e. ``T`` times larger).
    Identical gradients give the mean; ``T = 1`` gives the gradient.

    Reference: Senushkin et al., "Independent Component Alignment for Multi-Task Learning", CVPR 2023.
    """
    return from_weighting(aligned_mtl_weighting(pref_vector))
