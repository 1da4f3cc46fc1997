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
runs until its last member converges), and is scale-aware: the Gramian is normalised before solving, by its mean
diagonal ``trace(G) / T`` (``min_norm_simplex``, ``nash_bargaining``) or by its trace (``project_dual_cone``, as
TorchJD's projector), and a ridge ``reg_eps * I`` (relative to that normalisation) keeps singular Gramians
(identical or zero gradients) well posed. Non-finite input gives NaN output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from corrjax._checks import check_choice

Array = jax.Array
QP_METHODS = ("block_pivoting", "active_set")  # nonneg_qp's exact methods


def _check_square(g: Array, name: str = "gramian") -> Array:
    g = jnp.asarray(g)
    if g.ndim != 2 or g.shape[0] != g.shape[1] or g.shape[0] < 1:
        raise ValueError(f"`{name}` must be a square (T, T) matrix with T >= 1, got shape {tuple(g.shape)}")
    if not jnp.issubdtype(g.dtype, jnp.floating):
        g = g.astype(jnp.result_type(float))
    return g


def _normalized(g: Array, reg_eps: float) -> tuple[Array, Array]:
    """``(G / s + r I, s)`` with ``s = trace(G) / T`` (1 when the trace vanishes), ``r = max(reg_eps, 64 eps)``.

    The floor at 64 machine epsilons of ``G``'s dtype keeps the ridge visible after rounding (in float32 a smaller
    ridge vanishes into the diagonal and duplicated gradients make the restricted systems singular).
    """
    t = g.shape[0]
    s = jnp.trace(g) / t
    s = jnp.where(s > 0, s, 1.0)
    r = max(float(reg_eps), 64 * float(jnp.finfo(g.dtype).eps)) if reg_eps > 0 else 0.0
    return (g + g.T) / (2 * s) + r * jnp.eye(t, dtype=g.dtype), s


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
    tol: float = 1e-6,
) -> Array:
    """Solves ``min_v 1/2 v^T Q v + q^T v`` subject to ``v >= 0`` for a symmetric positive-definite ``Q``.

    Both methods find the partition of the coordinates into a free set ``F`` (``(Q v + q)_F = 0``) and a bound set
    (``v = 0``, ``(Q v + q) >= 0``), one ``T x T`` linear solve per iteration; both are exact (up to round-off) after
    finitely many iterations for positive-definite ``Q``, and ``max_iter`` (default ``4 T + 10``) caps degenerate
    cycling. Feasibility and the KKT conditions are checked to the relative tolerance ``tol``.

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
      tol: relative feasibility / KKT tolerance.

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
    scale = jnp.maximum(jnp.max(jnp.abs(jnp.diag(q_mat))), jnp.max(jnp.abs(q_vec)))
    thresh = tol * jnp.where(scale > 0, scale, 1.0)
    solver = _block_pivoting if method == "block_pivoting" else _active_set
    v = solver(q_mat, q_vec, thresh, tol, max_iter)
    return _nan_unless_finite(v, q_mat, q_vec)


def _solve_on(q_mat: Array, q_vec: Array, free: Array) -> Array:
    """``v`` with ``(Q v + q)_F = 0`` and ``v = 0`` off the free set ``F``."""
    f = free.astype(q_mat.dtype)
    m = q_mat * jnp.outer(f, f) + jnp.diag(1.0 - f)
    return jnp.linalg.solve(m, -q_vec * f) * f


def _block_pivoting(q_mat: Array, q_vec: Array, thresh: Array, tol: float, max_iter: int) -> Array:
    t = q_mat.shape[0]
    patience = 3  # Kim & Park's p-bar: full exchanges allowed without progress before falling back to Murty's rule
    index = jnp.arange(t)

    def body(state: tuple[Array, Array, Array, Array, Array, Array]) -> tuple[Array, ...]:
        _, free, it, best, tries, _ = state
        v = _solve_on(q_mat, q_vec, free)
        grad = q_mat @ v + q_vec
        v_tol = tol * jnp.maximum(jnp.max(jnp.abs(v)), jnp.finfo(v.dtype).tiny)
        bad = jnp.where(free, v < -v_tol, grad < -thresh)
        n_bad = jnp.sum(bad)
        progress = n_bad < best
        full = progress | (tries > 0)
        last = jnp.max(jnp.where(bad, index, -1))
        flip = jnp.where(full, bad, index == last)
        best = jnp.where(progress, n_bad, best)
        tries = jnp.where(progress, patience, jnp.where(full, tries - 1, tries))
        return v, free ^ flip, it + 1, best, tries, n_bad == 0

    init = (
        jnp.zeros((t,), q_mat.dtype),
        jnp.zeros((t,), bool),
        jnp.array(0),
        jnp.array(t + 1),
        jnp.array(patience),
        jnp.array(False),
    )
    v, *_ = jax.lax.while_loop(lambda s: (~s[5]) & (s[2] < max_iter), body, init)
    return jnp.maximum(v, 0.0)


def _active_set(q_mat: Array, q_vec: Array, thresh: Array, tol: float, max_iter: int) -> Array:
    del tol  # the iterates stay feasible; only the KKT threshold is used
    t = q_mat.shape[0]
    dtype = q_mat.dtype
    eye = jnp.eye(t, dtype=dtype)

    def body(state: tuple[Array, Array, Array, Array]) -> tuple[Array, Array, Array, Array]:
        v, free, it, _ = state
        s = _solve_on(q_mat, q_vec, free)
        feasible = jnp.all(jnp.where(free, s > 0, True))
        # feasible: accept s and price out the constrained coordinates
        cand = jnp.where(free, -jnp.inf, -(q_mat @ s + q_vec))
        j = jnp.argmax(cand)
        optimal = ~(cand[j] > thresh)
        free_a = jnp.where(optimal, free, free | (eye[j] > 0))
        # infeasible: move from v towards s until the first free coordinate hits zero, and release it
        bad = free & (s <= 0)
        ratio = jnp.where(bad, v / jnp.where(bad, v - s, 1.0), jnp.inf)
        k = jnp.argmin(ratio)
        alpha = jnp.clip(ratio[k], 0.0, 1.0)
        v_b = v + alpha * (s - v)
        free_b = free & (v_b > 0) & (jnp.arange(t) != k)
        v_b = jnp.where(free_b, v_b, 0.0)
        v = jnp.where(feasible, s, v_b)
        free = jnp.where(feasible, free_a, free_b)
        return v, free, it + 1, feasible & optimal

    init = (jnp.zeros((t,), dtype), jnp.zeros((t,), bool), jnp.array(0), jnp.array(False))
    v, *_ = jax.lax.while_loop(lambda s: (~s[3]) & (s[2] < max_iter), body, init)
    return v


def min_norm_simplex(
    gramian: Array,
    *,
    method: str = "active_set",
    max_iter: int | None = None,
    tol: float = 1e-6,
    reg_eps: float = 1e-6,
    qp_method: str = "block_pivoting",
) -> Array:
    """Weights ``w`` on the simplex minimising ``w^T G w``: the min-norm point ``J^T w`` of the convex hull.

    ``method="active_set"`` (exact): with ``v`` solving ``min_{v >= 0} 1/2 v^T G v - 1^T v``, the KKT conditions give
    ``w = v / sum(v)`` (:func:`nonneg_qp` with its default block principal pivoting; the name is kept from the
    earlier active-set solver; ``G`` is normalised by ``trace(G) / T`` and ridged by ``reg_eps``; when the hull
    contains 0 the ridge keeps ``v`` finite). ``method="frank_wolfe"``: Frank-Wolfe from the uniform weights with the
    exact line search of MGDA-UB, stopped when the duality gap ``w^T G w - min_i (G w)_i`` falls below ``tol``
    (relative) or after ``max_iter`` (default 250) steps.

    Args:
      gramian: ``(T, T)`` PSD Gramian ``J J^T``.
      method: ``"active_set"`` or ``"frank_wolfe"``.
      max_iter: iteration cap.
      tol: relative tolerance.
      reg_eps: ridge added to the Gramian normalised by ``trace(G) / T`` (``"active_set"`` only).
      qp_method: :func:`nonneg_qp`'s method (``"active_set"`` only).

    Returns:
      ``(T,)`` weights, non-negative, summing to 1 (NaN if the Gramian is not finite).

    Reference: Désidéri, "Multiple-gradient descent algorithm (MGDA)", 2012; Sener & Koltun, "Multi-Task Learning as
    Multi-Objective Optimization", NeurIPS 2018.
    """
    g = _check_square(gramian)
    check_choice(method, "method", ("active_set", "frank_wolfe"))
    check_choice(qp_method, "qp_method", QP_METHODS)
    t = g.shape[0]
    if method == "active_set":
        gn, _ = _normalized(g, reg_eps)
        v = nonneg_qp(gn, -jnp.ones((t,), g.dtype), method=qp_method, max_iter=max_iter, tol=tol)
        return v / jnp.sum(v)
    gn, _ = _normalized(g, 0.0)
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
    tol: float = 1e-6,
    reg_eps: float = 1e-4,
    qp_method: str = "block_pivoting",
) -> Array:
    """Weights ``v`` with ``J^T v`` the projection of ``J^T u`` onto the dual cone ``{x : J x >= 0}``.

    Solves ``min_v v^T G v`` subject to ``v >= u`` (Prop. 1 of Quinton & Rey 2024) as the non-negative QP in
    ``z = v - u``. The Gramian is trace-normalised and ridged by ``reg_eps`` first (TorchJD's ``QuadprogProjector``
    uses the same normalisation and default ridge), so ``(G v)_i >= -reg_eps * trace(G) * v_i``. For a
    batch of ``u`` use ``jax.vmap``.

    Args:
      gramian: ``(T, T)`` PSD Gramian.
      u: ``(T,)`` weights of the vector to project.
      max_iter, tol: iteration cap and tolerance of :func:`nonneg_qp`.
      reg_eps: ridge on the normalised Gramian.
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
    gn = (g + g.T) / (2 * jnp.where(tr > 0, tr, 1.0)) + reg_eps * jnp.eye(t, dtype=g.dtype)
    z = nonneg_qp(gn, gn @ u, method=qp_method, max_iter=max_iter, tol=tol)
    return u + z


