"""Task specifications shared by datasets and models.

A :class:`TaskSpec` names one prediction task, says what kind of target it has and how many outputs a model head
needs for it. Datasets expose ``.tasks: tuple[TaskSpec, ...]`` and models are built from the same tuple, so the
two always agree on names, label shapes and output shapes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

TaskKind = Literal["classification", "binary", "regression"]
TASK_KINDS: tuple[str, ...] = ("classification", "binary", "regression")
# Batch keys that are not task names.
RESERVED_KEYS: tuple[str, ...] = ("x", "mask")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task of a multi-task problem.

    Attributes:
      name: the task's key in batches (``batch[name]``) and in model outputs (``model(x)[name]``).
      kind: ``"classification"`` (integer labels ``(n,)`` in ``[0, num_outputs)``; model outputs logits
        ``(n, num_outputs)``), ``"binary"`` (labels in {0, 1}; logits) or ``"regression"`` (float targets).
      num_outputs: number of classes for classification; for binary/regression the number of targets. With
        ``num_outputs == 1`` binary/regression labels and outputs have shape ``(n,)``, otherwise
        ``(n, num_outputs)``.
    """

    name: str
    kind: TaskKind
    num_outputs: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"`name` must be a non-empty str, got {self.name!r}")
        if self.name in RESERVED_KEYS:
            raise ValueError(f"`name`={self.name!r} is reserved for batch keys {RESERVED_KEYS}")
        if self.kind not in TASK_KINDS:
            raise ValueError(f"unknown `kind`={self.kind!r}; expected one of {', '.join(map(repr, TASK_KINDS))}")
        if isinstance(self.num_outputs, bool) or not isinstance(self.num_outputs, int) or self.num_outputs < 1:
            raise ValueError(f"`num_outputs` must be a positive int, got {self.num_outputs!r}")
        if self.kind == "classification" and self.num_outputs < 2:
            raise ValueError(f"classification task {self.name!r} needs `num_outputs` >= 2, got {self.num_outputs}")

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Per-example output shape of a model head: ``()`` for a single binary/regression target."""
        if self.kind != "classification" and self.num_outputs == 1:
            return ()
        return (self.num_outputs,)

    @property
    def label_shape(self) -> tuple[int, ...]:
        """Per-example label shape: ``()`` for classification and single targets, else ``(num_outputs,)``."""
        return () if self.kind == "classification" else self.output_shape


def check_tasks(tasks: Sequence[TaskSpec], name: str = "tasks") -> tuple[TaskSpec, ...]:
    """Returns ``tasks`` as a tuple after checking it is a non-empty sequence of uniquely named TaskSpecs."""
    tasks = tuple(tasks)
    if not tasks:
        raise ValueError(f"`{name}` must contain at least one TaskSpec")
    for t in tasks:
        if not isinstance(t, TaskSpec):
            raise TypeError(f"`{name}` must contain TaskSpec instances, got {type(t).__name__}")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"`{name}` has duplicate task names: {names}")
    return tasks
