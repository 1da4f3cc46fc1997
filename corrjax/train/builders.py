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

import math
from collections.abc import Sequence
from typing import Any

from flax import nnx
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from corrjax.data import TaskSpec
from corrjax.models.embedding import EmbeddedModel, EmbeddingInput

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


_INPUT_KEYS = ("input", "embed_dim", "embed_pooling")
INPUTS = ("auto", "dense", "embedding")


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
    """Instantiates ``model_cfg`` for ``tasks`` with ``nnx.Rngs(seed)``.

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
    rngs = nnx.Rngs(seed)
    front = None
    if choice == "embedding":
        front = EmbeddingInput(
            features,
            opts.get("embed_dim") or 8,
            pooling=opts.get("embed_pooling") or "mean",
            rngs=rngs,
        )
        input_shape = (front.out_features,)
    node = fill_input_sizes(model_cfg, tuple(int(s) for s in input_shape))
    # Through a partial: Hydra would turn TaskSpec objects passed as instantiate kwargs into config nodes.
    factory = instantiate(node, _partial_=True)
    dtypes = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v is not None and k not in node}
    model = factory(tasks=tuple(tasks), rngs=rngs, **dtypes)
    return model if front is None else EmbeddedModel(front, model)
