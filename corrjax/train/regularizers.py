"""Regularisers of the shared representation for ``regularizer=`` (issue 7): DeCov, Barlow Twins, VICReg.

The train step calls ``fn(z)`` on the model's shared representation ``z = model.features(x)`` flattened to
``(n, D)`` and adds ``weight / T`` times it to every task loss (so the summed objective gets ``weight * fn(z)``).
Barlow Twins and VICReg are two-view objectives; without augmentation the single representation is used as both
views (:func:`same_view`), which keeps their redundancy-reduction parts (Barlow Twins' off-diagonal term; VICReg's
variance and covariance terms, the "VCReg" use of Zhu et al. 2023) while the invariance parts vanish. The losses
themselves are :mod:`corrjax.stats`'s (``decov_loss``, ``barlow_twins_loss``, ``vicreg_loss``), with their references.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

Array = jax.Array


def single_view(loss: Callable[[Array], Array]) -> Callable[[Array], Array]:
    """``z -> loss(z)`` (e.g. :func:`corrjax.stats.decov_loss`)."""
    return lambda z: loss(z)


def same_view(loss: Callable[[Array, Array], Array]) -> Callable[[Array], Array]:
    """``z -> loss(z, z)``: a two-view loss applied with the representation as both views."""
    return lambda z: loss(z, z)


def flatten_representation(z) -> Array:
    """``(n, D)`` from a representation pytree: every leaf flattened per example and concatenated."""
    leaves = jax.tree.leaves(z)
    flat = [leaf.reshape(leaf.shape[0], -1) for leaf in leaves]
    return flat[0] if len(flat) == 1 else jax.numpy.concatenate(flat, axis=1)
