"""Small convex solvers on the ``T x T`` task Gramian, written in JAX (jit/vmap-able, no host callbacks).

- :func:`project_simplex`: Euclidean projection onto the probability simplex (sort-based, Duchi et al. 2008).
- :func:`nonneg_qp`: ``min 1/2 v^T Q v + q^T v`` s.t. ``v >= 0`` by block principal pivoting (Júdice & Pires 1994;
  Kim & Park, SIAM J. Sci. Comput. 2011) or a primal active-set method (Lawson & Hanson, "Solving Least Squares
  Problems", 1974, ch. 23, generalised to a PSD quadratic): exact after finitely many steps.
- :func:`min_norm_simplex`: the min-norm point of the convex hull of the task gradients (MGDA), either exactly via
  :func:`nonneg_qp` or by Frank-Wolfe with exact line search (Sener & Koltun, NeurIPS 2018).
- :func:`project_dual_cone`: weights of the projection of ``J^T u`` onto the dual cone ``{x : J x >= 0}``, i.e.
  ``min v^T G v`` s.t. ``v >= u`` (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024, Prop. 1).
- :func:`nash_bargaining`: the Nash-MTL system ``G alpha = 1 / alpha``, ``alpha > 0`` (Navon et al., ICML 2022), as
  the minimiser of the strictly convex ``1/2 a^T G a - sum log a`` by damped Newton steps.

Every solver takes iteration caps (``max_iter``) and tolerances, runs a ``lax.while_loop`` (under ``vmap`` a batch
runs until its last member converges), and is scale-aware. What is solved, exactly:

- :func:`min_norm_simplex` adds **no ridge** by default: a task with an exactly zero gradient gives that vertex (the
  min-norm point is exactly 0); otherwise the simplex QP is rewritten as the non-negative least-squares problem
  ``min_{u >= 0} |J^T u|^2 + kappa (1^T u - 1)^2`` (exact for any ``kappa > 0``, also when 0 is in the hull),
  equilibrated by the task-gradient norms (so norms 1e-12 .. 1e12 apart are solved to rounding), and solved by block
  principal pivoting; where that fails (affinely dependent gradients: duplicates, ``T > d + 1``) the primal active
  set, which keeps the free gradients affinely independent, takes over.
- :func:`nash_bargaining` runs on the task-gradient cosine matrix; its optional ridge ``reg_eps`` is added to that
  matrix (after the per-task rescaling), so every task gets the same relative ridge and the answer is invariant to
  the scale of each task's gradient.
- :func:`project_dual_cone` keeps TorchJD's trace-normalised ridge ``reg_eps`` (documented there) and solves that
  problem to rounding (``nonneg_qp``'s default tolerance is a small multiple of the dtype's epsilon, its KKT test
  componentwise), equilibrated by the task-gradient norms.

Non-finite input gives NaN output.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import jax.scipy.linalg

from corrjax._checks import check_choice

Array = jax.Array
QP_METHODS = ("block_pivoting", "active_set")  # nonneg_qp's exact methods


def _check_square(g: Array, name: str = "gramian") -> Array:
    g = jnp.asarray(g)
    if jnp.issubdtype(g.dtype, jnp.complexfloating):
        raise TypeError(f"`{name}` must be real, got dtype {g.dtype}")
    if g.ndim != 2 or g.shape[0] != g.shape[1] or g.shape[0] < 1:
        raise ValueError(f"`{name}` must be a square (T, T) matrix with T >= 1, got shape {tuple(g.shape)}")
    if not jnp.issubdtype(g.dtype, jnp.floating):
        g = g.astype(jnp.result_type(float))
    elif jnp.finfo(g.dtype).bits < 32:
        # bfloat16/float16 Gramians are solved in float32 (XLA has no half-precision linear algebra, and a half
        # precision solve would be far less accurate than the Gramian); the weights come back in float32.
        g = g.astype(jnp.float32)
    return g


def default_tol(dtype: jnp.dtype) -> float:
    """The solvers' default relative tolerance: ``100 eps`` of ``dtype`` (2.2e-14 in float64, 1.2e-5 in float32)."""
    return 100.0 * float(jnp.finfo(dtype).eps)


