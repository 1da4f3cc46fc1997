"""corrjax.optim: Optax transformations that rescale updates by gradient variance, and gradient-noise diagnostics.

- :func:`scale_by_grad_variance`, :func:`msvag`, :func:`svag`: variance adaptation (Balles & Hennig, 2018).
- :func:`gradient_noise_scale`: McCandlish et al.'s B_simple as a pass-through transform.
- :func:`per_example_moments`: exact per-example gradient mean and sum of squared deviations (BackPACK-style fast
  path for ``nnx.Linear``/``nnx.Conv``).
"""

from corrjax.optim.aliases import msvag, svag
from corrjax.optim.grad_variance import (
    ScaleByBatchGradVarianceState,
    ScaleByGradVarianceState,
    rho,
    scale_by_grad_variance,
)
from corrjax.optim.noise_scale import (
    GradientNoiseScaleState,
    gradient_noise_scale,
    noise_scale_ema,
    noise_terms_from_moments,
    noise_terms_from_two_batches,
)
from corrjax.optim.per_example import fast_path_mask, per_example_moments

__all__ = [
    "GradientNoiseScaleState",
    "ScaleByBatchGradVarianceState",
    "ScaleByGradVarianceState",
    "fast_path_mask",
    "gradient_noise_scale",
    "msvag",
    "noise_scale_ema",
    "noise_terms_from_moments",
    "noise_terms_from_two_batches",
    "per_example_moments",
    "rho",
    "scale_by_grad_variance",
    "svag",
]
