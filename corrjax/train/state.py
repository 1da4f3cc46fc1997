"""The training state: a pytree of arrays that the jitted step donates and returns, and Orbax checkpoints whole.

The Flax NNX model is split once with :func:`flax.nnx.split` into a static ``graphdef`` (kept outside the state,
closed over by the step) and two states: ``params`` (the ``nnx.Param`` variables, what the optimiser updates) and
``rest`` (everything else the model carries, e.g. batch statistics or RNG counters). The PRNG key is stored as raw
``uint32`` key data so checkpoints stay plain arrays.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from corrjax.optim import GradientNoiseScaleState


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training.

    Attributes:
      step: number of optimiser steps taken (skipped non-finite steps included), int32 scalar.
      params: the model's ``nnx.Param`` state.
      rest: the model's other variables.
      opt_state: the optax chain's state.
      rng: raw PRNG key data (``jax.random.key_data``) for per-step randomness.
      nonfinite_streak: consecutive skipped (non-finite) steps ending at ``step``.
      nonfinite_max_streak: longest such streak so far (lets the host check a stop condition lazily).
      nonfinite_total: skipped steps in total.
      noise_scale: the EMAs of the gradient noise scale's two estimators
        (:class:`corrjax.optim.GradientNoiseScaleState`; all zero while ``trainer.noise_scale`` is off).
      loss_scale: the dynamic loss-scale state (:class:`corrjax.train.precision.LossScaleState`) of a float16 run;
        None (no leaves) otherwise.
    """

    step: jax.Array
    params: Any
    rest: Any
    opt_state: Any
    rng: jax.Array
    nonfinite_streak: jax.Array
    nonfinite_max_streak: jax.Array
    nonfinite_total: jax.Array
    noise_scale: GradientNoiseScaleState
    loss_scale: Any = None


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, Any, Any]:
    """``(graphdef, params, rest)`` of an NNX model; :func:`merge_model` inverts it."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, rest


def merge_model(graphdef: nnx.GraphDef, params: Any, rest: Any) -> nnx.Module:
    return nnx.merge(graphdef, params, rest)


def create_state(
    params: Any, rest: Any, tx: optax.GradientTransformation, seed: int, loss_scale: Any = None
) -> TrainState:
    """A fresh state at step 0 (call under ``jit`` with out shardings to place it on the mesh); ``loss_scale`` is the
    initial :class:`~corrjax.train.precision.LossScaleState` of a float16 run (None: no loss scaling).

    Every counter is its own array: the train step donates the state, and XLA refuses to donate one buffer twice.
    """
    zero = lambda: jnp.zeros((), jnp.int32)
    zeros_f32 = lambda: jnp.zeros((), jnp.float32)
    return TrainState(
        step=zero(),
        params=params,
        rest=rest,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
        nonfinite_streak=zero(),
        nonfinite_max_streak=zero(),
        nonfinite_total=zero(),
        noise_scale=GradientNoiseScaleState(
            count=zero(), grad_sq_norm=zeros_f32(), trace_cov=zeros_f32(), noise_scale=zeros_f32()
        ),
        loss_scale=loss_scale,
    )