def _normalized(g: Array) -> Array:
    """``G / s`` (symmetrised) with ``s = trace(G) / T`` (1 when the trace vanishes): Frank-Wolfe's scale."""
    t = g.shape[0]
    s = jnp.trace(g) / t
    s = jnp.where(s > 0, s, 1.0)
    return (g + g.T) / (2 * s)


def _nan_unless_finite(x: Array, *inputs: Array) -> Array:
    ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in inputs]))
    return jnp.where(ok, x, jnp.nan)


def project_simplex(v: Array) -> Array:
    """Euclidean projection of ``v`` (shape ``(T,)``) onto ``{w : w >= 0, sum(w) = 1}``.

    Computed on ``v - max(v)`` (the projection is shift-invariant), so large entries do not cancel in the
    cumulative sums; NaN input gives NaN.

    Reference: Duchi et al., "Efficient Projections onto the l1-Ball for Learning in High Dimensions", ICML 2008.
    """
    v = jnp.asarray(v)
    t = v.shape[-1]
    v = v - jnp.max(v)
    u = jnp.sort(v)[::-1]
    css = jnp.cumsum(u) - 1.0
    idx = jnp.arange(1, t + 1, dtype=v.dtype)
    # rho >= 1 in exact arithmetic (u_1 - (u_1 - 1) = 1); the floor guards rounding
    rho = jnp.maximum(jnp.sum(u - css / idx > 0), 1)
    theta = css[rho - 1] / rho.astype(v.dtype)
    return jnp.maximum(v - theta, 0.0)


def nonneg_qp(
    q_mat: Array,
    q_vec: Array,
    *,
    method: str = "block_pivoting",
    max_iter: int | None = None,
    tol: float | None = None,
) -> Array:
    """Solves ``min_v 1/2 v^T Q v + q^T v`` subject to ``v >= 0`` for a symmetric positive-definite ``Q``.

    Both methods find the partition of the coordinates into a free set ``F`` (``(Q v + q)_F = 0``) and a bound set
    (``v = 0``, ``(Q v + q) >= 0``), one ``T x T`` linear solve per iteration; both are exact (up to round-off) after
    finitely many iterations for positive-definite ``Q``, and ``max_iter`` (default ``4 T + 10``) caps degenerate
    cycling. Feasibility is checked to the relative tolerance ``tol`` (default :func:`default_tol`, a hundred
    machine epsilons of ``Q``'s dtype) and each coordinate's KKT condition componentwise, ``(Q v + q)_i >= -tol
    (|Q| |v| + |q|)_i`` (the rounding scale of that gradient, invariant to rescaling the variables), so the answer is
    that of an exact QP solver such as quadprog up to rounding, also when the coordinates' scales differ by orders of
    magnitude.

    - ``"block_pivoting"`` (default): Júdice & Pires' block principal pivoting for the linear complementarity problem,
      with the safeguard of Kim & Park (SIAM J. Sci. Comput. 2011): every coordinate that violates its side of the
      partition switches sides at once while the number of violations falls (or for 3 more tries), else only the
      last one (Murty's rule, which terminates). Typically 2-5 iterations whatever the number of active constraints.
    - ``"active_set"``: the primal active-set method (Lawson & Hanson's NNLS, for a quadratic): the free set grows or
      shrinks by one coordinate per iteration, so it takes about as many iterations as there are free coordinates.

    Under ``vmap`` the batch iterates until its slowest member converges, which is where the block method pays off
    (UPGrad solves ``T`` of these at once).

    Args:
      q_mat: ``(T, T)`` symmetric positive-definite matrix (add a ridge for PSD input).
      q_vec: ``(T,)`` linear term.
      method: ``"block_pivoting"`` or ``"active_set"``.
      max_iter: iteration cap.
      tol: relative feasibility / KKT tolerance (default ``100 eps``).

    Returns:
      ``v`` of shape ``(T,)``, ``v >= 0``.
    """
    q_mat = _check_square(q_mat, "q_mat")
    check_choice(method, "method", QP_METHODS)
    t = q_mat.shape[0]
    q_vec = jnp.asarray(q_vec, q_mat.dtype)
    if q_vec.shape != (t,):
        raise ValueError(f"`q_vec` must have shape (T,) = ({t},) to match `q_mat` {tuple(q_mat.shape)}")
    max_iter = 4 * t + 10 if max_iter is None else int(max_iter)
    tol = default_tol(q_mat.dtype) if tol is None else float(tol)
    thresh = _componentwise(q_mat, q_vec, tol)
    if method == "block_pivoting":
        v, _ = _block_pivoting(q_mat, q_vec, thresh, tol, max_iter)
    else:
        v = _active_set(q_mat, q_vec, thresh, tol, max_iter)
    return _nan_unless_finite(v, q_mat, q_vec)


