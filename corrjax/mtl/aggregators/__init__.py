"""Multi-task aggregators: Optax transformations from task-stacked gradients to one update.

The public aggregators live in :mod:`corrjax.mtl`. Here are their Gramian weightings (``G -> w``), for training
steps that compute the Gramian themselves and pull the weights back with one VJP (``grads = vjp_fn(w)``) instead of
contracting a materialised Jacobian; :func:`corrjax.mtl.from_weighting` turns any of them into an aggregator.
"""

from corrjax.mtl.aggregators._base import GramianWeighting, from_weighting
from corrjax.mtl.aggregators.aligned import aligned_mtl_weighting
from corrjax.mtl.aggregators.basic import mean_weighting, rlw_weighting, sum_weighting, weighted_weighting
from corrjax.mtl.aggregators.cagrad import cagrad_weighting
from corrjax.mtl.aggregators.config_grad import config_grad_weighting
from corrjax.mtl.aggregators.dual_cone import dualproj_weighting, upgrad_weighting
from corrjax.mtl.aggregators.fairgrad import fairgrad_weighting
from corrjax.mtl.aggregators.imtl import imtl_g_weighting
from corrjax.mtl.aggregators.mgda import mgda_weighting
from corrjax.mtl.aggregators.nash import nash_mtl_weighting
from corrjax.mtl.aggregators.projection import gradvac_weighting, pcgrad_weighting
from corrjax.mtl.aggregators.sdmgrad import sdmgrad_weighting

__all__ = [
    "GramianWeighting",
    "aligned_mtl_weighting",
    "cagrad_weighting",
    "config_grad_weighting",
    "dualproj_weighting",
    "fairgrad_weighting",
    "from_weighting",
    "gradvac_weighting",
    "imtl_g_weighting",
    "mean_weighting",
    "mgda_weighting",
    "nash_mtl_weighting",
    "pcgrad_weighting",
    "rlw_weighting",
    "sdmgrad_weighting",
    "sum_weighting",
    "upgrad_weighting",
    "weighted_weighting",
]
