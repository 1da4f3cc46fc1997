"""corrjax.mtl: task-stacked gradients and multi-task aggregators as Optax transformations.

Task gradients come from one forward pass and a ``T``-batched VJP (:func:`value_and_task_grad`); aggregators take the
task-stacked pytree (every leaf ``(T, ...)``) and return one update, so ``optax.chain(pcgrad(), optax.adam(1e-3))``
is a multi-task optimiser. Solvers (min-norm, dual-cone projection, Nash bargaining) are JAX code inside the step.
"""

# --- task gradients, aggregators and solvers (issue 4, gradient half) ---
from corrjax.mtl._gramian import combine as combine_tasks
from corrjax.mtl._gramian import gramian as task_gramian
from corrjax.mtl.aggregators._base import GramianWeighting, from_weighting
from corrjax.mtl.aggregators.basic import mean, rlw, sum, weighted
from corrjax.mtl.aggregators.graddrop import graddrop
from corrjax.mtl.aggregators.projection import gradvac, pcgrad
from corrjax.mtl.task_grad import RepGrads, shared_only, value_and_rep_grad, value_and_task_grad

__all__ = [
    "GramianWeighting",
    "RepGrads",
    "combine_tasks",
    "from_weighting",
    "graddrop",
    "gradvac",
    "mean",
    "pcgrad",
    "rlw",
    "shared_only",
    "sum",
    "task_gramian",
    "value_and_rep_grad",
    "value_and_task_grad",
    "weighted",
]
# --- loss weightings and diagnostics: add imports below and extend __all__ (`__all__ += [...]`) ---