def _kkt_thresh(q_mat: Array, q_vec: Array, tol: float) -> Array:
    scale = jnp.maximum(jnp.max(jnp.abs(jnp.diag(q_mat))), jnp.max(jnp.abs(q_vec)))
    return tol * jnp.where(scale > 0, scale, 1.0)


def _solve_on(q_mat: Array, q_vec: Array, free: Array, cholesky: bool = False) -> Array:
    """``v`` with ``(Q v + q)_F = 0`` and ``v = 0`` off the free set ``F``; ``cholesky=True`` factors the (then
    positive-definite) restricted matrix by Cholesky instead of LU (half the flops; NaN where it is not numerically
    positive definite)."""
    f = free.astype(q_mat.dtype)
    m = q_mat * jnp.outer(f, f) + jnp.diag(1.0 - f)
    if cholesky:
        return jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(m), True), -q_vec * f) * f
    return jnp.linalg.solve(m, -q_vec * f) * f


def _componentwise(q_mat: Array, q_vec: Array, tol: float) -> Callable[[Array], Array]:
    """``v -> tol (|Q| |v| + |q|)``: the KKT threshold of each coordinate, the scale of the rounding in its gradient
    ``(Q v + q)_i`` (invariant to a diagonal rescaling of the variables, so tiny and huge coordinates are judged
    alike)."""
    abs_q, abs_c = jnp.abs(q_mat), jnp.abs(q_vec)
    return lambda v: tol * (abs_q @ jnp.abs(v) + abs_c)


_PATIENCE = 3  # Kim & Park's p-bar: full exchanges allowed without progress before falling back to Murty's rule


def _thresh_fn(thresh: Array | Callable[[Array], Array]) -> Callable[[Array], Array]:
    return thresh if callable(thresh) else (lambda v: thresh)


def _pivot_step(
    q_mat: Array,
    q_vec: Array,
    thresh_at: Callable[[Array], Array],
    tol: float,
    v: Array,
    free: Array,
    best: Array,
    tries: Array,
) -> tuple[Array, Array, Array, Array]:
    """One block-pivoting exchange from ``v`` (the solution on ``free``): ``(free, best, tries, optimal)``."""
    index = jnp.arange(q_mat.shape[0])
    grad = q_mat @ v + q_vec
    v_tol = tol * jnp.maximum(jnp.max(jnp.abs(v)), jnp.finfo(v.dtype).tiny)
    bad = jnp.where(free, v < -v_tol, grad < -thresh_at(v))
    n_bad = jnp.sum(bad)
    progress = n_bad < best
    full = progress | (tries > 0)
    last = jnp.max(jnp.where(bad, index, -1))
    flip = jnp.where(full, bad, index == last)
    best = jnp.where(progress, n_bad, best)
    tries = jnp.where(progress, _PATIENCE, jnp.where(full, tries - 1, tries))
    return free ^ flip, best, tries, n_bad == 0


