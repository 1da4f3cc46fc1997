"""Mixed precision for the training codebase: the dtype policy and dynamic loss scaling.

``parallel.compute_dtype`` is the dtype the layers compute in (their ``dtype``) and ``parallel.param_dtype`` the
dtype the parameters are stored in (their ``param_dtype``, hence also the gradients' and the optax state's). Both
accept ``float32``, ``bfloat16``, ``float16`` or ``auto``: ``compute_dtype=auto`` is bfloat16 on accelerators (GPU,
TPU) and float32 on CPU (where XLA emulates half-precision arithmetic and gains nothing), ``param_dtype=auto`` is
float32 everywhere, so by default an accelerator run keeps float32 master weights and optimiser state and computes
activations in bfloat16 (Micikevicius et al., 2018, "Mixed Precision Training").

The train step (:mod:`corrjax.train.step`) upcasts every model output to float32 before the losses, so losses, the
task Gramian and the aggregator's solves are float32 whatever the compute dtype. float16 (5 exponent bits) needs
loss scaling to keep small gradients from flushing to zero: :class:`DynamicLossScale` multiplies the losses by a scale
before the backward pass and divides the gradients by it after, halves the scale and skips the step (through the
step's non-finite guard) when the gradients overflow, and doubles it after ``growth_interval`` finite steps in a row.
bfloat16 has float32's exponent range and needs no scaling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["DynamicLossScale", "LossScaleState", "Precision", "resolve_precision", "upcast"]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class Precision(NamedTuple):
    """The resolved dtype policy of a run.

    Attributes:
      compute_dtype: the layers' computation dtype.
      param_dtype: the parameters' (and gradients', optimiser state's) dtype.
    """

    compute_dtype: Any
    param_dtype: Any

    @property
    def loss_scaling(self) -> bool:
        """Whether float16 is involved, which needs dynamic loss scaling."""
        return jnp.float16 in (jnp.dtype(self.compute_dtype), jnp.dtype(self.param_dtype))


def _parse(value: Any, key: str, auto: Any) -> Any:
    name = "auto" if value is None else str(value)
    if name == "auto":
        return auto
    if name not in _DTYPES:
        raise ValueError(f"`parallel.{key}`={value!r} must be one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def resolve_precision(parallel: Any, backend: str | None = None) -> Precision:
    """The :class:`Precision` of a ``parallel`` config node (``compute_dtype``, ``param_dtype``; missing keys mean
    ``auto``) on ``backend`` (default: JAX's default backend). Raises ``ValueError`` naming the key for an unknown
    dtype name."""
    backend = jax.default_backend() if backend is None else backend
    get = parallel.get if hasattr(parallel, "get") else lambda k, d=None: getattr(parallel, k, d)
    compute = _parse(get("compute_dtype", "auto"), "compute_dtype", jnp.float32 if backend == "cpu" else jnp.bfloat16)
    param = _parse(get("param_dtype", "auto"), "param_dtype", jnp.float32)
    return Precision(compute, param)


def upcast(tree: Any) -> Any:
    """Floating leaves narrower than float32 (bfloat16, float16) cast to float32; other leaves unchanged."""

    def cast(x: Any) -> Any:
        if jnp.issubdtype(jnp.result_type(x), jnp.floating) and jnp.finfo(jnp.result_type(x)).bits < 32:
            return jnp.asarray(x, jnp.float32)
        return x

    return jax.tree.map(cast, tree)


class LossScaleState(NamedTuple):
    """Dynamic loss-scale state.

    Attributes:
      scale: the current loss scale, float32 scalar.
      good_steps: finite steps in a row since the scale last changed, int32 scalar.
    """

    scale: jax.Array
    good_steps: jax.Array


@dataclass(frozen=True)
class DynamicLossScale:
    """Dynamic loss scaling (Micikevicius et al., 2018; the schedule of ``torch.amp.GradScaler`` and ``jmp``).

    Attributes:
      initial_scale: the scale at step 0.
      growth_interval: finite steps in a row after which the scale is multiplied by ``factor``.
      factor: growth factor; a non-finite step divides the scale by it.
      min_scale: the scale never drops below this.
    """

    initial_scale: float = 2.0**15
    growth_interval: int = 2000
    factor: float = 2.0
    min_scale: float = 1.0

    def __post_init__(self) -> None:
        if not (self.initial_scale >= self.min_scale > 0 and self.factor > 1 and self.growth_interval >= 1):
            raise ValueError(
                "DynamicLossScale needs initial_scale >= min_scale > 0, factor > 1 and growth_interval >= 1; "
                f"got {self}"
            )

    def init(self) -> LossScaleState:
        """The step-0 state (every leaf its own array: the train step donates the state)."""
        return LossScaleState(jnp.asarray(self.initial_scale, jnp.float32), jnp.zeros((), jnp.int32))

    def adjust(self, state: LossScaleState, finite: jax.Array) -> LossScaleState:
        """The next state after a step whose gradients were ``finite`` (a bool scalar): grow after
        ``growth_interval`` finite steps in a row, shrink (not below ``min_scale``) on a non-finite one."""
        good = jnp.where(finite, state.good_steps + 1, 0)
        grow = good >= self.growth_interval
        scale = jnp.where(finite, jnp.where(grow, state.scale * self.factor, state.scale), state.scale / self.factor)
        scale = jnp.maximum(scale, jnp.float32(self.min_scale))
        # Growing to inf would make every later step non-finite: keep the scale finite.
        scale = jnp.where(jnp.isfinite(scale), scale, state.scale)
        return LossScaleState(scale.astype(jnp.float32), jnp.where(grow, 0, good).astype(jnp.int32))
