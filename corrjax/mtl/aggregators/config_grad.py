"""ConFIG: the conflict-free direction from the pseudo-inverse of the unit task gradients (Liu et al., ICLR 2025)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from corrjax.mtl.aggregators._base import GramianWeighting, from_weighting, nan_if_nonfinite

Array = jax.Array


def config_grad_weighting(preference: Any = None, rtol: float | None = None) -> GramianWeighting:
    """ConFIG's weights from the Gramian (see :func:`config_grad`)."""
    if rtol is not None and not rtol >= 0:
        raise ValueError(f"`rtol` must be non-negative, got {rtol!r}")

    def update(g: Array, state: Any, t: int, **_: Any) -> tuple[Array, Any]:
        dtype = g.dtype
        g = (g + g.T) / 2
        norms = jnp.sqrt(jnp.maximum(jnp.diag(g), 0.0))
        live = norms > 0
        safe = jnp.where(live, norms, 1.0)
        both = live[:, None] & live[None, :]
        eye = jnp.eye(t, dtype=dtype)
        # Gramian of the unit gradients U (zero rows for zero gradients, as TorchJD's nan_to_num); exact unit diagonal
        cos = jnp.where(both, jnp.clip(g / jnp.outer(safe, safe), -1.0, 1.0), 0.0)
        cos = jnp.where(eye > 0, live.astype(dtype), cos)
        if preference is None:
            pref = jnp.ones((t,), dtype)
        else:
            pref = jnp.asarray(preference, dtype)
            if pref.shape != (t,):
                raise ValueError(f"`preference` must have shape (T,) = ({t},) to match the task axis, got {pref.shape}")
        # pinv(U) pref = U^T (U U^T)^+ pref = U^T c, c = C^+ pref by the eigendecomposition of C = U U^T
        evals, evecs = jnp.linalg.eigh(cos)
        cut = (10.0 * t * float(jnp.finfo(dtype).eps) if rtol is None else rtol) * jnp.max(evals)
        keep = evals > cut
        inv = jnp.where(keep, 1.0 / jnp.where(keep, evals, 1.0), 0.0)
        c = evecs @ (inv * (evecs.T @ pref))
        cc = cos @ c
        best_sq = jnp.maximum(c @ cc, 0.0)  # |U^T c|^2
        nonzero = best_sq > 0
        inv_best = jnp.where(nonzero, 1.0 / jnp.sqrt(jnp.where(nonzero, best_sq, 1.0)), 0.0)
        # length = sum_i g_i . unit = sum_i |g_i| (C c)_i / |U^T c|; update = length * U^T c / |U^T c|
        length = jnp.sum(norms * cc) * inv_best
        weights = jnp.where(live, length * inv_best * c / safe, 0.0)
        return nan_if_nonfinite(weights, g), state

    return GramianWeighting(init=optax.EmptyState, update=update)


def config_grad(preference: Any = None, rtol: float | None = None) -> optax.GradientTransformationExtraArgs:
    r"""ConFIG: the direction ``u = pinv(U) p`` of the unit task gradients, scaled by the sum of the projections.

    With ``U`` the ``(T, P)`` matrix of unit gradients ``g_i / |g_i|`` and ``p`` the preference vector (ones):

    .. math:: \hat u = \frac{U^{+} p}{|U^{+} p|}, \qquad d = \Big(\sum_i g_i^\top \hat u\Big)\, \hat u .

    For linearly independent gradients ``U U^+ p = p``: every unit gradient has the projection ``p_i`` on
    ``U^+ p``, so ``g_i . d > 0`` for all ``i`` (no conflict) and the update is scaled like the sum of the gradients
    along it. Computed from the Gramian alone: ``U^+ p = U^T c`` with ``c = C^+ p``, ``C`` the cosine matrix, its
    pseudo-inverse by an eigendecomposition that drops eigenvalues below ``rtol * max(eig)`` (default ``10 T eps``
    of the dtype, about the Gramian's rounding). Unit gradients closer than about ``sqrt(rtol)`` (near-duplicate
    tasks) are thereby treated as one direction, as are the dependent directions when ``T > d``, where the update is
    ``pinv``'s least-squares direction (and ``g_i . d >= 0`` may fail). A zero-gradient task is a zero row of ``U``
    (TorchJD's ``nan_to_num``): it gets weight 0. All gradients zero give 0. Output scale: ``T = 1`` gives ``g``.
    The direction does not depend on the gradients' norms (only on the unit gradients); the length is the sum of
    the projections. In float32 the Gramian's rounding (~1e-7 relative) limits the accuracy for near-duplicate
    tasks to about ``1e-7 / lambda_min(C)``.

    Args:
      preference: ``(T,)`` preference vector ``p`` (default ones; TorchJD's ``pref_vector``).
      rtol: relative eigenvalue cutoff of the cosine matrix's pseudo-inverse.

    Reference: Liu, Chu, Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks",
    ICLR 2025 (Eq. 2); TorchJD ``ConFIG`` (the same direction via ``torch.linalg.pinv`` of ``U``).
    """
    return from_weighting(config_grad_weighting(preference, rtol))
