"""OMoE, the one-gate mixture-of-experts baseline of the MMoE paper's synthetic experiment, for ``model=omoe``.

Ma et al. (KDD 2018, Section 5) compare shared-bottom, OMoE and MMoE: OMoE mixes the same ``E`` experts with a
single softmax gate shared by all tasks, ``h = sum_e g(x)_e f_e(x)``, so it differs from MMoE only in the number of
gates. It is built here from corrjax.models' public pieces for that experiment; every parameter but the heads is
shared.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from corrjax.data import TaskSpec
from corrjax.models.base import BackboneFactory, MultiTaskModel, build_backbone, make_heads


class OMoE(MultiTaskModel):
    """One-gate mixture of experts: ``features(x)`` is ``(n, E, h)``; every task reads the same gated mixture."""

    task_specific = ("heads",)

    def __init__(
        self,
        expert: BackboneFactory,
        tasks: Sequence[TaskSpec],
        *,
        num_experts: int = 4,
        gate_in_features: int,
        tower_hidden: Sequence[int] = (),
        rngs: nnx.Rngs,
    ) -> None:
        if num_experts < 1:
            raise ValueError(f"`num_experts` must be >= 1, got {num_experts}")
        self._init_tasks(tasks)
        self.experts = nnx.List([build_backbone(expert, rngs, "expert") for _ in range(num_experts)])
        self.gate = nnx.Linear(gate_in_features, num_experts, rngs=rngs)
        self.heads = make_heads(self.experts[0].out_features, self.tasks, tower_hidden, rngs)

    def features(self, x: jax.Array) -> jax.Array:
        return jnp.stack([e(x) for e in self.experts], axis=1)

    def gate_weights(self, x: jax.Array) -> dict[str, jax.Array]:
        """``{task: (n, E)}``: the one gate's softmax weights (the same for every task)."""
        g = jax.nn.softmax(self.gate(x.reshape(x.shape[0], -1)), axis=-1)
        return {n: g for n in self.task_names}

    def from_features(self, z: jax.Array, x: jax.Array) -> dict[str, jax.Array]:
        g = jax.nn.softmax(self.gate(x.reshape(x.shape[0], -1)), axis=-1)
        h = jnp.einsum("ne,neh->nh", g, z)
        return {n: self.heads[n](h) for n in self.task_names}