def nash_bargaining(
    gramian: Array,
    *,
    max_iter: int = 30,
    tol: float = 1e-9,
    reg_eps: float = 1e-6,
) -> Array:
    """Solves Nash-MTL's bargaining system ``(G alpha)_i = 1 / alpha_i``, ``alpha > 0``.

    The system is the stationarity condition of the strictly convex, self-concordant
    ``phi(a) = 1/2 a^T G a - sum_i log a_i`` (its Hessian ``G + diag(1/a^2)`` is positive definite even for singular
    ``G``), minimised by damped Newton steps (step ``1 / (1 + lambda)`` while the Newton decrement ``lambda >= 1/4``,
    full steps after), which keep ``a > 0`` and converge quadratically. Solved on the normalised ``G / s``
    (``s = trace(G) / T``) and rescaled by ``1 / sqrt(s)``, so the answer is scale-equivariant:
    ``alpha(c G) = alpha(G) / sqrt(c)``. For orthogonal gradients ``alpha_i = 1 / |g_i|``. A task with a zero gradient
    has no finite solution (``alpha_i -> inf`` times a zero vector); it is taken out of the system and gets
    ``alpha_i = 0``. Near a Pareto-stationary point (``0`` in the convex hull, e.g. opposite gradients) the system
    has no solution either (``phi`` is unbounded below); the ridge ``reg_eps`` (on the normalised Gramian, not floored)
    keeps ``alpha`` finite, and since ``|J^T alpha|^2 = alpha^T G alpha <= T`` the update stays bounded. Set
    ``reg_eps=0`` for the exact system away from such points.

    Args:
      gramian: ``(T, T)`` PSD Gramian.
      max_iter: Newton iteration cap.
      tol: stop when the squared Newton decrement is below ``tol``.
      reg_eps: optional ridge on the normalised Gramian.

    Returns:
      ``(T,)`` weights ``alpha`` (positive for non-zero gradients).

    Reference: Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022 (Eq. 4).
    """
    g = _check_square(gramian)
    t = g.shape[0]
    gn, s = _normalized(g, 0.0)
    eye = jnp.eye(t, dtype=g.dtype)
    diag = jnp.diag(gn)
    # Only (numerically) zero gradients are taken out: a task whose gradient is 1e-3 of the others still bargains.
    live = diag > jnp.finfo(g.dtype).tiny
    # Newton runs on b = D a with D = diag(|g_i|) (Newton steps are affine-invariant, so this changes only the
    # conditioning): the system matrix becomes the cosine matrix plus the ridge reg_eps / |g_i|^2 (relative), well
    # conditioned whatever the spread of the task-gradient norms.
    d = jnp.where(live, jnp.sqrt(jnp.where(live, diag, 1.0)), 1.0)
    both = live[:, None] & live[None, :]
    gn = jnp.where(both, (gn + reg_eps * eye) / jnp.outer(d, d), eye)  # dead tasks decouple, zeroed below

    def body(state: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
        a, it, _ = state
        grad = gn @ a - 1.0 / a
        hess = gn + eye / a**2
        d = -jnp.linalg.solve(hess, grad)
        lam2 = jnp.maximum(-grad @ d, 0.0)
        lam = jnp.sqrt(lam2)
        step = jnp.where(lam >= 0.25, 1.0 / (1.0 + lam), 1.0)
        a_new = a + step * d
        a_new = jnp.where(a_new > 0, a_new, 0.5 * a)
        return a_new, it + 1, ~(lam2 > tol)

    b0 = 1.0 / jnp.sqrt(jnp.diag(gn))
    b, *_ = jax.lax.while_loop(lambda st: (~st[2]) & (st[1] < max_iter), body, (b0, jnp.array(0), jnp.array(False)))
    return _nan_unless_finite(jnp.where(live, b / d, 0.0) / jnp.sqrt(s), g)
