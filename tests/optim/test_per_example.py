"""per_example_moments: both paths equal the explicit vmap(grad) reference on MLPs and small CNNs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import corrjax.optim as co


class MLP(nnx.Module):
    def __init__(self, din=6, hidden=8, dout=3, *, rngs):
        self.l1 = nnx.Linear(din, hidden, rngs=rngs)
        self.l2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.norm = nnx.LayerNorm(hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, dout, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.l1(x))
        h = nnx.tanh(self.norm(self.l2(h)))
        return self.out(h)


class CNN(nnx.Module):
    def __init__(self, *, rngs):
        self.c1 = nnx.Conv(2, 4, (3, 3), rngs=rngs)
        self.c2 = nnx.Conv(4, 4, (3, 3), strides=2, padding="VALID", feature_group_count=2, use_bias=False, rngs=rngs)
        self.head = nnx.Linear(4 * 3 * 3, 3, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.c1(x))
        h = self.c2(h)
        return self.head(h.reshape(*h.shape[:-3], -1))


class Tied(nnx.Module):
    """A kernel used twice (and once outside a layer) must fall back to the generic path."""

    def __init__(self, *, rngs):
        self.l = nnx.Linear(4, 4, rngs=rngs)
        self.out = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(self.l(nnx.relu(self.l(x)))) + 0.1 * jnp.sum(self.out.kernel[...])


class Seq(nnx.Module):
    """Dense layers applied to every position of a sequence: several rows per example."""

    def __init__(self, *, rngs):
        self.l = nnx.Linear(3, 5, rngs=rngs)
        self.out = nnx.Linear(5, 2, rngs=rngs)

    def __call__(self, x):  # x: (L, 3)
        return self.out(nnx.gelu(self.l(x)).mean(-2))


@functools.cache
def _setup(model_cls, seed=0):
    # One compiled initialisation instead of many eager ops.
    model = nnx.jit(lambda: model_cls(rngs=nnx.Rngs(seed)))()
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p, x, y):
        logits = nnx.merge(graphdef, p)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    return params, loss


@functools.cache
def _per_example_grads(loss):
    return jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0)))


def _reference(loss, params, x, y):
    per = _per_example_grads(loss)(params, x, y)
    per = jax.tree.map(lambda g: np.asarray(g, np.float64), per)
    return jax.tree.map(lambda g: g.mean(0), per), jax.tree.map(lambda g: ((g - g.mean(0)) ** 2).sum(0), per)


def _close(got, want, rtol, atol_frac):
    for path, g, w in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(got), jax.tree.leaves(want), strict=True
    ):
        np.testing.assert_allclose(
            np.asarray(g, np.float64), w, rtol=rtol, atol=atol_frac * np.abs(w).max() + 1e-12, err_msg=str(path[0])
        )


@functools.cache
def _jitted(model_name, method, microbatch_size):
    params, loss = _setup(MODELS[model_name])
    fn = functools.partial(co.per_example_moments, loss, method=method, microbatch_size=microbatch_size)
    return params, loss, jax.jit(lambda p, x, y: fn(p, x, y)[:2])


MODELS = {"mlp": MLP, "cnn": CNN, "seq": Seq, "tied": Tied}
INPUTS = {"mlp": (6,), "cnn": (8, 8, 2), "seq": (4, 3), "tied": (4,)}
FAST = {
    "mlp": {"l1": True, "l2": True, "out": True},
    "cnn": {"c1": True, "c2": True, "head": True},
    "seq": {"l": True, "out": True},
    "tied": {"l": False, "out": False},
}


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_fast_path_mask(model_name):
    params, loss = _setup(MODELS[model_name])
    x = jnp.zeros((3, *INPUTS[model_name]))
    mask = co.fast_path_mask(loss, params, x, jnp.zeros(3, jnp.int32))
    flat = {"/".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(mask)}
    for layer, expect in FAST[model_name].items():
        assert flat[f"{layer}/kernel"] is expect, (layer, flat)
    assert not any(v for k, v in flat.items() if not k.endswith("kernel"))


CASES = [
    ("mlp", "fast", 4),  # two scanned microbatches and a remainder of 2
    ("cnn", "fast", 4),
    ("seq", "fast", None),
    ("tied", "fast", None),
    ("mlp", "vmap", None),
    ("cnn", "vmap", 4),
]


@pytest.mark.parametrize(("model_name", "method", "microbatch_size"), CASES)
def test_matches_vmap_grad_reference(model_name, method, microbatch_size):
    params, loss, fn = _jitted(model_name, method, microbatch_size)
    n = 10  # with microbatch 4: two scanned chunks + a remainder of 2
    x = jax.random.normal(jax.random.key(1), (n, *INPUTS[model_name])) + 0.5
    y = jnp.arange(n) % 3
    mean, ssd = fn(params, x, y)
    want_mean, want_ssd = _reference(loss, params, x, y)
    _close(mean, want_mean, 2e-5, 1e-5)
    _close(ssd, want_ssd, 2e-4, 1e-5)


@functools.cache
def _reference64(model_name):
    params, loss = _setup(MODELS[model_name])
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        per = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0)))
    return p64, per


@settings(max_examples=10)
@given(seed=st.integers(0, 2**31 - 1), offset=st.sampled_from([0.0, 1.0, 1e3]))
def test_mlp_float32_large_offset_against_float64(seed, offset):
    """Inputs with a mean 1e3 times their spread: the centred formulas keep float32 close to float64."""
    params, _loss, fn = _jitted("mlp", "fast", 3)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((7, 6)) + offset).astype(np.float32)
    y = rng.integers(0, 3, 7)
    mean, ssd = fn(params, jnp.asarray(x), jnp.asarray(y))
    p64, per_fn = _reference64("mlp")
    with jax.enable_x64(True):
        per = jax.tree.map(np.asarray, per_fn(p64, jnp.asarray(x, jnp.float64), jnp.asarray(y)))
    want_mean = jax.tree.map(lambda g: g.mean(0), per)
    want_ssd = jax.tree.map(lambda g: ((g - g.mean(0)) ** 2).sum(0), per)
    # float32 input rounding alone perturbs the gradients by ~1e-7 * offset relative.
    _close(mean, want_mean, 1e-4, 1e-5)
    _close(ssd, want_ssd, 1e-3, 1e-5)


def test_dense_moments_cancellation():
    """A dense layer whose per-example gradients share a large common part (activation offset 1e4)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 5)) + 1e4
    g = 1e-3 * rng.standard_normal((64, 3)) + 2.0  # mean^2 / variance of a_i g_i ~ 4e6
    per = a[:, :, None] * g[:, None, :]
    want = ((per - per.mean(0)) ** 2).sum(0)
    from corrjax.optim.per_example import _dense_moments

    mean, m2 = _dense_moments(jnp.asarray(a, jnp.float32), jnp.asarray(g, jnp.float32))
    np.testing.assert_allclose(np.asarray(mean), per.mean(0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(m2), want, rtol=1e-3)
    naive = (np.float32(a) ** 2).T @ (np.float32(g) ** 2) - 64 * np.float32(per.mean(0)) ** 2
    assert np.abs(naive - want).max() / want.max() > 1e-2  # the raw sum-of-squares route fails here


def test_pure_function_loss_and_pytree_batch():
    """No Flax at all: the generic path runs; batches may be pytrees."""
    params = {"w": jnp.array([[1.0, -2.0], [0.5, 0.3]]), "b": jnp.array([0.1, 0.2])}

    def loss(p, ex):
        return jnp.sum((ex["x"] @ p["w"] + p["b"] - ex["y"]) ** 2)

    batch = {"x": jax.random.normal(jax.random.key(0), (7, 2)), "y": jax.random.normal(jax.random.key(1), (7, 2))}
    mean, ssd, n = co.per_example_moments(loss, params, batch, microbatch_size=3)
    assert n == 7
    per = jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, batch)
    jax.tree.map(lambda m, g: np.testing.assert_allclose(m, g.mean(0), rtol=1e-5, atol=1e-6), mean, per)
    jax.tree.map(lambda s, g: np.testing.assert_allclose(s, ((g - g.mean(0)) ** 2).sum(0), rtol=1e-4), ssd, per)


