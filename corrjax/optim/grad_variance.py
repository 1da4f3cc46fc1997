"""Variance-adapted updates: rescale each coordinate by how much of its gradient is signal rather than noise.

Implements the variance adaptation of Balles & Hennig, "Dissecting Adam: The Sign, Magnitude and Variance of
Stochastic Gradients" (ICML 2018, arXiv:1705.07774), Algorithm 1 (M-SVAG) and Section 4 (SVAG), as an Optax
gradient transformation, plus a within-batch variant that reads per-example statistics from extra args (the
``sum_sq_diff_grads``/``sample_size`` names of ``optax.experimental.aggregating``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from corrjax._checks import check_choice

__all__ = [
    "ScaleByBatchGradVarianceState",
    "ScaleByGradVarianceState",
    "rho",
    "scale_by_grad_variance",
]

RULES = ("msvag", "svag", "inv_std")
SOURCES = ("ema", "batch")
RHO_CAP = 0.999


class ScaleByGradVarianceState(NamedTuple):
    """State of ``scale_by_grad_variance(source="ema")``.

    Attributes:
      count: number of updates so far, int32 scalar.
      mu: EMA of the gradient (decay ``b1``), same structure as the params (dtype ``mu_dtype`` if given).
      nu: EMA of the squared gradient (decay ``b2``, or ``b1`` when ``b2`` is None).
    """

    count: chex.Array
    mu: optax.Updates
    nu: optax.Updates


class ScaleByBatchGradVarianceState(NamedTuple):
    """State of ``scale_by_grad_variance(source="batch")``: only the update counter (the estimate is per batch)."""

    count: chex.Array


def rho(beta: chex.Numeric, count: chex.Numeric) -> chex.Array:
    """Variance factor of a bias-corrected EMA: ``Var[m_hat_t] = rho(beta, t) * sigma^2`` for i.i.d. gradients.

    ``rho(beta, t) = (1 - beta)(1 + beta^t) / ((1 + beta)(1 - beta^t))``, capped at 0.999 (it equals 1 at t = 1,
    where the variance estimate ``(v_hat - m_hat^2) / (1 - rho)`` would divide by zero). Balles & Hennig (2018), Eq. 20.
    Computed in float32 (or float64 under x64) so that ``beta^t`` does not round to 1 in low precision.
    """
    dtype = jnp.promote_types(jnp.result_type(beta), jnp.float32)
    beta = jnp.asarray(beta, dtype)
    bt = beta ** jnp.asarray(count, dtype)
    r = (1 - beta) * (1 + bt) / ((1 + beta) * (1 - bt))
    return jnp.minimum(r, RHO_CAP)


def _compute_dtype(dtype: Any) -> Any:
    """bf16/f16 are computed in float32 (``v - m^2`` cancels badly in 8 mantissa bits); f32/f64 stay."""
    return jnp.promote_types(dtype, jnp.float32)


def _is_static(x: Any, value: float) -> bool:
    return isinstance(x, int | float) and float(x) == value


def _check_clip(clip: Any) -> tuple[Any, Any]:
    if not isinstance(clip, tuple | list) or len(clip) != 2:
        raise ValueError(f"`clip` must be a pair (low, high), got {clip!r}")
    return clip[0], clip[1]


def scale_by_grad_variance(
    *,
    b1: chex.Numeric = 0.9,
    b2: chex.Numeric | None = None,
    eps: chex.Numeric = 1e-8,
    rule: str = "msvag",
    source: str = "ema",
    clip: tuple[chex.Numeric, chex.Numeric] = (0.0, 1.0),
    mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Rescales updates by the estimated signal-to-noise ratio of each gradient coordinate.

    ``source="ema"`` (temporal estimate, Balles & Hennig 2018, Alg. 1): with ``m``, ``v`` EMAs of ``g`` and
    ``g^2`` (decays ``b1`` and ``b2``, ``b2`` defaulting to ``b1``) and their bias-corrected ``m_hat``, ``v_hat``,

    .. math::
      \rho_t = \min\Big(\frac{(1-\beta_1)(1+\beta_1^t)}{(1+\beta_1)(1-\beta_1^t)}, 0.999\Big), \quad
      s = \frac{\max(\hat v - \hat m^2, 0)}{1 - \rho_t},

    - ``rule="msvag"``: ``gamma = m_hat^2 / (m_hat^2 + rho_t s)``, update ``gamma * m_hat`` (M-SVAG);
    - ``rule="svag"``: ``gamma = m_hat^2 / (m_hat^2 + s)``, update ``gamma * g`` (SVAG);
    - ``rule="inv_std"``: update ``m_hat / (sqrt(s) + eps)`` (the Adam-like inverse-std variant, for comparison;
      ``clip`` does not apply to it).

    ``rho_t`` always uses ``b1``: it is the variance factor of ``m_hat``, and ``s`` is unbiased for the gradient
    variance whatever the decay of ``v``. ``v_hat - m_hat^2`` is non-negative in exact arithmetic when ``b2 == b1``;
    rounding (or ``b2 != b1``) can make it slightly negative, so it is clamped at 0; at ``t = 1`` it is exactly 0 and
    is set so (computed, it would be rounding error amplified 1000-fold by the cap).

    ``source="batch"`` (within-batch variance at fixed parameters): the incoming update is the mean gradient of
    ``sample_size`` examples and the extra arg ``sum_sq_diff_grads`` holds, per coordinate, the sum of squared
    deviations of the per-example gradients from that mean (see :func:`corrjax.optim.per_example_moments` or
    ``optax.experimental.aggregating.get_per_element_mean_and_sum_sq_diff_grads``). Then the variance of the mean is
    ``v = sum_sq_diff_grads / ((n - 1) n)``, the unbiased signal ``max(mean^2 - v, 0)`` and
    ``gamma = signal / (signal + v)``; the update is ``gamma * mean`` for "msvag" and "svag" (which coincide here:
    the stochastic gradient is the mean) and ``mean / (sqrt(v) + eps)`` for "inv_std". Zero variance leaves the mean
    unchanged; pure noise (``mean^2 <= v``) gives a zero update. A static ``sample_size < 2`` raises ``ValueError``;
    a traced one below 2 gives NaN (the variance is undefined), as numpy's ``var(ddof=1)`` does.

    In both sources ``gamma`` is clipped to ``clip = (low, high)`` and 0/0 gives 0. Arithmetic runs in float32 for
    bf16/f16 inputs and in the input precision otherwise; updates keep the dtype of the incoming updates, ``nu`` the
    dtype of the params and ``mu`` ``mu_dtype`` (default: the params' dtype). All work is elementwise, so shardings of
    the params carry over to state and updates.

    With ``optax.MultiSteps`` the inner update sees the average of the ``k`` accumulated mini-step gradients. For
    ``source="ema"`` this is one ordinary step on the averaged gradient. For ``source="batch"`` the extra args are
    those passed on the *last* mini-step: pass statistics for the whole accumulated batch (e.g. Chan-merged, as
    :func:`per_example_moments` does across microbatches); passing one mini-batch's ``sum_sq_diff_grads`` and
    ``sample_size`` overstates the variance of the accumulated mean by about ``k`` and shrinks updates.

    Args:
      b1: EMA decay for the first moment (and the second if ``b2`` is None). May be an array (schedules,
        ``optax.inject_hyperparams``).
      b2: optional separate EMA decay for the second moment.
      eps: added to ``sqrt(s)`` in the "inv_std" rule.
      rule: "msvag" (default), "svag" or "inv_std".
      source: "ema" (default) or "batch".
      clip: ``(low, high)`` bounds of the variance factor ``gamma``.
      mu_dtype: optional dtype of the first-moment accumulator.

    Returns:
      An ``optax.GradientTransformationExtraArgs``. Unknown extra args are ignored; with ``source="batch"`` the
      extra args ``sum_sq_diff_grads`` (same structure as the updates) and ``sample_size`` are required.

    References:
      Balles & Hennig, `Dissecting Adam: The Sign, Magnitude and Variance of Stochastic Gradients
      <https://arxiv.org/abs/1705.07774>`_, ICML 2018.
    """
    check_choice(rule, "rule", RULES)
    check_choice(source, "source", SOURCES)
    low, high = _check_clip(clip)
    mu_dtype = None if mu_dtype is None else jax.dtypes.canonicalize_dtype(mu_dtype)
    if source == "batch":
        return _scale_by_batch_variance(rule=rule, eps=eps, low=low, high=high)

    decay2 = b1 if b2 is None else b2

    def init_fn(params: optax.Params) -> ScaleByGradVarianceState:
        return ScaleByGradVarianceState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params, dtype=mu_dtype),
            nu=optax.tree.zeros_like(params),
        )

    def update_fn(
        updates: optax.Updates, state: ScaleByGradVarianceState, params: optax.Params | None = None, **extra_args: Any
    ) -> tuple[optax.Updates, ScaleByGradVarianceState]:
        del params, extra_args
        count = optax.safe_increment(state.count)
        r = rho(b1, count)
        fdt = r.dtype
        k1 = 1 / (1 - jnp.asarray(b1, fdt) ** count.astype(fdt))  # bias corrections as scalar multipliers
        k2 = 1 / (1 - jnp.asarray(decay2, fdt) ** count.astype(fdt))
        # Scalar factor turning max(v_hat - m_hat^2, 0) into s (inv_std, svag) or rho_t * s (msvag). At t = 1,
        # v_hat - m_hat^2 = g^2 - g^2 = 0 exactly; computed, it is rounding amplified 1000-fold by the cap, so the
        # factor is 0 there.
        first = count == 1
        s_factor = jnp.where(first, 0, (r if rule == "msvag" else 1) / (1 - r))

        def leaf(g: chex.Array, m: chex.Array, v: chex.Array) -> tuple[chex.Array, chex.Array, chex.Array]:
            cdt = _compute_dtype(jnp.promote_types(g.dtype, m.dtype))
            gc, mc, vc = g.astype(cdt), m.astype(cdt), v.astype(cdt)
            c1, c2 = jnp.asarray(b1, cdt), jnp.asarray(decay2, cdt)
            m_new = c1 * mc + (1 - c1) * gc
            v_new = c2 * vc + (1 - c2) * gc * gc
            m_hat = m_new * k1.astype(cdt)
            m2 = m_hat * m_hat
            excess = jnp.maximum(v_new * k2.astype(cdt) - m2, 0)  # (1 - rho_t) s
            if rule == "inv_std":
                u = m_hat / (jnp.sqrt(excess) * jnp.sqrt(s_factor).astype(cdt) + jnp.asarray(eps, cdt))
            else:
                den = m2 + excess * s_factor.astype(cdt)  # m_hat^2 + rho_t s  or  m_hat^2 + s
                # den >= m2 >= 0, so den == 0 only when m2 == 0: max(den, tiny) turns that 0/0 into 0.
                gamma = m2 / jnp.maximum(den, jnp.finfo(cdt).tiny)
                if not (_is_static(low, 0.0) and _is_static(high, 1.0)):  # gamma is in [0, 1] already
                    gamma = jnp.clip(gamma, jnp.asarray(low, cdt), jnp.asarray(high, cdt))
                u = gamma * (m_hat if rule == "msvag" else gc)
            return u.astype(g.dtype), m_new.astype(m.dtype), v_new.astype(v.dtype)

        out = jax.tree.map(leaf, updates, state.mu, state.nu)
        treedef = jax.tree.structure(updates)
        if treedef.num_leaves == 0:
            return updates, ScaleByGradVarianceState(count=count, mu=state.mu, nu=state.nu)
        new_updates, mu, nu = (jax.tree.unflatten(treedef, xs) for xs in zip(*treedef.flatten_up_to(out), strict=True))
        return new_updates, ScaleByGradVarianceState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _scale_by_batch_variance(*, rule: str, eps: Any, low: Any, high: Any) -> optax.GradientTransformationExtraArgs:
    def init_fn(params: optax.Params) -> ScaleByBatchGradVarianceState:
        del params
        return ScaleByBatchGradVarianceState(count=jnp.zeros([], jnp.int32))

    def update_fn(
        updates: optax.Updates,
        state: ScaleByBatchGradVarianceState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, ScaleByBatchGradVarianceState]:
        del params
        missing = [k for k in ("sum_sq_diff_grads", "sample_size") if extra_args.get(k) is None]
        if missing:
            raise ValueError(
                f"scale_by_grad_variance(source='batch') needs the extra args {missing} "
                "(pass them to update(..., sum_sq_diff_grads=..., sample_size=...); "
                "see corrjax.optim.per_example_moments)"
            )
        ssd, n = extra_args["sum_sq_diff_grads"], extra_args["sample_size"]
        if isinstance(n, int | float) and n < 2:
            raise ValueError(f"`sample_size` must be >= 2 to estimate a variance, got {n}")
        if jax.tree.structure(ssd) != jax.tree.structure(updates):
            raise ValueError(
                "`sum_sq_diff_grads` must have the structure of the updates: "
                f"got {jax.tree.structure(ssd)} vs {jax.tree.structure(updates)}"
            )

        nf = jnp.asarray(n, jnp.float32)
        # 1 / ((n - 1) n) turns sum_sq_diff into the variance of the mean; undefined (NaN) for n < 2.
        inv = jnp.where(nf >= 2, 1 / jnp.maximum((nf - 1) * nf, 1), jnp.nan)

        def leaf(g: chex.Array, q: chex.Array) -> chex.Array:
            if g.shape != q.shape:
                raise ValueError(f"`sum_sq_diff_grads` leaf shape {q.shape} differs from the update's {g.shape}")
            cdt = _compute_dtype(g.dtype)
            gc = g.astype(cdt)
            v = q.astype(cdt) * inv.astype(cdt)
            if rule == "inv_std":
                u = gc / (jnp.sqrt(v) + jnp.asarray(eps, cdt))
            else:
                signal = jnp.maximum(gc * gc - v, 0)
                gamma = signal / jnp.maximum(signal + v, jnp.finfo(cdt).tiny)  # 0/0 -> 0; NaN stays NaN
                if not (_is_static(low, 0.0) and _is_static(high, 1.0)):
                    gamma = jnp.clip(gamma, jnp.asarray(low, cdt), jnp.asarray(high, cdt))
                u = gamma * gc
            return u.astype(g.dtype)

        new_updates = jax.tree.map(leaf, updates, ssd)
        return new_updates, ScaleByBatchGradVarianceState(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
