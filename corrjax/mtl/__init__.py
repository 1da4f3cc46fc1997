"""corrjax.mtl: task-stacked gradients and multi-task aggregators as Optax transformations.

Task gradients come from one forward pass and ``T`` VJPs in one program (:func:`value_and_task_grad`); aggregators
take the task-stacked pytree (every leaf ``(T, ...)``) and return one update, so
``optax.chain(pcgrad(), optax.adam(1e-3))`` is a multi-task optimiser. Solvers (min-norm, dual-cone projection, Nash
bargaining) are JAX code inside the step.

- Task gradients: :func:`value_and_task_grad`, :func:`value_and_rep_grad` (rep-grad mode), :func:`shared_only`.
- Gradient aggregators (task-stacked gradients in, one update out): ``mean``, ``sum``, ``weighted``, ``rlw``,
  ``pcgrad``, ``gradvac``, ``cagrad``, ``mgda``, ``imtl_g``, ``nash_mtl``, ``aligned_mtl``, ``upgrad``, ``dualproj``,
  ``graddrop``, ``fairgrad``, ``config_grad`` (ConFIG), ``sdmgrad``, ``excess_mtl``; with per-task state and the
  task losses: ``moco``, ``db_mtl``; :func:`from_weighting` builds one from a Gramian weighting.
- Loss weightings (extra argument ``task_losses``): ``uncertainty_weighting``, ``dwa``, ``gradnorm``, ``famo``,
  ``geometric_mean``, ``stch``, ``imtl_l``; ``imtl`` (IMTL-G on the IMTL-L-scaled gradients).
- Diagnostics returning arrays for a training loop to log: ``task_gradient_cosine``, ``conflict_fraction``,
  ``gradient_norm_ratios``, ``gradient_magnitude_similarity``, ``tag_affinity``, ``gradient_diagnostics``;
  ``cosine_from_gramian`` with a :class:`TaskGramian` computed once and passed to the aggregator as
  ``task_gramian=`` (Gramian-weighting aggregators reuse it instead of computing ``J J^T`` again).
"""

from corrjax.mtl import solvers
from corrjax.mtl._gramian import TaskGramian
from corrjax.mtl._gramian import combine as combine_tasks
from corrjax.mtl._gramian import gramian as task_gramian
from corrjax.mtl.aggregators._base import GramianWeighting, from_weighting
from corrjax.mtl.aggregators.aligned import aligned_mtl
from corrjax.mtl.aggregators.basic import mean, rlw, sum, weighted
from corrjax.mtl.aggregators.cagrad import cagrad
from corrjax.mtl.aggregators.config_grad import config_grad
from corrjax.mtl.aggregators.db_mtl import db_mtl
from corrjax.mtl.aggregators.dual_cone import dualproj, upgrad
from corrjax.mtl.aggregators.excess_mtl import excess_mtl
from corrjax.mtl.aggregators.fairgrad import fairgrad
from corrjax.mtl.aggregators.graddrop import graddrop
from corrjax.mtl.aggregators.imtl import imtl_g
from corrjax.mtl.aggregators.mgda import mgda
from corrjax.mtl.aggregators.moco import moco
from corrjax.mtl.aggregators.nash import nash_mtl
from corrjax.mtl.aggregators.projection import gradvac, pcgrad
from corrjax.mtl.aggregators.sdmgrad import sdmgrad
from corrjax.mtl.diagnostics import (
    conflict_fraction,
    cosine_from_gramian,
    gradient_diagnostics,
    gradient_magnitude_similarity,
    gradient_norm_ratios,
    tag_affinity,
    task_gradient_cosine,
    task_gradient_norms,
)
from corrjax.mtl.impartial import imtl, imtl_l
from corrjax.mtl.scalarization import stch
from corrjax.mtl.task_grad import RepGrads, shared_only, value_and_rep_grad, value_and_task_grad
from corrjax.mtl.weighting import dwa, famo, geometric_mean, gradnorm, uncertainty_weighting

__all__ = [
    "GramianWeighting",
    "RepGrads",
    "TaskGramian",
    "aligned_mtl",
    "cagrad",
    "combine_tasks",
    "config_grad",
    "conflict_fraction",
    "cosine_from_gramian",
    "db_mtl",
    "dualproj",
    "dwa",
    "excess_mtl",
    "fairgrad",
    "famo",
    "from_weighting",
    "geometric_mean",
    "graddrop",
    "gradient_diagnostics",
    "gradient_magnitude_similarity",
    "gradient_norm_ratios",
    "gradnorm",
    "gradvac",
    "imtl",
    "imtl_g",
    "imtl_l",
    "mean",
    "mgda",
    "moco",
    "nash_mtl",
    "pcgrad",
    "rlw",
    "sdmgrad",
    "shared_only",
    "solvers",
    "stch",
    "sum",
    "tag_affinity",
    "task_gradient_cosine",
    "task_gradient_norms",
    "task_gramian",
    "uncertainty_weighting",
    "upgrad",
    "value_and_rep_grad",
    "value_and_task_grad",
    "weighted",
]