def test_feeds_scale_by_grad_variance():
    params, _loss, fn = _jitted("mlp", "fast", 4)
    x, y = jax.random.normal(jax.random.key(2), (10, 6)), jnp.arange(10) % 3
    mean, ssd = fn(params, x, y)
    tx = optax.chain(co.gradient_noise_scale(), co.msvag(0.1, source="batch"))
    u, s = jax.jit(lambda m, q: tx.update(m, tx.init(params), sum_sq_diff_grads=q, sample_size=10))(mean, ssd)
    assert all(bool(jnp.isfinite(v).all()) for v in jax.tree.leaves(u))
    trace = sum(float(jnp.sum(q)) for q in jax.tree.leaves(ssd)) / 9
    np.testing.assert_allclose(float(optax.tree.get(s, "trace_cov")), trace, rtol=1e-5)


def test_errors():
    params, loss = _setup(MLP)
    x, y = jnp.zeros((4, 6)), jnp.zeros(4, jnp.int32)
    with pytest.raises(ValueError, match="leading"):
        co.per_example_moments(loss, params, x, jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match="microbatch_size"):
        co.per_example_moments(loss, params, x, y, microbatch_size=0)
    with pytest.raises(ValueError, match="method"):
        co.per_example_moments(loss, params, x, y, method="backpack")
    with pytest.raises(ValueError, match="batched"):
        co.per_example_moments(loss, params)
