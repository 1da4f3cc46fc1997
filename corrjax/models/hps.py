"""Hard parameter sharing (shared-bottom): one trunk for all tasks, one head per task (Caruana, 1997)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from corrjax.data.spec import TaskSpec
from corrjax.models.base import BackboneFactory, MultiTaskModel, build_backbone, make_heads


class HPS(MultiTaskModel):
    """Shared-bottom model: ``features(x) = trunk(x)`` of shape ``(n, h)``; ``head_t(features)`` per task.

    Args:
      backbone: factory called as ``backbone(rngs=rngs)``, returning a module with ``out_features``
        (e.g. ``functools.partial(MLP, 100, (64,))``).
      tasks: the task specs.
      head_hidden: widths of each task's tower before its output layer.
      dtype, param_dtype: computation and parameter dtypes of the trunk and heads.
    """

    task_specific = ("heads",)

    def __init__(
        self,
        backbone: BackboneFactory,
        tasks: Sequence[TaskSpec],
        *,
        head_hidden: Sequence[int] = (),
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        self._init_tasks(tasks)
        kw = {"dtype": dtype, "param_dtype": param_dtype}
        self.trunk = build_backbone(backbone, rngs, "backbone", **kw)
        self.heads = make_heads(self.trunk.out_features, self.tasks, head_hidden, rngs, **kw)

    def features(self, x: jax.Array) -> jax.Array:
        return self.trunk(x)

    def from_features(self, z: jax.Array, x: jax.Array | None = None) -> dict[str, jax.Array]:
        return self.heads(z)
