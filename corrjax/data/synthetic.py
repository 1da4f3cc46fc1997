"""Synthetic multi-task regression with controllable task correlation (Ma et al., KDD 2018, Section 3.2).

The MMoE paper's generator, generalised from two tasks to ``T`` tasks with a target correlation matrix ``R``:

1. draw orthonormal directions ``u_1..u_T`` in ``R^d`` (QR of a Gaussian matrix);
2. factor ``R = L L^T`` (Cholesky; a semi-definite ``R`` such as ``p = 1`` is allowed) and set
   ``w_k = c * sum_j L_kj u_j``, so ``|w_k| = c`` and ``cos(w_i, w_j) = R_ij`` exactly. For ``T = 2`` and
   ``R = [[1, p], [p, 1]]`` this is the paper's ``w_1 = c u_1``, ``w_2 = c (p u_1 + sqrt(1 - p^2) u_2)``;
3. ``x ~ N(0, I_d)`` and ``y_k = w_k^T x + sum_{i=1..m} sin(alpha_i w_k^T x + beta_i) + eps``, with ``alpha_i,
   beta_i ~ N(0, 1)`` shared by all tasks and ``eps ~ N(0, noise_std^2)``.

The paper does not state every constant; the defaults ``d = 100``, ``c = 0.3``, ``m = 5``, ``noise_std = 0.1``
follow the public re-implementations. The label correlation is lower than ``R_ij`` because of the sine terms (the
paper reports it as a monotone function of ``p``); :func:`synthetic` records the realised value in ``info``.
Everything is pure JAX and seeded: the same seed gives the same problem and the same examples. :func:`synthetic`
compiles one program for all its draws (problem and a block of examples), whatever the split and its size.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from corrjax.data.iterator import check_seed
from corrjax.data.source import ArrayDataset
from corrjax.data.spec import TaskSpec

SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
DEFAULT_SIZES: dict[str, int] = {"train": 8192, "val": 2048, "test": 2048}


class SyntheticProblem(NamedTuple):
    """The parameters shared by every example: task weights ``(T, d)`` and sine constants ``alpha, beta (m,)``."""

    weights: jax.Array
    alpha: jax.Array
    beta: jax.Array


def correlation_matrix(correlation: Any, num_tasks: int) -> np.ndarray:
    """Returns the ``(T, T)`` target correlation: a scalar ``p`` means ``R_ij = p`` off the diagonal.

    Raises ``ValueError`` unless the result is symmetric with unit diagonal, entries in [-1, 1] and positive
    semi-definite.
    """
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"`num_tasks` must be a positive int, got {num_tasks!r}")
    r = np.asarray(correlation, dtype=np.float64)
    if r.ndim == 0:
        r = np.full((num_tasks, num_tasks), float(r))
        np.fill_diagonal(r, 1.0)
    if r.shape != (num_tasks, num_tasks):
        raise ValueError(f"`correlation` must be a scalar or ({num_tasks}, {num_tasks}), got shape {r.shape}")
    if not np.all(np.isfinite(r)) or not np.allclose(r, r.T) or not np.allclose(np.diag(r), 1.0):
        raise ValueError(f"`correlation` must be finite, symmetric with unit diagonal, got\n{r}")
    if np.abs(r).max() > 1.0 + 1e-12 or np.linalg.eigvalsh(r).min() < -1e-8:
        raise ValueError(f"`correlation` must be positive semi-definite with entries in [-1, 1], got\n{r}")
    return r


def psd_cholesky(r: np.ndarray, tol: float = 1e-10) -> np.ndarray:
    """Lower-triangular ``L`` with ``L L^T = r`` for a positive semi-definite ``r`` (zero columns where singular)."""
    t = r.shape[0]
    lower = np.zeros_like(r)
    for j in range(t):
        d = r[j, j] - lower[j, :j] @ lower[j, :j]
        if d <= tol:
            continue  # column j is spanned by earlier ones: leave it zero
        lower[j, j] = np.sqrt(d)
        lower[j + 1 :, j] = (r[j + 1 :, j] - lower[j + 1 :, :j] @ lower[j, :j]) / lower[j, j]
    return lower


def make_problem(
    key: jax.Array,
    correlation: Any = 0.5,
    *,
    num_tasks: int = 2,
    num_features: int = 100,
    scale: float = 0.3,
    num_sin: int = 5,
) -> SyntheticProblem:
    """Draws task weights with ``cos(w_i, w_j) = R_ij`` and ``|w_k| = scale``, and the sine constants."""
    r = correlation_matrix(correlation, num_tasks)
    if num_features < num_tasks:
        raise ValueError(f"`num_features`={num_features} must be >= `num_tasks`={num_tasks} for orthonormal directions")
    return _draw_problem(key, jnp.asarray(psd_cholesky(r), jnp.float32), scale, num_features, num_sin)


def _normals(keys: jax.Array, length: int) -> jax.Array:
    """``(K, length)`` standard normals, row ``k`` from ``keys[k]``: one draw site, however many rows (each site
    costs XLA about a second of compilation on a CPU). Threefry is counter based, so a row's first ``m`` values do
    not depend on ``length``."""
    return jax.vmap(lambda k: jax.random.normal(k, (length,)))(keys)


def _problem_size(num_tasks: int, num_features: int, num_sin: int) -> int:
    return num_features * num_tasks + 2 * num_sin


def _problem_from_normals(z: jax.Array, lower: jax.Array, scale: Any, num_features: int, num_sin: int):
    t = lower.shape[0]
    g, alpha, beta = jnp.split(
        z[: _problem_size(t, num_features, num_sin)], [num_features * t, num_features * t + num_sin]
    )
    q, _ = jnp.linalg.qr(g.reshape(num_features, t))  # (d, T), orthonormal columns
    weights = scale * lower.astype(q.dtype) @ q.T  # (T, d)
    return SyntheticProblem(weights, alpha, beta)


def _examples_from_normals(problem: SyntheticProblem, z: jax.Array, num_examples: int, noise_std: Any):
    num_tasks, d = problem.weights.shape
    x = z[: num_examples * d].reshape(num_examples, d)
    eps = z[num_examples * d : num_examples * (d + num_tasks)].reshape(num_examples, num_tasks)
    lin = x @ problem.weights.T  # (n, T)
    nonlin = jnp.sin(lin[..., None] * problem.alpha + problem.beta).sum(-1)
    return x, lin + nonlin + noise_std * eps


@partial(jax.jit, static_argnums=(3, 4))
def _draw_problem(key: jax.Array, lower: jax.Array, scale: float, num_features: int, num_sin: int) -> SyntheticProblem:
    z = _normals(key[None], _problem_size(lower.shape[0], num_features, num_sin))[0]
    return _problem_from_normals(z, lower, scale, num_features, num_sin)


@partial(jax.jit, static_argnums=2)
def sample(problem: SyntheticProblem, key: jax.Array, num_examples: int, noise_std: float = 0.1):
    """Draws ``x (n, d)`` and targets ``y (n, T)`` from ``problem``. Pure and jittable (``num_examples`` static)."""
    num_tasks, d = problem.weights.shape
    z = _normals(key[None], num_examples * (d + num_tasks))[0]
    return _examples_from_normals(problem, z, num_examples, noise_std)


# Examples are drawn in blocks of this many, each from its own key: one compiled program serves every split and
# size, and the first k examples of a split are the same whatever `num_examples` is.
BLOCK_SIZE = 1024


@partial(jax.jit, static_argnames=("num_features", "num_sin", "block_size"))
def _generate(seed, lower, scale, noise_std, stream, block, *, num_features, num_sin, block_size):
    """:func:`synthetic`'s one compiled program: the problem of ``seed`` (:func:`make_problem` of
    ``fold_in(key(seed), 0)``) and block ``block`` of the examples of split ``stream`` (``1 + SPLITS[split]``),
    drawn with :func:`sample` from ``fold_in(fold_in(key(seed), stream), block)``. Everything but the sizes is
    traced, so each call reuses the program."""
    key = jax.random.key(seed)
    t = lower.shape[0]
    keys = jnp.stack([jax.random.fold_in(key, 0), jax.random.fold_in(jax.random.fold_in(key, stream), block)])
    size = max(_problem_size(t, num_features, num_sin), block_size * (num_features + t))
    z = _normals(keys, size)  # one draw site for the problem (row 0) and the block (row 1)
    problem = _problem_from_normals(z[0], lower, scale, num_features, num_sin)
    return (problem, *_examples_from_normals(problem, z[1], block_size, noise_std))


def synthetic(
    split: str = "train",
    *,
    num_examples: int | None = None,
    num_tasks: int = 2,
    correlation: Any = 0.5,
    num_features: int = 100,
    scale: float = 0.3,
    num_sin: int = 5,
    noise_std: float = 0.1,
    seed: int = 0,
) -> ArrayDataset:
    """The MMoE synthetic dataset as an in-memory :class:`ArrayDataset`.

    Tasks are regressions named ``task0 .. task{T-1}``; ``x`` is float32 ``(n, num_features)``. All splits of one
    ``seed`` (an int in ``[0, 2**31)``) share the problem (weights, sine constants) and draw independent examples,
    in blocks of :data:`BLOCK_SIZE` from one compiled program (so the first ``k`` examples of a split do not depend
    on ``num_examples``). ``info`` holds the problem, the target correlation and the realised label correlation.

    Raises ``ValueError`` naming the argument for an unknown split, a seed outside ``[0, 2**31)``, a non-positive
    ``num_examples``, a negative ``noise_std`` or ``scale``, a negative ``num_sin``, fewer
    ``num_features`` than tasks and an invalid ``correlation``.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown `split`={split!r}; expected one of {', '.join(map(repr, SPLITS))}")
    seed = check_seed(seed)
    n = DEFAULT_SIZES[split] if num_examples is None else int(num_examples)
    if n < 1:
        raise ValueError(f"`num_examples` must be positive, got {n}")
    for name, value in (("noise_std", noise_std), ("scale", scale)):
        if value < 0:  # NaN passes: NaN noise gives non-finite labels on purpose (the training tests' bad data)
            raise ValueError(f"`{name}`={value} must be >= 0")
    if isinstance(num_sin, bool) or not isinstance(num_sin, int) or num_sin < 0:
        raise ValueError(f"`num_sin`={num_sin!r} must be an int >= 0")
    target = correlation_matrix(correlation, num_tasks)
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < num_tasks:
        raise ValueError(f"`num_features`={num_features!r} must be an int >= `num_tasks`={num_tasks}")
    lower = psd_cholesky(target).astype(np.float32)
    args = (np.int32(seed), lower, np.float32(scale), np.float32(noise_std), np.int32(1 + SPLITS[split]))
    sizes = {"num_features": num_features, "num_sin": num_sin, "block_size": BLOCK_SIZE}
    blocks = [_generate(*args, np.int32(b), **sizes) for b in range(-(-n // BLOCK_SIZE))]
    problem = jax.tree.map(np.asarray, blocks[0][0])
    x = np.concatenate([np.asarray(b[1], np.float32) for b in blocks])[:n]
    y = np.concatenate([np.asarray(b[2], np.float32) for b in blocks])[:n]
    tasks = tuple(TaskSpec(f"task{k}", "regression", 1) for k in range(num_tasks))
    arrays = {"x": x, **{t.name: y[:, k] for k, t in enumerate(tasks)}}
    label_corr = np.corrcoef(y, rowvar=False) if n > 1 else np.full((num_tasks, num_tasks), np.nan)
    info = {
        "problem": problem,
        "target_correlation": target,
        "label_correlation": np.atleast_2d(label_corr),
        "split": split,
        "seed": seed,
    }
    return ArrayDataset(arrays, tasks, name=f"synthetic/{split}", info=info)
