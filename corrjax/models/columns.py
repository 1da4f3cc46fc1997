"""Column and attention architectures built from a sequence of stages: cross-stitch networks and an MTAN variant.

Both take ``stages``: factories (each called as ``stage(rngs=rngs)``) of modules applied in sequence, whose output's
last axis has size ``out_features`` (e.g. :class:`~corrjax.models.backbones.MLP` layers on vectors or
:class:`~corrjax.models.backbones.ConvBlock` on images). Heads read the last stage globally average-pooled over any
spatial axes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from corrjax.data.spec import TaskSpec
from corrjax.models.backbones import global_pool
from corrjax.models.base import BackboneFactory, MultiTaskModel, build_backbone, make_heads


class CrossStitchUnit(nnx.Module):
    """Learned linear mixing of task columns: ``h'_t = sum_s alpha[t, s] h_s`` on ``(T, n, ...)`` activations.

    Initialised as in Misra et al. (2016): ``self_weight`` on the diagonal, the rest spread evenly over the row.
    ``alpha`` is stored in ``param_dtype``; the mixing runs in ``dtype`` (None: the promoted dtype of ``alpha`` and
    ``h``).
    """

    def __init__(
        self, num_tasks: int, self_weight: float = 0.9, *, dtype: Any = None, param_dtype: Any = jnp.float32
    ) -> None:
        off = (1.0 - self_weight) / (num_tasks - 1) if num_tasks > 1 else 0.0
        alpha = np.full((num_tasks, num_tasks), off, np.float32)
        np.fill_diagonal(alpha, 1.0 if num_tasks == 1 else self_weight)
        self.alpha = nnx.Param(jnp.asarray(alpha, param_dtype))
        self.dtype = dtype

    def __call__(self, h: jax.Array) -> jax.Array:
        alpha = self.alpha[...]
        if self.dtype is not None:
            alpha, h = alpha.astype(self.dtype), h.astype(self.dtype)
        return jnp.tensordot(alpha, h, axes=(1, 0))


class CrossStitch(MultiTaskModel):
    """Cross-stitch network (Misra et al., CVPR 2016): one column of ``stages`` per task, mixed after every stage.

    ``features(x)`` is the stitched output of the last stage, ``(n, T, ...)`` (column ``t`` feeds task ``t``'s
    head). Every column and unit receives gradient from all tasks through the mixing, so all are shared; only the
    heads are task-specific.
    """

    task_specific = ("heads",)

    def __init__(
        self,
        stages: Sequence[BackboneFactory],
        tasks: Sequence[TaskSpec],
        *,
        head_hidden: Sequence[int] = (),
        self_weight: float = 0.9,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        if not stages:
            raise ValueError("`stages` must contain at least one factory")
        self._init_tasks(tasks)
        kw = {"dtype": dtype, "param_dtype": param_dtype}
        self.columns = nnx.Dict(
            {n: nnx.List([build_backbone(s, rngs, "stages", **kw) for s in stages]) for n in self.task_names}
        )
        self.stitches = nnx.List([CrossStitchUnit(len(self.tasks), self_weight, **kw) for _ in stages])
        width = self.columns[self.task_names[0]][-1].out_features
        self.heads = make_heads(width, self.tasks, head_hidden, rngs, **kw)

    def features(self, x: jax.Array) -> jax.Array:
        hs = [x] * len(self.task_names)
        for level, stitch in enumerate(self.stitches):
            stacked = stitch(jnp.stack([self.columns[n][level](h) for n, h in zip(self.task_names, hs, strict=True)]))
            hs = list(stacked)
        return jnp.moveaxis(stacked, 0, 1)

    def from_features(self, z: jax.Array, x: jax.Array | None = None) -> dict[str, jax.Array]:
        return self.heads.per_task(jax.vmap(global_pool, in_axes=1)(z))


class MTAN(MultiTaskModel):
    """A dense-prediction-free MTAN (Liu et al., CVPR 2019): a shared trunk with task-specific attention masks.

    The trunk's stages give ``u_1..u_L``. Task ``t`` keeps an attended feature
    ``a_t^1 = sigmoid(A_t^1 u_1) * u_1`` and ``a_t^l = sigmoid(A_t^l [u_l, s_l(a_t^{l-1})]) * u_l``, where ``s_l`` is
    the shared stage ``l`` (standing in for MTAN's shared attention block) and ``A_t^l`` a per-task Dense map over the
    channel axis (a 1x1 convolution on images); its head reads the pooled ``a_t^L``. ``features(x)`` is the tuple
    ``(u_1, .., u_L)``; trunk parameters are shared, attention and heads task-specific.
    """

    task_specific = ("attention", "heads")

    def __init__(
        self,
        stages: Sequence[BackboneFactory],
        tasks: Sequence[TaskSpec],
        *,
        head_hidden: Sequence[int] = (),
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        if not stages:
            raise ValueError("`stages` must contain at least one factory")
        self._init_tasks(tasks)
        kw = {"dtype": dtype, "param_dtype": param_dtype}
        self.trunk = nnx.List([build_backbone(s, rngs, "stages", **kw) for s in stages])
        widths = [s.out_features for s in self.trunk]
        self.attention = nnx.Dict(
            {
                n: nnx.List([nnx.Linear(w if i == 0 else 2 * w, w, rngs=rngs, **kw) for i, w in enumerate(widths)])
                for n in self.task_names
            }
        )
        self.heads = make_heads(widths[-1], self.tasks, head_hidden, rngs, **kw)

    def features(self, x: jax.Array) -> tuple[jax.Array, ...]:
        us, h = [], x
        for stage in self.trunk:
            h = stage(h)
            us.append(h)
        return tuple(us)

    def _attend(self, us: Sequence[jax.Array], name: str) -> tuple[list[jax.Array], jax.Array]:
        """Task ``name``'s masks at every level and its last attended feature ``a^L``."""
        a, masks = None, []
        for level, (u, att) in enumerate(zip(us, self.attention[name], strict=True)):
            inp = u if level == 0 else jnp.concatenate([u, self.trunk[level](a)], axis=-1)
            masks.append(jax.nn.sigmoid(att(inp)))
            a = masks[-1] * u
        return masks, a

    def attention_masks(self, x: jax.Array) -> dict[str, list[jax.Array]]:
        """``{task: [mask_1, .., mask_L]}`` sigmoid attention masks, each shaped like ``u_l`` (for plots)."""
        us = self.features(x)
        return {n: self._attend(us, n)[0] for n in self.task_names}

    def from_features(self, z: Sequence[jax.Array], x: jax.Array | None = None) -> dict[str, jax.Array]:
        return self.heads.per_task([global_pool(self._attend(z, n)[1]) for n in self.task_names])