def _active_set_step(
    q_mat: Array, q_vec: Array, thresh_at: Callable[[Array], Array], v: Array, free: Array, s: Array
) -> tuple[Array, Array, Array]:
    """One primal active-set step from the feasible ``v`` given ``s`` (the solution on ``free``): ``(v, free,
    optimal)``."""
    index = jnp.arange(q_mat.shape[0])
    feasible = jnp.all(jnp.where(free, s > 0, True))
    # feasible: accept s and price out the constrained coordinates
    cand = jnp.where(free, -jnp.inf, -(q_mat @ s + q_vec) - thresh_at(s))
    j = jnp.argmax(cand)
    optimal = ~(cand[j] > 0)
    free_a = jnp.where(optimal, free, free | (index == j))
    # infeasible: move from v towards s until the first free coordinate hits zero, and release it
    bad = free & (s <= 0)
    ratio = jnp.where(bad, v / jnp.where(bad, v - s, 1.0), jnp.inf)
    k = jnp.argmin(ratio)
    alpha = jnp.clip(ratio[k], 0.0, 1.0)
    v_b = v + alpha * (s - v)
    free_b = free & (v_b > 0) & (index != k)
    v_b = jnp.where(free_b, v_b, 0.0)
    return jnp.where(feasible, s, v_b), jnp.where(feasible, free_a, free_b), feasible & optimal


def _block_pivoting(
    q_mat: Array,
    q_vec: Array,
    thresh: Array | Callable[[Array], Array],
    tol: float,
    max_iter: int,
    cholesky: bool = False,
) -> tuple[Array, Array]:
    """Returns ``(v, converged)``: converged is False when ``max_iter`` ran out before the partition was optimal.
    ``thresh`` is the KKT threshold, a scalar or a function of ``v`` (:func:`_componentwise`); ``cholesky``: see
    :func:`_solve_on`."""
    t = q_mat.shape[0]
    thresh_at = _thresh_fn(thresh)

    def body(state: tuple[Array, Array, Array, Array, Array, Array]) -> tuple[Array, ...]:
        _, free, it, best, tries, _ = state
        v = _solve_on(q_mat, q_vec, free, cholesky)
        free, best, tries, done = _pivot_step(q_mat, q_vec, thresh_at, tol, v, free, best, tries)
        return v, free, it + 1, best, tries, done

    init = (
        jnp.zeros((t,), q_mat.dtype),
        jnp.zeros((t,), bool),
        jnp.array(0),
        jnp.array(t + 1),
        jnp.array(_PATIENCE),
        jnp.array(False),
    )
    v, _, _, _, _, done = jax.lax.while_loop(lambda s: (~s[5]) & (s[2] < max_iter), body, init)
    return jnp.maximum(v, 0.0), done


def _active_set(
    q_mat: Array, q_vec: Array, thresh: Array | Callable[[Array], Array], tol: float, max_iter: int | Array
) -> Array:
    del tol  # the iterates stay feasible; only the KKT threshold is used
    t = q_mat.shape[0]
    thresh_at = _thresh_fn(thresh)

    def body(state: tuple[Array, Array, Array, Array]) -> tuple[Array, Array, Array, Array]:
        v, free, it, _ = state
        s = _solve_on(q_mat, q_vec, free)
        v, free, done = _active_set_step(q_mat, q_vec, thresh_at, v, free, s)
        return v, free, it + 1, done

    init = (jnp.zeros((t,), q_mat.dtype), jnp.zeros((t,), bool), jnp.array(0), jnp.array(False))
    v, *_ = jax.lax.while_loop(lambda s: (~s[3]) & (s[2] < max_iter), body, init)
    return v


