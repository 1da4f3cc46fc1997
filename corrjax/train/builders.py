"""Builds the model of a run from its ``model=`` config node and the data's input shape.

Model configs are ``_target_`` nodes (backbone and expert factories as ``_partial_: true`` sub-nodes). Sizes that
depend on the data are left ``null`` in the configs and filled in here from one example's ``x`` shape, so one model
config serves every dataset: any ``in_features`` or ``gate_in_features`` key that is null becomes the flattened
input size ``prod(x.shape[1:])``, any null ``in_shape`` becomes ``x.shape[1:]``, and any null ``in_channels`` the
channel count ``x.shape[-1]`` of image data ``(n, H, W, C)`` (1 for ``(n, H, W)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from flax import nnx
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from corrjax.data import TaskSpec

_FLAT_KEYS = ("in_features", "gate_in_features")
_SHAPE_KEYS = ("in_shape",)
_CHANNEL_KEYS = ("in_channels",)


def fill_input_sizes(node: Any, input_shape: Sequence[int]) -> Any:
    """A plain-container copy of ``node`` with the null size keys filled from ``input_shape`` (one example)."""
    if isinstance(node, DictConfig | ListConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if value is None and key in _FLAT_KEYS:
                value = math.prod(input_shape)
            elif value is None and key in _SHAPE_KEYS:
                value = list(input_shape)
            elif value is None and key in _CHANNEL_KEYS:
                value = int(input_shape[-1]) if len(input_shape) == 3 else 1
            out[key] = fill_input_sizes(value, input_shape)
        return out
    if isinstance(node, list):
        return [fill_input_sizes(v, input_shape) for v in node]
    return node


def build_model(
    model_cfg: Any,
    tasks: Sequence[TaskSpec],
    input_shape: Sequence[int],
    seed: int,
    *,
    dtype: Any = None,
    param_dtype: Any = None,
) -> nnx.Module:
    """Instantiates ``model_cfg`` for ``tasks`` with ``nnx.Rngs(seed)``; ``dtype`` / ``param_dtype`` (the run's
    precision, :mod:`corrjax.train.precision`; None: the model's defaults) are passed to the model, which hands them
    to its backbones and heads, unless the config sets them."""
    node = fill_input_sizes(model_cfg, tuple(int(s) for s in input_shape))
    # Through a partial: Hydra would turn TaskSpec objects passed as instantiate kwargs into config nodes.
    factory = instantiate(node, _partial_=True)
    dtypes = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v is not None and k not in node}
    return factory(tasks=tuple(tasks), rngs=nnx.Rngs(seed), **dtypes)
