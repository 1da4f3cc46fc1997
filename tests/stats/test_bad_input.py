"""Bad input that is knowable at trace time raises ValueError/TypeError naming the argument and the shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import corrjax.stats as cs

X = np.zeros((5, 2), np.float32)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: cs.cov(np.zeros((2, 3, 4))), ValueError, r"`x` must be 1-D .* got shape \(2, 3, 4\)"),
        (lambda: cs.corrcoef(np.float32(1.0)), ValueError, r"`x` must be 1-D .* got shape \(\)"),
        (lambda: cs.cov(X, np.zeros((4, 2))), ValueError, r"x.shape=\(5, 2\) and y.shape=\(4, 2\)"),
        (lambda: cs.corrcoef(X, np.zeros((6,))), ValueError, r"x.shape=\(5, 2\) and y.shape=\(6, 1\)"),
        (lambda: cs.cov(X, ddof=-1), ValueError, r"`ddof` must be non-negative, got -1"),
        (lambda: cs.cov(X, ddof=1.5), TypeError, r"`ddof` must be a non-negative int"),
        (lambda: cs.cov(X, fweights=np.ones(4)), ValueError, r"`fweights` .* \(n=5\), got shape \(4,\)"),
        (lambda: cs.corrcoef(X, aweights=np.ones((5, 1))), ValueError, r"`aweights` .* got shape \(5, 1\)"),
        (lambda: cs.cov(X + 1j), TypeError, r"`x` must be real"),
        (lambda: cs.cov("abc"), TypeError, r"`x` must be"),
        (lambda: cs.pearsonr(np.zeros(5), np.zeros(4)), ValueError, r"same length along axis 0: .*\(5,\).*\(4,\)"),
        (lambda: cs.pearsonr(np.zeros((3, 4)), np.zeros((2, 4))), ValueError, r"same length along axis 0"),
        (lambda: cs.pearsonr(np.zeros((4, 3)), np.zeros((4, 2))), ValueError, r"broadcastable.*\(4, 3\).*\(4, 2\)"),
        (lambda: cs.pearsonr(np.zeros(1), np.zeros(1)), ValueError, r"at least 2 observations"),
        (lambda: cs.pearsonr(np.zeros(4), np.zeros(4), axis=1), ValueError, r"`axis`=1 is not a valid axis"),
        (lambda: cs.fisher_z_ci(0.5, 10, confidence_level=1.5), ValueError, r"`confidence_level` must be in"),
        (lambda: cs.concordance(X, np.zeros((5, 3))), ValueError, r"same number of columns.*\(5, 2\).*\(5, 3\)"),
        (lambda: cs.concordance(X, np.zeros((4, 2))), ValueError, r"x.shape=\(5, 2\) and y.shape=\(4, 2\)"),
        (lambda: cs.partial_corr(np.zeros((2, 2, 2))), ValueError, r"`x` must be 1-D"),
        (lambda: cs.nancov(X, ddof=-2), ValueError, r"`ddof` must be non-negative"),
        (lambda: cs.nancov(X, min_periods=-1), ValueError, r"`min_periods` must be non-negative"),
        (lambda: cs.nancorrcoef(X, min_periods=2.0), TypeError, r"`min_periods` must be a non-negative int"),
        (lambda: cs.nancorrcoef(X, np.zeros((3, 1))), ValueError, r"x.shape=\(5, 2\) and y.shape=\(3, 1\)"),
        (lambda: cs.ledoit_wolf(np.zeros((0, 3))), ValueError, r"at least one observation, got shape \(0, 3\)"),
        (lambda: cs.oas(np.zeros((2, 2, 2))), ValueError, r"`x` must be 1-D"),
        (lambda: cs.cov_init(0), ValueError, r"`d` must be a positive int"),
        (lambda: cs.cov_init(2, 2.5), ValueError, r"`e` must be a positive int"),
        (lambda: cs.cov_init(2, dtype=jnp.int32), TypeError, r"`dtype` must be a floating dtype"),
        (lambda: cs.cov_update(cs.cov_init(3), X), ValueError, r"`x` must have 3 columns .* got shape \(5, 2\)"),
        (lambda: cs.cov_update(cs.cov_init(2), X, X), ValueError, r"create it with cov_init\(d, e\)"),
        (lambda: cs.cov_update(cs.cov_init(2, 1), X), ValueError, r"pass `y`"),
        (lambda: cs.cov_update(cs.cov_init(2, 1), X, np.zeros((4, 1))), ValueError, r"y.shape=\(4, 1\)"),
        (lambda: cs.cov_update(cs.cov_init(2, 3), X, np.zeros((5, 1))), ValueError, r"`y` must have 3 columns"),
        (lambda: cs.cov_update(cs.cov_init(2), X, weights=np.ones(3)), ValueError, r"`weights` must have shape"),
        (lambda: cs.cov_merge(cs.cov_init(2), cs.cov_init(3)), ValueError, r"cannot merge states"),
        (lambda: cs.cov_merge(cs.cov_init(2), cs.cov_init(2, 2)), ValueError, r"cannot merge states"),
        (lambda: cs.cov_finalize(cs.cov_init(2), ddof=-1), ValueError, r"`ddof` must be non-negative"),
    ],
)
def test_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_errors_are_raised_at_trace_time_under_jit():
    with pytest.raises(ValueError, match=r"x.shape=\(5, 2\) and y.shape=\(4, 2\)"):
        jax.jit(cs.corrcoef)(X, np.zeros((4, 2), np.float32))
    with pytest.raises(ValueError, match=r"`ddof` must be non-negative"):
        jax.jit(lambda a: cs.nancov(a, ddof=-1))(X)


def test_undefined_cases_give_nan_not_errors():
    one = np.ones((1, 2), np.float32)
    assert np.isnan(jax.jit(cs.cov)(one)).all()
    assert np.isnan(jax.jit(cs.corrcoef)(one)).all()
    assert np.isnan(jax.jit(cs.cov)(np.zeros((0, 2), np.float32))).all()
    assert np.isnan(jax.jit(cs.nancov)(np.full((4, 2), np.nan))).all()
    assert np.isnan(jax.jit(cs.nancorrcoef)(np.full((4, 2), np.nan))).all()
