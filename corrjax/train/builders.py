"""Builds the model of a run from its ``model=`` config node and the data's input shape.

Model configs are ``_target_`` nodes (backbone and expert factories as ``_partial_: true`` sub-nodes). Sizes that
depend on the data are left ``null`` in the configs and filled in here from one example's ``x`` shape, so one model
config serves every dataset: any ``in_features`` or ``gate_in_features`` key that is null becomes the flattened
input size ``prod(x.shape[1:])``, any null ``in_shape`` becomes ``x.shape[1:]``, and any null ``in_channels`` the
channel count ``x.shape[-1]`` of image data ``(n, H, W, C)`` (1 for ``(n, H, W)``).

Tabular data (a dataset with ``features``, whose ``x`` is a dict ``{feature name: array}``) gets an
:class:`~corrjax.models.EmbeddingInput` in front of the model (:class:`~corrjax.models.EmbeddedModel`), and the
model's null sizes are filled with the embedding's width. The model node's keys ``input`` (``auto``: embedding for
tabular data, dense otherwise; ``dense``; ``embedding``), ``embed_dim`` (default 8) and ``embed_pooling`` (``mean``
or ``sum`` for multi-hot features) control it and are not passed to the model's ``_target_``.
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
from corrjax.models.embedding import EmbeddedModel, EmbeddingInput

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


_INPUT_KEYS = ("input", "embed_dim", "embed_pooling")
INPUTS = ("auto", "dense", "embedding")


@functools.lru_cache(maxsize=8)
def _jitted_init(
    node_json: str, tasks: tuple[TaskSpec, ...], front: tuple[Any, ...] | None, dtypes: tuple[tuple[str, Any], ...]
) -> Callable[[Any], nnx.Module]:
    """``seed -> model``, every initialiser of the model in one compiled program (eagerly, each layer's
    initialisers compile on their own: a dozen XLA compilations for a small MLP). The seed is traced, so the seeds
    of an ensemble share the program; cached per (config, tasks, embedding front, dtypes). ``front`` is
    ``(features, embed_dim, pooling)`` for an :class:`~corrjax.models.EmbeddingInput` in front of the model."""
    # Through a partial: Hydra would turn TaskSpec objects passed as instantiate kwargs into config nodes.
    factory = instantiate_node(json.loads(node_json), "model", _partial_=True)

    def init(seed: Any) -> nnx.Module:
        rngs = nnx.Rngs(jax.random.key(seed))
        embed = None if front is None else EmbeddingInput(front[0], front[1], pooling=front[2], rngs=rngs)
        model = factory(tasks=tasks, rngs=rngs, **dict(dtypes))
        return model if embed is None else EmbeddedModel(embed, model)

    return nnx.jit(init)


def build_model(
    model_cfg: Any,
    tasks: Sequence[TaskSpec],
    input_shape: Sequence[int] | None,
    seed: int,
    *,
    features: Sequence[Any] | None = None,
    dtype: Any = None,
    param_dtype: Any = None,
) -> nnx.Module:
    """Instantiates ``model_cfg`` for ``tasks`` with ``nnx.Rngs(seed)``, initialised in one compiled program (the
    same parameters as eager initialisation).

    ``input_shape`` is one example's ``x`` shape (None for tabular data); ``features`` the dataset's
    :class:`~corrjax.data.FeatureSpec` tuple, if it has one, for the embedding front (``model.input``); ``dtype`` /
    ``param_dtype`` (the run's precision, :mod:`corrjax.train.precision`; None: the model's defaults) are passed to
    the model, which hands them to its backbones and heads, unless the config sets them."""
    if isinstance(model_cfg, DictConfig | ListConfig):
        model_cfg = OmegaConf.to_container(model_cfg, resolve=True)
    model_cfg = dict(model_cfg)
    opts = {k: model_cfg.pop(k) for k in _INPUT_KEYS if k in model_cfg}
    choice = opts.get("input") or "auto"
    if choice not in INPUTS:
        raise ValueError(f"`model.input`={choice!r}; expected one of {INPUTS}")
    if choice == "auto":
        choice = "embedding" if features is not None else "dense"
    if choice == "embedding" and features is None:
        raise ValueError("`model.input`=embedding needs a tabular dataset (one with `features`)")
    if choice == "dense" and input_shape is None:
        raise ValueError("`model.input`=dense needs array inputs; this dataset's x is a dict of features")
    front = None
    if choice == "embedding":
        front = (tuple(features), opts.get("embed_dim") or 8, opts.get("embed_pooling") or "mean")
        width = nnx.eval_shape(lambda: EmbeddingInput(front[0], front[1], pooling=front[2], rngs=nnx.Rngs(0)))
        input_shape = (width.out_features,)
    node = fill_input_sizes(model_cfg, tuple(int(s) for s in input_shape))
    dtypes = tuple(
        (k, v) for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v is not None and k not in node
    )
    try:
        return _jitted_init(json.dumps(node, sort_keys=True), tuple(tasks), front, dtypes)(np.int32(seed))
    except (TypeError, ValueError) as e:
        e.add_note(f"(building `model`: {node.get('_target_')} for examples of shape {tuple(input_shape)})")
        raise