def _min_norm_exact(g: Array, max_iter: int | None, tol: float | None, reg_eps: float, qp_method: str) -> Array:
    t = g.shape[0]
    dtype = g.dtype
    g = (g + g.T) / 2
    ok_in = jnp.all(jnp.isfinite(g))
    g = jnp.where(ok_in, g, jnp.eye(t, dtype=dtype))
    diag = jnp.diag(g)
    zero = diag <= 0
    n = jnp.sqrt(jnp.where(zero, 1.0, diag))
    z = jnp.min(n) / n
    q_mat = g / jnp.outer(n, n) + jnp.outer(z, z) + float(reg_eps) * jnp.eye(t, dtype=dtype)
    max_iter = 4 * t + 10 if max_iter is None else int(max_iter)
    tol = default_tol(dtype) if tol is None else float(tol)
    # _kkt_thresh(q_mat, -z, tol) without its reductions: diag(q_mat) = 1 + z^2 + reg_eps and max(z) = 1 (the smallest
    # gradient), so the scale is 2 + reg_eps (with a zero task the answer is set below)
    thresh = tol * (2.0 + float(reg_eps))
    if qp_method == "block_pivoting":
        # Cholesky, as C + z z^T is positive definite where block pivoting can be certified: a restricted matrix that is
        # numerically singular (affinely dependent gradients) gives NaN or breaks sum(u) = z . b <= 1 (at the solution
        # it is kappa / (kappa + |d|^2)), and the primal active set, with LU, takes over
        b, done = _block_pivoting(q_mat, -z, thresh, tol, max_iter, cholesky=True)
        certified = done & jnp.all(jnp.isfinite(b)) & (z @ b <= 1.0 + 1e3 * tol)

        def fallback() -> Array:
            # zero trips for certified members of a vmapped batch, where lax.cond runs both branches
            return _active_set(q_mat, -z, thresh, tol, jnp.where(certified, 0, max_iter + 2 * t))

        b = jax.lax.cond(certified, lambda: b, fallback)
    else:
        b = _active_set(q_mat, -z, thresh, tol, max_iter + 2 * t)
    u = b / n
    w = u / jnp.sum(u)
    first_zero = jax.nn.one_hot(jnp.argmax(zero), t, dtype=dtype)
    return jnp.where(ok_in, jnp.where(jnp.any(zero), first_zero, w), jnp.nan)


