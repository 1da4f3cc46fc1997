"""Backbones (shared trunks and experts) for corrjax multi-task models, as Flax NNX modules.

Every backbone maps a batch ``x (n, ...)`` to features ``(n, out_features)`` and exposes ``out_features``, which
is all the multi-task architectures need from it. They hold only ``nnx.Param`` state (GroupNorm rather than
BatchNorm), so a model is a pure function of its parameters after ``nnx.split``.

Every backbone takes Flax's mixed-precision pair: ``dtype``, the dtype its layers compute in (None: from the inputs
and parameters), and ``param_dtype``, the dtype its parameters are stored in (float32 by default), e.g.
``dtype=jnp.bfloat16`` for bfloat16 compute with float32 master weights.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Activation = Callable[[jax.Array], jax.Array]
Dtype = Any


def flatten(x: jax.Array) -> jax.Array:
    """``(n, ...) -> (n, prod(...))``."""
    return x.reshape(x.shape[0], -1)


class MLP(nnx.Module):
    """A multilayer perceptron on flattened input: ``(n, ...) -> (n, hidden[-1])``.

    Args:
      in_features: size of the flattened input ``prod(x.shape[1:])``.
      hidden: widths of the Dense layers; each is followed by ``activation`` (the last one too unless
        ``activate_last=False``).
      dtype, param_dtype: computation and parameter dtypes (module docstring).
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (64, 64),
        *,
        activation: Activation = nnx.relu,
        activate_last: bool = True,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        hidden = tuple(int(h) for h in hidden)
        if not hidden or min(hidden) < 1 or in_features < 1:
            raise ValueError(f"`in_features`={in_features} and `hidden`={hidden} must be positive and non-empty")
        sizes = (int(in_features), *hidden)
        self.layers = nnx.List(
            [nnx.Linear(a, b, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for a, b in itertools.pairwise(sizes)]
        )
        self.activation = activation
        self.activate_last = activate_last
        self.in_features = int(in_features)
        self.out_features = hidden[-1]

    def __call__(self, x: jax.Array) -> jax.Array:
        x = flatten(x)
        if x.shape[1] != self.in_features:
            raise ValueError(f"MLP expects {self.in_features} input features, got x of shape {x.shape}")
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if self.activate_last or i < len(self.layers) - 1:
                x = self.activation(x)
        return x


class LeNet(nnx.Module):
    """The LeNet-style CNN of the MultiMNIST benchmark (Sener & Koltun, 2018): ``(n, H, W, C) -> (n, out_features)``.

    Two blocks of 5x5 convolution, 2x2 max-pooling and ReLU (10 and 20 channels by default), then a Dense layer
    with ReLU. ``padding="SAME"`` keeps small inputs (12x12 multidigits) valid; ``"VALID"`` is the original for
    28x28 MNIST.
    """

    def __init__(
        self,
        in_shape: Sequence[int] = (12, 12, 1),
        *,
        channels: Sequence[int] = (10, 20),
        out_features: int = 50,
        kernel_size: int = 5,
        padding: str = "SAME",
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        h, w, c = (int(s) for s in in_shape)
        convs = []
        for ch in channels:
            convs.append(
                nnx.Conv(
                    c,
                    int(ch),
                    (kernel_size, kernel_size),
                    padding=padding,
                    dtype=dtype,
                    param_dtype=param_dtype,
                    rngs=rngs,
                )
            )
            if padding == "VALID":
                h, w = h - kernel_size + 1, w - kernel_size + 1
            h, w, c = h // 2, w // 2, int(ch)
        if h < 1 or w < 1:
            raise ValueError(f"`in_shape`={tuple(in_shape)} is too small for {len(channels)} conv/pool blocks")
        self.convs = nnx.List(convs)
        self.dense = nnx.Linear(h * w * c, int(out_features), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.in_shape = tuple(int(s) for s in in_shape)
        self.out_features = int(out_features)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim == 3:
            x = x[..., None]
        if tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(f"LeNet expects images of shape (n, *{self.in_shape}), got {x.shape}")
        for conv in self.convs:
            x = nnx.relu(nnx.max_pool(conv(x), (2, 2), strides=(2, 2)))
        return nnx.relu(self.dense(flatten(x)))


def _groups(channels: int, max_groups: int = 8) -> int:
    return math.gcd(channels, max_groups)


class ResidualBlock(nnx.Module):
    """Pre-activation-free basic block: conv3x3-GN-ReLU-conv3x3-GN, plus a 1x1 projection shortcut when needed."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        *,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.conv1 = nnx.Conv(in_channels, out_channels, (3, 3), strides=stride, use_bias=False, **kw)
        self.norm1 = nnx.GroupNorm(out_channels, num_groups=_groups(out_channels), **kw)
        self.conv2 = nnx.Conv(out_channels, out_channels, (3, 3), use_bias=False, **kw)
        self.norm2 = nnx.GroupNorm(out_channels, num_groups=_groups(out_channels), **kw)
        if stride != 1 or in_channels != out_channels:
            self.proj = nnx.Conv(in_channels, out_channels, (1, 1), strides=stride, use_bias=False, **kw)
        else:
            self.proj = None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        shortcut = x if self.proj is None else self.proj(x)
        return nnx.relu(y + shortcut)


class ResNet(nnx.Module):
    """A small ResNet for 32x32 / 64x64 images (He et al., 2016, CIFAR variant): ``(n, H, W, C) -> (n, widths[-1])``.

    A 3x3 stem (stride ``stem_stride``: use 2 for 64x64 inputs), then one stage per entry of ``widths`` with
    ``blocks_per_stage`` basic blocks (stride 2 at the start of every stage but the first), then global average
    pooling. GroupNorm replaces BatchNorm so the model has no batch statistics.
    """

    def __init__(
        self,
        in_channels: int = 3,
        *,
        widths: Sequence[int] = (16, 32, 64),
        blocks_per_stage: int = 2,
        stem_stride: int = 1,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        widths = tuple(int(w) for w in widths)
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.stem = nnx.Conv(int(in_channels), widths[0], (3, 3), strides=stem_stride, use_bias=False, **kw)
        self.stem_norm = nnx.GroupNorm(widths[0], num_groups=_groups(widths[0]), **kw)
        blocks, c = [], widths[0]
        for s, w in enumerate(widths):
            for b in range(blocks_per_stage):
                blocks.append(ResidualBlock(c, w, stride=2 if (s > 0 and b == 0) else 1, **kw))
                c = w
        self.blocks = nnx.List(blocks)
        self.in_channels = int(in_channels)
        self.out_features = widths[-1]

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"ResNet expects images (n, H, W, {self.in_channels}), got shape {x.shape}")
        x = nnx.relu(self.stem_norm(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        return jnp.mean(x, axis=(1, 2))


class ConvBlock(nnx.Module):
    """A 3x3 conv, GroupNorm, ReLU and optional 2x2 max-pool: ``(n, H, W, C_in) -> (n, H', W', out_features)``.

    The stage unit of the column/attention architectures (cross-stitch, MTAN) on images; ``out_features`` is the
    channel count.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        pool: bool = True,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.conv = nnx.Conv(int(in_channels), int(out_channels), (3, 3), use_bias=False, **kw)
        self.norm = nnx.GroupNorm(int(out_channels), num_groups=_groups(int(out_channels)), **kw)
        self.pool = pool
        self.out_features = int(out_channels)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.norm(self.conv(x)))
        return nnx.max_pool(x, (2, 2), strides=(2, 2)) if self.pool else x


def global_pool(x: jax.Array) -> jax.Array:
    """Averages every axis between the batch and the last (channel) axis: ``(n, ..., C) -> (n, C)``."""
    return x if x.ndim == 2 else jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))
