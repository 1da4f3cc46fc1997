"""ESMM, the entire space multi-task model (Ma et al., "Entire Space Multi-Task Model: An Effective Approach for
Estimating Post-Click Conversion Rate", SIGIR 2018, arXiv:1804.07931).

Post-click conversion rate ``pCVR = p(z = 1 | y = 1, x)`` (``y`` click, ``z`` conversion) is classically trained on
clicked impressions only and then used on all of them: sample selection bias, made worse by the sparsity of clicks.
ESMM writes the click-and-convert probability over the entire impression space as

    pCTCVR = p(y = 1, z = 1 | x) = pCTR x pCVR,

models ``pCTR`` and ``pCVR`` with two networks on a shared input, and trains it with the CTR loss and the CTCVR loss
on every impression (Eq. 3 of the paper); the CVR network is never trained on clicked impressions alone, and
``pCVR`` is read off as an intermediate output.

Here the two networks are the two tasks of any corrjax multi-task body (:class:`SeparateTowers` by default, the
paper's layout; or HPS, MMoE, CGC, PLE, built for the internal tasks ``ctr`` and ``cvr``), and the model's trained
tasks are the dataset's CTR and CTCVR tasks, so their two losses (the binary kind's sigmoid cross-entropy on the
returned logits) go through corrjax.mtl's aggregators like any others. The CTCVR output is the logit of
``sigmoid(a) sigmoid(b)`` for the body's CTR and CVR logits ``a, b``, computed in log space:
``log p = log_sigmoid(a) + log_sigmoid(b)``, ``logit(p) = log p - log(-expm1(log p))``.

Shared/task-specific split: the CTR network is reached by both losses (CTCVR's through ``pCTR``), so its
parameters are shared (task-stacked, through the aggregator); the CVR network only by the CTCVR loss, so its
task-specific parameters belong to that task.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from corrjax.data.spec import TaskSpec
from corrjax.models.backbones import flatten
from corrjax.models.base import MultiTaskModel, TaskHead

# The body's internal tasks.
CTR, CVR = "ctr", "cvr"
BODY_TASKS: tuple[TaskSpec, ...] = (TaskSpec(CTR, "binary", 1), TaskSpec(CVR, "binary", 1))
BodyFactory = Callable[..., MultiTaskModel]  # called as body(tasks=BODY_TASKS, rngs=rngs)


def ctcvr_logit(ctr_logit: jax.Array, cvr_logit: jax.Array) -> jax.Array:
    """``logit(sigmoid(a) * sigmoid(b))``, computed in log space (finite for logits up to ~1e2 in float32)."""
    log_p = jax.nn.log_sigmoid(ctr_logit) + jax.nn.log_sigmoid(cvr_logit)
    # log p < 0 strictly: at p -> 1 (both logits beyond ~100 in float32) log(-expm1(0)) would be -inf.
    log_p = jnp.minimum(log_p, -jnp.finfo(log_p.dtype).tiny)
    return log_p - jnp.log(-jnp.expm1(log_p))


class SeparateTowers(MultiTaskModel):
    """One MLP tower and output layer per task on the (flattened) input, nothing shared but the input: the
    layout of ESMM's CTR and CVR networks (which share only the embedding in front of them).

    ``features(x)`` is the flattened input ``(n, in_features)``; ``from_features`` applies the towers.
    """

    task_specific = ("heads",)

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        *,
        in_features: int,
        tower_hidden: Sequence[int] = (),
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        self._init_tasks(tasks)
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        # One module per tower, not a stacked TaskHeads: the CTR tower is shared (both ESMM losses reach it) and the
        # CVR tower task-specific, and the shared/task split (corrjax.models.shared_mask) is per parameter leaf.
        hidden = tuple(tower_hidden)
        self.heads = nnx.Dict({t.name: TaskHead(int(in_features), t, hidden, **kw) for t in self.tasks})
        self.in_features = int(in_features)

    def features(self, x: jax.Array) -> jax.Array:
        z = flatten(x)
        if z.shape[1] != self.in_features:
            raise ValueError(f"SeparateTowers expects {self.in_features} input features, got x of shape {x.shape}")
        return z

    def from_features(self, z: jax.Array, x: jax.Array | None = None) -> dict[str, jax.Array]:
        return {name: self.heads[name](z) for name in self.task_names}


class ESMM(MultiTaskModel):
    """Entire space multi-task model (Ma et al., SIGIR 2018): outputs the CTR and CTCVR logits, and the CVR logit.

    Args:
      tasks: the trained tasks: exactly the dataset's CTR task and CTCVR task (binary, one output each), e.g.
        ``click`` (clicked) and ``purchase`` (clicked and converted).
      ctr_task, ctcvr_task: their names.
      cvr_output: the key of the extra output, the post-click conversion logit ``b`` (``sigmoid(b)`` is pCVR).
        Not trained on its own; :attr:`reported_outputs` names it so the training codebase evaluates it against a
        dataset task of that name when there is one (labelled on clicked impressions only).
      in_features: the input width (of the embedded input), used by the default body.
      tower_hidden: the default body's tower widths (the paper: 360, 200, 80).
      body: factory ``body(tasks=BODY_TASKS, rngs=rngs)`` of the two-task network that gives the CTR and CVR
        logits, e.g. ``functools.partial(MMoE, expert, num_experts=4, gate_in_features=d)``; default
        :class:`SeparateTowers` on ``in_features``.
      dtype, param_dtype: computation and parameter dtypes, handed to the body (a factory that does not fix them).
      rngs: parameter initialisation.

    ``model(x) == {ctr_task: a, ctcvr_task: logit(sigmoid(a) sigmoid(b)), cvr_output: b}``; ``features`` and
    ``from_features`` are the body's.
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        *,
        ctr_task: str = "click",
        ctcvr_task: str = "purchase",
        cvr_output: str = "cvr",
        in_features: int | None = None,
        tower_hidden: Sequence[int] = (64, 32),
        body: BodyFactory | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        self._init_tasks(tasks)
        names = list(self.task_names)
        if sorted(names) != sorted([ctr_task, ctcvr_task]) or ctr_task == ctcvr_task:
            raise ValueError(
                f"ESMM trains exactly the tasks `ctr_task`={ctr_task!r} and `ctcvr_task`={ctcvr_task!r}; got tasks "
                f"{names} (select them with tasks=[{ctr_task},{ctcvr_task}])"
            )
        for t in self.tasks:
            if t.kind != "binary" or t.num_outputs != 1:
                raise ValueError(f"ESMM's task {t.name!r} must be binary with one output, got {t}")
        if cvr_output in names:
            raise ValueError(f"`cvr_output`={cvr_output!r} must differ from the trained tasks {names}")
        if body is None:
            if in_features is None:
                raise ValueError("ESMM needs `in_features` for its default body (or a `body` factory)")
            self.body = SeparateTowers(
                BODY_TASKS,
                in_features=in_features,
                tower_hidden=tower_hidden,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
        else:
            fixed = getattr(body, "keywords", None) or {}
            dtypes = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if k not in fixed}
            self.body = body(tasks=BODY_TASKS, rngs=rngs, **dtypes)
            if not isinstance(self.body, MultiTaskModel) or set(self.body.task_names) != {CTR, CVR}:
                raise TypeError(f"`body` must build a MultiTaskModel for the tasks {CTR!r}, {CVR!r}")
        self.ctr_task, self.ctcvr_task, self.cvr_output = ctr_task, ctcvr_task, cvr_output
        self.reported_outputs = (cvr_output,)

    def is_task_specific(self, path: tuple[str | int, ...]) -> bool:
        # The body's task-specific parameters of the CVR network are reached by the CTCVR loss alone; those of the
        # CTR network by both losses, hence shared.
        rest = tuple(path[1:])
        return bool(path) and path[0] == "body" and CVR in rest and self.body.is_task_specific(rest)

    def features(self, x: jax.Array) -> Any:
        return self.body.features(x)

    def from_features(self, z: Any, x: jax.Array) -> dict[str, jax.Array]:
        out = self.body.from_features(z, x)
        a, b = out[CTR], out[CVR]
        return {self.ctr_task: a, self.ctcvr_task: ctcvr_logit(a, b), self.cvr_output: b}

    @property
    def gate_weights(self):
        """The body's ``gate_weights`` (MMoE/CGC/PLE bodies), keyed by the body's tasks; AttributeError otherwise."""
        if not hasattr(self.body, "gate_weights"):
            raise AttributeError(f"{type(self.body).__name__} has no gate_weights")
        return self.body.gate_weights