def min_norm_simplex(
    gramian: Array,
    *,
    method: str = "active_set",
    max_iter: int | None = None,
    tol: float | None = None,
    reg_eps: float = 0.0,
    qp_method: str = "block_pivoting",
) -> Array:
    """Weights ``w`` on the simplex minimising ``w^T G w``: the min-norm point ``J^T w`` of the convex hull.

    ``method="active_set"`` (exact, the default): a task with an exactly zero gradient (``G_ii = 0``) makes the
    min-norm point exactly 0 and gets all the weight (the first such task). Otherwise, with ``n_i = sqrt(G_ii)``, the
    cosine matrix ``C = D^{-1} G D^{-1}`` and ``z_i = min_j n_j / n_i``, the non-negative QP
    ``min_{b >= 0} 1/2 b^T (C + z z^T) b - z^T b`` is the non-negative least-squares problem
    ``min_{u >= 0} |J^T u|^2 + kappa (1^T u - 1)^2`` with ``u = b min(n) / n`` and ``kappa = min(n)^2``; its KKT
    conditions are those of the simplex problem for ``w = u / sum(u)``, for every ``kappa > 0`` and also when 0 is in
    the hull (then ``sum(u) = 1`` and ``J^T u = 0``). No ridge is added, so the answer is the exact min-norm point up
    to rounding, whatever the spread of the task-gradient norms. :func:`nonneg_qp`'s ``qp_method`` solves it (block
    pivoting factors its restricted matrices by Cholesky); when block pivoting does not certify its answer (finite,
    converged, ``sum(u) <= 1``; it can fail when the gradients are affinely dependent, as with duplicated tasks or
    ``T > d + 1``, which makes ``C + z z^T`` singular), the primal active set (LU), which only frees a coordinate that
    lowers the objective and so keeps the free gradients affinely independent, solves it instead (a ``lax.cond``:
    it costs nothing when block pivoting is certified; under ``vmap`` its loop takes no step for certified members).

    ``method="frank_wolfe"``: Frank-Wolfe from the uniform weights with the exact line search of MGDA-UB, stopped when
    the duality gap ``w^T G w - min_i (G w)_i`` (on ``G / (trace(G) / T)``) falls below ``tol`` (default ``1e-6``) or
    after ``max_iter`` (default 250) steps.

    Args:
      gramian: ``(T, T)`` PSD Gramian ``J J^T``.
      method: ``"active_set"`` or ``"frank_wolfe"``.
      max_iter: iteration cap.
      tol: relative tolerance (default ``100 eps`` of the dtype for ``"active_set"``).
      reg_eps: optional ridge added to the cosine matrix ``C`` (each task's squared norm grows by the same relative
        ``reg_eps``; default 0, the exact problem; ``"active_set"`` only).
      qp_method: :func:`nonneg_qp`'s method (``"active_set"`` only).

    Returns:
      ``(T,)`` weights, non-negative, summing to 1 (NaN if the Gramian is not finite).

    Reference: Désidéri, "Multiple-gradient descent algorithm (MGDA)", 2012; Sener & Koltun, "Multi-Task Learning as
    Multi-Objective Optimization", NeurIPS 2018; Lawson & Hanson, "Solving Least Squares Problems", 1974, ch. 23.
    """
    g = _check_square(gramian)
    check_choice(method, "method", ("active_set", "frank_wolfe"))
    check_choice(qp_method, "qp_method", QP_METHODS)
    t = g.shape[0]
    if method == "active_set":
        return _min_norm_exact(g, max_iter, tol, reg_eps, qp_method)
    tol = 1e-6 if tol is None else float(tol)
    gn = _normalized(g)
    max_iter = 250 if max_iter is None else int(max_iter)

    def body(state: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
        w, it, _ = state
        gw = gn @ w
        a = w @ gw
        i = jnp.argmin(gw)
        b, c = gw[i], gn[i, i]
        den = a - 2 * b + c
        gamma = jnp.clip(jnp.where(den > 0, (a - b) / jnp.where(den > 0, den, 1.0), 0.0), 0.0, 1.0)
        w = (1 - gamma) * w + gamma * jax.nn.one_hot(i, t, dtype=g.dtype)
        return w, it + 1, ~(a - b > tol)

    w0 = jnp.full((t,), 1.0 / t, g.dtype)
    w, *_ = jax.lax.while_loop(lambda s: (~s[2]) & (s[1] < max_iter), body, (w0, jnp.array(0), jnp.array(False)))
    return _nan_unless_finite(w, g)


def project_dual_cone(
    gramian: Array,
    u: Array,
    *,
    max_iter: int | None = None,
    tol: float | None = None,
    reg_eps: float = 1e-4,
    qp_method: str = "block_pivoting",
) -> Array:
    """Weights ``v`` with ``J^T v`` the projection of ``J^T u`` onto the dual cone ``{x : J x >= 0}``.

    Solves ``min_v v^T G v`` subject to ``v >= u`` (Prop. 1 of Quinton & Rey 2024) as the non-negative QP in
    ``z = v - u``. The Gramian is trace-normalised and ridged by ``reg_eps`` first (TorchJD's ``QuadprogProjector``
    uses the same normalisation and default ridge), so ``(G v)_i >= -reg_eps * trace(G) * v_i``. That ridged QP is
    solved to rounding (the default ``tol`` is :func:`default_tol`, so the answer is quadprog's on the same problem):
    in the variables ``y_i = s_i z_i``, ``s_i = sqrt(G_ii / trace(G) + reg_eps)``, which give the QP a unit diagonal
    (built from ``G_ij / (trace(G) s_i s_j)``, so Gramian entries 1e24 apart neither underflow nor hide the small
    tasks), with each coordinate's KKT condition judged against the rounding in its own gradient (as
    :func:`nonneg_qp`), so tasks whose gradient norms are 1e12 apart are solved alike, also in float32.
    ``reg_eps=0`` projects exactly when ``G`` is non-singular. For a batch of ``u`` use ``jax.vmap``.

    Args:
      gramian: ``(T, T)`` PSD Gramian.
      u: ``(T,)`` weights of the vector to project.
      max_iter, tol: iteration cap and tolerance of :func:`nonneg_qp` (default ``100 eps``).
      reg_eps: ridge on the trace-normalised Gramian.
      qp_method: :func:`nonneg_qp`'s method.

    Returns:
      ``(T,)`` weights ``v >= u``.
    """
    g = _check_square(gramian)
    check_choice(qp_method, "qp_method", QP_METHODS)
    t = g.shape[0]
    u = jnp.asarray(u, g.dtype)
    if u.shape != (t,):
        raise ValueError(f"`u` must have shape (T,) = ({t},) to match `gramian` {tuple(g.shape)}")
    tr = jnp.trace(g)
    tr = jnp.where(tr > 0, tr, 1.0)
    # Q = G / tr + reg_eps I, equilibrated: y = s z with s_i = sqrt(Q_ii) and Q~ = S^{-1} Q S^{-1} (unit diagonal), so
    # that tasks whose norms are 1e12 apart are solved alike; Q~_ij = G_ij k_i k_j with k_i = 1 / (sqrt(tr) s_i), whose
    # products underflow only where they are negligible next to the unit diagonal
    r2 = jnp.maximum(jnp.diag(g), 0.0) / tr  # |g_i|^2 / tr <= 1
    s = jnp.sqrt(r2 + reg_eps)
    s = jnp.where(s > 0, s, 1.0)  # reg_eps = 0 and a zero task: Q is singular there anyway
    h = jnp.sqrt(0.5) / (jnp.sqrt(tr) * s)  # k / sqrt(2): the symmetrisation (G + G^T) / 2 folded in
    ridge = reg_eps / s**2
    index = jnp.arange(t)
    q_eq = (((g + g.T) * h[:, None]) * h[None, :]).at[index, index].add(ridge)
    q_vec = q_eq @ (s * u)
    max_iter = 4 * t + 10 if max_iter is None else int(max_iter)
    tol = default_tol(g.dtype) if tol is None else float(tol)
    # componentwise KKT thresholds (see _componentwise) from |Q~| itself: a bound such as |Q~_ij| <= f_i f_j
    # (|cos| <= 1) saves the matrix-vector product but grows like T tol where the tasks are near-orthogonal and
    # accepts wrong partitions (UPGrad, T = 128, float32: 4.8e-6 relative against quadprog vs 1.7e-7 with |Q~|)
    thresh = _componentwise(q_eq, q_vec, tol)
    if qp_method == "block_pivoting":
        y, _ = _block_pivoting(q_eq, q_vec, thresh, tol, max_iter)
    else:
        y = _active_set(q_eq, q_vec, thresh, tol, max_iter)
    return _nan_unless_finite(u + y / s, g, u)


def nash_bargaining(
    gramian: Array,
    *,
    max_iter: int = 200,
    tol: float | None = None,
    reg_eps: float = 1e-6,
) -> Array:
    """Solves Nash-MTL's bargaining system ``(G alpha)_i = 1 / alpha_i``, ``alpha > 0``.

    In ``b = D alpha`` (``D = diag(|g_i|)``) the system reads ``(C b)_i = 1 / b_i`` with ``C`` the task-gradient cosine
    matrix, and ``alpha = b / |g|``; so the update ``d = sum_i alpha_i g_i = sum_i b_i g_i / |g_i|`` depends only on the
    gradients' directions (the Nash bargaining solution is invariant to each task's scale: ``sum_i log(g_i . d)``
    changes by a constant). The system is the stationarity condition of the strictly convex, self-concordant
    ``phi(b) = 1/2 b^T C_r b - sum_i log b_i`` (its Hessian ``C_r + diag(1/b^2)`` is positive definite even for a
    singular ``C``, e.g. ``T > d``), minimised by damped Newton steps (step ``1 / (1 + lambda)`` while the Newton
    decrement ``lambda >= 1/4``, full steps after), which keep ``b > 0`` and converge quadratically. ``C_r = C +
    reg_eps I``: the ridge is added **after** the per-task rescaling, so every task gets the same relative ridge
    (its squared norm grows by the factor ``1 + reg_eps``) whatever its scale. For orthogonal gradients
    ``alpha_i = 1 / (|g_i| sqrt(1 + reg_eps))``. A task with a zero gradient has no finite solution; it is taken out
    of the system and gets ``alpha_i = 0``. Near a Pareto-stationary point (``0`` in the convex hull, e.g. opposite
    gradients) the exact system has no solution (``phi`` is unbounded below); the ridge keeps ``b`` finite, and since
    ``|d|^2 = b^T C b <= T`` the update stays bounded. ``reg_eps=0`` solves the exact system (where it has a
    solution). The answer is scale-equivariant: ``alpha(c G) = alpha(G) / sqrt(c)``.

    Args:
      gramian: ``(T, T)`` PSD Gramian.
      max_iter: Newton iteration cap (default 200: near a Pareto-stationary point the damped phase is long, ``b`` grows
        to ~``1 / sqrt(reg_eps)``; elsewhere a handful of steps).
      tol: stop when the squared Newton decrement is below ``tol`` (default ``100 eps`` of the dtype; a last full
        step follows, so ``b`` is then accurate to about ``tol``).
      reg_eps: ridge on the cosine matrix (relative to each task's squared norm).

    Returns:
      ``(T,)`` weights ``alpha`` (positive for non-zero gradients).

    Reference: Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022 (Eq. 4).
    """
    g = _check_square(gramian)
    t = g.shape[0]
    tol = default_tol(g.dtype) if tol is None else float(tol)
    eye = jnp.eye(t, dtype=g.dtype)
    g = (g + g.T) / 2
    diag = jnp.diag(g)
    # Only exactly zero gradients are taken out: a task whose gradient is 1e-12 of the others still bargains.
    live = diag > 0
    d = jnp.sqrt(jnp.where(live, diag, 1.0))
    both = live[:, None] & live[None, :]
    cos = jnp.where(both, g / jnp.outer(d, d), eye) + float(reg_eps) * eye  # dead tasks decouple, zeroed below

    def body(state: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
        b, it, _ = state
        grad = cos @ b - 1.0 / b
        hess = cos + eye / b**2
        step_dir = -jnp.linalg.solve(hess, grad)
        lam2 = jnp.maximum(-grad @ step_dir, 0.0)
        lam = jnp.sqrt(lam2)
        step = jnp.where(lam >= 0.25, 1.0 / (1.0 + lam), 1.0)
        b_new = b + step * step_dir
        b_new = jnp.where(b_new > 0, b_new, 0.5 * b)
        return b_new, it + 1, ~(lam2 > tol)

    b0 = 1.0 / jnp.sqrt(jnp.diag(cos))
    b, *_ = jax.lax.while_loop(lambda st: (~st[2]) & (st[1] < max_iter), body, (b0, jnp.array(0), jnp.array(False)))
    return _nan_unless_finite(jnp.where(live, b / d, 0.0), g)
