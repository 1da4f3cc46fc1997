"""Mixture-of-experts multi-task models: MMoE (Ma et al., KDD 2018), CGC and PLE (Tang et al., RecSys 2020).

- **MMoE**: ``E`` shared experts; task ``t`` mixes them with its own softmax gate on the input,
  ``h_t = sum_e g_t(x)_e f_e(x)``, then its tower.
- **CGC** (Customized Gate Control): shared experts plus ``m`` experts private to each task; task ``t``'s gate
  mixes its own and the shared experts only.
- **PLE** (Progressive Layered Extraction): ``L`` stacked CGC levels. Below the top, every task and the shared
  branch carry their own representation; a shared gate mixes all experts to form the next shared input.

``features(x)`` returns the expert outputs stacked as ``(n, E, h)`` for MMoE/OMoE; for CGC/PLE a dict with the top
level's expert outputs ``"experts" (n, E_total, h)`` (ordered: shared experts, then each task's experts in task order)
and the representations its gates read, ``"inputs"``. ``from_features(z, x)`` applies the gates, towers and heads.
``gate_weights(x) -> {task: (n, E_gate)}`` exposes the (top-level) gate probabilities, which sum to 1 per example.

Experts, per-task gates and heads are stacked parameters (:class:`~corrjax.models.base.Stacked`: one module with a
leading expert or task axis, built and applied under ``nnx.vmap``), so tracing and compiling the train step does not
grow with the number of experts or tasks: ``experts.stack`` holds ``(E, ...)`` leaves, ``gates.stack`` ``(T, ...)``,
a CGC/PLE level's ``task.stack`` ``(T * m, ...)`` (task-major: task ``t``'s ``m`` experts at ``t*m .. t*m+m-1``).
``experts[e]``, ``gates[t]`` and ``heads[name]`` give one copy as a module. Checkpoints written before this layout
(one ``nnx.List`` entry per expert, one ``nnx.Dict`` entry per gate and head) do not restore into it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from corrjax.data.spec import TaskSpec
from corrjax.models.backbones import MLP, flatten
from corrjax.models.base import BackboneFactory, MultiTaskModel, Stacked, make_heads

UpperExpertFactory = Callable[[int, nnx.Rngs], nnx.Module]


def _experts(factory: BackboneFactory, count: int, rngs: nnx.Rngs, name: str, **dtypes: Any) -> Stacked | None:
    """``count`` experts stacked (None for none: CGC/PLE without shared or without task experts)."""
    return Stacked(factory, count, rngs=rngs, name=name, **dtypes) if count else None


def _mix(gate_logits: jax.Array, experts: jax.Array) -> jax.Array:
    """``softmax(gate_logits) (n, E)`` weighted sum of ``experts (n, E, h)`` -> ``(n, h)`` (the softmax in at least
    float32, the mixture in the experts' dtype)."""
    weights = jax.nn.softmax(gate_logits.astype(jnp.promote_types(gate_logits.dtype, jnp.float32)), axis=-1)
    return jnp.einsum("ne,neh->nh", weights.astype(experts.dtype), experts)


def _mix_stacked(gate_logits: jax.Array, experts: jax.Array) -> jax.Array:
    """Every task's mixture at once: ``softmax(gate_logits) (T, n, E)`` and ``experts (n, E, h)`` or per task
    ``(n, T, E, h)`` -> ``(T, n, h)``."""
    w = jax.nn.softmax(gate_logits.astype(jnp.promote_types(gate_logits.dtype, jnp.float32)), axis=-1)
    w = w.astype(experts.dtype)
    if experts.ndim == 3:
        return jnp.einsum("tne,neh->tnh", w, experts)
    return jnp.einsum("tne,nteh->tnh", w, experts)


class MMoE(MultiTaskModel):
    """Multi-gate mixture of experts (Ma et al., KDD 2018).

    Args:
      expert: factory called as ``expert(rngs=rngs)``, returning a module with ``out_features``; called
        ``num_experts`` times.
      tasks: the task specs.
      num_experts: ``E``.
      gate_in_features: size of the flattened input the gates see (``prod(x.shape[1:])``).
      tower_hidden: widths of each task's tower.
      dtype, param_dtype: computation and parameter dtypes of the experts, gates and heads.
    """

    task_specific = ("gates", "heads")

    def __init__(
        self,
        expert: BackboneFactory,
        tasks: Sequence[TaskSpec],
        *,
        num_experts: int = 4,
        gate_in_features: int,
        tower_hidden: Sequence[int] = (),
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        if num_experts < 1:
            raise ValueError(f"`num_experts` must be >= 1, got {num_experts}")
        self._init_tasks(tasks)
        kw = {"dtype": dtype, "param_dtype": param_dtype}
        self.experts = _experts(expert, num_experts, rngs, "expert", **kw)
        self._init_gates(gate_in_features, num_experts, rngs, **kw)
        self.heads = make_heads(self.experts.out_features, self.tasks, tower_hidden, rngs, **kw)
        self.num_experts = num_experts

    def _init_gates(self, in_features: int, num_experts: int, rngs: nnx.Rngs, **dtypes: Any) -> None:
        # One stacked Linear: gates.stack.kernel is (T, in_features, E); gates[t] is task t's gate.
        gate = partial(nnx.Linear, in_features, num_experts, **dtypes)
        self.gates = Stacked(gate, len(self.task_names), rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        return jnp.moveaxis(self.experts(x), 0, 1)

    def stacked_gate_logits(self, x: jax.Array) -> jax.Array:
        """``(T, n, E)`` every task's gate logits (task order)."""
        return self.gates(flatten(x))

    def gate_logits(self, x: jax.Array) -> dict[str, jax.Array]:
        logits = self.stacked_gate_logits(x)
        return {n: logits[k] for k, n in enumerate(self.task_names)}

    def gate_weights(self, x: jax.Array) -> dict[str, jax.Array]:
        """``{task: (n, E)}`` softmax gate weights."""
        return {n: jax.nn.softmax(g, axis=-1) for n, g in self.gate_logits(x).items()}

    def from_features(self, z: jax.Array, x: jax.Array) -> dict[str, jax.Array]:
        return self.heads.per_task(_mix_stacked(self.stacked_gate_logits(x), z))


class OMoE(MMoE):
    """One-gate mixture of experts, the baseline of Ma et al. (KDD 2018, Section 5).

    Like :class:`MMoE` but with a single softmax gate shared by every task, ``h = sum_e g(x)_e f_e(x)``, so every
    task's head reads the same mixture; only the heads are task-specific. Arguments as :class:`MMoE`.
    """

    task_specific = ("heads",)

    def _init_gates(self, in_features: int, num_experts: int, rngs: nnx.Rngs, **dtypes: Any) -> None:
        self.gate = nnx.Linear(in_features, num_experts, rngs=rngs, **dtypes)

    def gate_logits(self, x: jax.Array) -> dict[str, jax.Array]:
        """``{task: (n, E)}``: the one gate's logits (the same array for every task)."""
        g = self.gate(flatten(x))
        return {n: g for n in self.task_names}

    def from_features(self, z: jax.Array, x: jax.Array) -> dict[str, jax.Array]:
        return self.heads(_mix(self.gate(flatten(x)), z))


class CGCLevel(nnx.Module):
    """One extraction level: shared and per-task experts, per-task gates, and optionally a shared gate.

    ``inputs`` is ``{"shared": s, task: h_t}``; task experts and gates read ``h_t``, shared experts and the shared
    gate read ``s`` (at the first level all are ``x``).
    """

    def __init__(
        self,
        make_expert: Callable[[nnx.Rngs], nnx.Module],
        task_names: Sequence[str],
        *,
        num_shared_experts: int,
        num_task_experts: int,
        gate_in_features: int,
        shared_gate: bool,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        if num_shared_experts < 0 or num_task_experts < 0 or num_shared_experts + num_task_experts < 1:
            raise ValueError(
                f"`num_shared_experts`={num_shared_experts} and `num_task_experts`={num_task_experts} must be >= 0 "
                "and give each gate at least one expert"
            )
        self.task_names = tuple(task_names)
        num_tasks = len(self.task_names)
        kw = {"dtype": dtype, "param_dtype": param_dtype}
        self.shared = _experts(make_expert, num_shared_experts, rngs, "expert", **kw)
        # All tasks' experts in one stack, task-major: task t's m experts are copies t*m .. t*m + m - 1.
        self.task = _experts(make_expert, num_task_experts * num_tasks, rngs, "expert", **kw)
        gate_size = num_shared_experts + num_task_experts
        self.gates = Stacked(partial(nnx.Linear, gate_in_features, gate_size, **kw), num_tasks, rngs=rngs)
        total = num_shared_experts + num_task_experts * num_tasks
        self.shared_gate = nnx.Linear(gate_in_features, total, rngs=rngs, **kw) if shared_gate else None
        self.num_shared, self.num_task = num_shared_experts, num_task_experts
        self.out_features = (self.shared if num_shared_experts else self.task).out_features

    def _task_inputs(self, inputs: dict[str, jax.Array]) -> tuple[jax.Array, bool]:
        """``(x, False)`` when every task reads the shared input (the first level: one array, broadcast), else
        the per-task inputs stacked ``((T, n, ...), True)``."""
        shared = inputs.get("shared")
        if shared is not None and all(inputs[n] is shared for n in self.task_names):
            return shared, False
        return jnp.stack([inputs[n] for n in self.task_names]), True

    def experts(self, inputs: dict[str, jax.Array]) -> jax.Array:
        """All expert outputs ``(n, E_total, h)``: shared first, then each task's in task order."""
        outs = []
        if self.shared is not None:
            outs.append(self.shared(inputs["shared"]))
        if self.task is not None:
            x, stacked = self._task_inputs(inputs)
            if stacked:  # copy t*m + j reads task t's input
                x = jnp.repeat(x, self.num_task, axis=0)
            outs.append(self.task(x, stacked_input=stacked))
        return jnp.moveaxis(outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0), 0, 1)

    def stacked_gate_logits(self, inputs: dict[str, jax.Array]) -> jax.Array:
        """``(T, n, E_s + E_t)`` every task's gate logits."""
        x, stacked = self._task_inputs(inputs)
        return self.gates(jax.vmap(flatten)(x) if stacked else flatten(x), stacked_input=stacked)

    def gate_logits(self, inputs: dict[str, jax.Array]) -> dict[str, jax.Array]:
        logits = self.stacked_gate_logits(inputs)
        return {n: logits[k] for k, n in enumerate(self.task_names)}

    def _selection(self) -> np.ndarray:
        """``(T, E_s + E_t)`` the expert indices each task's gate mixes: the shared ones, then its own."""
        shared = np.arange(self.num_shared)
        return np.stack(
            [
                np.concatenate([shared, self.num_shared + k * self.num_task + np.arange(self.num_task)])
                for k in range(len(self.task_names))
            ]
        ).astype(np.int32)

    def select(self, z: jax.Array, name: str) -> jax.Array:
        """The experts task ``name``'s gate mixes: shared ones and its own, ``(n, E_s + E_t, h)``."""
        return z[:, self._selection()[self.task_names.index(name)]]

    def stacked_mix(self, z: jax.Array, inputs: dict[str, jax.Array]) -> jax.Array:
        """``(T, n, h)`` every task's next-level representation (task order)."""
        return _mix_stacked(self.stacked_gate_logits(inputs), z[:, self._selection()])

    def mix(self, z: jax.Array, inputs: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Next-level representations ``{task: (n, h)}`` (plus ``"shared"`` with a shared gate)."""
        reps = self.stacked_mix(z, inputs)
        out = {n: reps[k] for k, n in enumerate(self.task_names)}
        if self.shared_gate is not None:
            out["shared"] = _mix(self.shared_gate(flatten(inputs["shared"])), z)
        return out


class PLE(MultiTaskModel):
    """Progressive Layered Extraction (Tang et al., RecSys 2020); ``num_levels=1`` is CGC.

    Args:
      expert: factory called as ``expert(rngs=rngs)`` for the first level's experts (they read ``x``).
      tasks: the task specs.
      num_levels: extraction levels ``L``.
      num_shared_experts, num_task_experts: experts per level.
      gate_in_features: flattened input size seen by the first level's gates.
      upper_expert: factory called as ``upper_expert(in_features, rngs=rngs)`` for experts above the first level;
        by default a one-layer ReLU MLP of the first level's width.
      tower_hidden: widths of each task's tower.
      dtype, param_dtype: computation and parameter dtypes of the experts, gates and heads.

    ``features(x)`` returns ``{"experts": (n, E_total, h), "inputs": {...}}``: the top level's expert outputs and the
    representations its gates read (``x`` itself when ``L = 1``).
    """

    task_specific = ("heads",)

    def __init__(
        self,
        expert: BackboneFactory,
        tasks: Sequence[TaskSpec],
        *,
        num_levels: int = 2,
        num_shared_experts: int = 2,
        num_task_experts: int = 1,
        gate_in_features: int,
        upper_expert: UpperExpertFactory | None = None,
        tower_hidden: Sequence[int] = (),
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        if num_levels < 1:
            raise ValueError(f"`num_levels` must be >= 1, got {num_levels}")
        self._init_tasks(tasks)
        levels, make, gate_in = [], expert, gate_in_features
        for level in range(num_levels):
            lvl = CGCLevel(
                make,
                self.task_names,
                num_shared_experts=num_shared_experts,
                num_task_experts=num_task_experts,
                gate_in_features=gate_in,
                # The shared gate forms the next level's shared input, read only by shared experts (and the next
                # shared gate): without shared experts it would feed nothing.
                shared_gate=level < num_levels - 1 and num_shared_experts > 0,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
            levels.append(lvl)
            width = lvl.out_features
            make = partial(upper_expert, width) if upper_expert is not None else partial(MLP, width, (width,))
            gate_in = width
        self.levels = nnx.List(levels)
        self.heads = make_heads(
            levels[-1].out_features, self.tasks, tower_hidden, rngs, dtype=dtype, param_dtype=param_dtype
        )
        self.num_levels = num_levels

    def is_task_specific(self, path: tuple[str | int, ...]) -> bool:
        # Task t's gate at level l forms h_t, which only task t's gate and experts at level l + 1 read; task t's
        # experts at level l feed task t's gate there and, below the top, the shared gate, which mixes all experts
        # into the next shared input (hence reaches every task). So task t's experts are task-specific at the top
        # level, and its gates at the top two levels; at every level when there are no shared experts (no shared
        # gate then), and its gates at every level when there are no task experts (h_t feeds only gates then).
        if path and path[0] == "levels":
            top, level, part = self.num_levels - 1, path[1], path[2]
            no_shared, no_task = self.levels[0].num_shared == 0, self.levels[0].num_task == 0
            if part == "task":
                return level == top or no_shared
            if part == "gates":
                return level >= top - 1 or no_shared or no_task
            return False
        return super().is_task_specific(path)

    def features(self, x: jax.Array) -> dict[str, Any]:
        inputs = {"shared": x, **{n: x for n in self.task_names}}
        for lvl in self.levels[:-1]:
            inputs = lvl.mix(lvl.experts(inputs), inputs)
        return {"experts": self.levels[-1].experts(inputs), "inputs": inputs}

    def gate_weights(self, x: jax.Array) -> dict[str, jax.Array]:
        """``{task: (n, E_s + E_t)}`` top-level gate probabilities (shared experts first)."""
        logits = self.levels[-1].gate_logits(self.features(x)["inputs"])
        return {n: jax.nn.softmax(g, axis=-1) for n, g in logits.items()}

    def from_features(self, z: dict[str, Any], x: jax.Array | None = None) -> dict[str, jax.Array]:
        return self.heads.per_task(self.levels[-1].stacked_mix(z["experts"], z["inputs"]))


class CGC(PLE):
    """Customized Gate Control (Tang et al., RecSys 2020): a single-level PLE. See :class:`PLE` for arguments."""

    def __init__(
        self,
        expert: BackboneFactory,
        tasks: Sequence[TaskSpec],
        *,
        num_shared_experts: int = 2,
        num_task_experts: int = 1,
        gate_in_features: int,
        tower_hidden: Sequence[int] = (),
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        super().__init__(
            expert,
            tasks,
            num_levels=1,
            num_shared_experts=num_shared_experts,
            num_task_experts=num_task_experts,
            gate_in_features=gate_in_features,
            tower_hidden=tower_hidden,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
