"""corrjax.models: Flax NNX multi-task models.

Every model maps ``x`` to ``{task_name: output}``, exposes ``features(x)`` / ``from_features(z, x)``, and
:func:`shared_mask` gives the shared/task-specific split of its parameters as a boolean pytree for corrjax.mtl.
"""

from corrjax.data.spec import TaskSpec
from corrjax.models.backbones import MLP, ConvBlock, LeNet, ResidualBlock, ResNet, global_pool
from corrjax.models.base import MultiTaskModel, TaskHead, count_params, shared_mask
from corrjax.models.columns import MTAN, CrossStitch, CrossStitchUnit
from corrjax.models.embedding import EmbeddedModel, EmbeddingInput
from corrjax.models.esmm import ESMM, SeparateTowers
from corrjax.models.hps import HPS
from corrjax.models.moe import CGC, PLE, MMoE, OMoE

__all__ = [
    "CGC",
    "ESMM",
    "HPS",
    "MLP",
    "MTAN",
    "PLE",
    "ConvBlock",
    "CrossStitch",
    "CrossStitchUnit",
    "EmbeddedModel",
    "EmbeddingInput",
    "LeNet",
    "MMoE",
    "MultiTaskModel",
    "OMoE",
    "ResNet",
    "ResidualBlock",
    "SeparateTowers",
    "TaskHead",
    "TaskSpec",
    "count_params",
    "global_pool",
    "shared_mask",
]
