"""corrjax.models: Flax NNX multi-task models.

Every model maps ``x`` to ``{task_name: output}``, exposes ``features(x)`` / ``from_features(z, x)``, and
:func:`shared_mask` gives the shared/task-specific split of its parameters as a boolean pytree for corrjax.mtl.
"""

from corrjax.data.spec import TaskSpec
from corrjax.models.backbones import MLP, LeNet, ResidualBlock, ResNet
from corrjax.models.base import MultiTaskModel, TaskHead, count_params, shared_mask
from corrjax.models.hps import HPS
from corrjax.models.moe import CGC, PLE, MMoE

__all__ = [
    "CGC",
    "HPS",
    "MLP",
    "PLE",
    "LeNet",
    "MMoE",
    "MultiTaskModel",
    "ResNet",
    "ResidualBlock",
    "TaskHead",
    "TaskSpec",
    "count_params",
    "shared_mask",
]
