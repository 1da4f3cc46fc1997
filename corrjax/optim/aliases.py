"""Complete variance-adapted optimisers in Optax style: ``msvag`` and ``svag``."""

from __future__ import annotations

from typing import Any

import chex
import optax

from corrjax.optim.grad_variance import scale_by_grad_variance

__all__ = ["msvag", "svag"]


def msvag(
    learning_rate: optax.ScalarOrSchedule,
    b1: chex.Numeric = 0.9,
    b2: chex.Numeric | None = None,
    *,
    source: str = "ema",
    clip: tuple[chex.Numeric, chex.Numeric] = (0.0, 1.0),
    mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    """M-SVAG: momentum SGD whose momentum is shrunk per coordinate by its estimated signal-to-noise ratio.

    ``update = -learning_rate * gamma * m_hat`` with ``gamma = m_hat^2 / (m_hat^2 + rho_t s)``; see
    :func:`corrjax.optim.scale_by_grad_variance` (``rule="msvag"``) for the estimates and ``source="batch"``.

    Args:
      learning_rate: a float or an Optax schedule.
      b1: EMA decay of the gradient (and of its square when ``b2`` is None).
      b2: optional separate EMA decay of the squared gradient.
      source: "ema" (temporal, as in the paper) or "batch" (needs the ``sum_sq_diff_grads``/``sample_size`` extras).
      clip: bounds of the variance factor ``gamma``.
      mu_dtype: optional dtype of the first-moment accumulator.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    References:
      Balles & Hennig, `Dissecting Adam <https://arxiv.org/abs/1705.07774>`_, ICML 2018, Algorithm 1.
    """
    return optax.chain(
        scale_by_grad_variance(b1=b1, b2=b2, rule="msvag", source=source, clip=clip, mu_dtype=mu_dtype),
        optax.scale_by_learning_rate(learning_rate),
    )


def svag(
    learning_rate: optax.ScalarOrSchedule,
    b1: chex.Numeric = 0.9,
    b2: chex.Numeric | None = None,
    *,
    source: str = "ema",
    clip: tuple[chex.Numeric, chex.Numeric] = (0.0, 1.0),
    mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    """SVAG: SGD whose stochastic gradient is shrunk per coordinate by its estimated signal-to-noise ratio.

    ``update = -learning_rate * gamma * g`` with ``gamma = m_hat^2 / (m_hat^2 + s)``; see
    :func:`corrjax.optim.scale_by_grad_variance` (``rule="svag"``).

    Args:
      learning_rate: a float or an Optax schedule.
      b1: EMA decay used to estimate the gradient mean (and variance when ``b2`` is None).
      b2: optional separate EMA decay of the squared gradient.
      source: "ema" or "batch".
      clip: bounds of the variance factor ``gamma``.
      mu_dtype: optional dtype of the first-moment accumulator.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    References:
      Balles & Hennig, `Dissecting Adam <https://arxiv.org/abs/1705.07774>`_, ICML 2018, Section 4.
    """
    return optax.chain(
        scale_by_grad_variance(b1=b1, b2=b2, rule="svag", source=source, clip=clip, mu_dtype=mu_dtype),
        optax.scale_by_learning_rate(learning_rate),
    )
