"""Builds the model of a run from its ``model=`` config node and the data's input shape.

Model configs are ``_target_`` nodes (backbone and expert factories as ``_partial_: true`` sub-nodes). Sizes that
depend on the data are left ``null`` in the configs and filled in here from one example's ``x`` shape, so one model
config serves every dataset: any ``in_features`` or ``gate_in_features`` key that is null becomes the flattened
input size ``prod(x.shape[1:])``, any null ``in_shape`` becomes ``x.shape[1:]``, and any null ``in_channels`` the
channel count ``x.shape[-1]`` of image data ``(n, H, W, C)`` (1 for ``(n, H, W)``).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from corrjax.data import TaskSpec

_FLAT_KEYS = ("in_features", "gate_in_features")
_SHAPE_KEYS = ("in_shape",)
_CHANNEL_KEYS = ("in_channels",)


def instantiate_node(node: Any, key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(node, **kwargs)``, an error of the target raised as itself (its message as text,
    its type kept, e.g. :class:`corrjax.data.DatasetNotPreparedError`) with a note naming the config ``key`` and
    the target, instead of Hydra's ``InstantiationException`` quoting its ``repr`` (newlines as ``\\n``)."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if cause is None:
            raise
        target = node.get("_target_") if hasattr(node, "get") else None
        cause.add_note(f"(instantiating `{key}`" + (f": {target})" if target else ")"))
        raise cause from None


def _check_input_rank(path: str, key: str, input_shape: Sequence[int]) -> None:
    if key in _SHAPE_KEYS and len(input_shape) != 3:
        want = "(H, W, C) images"
    elif key in _CHANNEL_KEYS and len(input_shape) not in (2, 3):
        want = "(H, W) or (H, W, C) images"
    else:
        return
    raise ValueError(
        f"`model.{path}` is filled from the data's example shape, and this image model needs {want}; the `data` "
        f"gives examples of shape {tuple(input_shape)}. Choose an image dataset for it (e.g. data=multidigits) or a "
        "vector model for this data (e.g. model=hps, model=mmoe)"
    )


def fill_input_sizes(node: Any, input_shape: Sequence[int], _path: str = "") -> Any:
    """A plain-container copy of ``node`` with the null size keys filled from ``input_shape`` (one example).

    Raises ``ValueError`` naming the key when an image model's null ``in_shape`` / ``in_channels`` meets vector
    data (``input_shape`` of the wrong rank)."""
    if isinstance(node, DictConfig | ListConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            path = f"{_path}.{key}" if _path else str(key)
            if value is None and key in (*_SHAPE_KEYS, *_CHANNEL_KEYS):
                _check_input_rank(path, key, input_shape)
            if value is None and key in _FLAT_KEYS:
                value = math.prod(input_shape)
            elif value is None and key in _SHAPE_KEYS:
                value = list(input_shape)
            elif value is None and key in _CHANNEL_KEYS:
                value = int(input_shape[-1]) if len(input_shape) == 3 else 1
            out[key] = fill_input_sizes(value, input_shape, path)
        return out
    if isinstance(node, list):
        return [fill_input_sizes(v, input_shape, f"{_path}[{i}]") for i, v in enumerate(node)]
    return node


@functools.lru_cache(maxsize=8)
def _jitted_init(node_json: str, tasks: tuple[TaskSpec, ...]) -> Callable[[Any], nnx.Module]:
    """``seed -> model``, every initialiser of the model in one compiled program (eagerly, each layer's
    initialisers compile on their own: a dozen XLA compilations for a small MLP). The seed is traced, so the seeds
    of an ensemble share the program; cached per (config, tasks)."""
    # Through a partial: Hydra would turn TaskSpec objects passed as instantiate kwargs into config nodes.
    factory = instantiate_node(json.loads(node_json), "model", _partial_=True)
    return nnx.jit(lambda seed: factory(tasks=tasks, rngs=nnx.Rngs(jax.random.key(seed))))


def build_model(model_cfg: Any, tasks: Sequence[TaskSpec], input_shape: Sequence[int], seed: int) -> nnx.Module:
    """Instantiates ``model_cfg`` for ``tasks`` with ``nnx.Rngs(seed)``, initialised in one compiled program (the
    same parameters as eager initialisation)."""
    node = fill_input_sizes(model_cfg, tuple(int(s) for s in input_shape))
    try:
        return _jitted_init(json.dumps(node, sort_keys=True), tuple(tasks))(np.int32(seed))
    except (TypeError, ValueError) as e:
        e.add_note(f"(building `model`: {node.get('_target_')} for examples of shape {tuple(input_shape)})")
        raise
