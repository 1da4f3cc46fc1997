"""Structured config schemas for the Hydra training codebase.

The dataclasses below are registered in Hydra's ConfigStore and used as the base of ``configs/train.yaml`` (through
its defaults list), so a misspelt or wrongly typed override such as ``trainer.max_stepz=3`` or
``trainer.max_steps=abc`` fails at composition time with Hydra's error naming the key. The groups whose options
differ in shape (``data``, ``model``, ``mtl``, ``optim``, ``regularizer``) are ``_target_`` nodes instantiated with
:func:`hydra.utils.instantiate`; Hydra's struct mode still rejects unknown keys in them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class TrainerConfig:
    """Loop settings: step counts, batch sizes, checkpointing and the non-finite guard.

    These are the trainer's defaults, in this one place (``configs/trainer/default.yaml`` selects them unchanged;
    ``configs/trainer/tiny.yaml`` and the experiments override some). Periodic work runs at every multiple of its
    period and at the last step (:func:`corrjax.train.loop.every`); a period of 0 means never during the run."""

    max_steps: int = 600
    batch_size: int = 128
    eval_batch_size: int = 512
    eval_every: int = 200
    eval_split: str = "test"
    log_every: int = 20
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    async_checkpointing: bool = True
    resume: bool = False
    # A fresh run (resume=false) in a directory holding a previous run's results deletes them only when this is true
    # (otherwise it stops with an error naming the directory): corrjax.train.rundir.
    overwrite: bool = False
    # Stop (with a checkpoint) after this many steps of this invocation; a later `trainer.resume=true` continues.
    stop_after: int | None = None
    max_nonfinite_in_a_row: int = 10
    # Log McCandlish et al.'s gradient noise scale at every log step (one more forward/backward pass there).
    noise_scale: bool = True
    progress: bool = True


# Lower bounds of the trainer's counts (the schema checks types only): 0 disables evaluation and checkpointing.
_TRAINER_MINIMUMS = {
    "max_steps": 0,
    "batch_size": 1,
    "eval_batch_size": 1,
    "eval_every": 0,
    "log_every": 1,
    "checkpoint_every": 0,
    "keep_checkpoints": 1,
    "stop_after": 1,
    "max_nonfinite_in_a_row": 1,
}


def check_trainer(trainer: Any) -> None:
    """Raises ``ValueError`` naming the key when a ``trainer`` count is below its minimum (``log_every`` >= 1,
    ``eval_every`` and ``checkpoint_every`` >= 0 with 0 meaning never, ``stop_after`` null or >= 1, ...).

    The structured schema rejects misspelt keys and wrong types at composition; this catches the well-typed values
    that would otherwise crash mid-run (``log_every=0``) or silently misbehave (``max_nonfinite_in_a_row=0``)."""
    for key, minimum in _TRAINER_MINIMUMS.items():
        value = trainer.get(key) if hasattr(trainer, "get") else getattr(trainer, key, None)
        if value is None and key == "stop_after":
            continue
        if value is None or value < minimum:
            raise ValueError(f"`trainer.{key}`={value} must be >= {minimum}")


@dataclass
class DistributedConfig:
    """``jax.distributed.initialize`` arguments; ``enabled=None`` means: initialise when SLURM says so."""

    enabled: bool | None = None
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: list[int] | None = None
    initialization_timeout: int = 300


@dataclass
class ParallelConfig:
    """Mesh shape: the data axis spans ``data`` devices (-1: every device of every process)."""

    data: int = -1
    axis_name: str = "data"
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


@dataclass
class LoaderConfig:
    """The input pipeline (:class:`corrjax.data.BatchIterator` for training, the same for evaluation): grain
    DataLoader worker processes that read, decode and transform batches, and batches kept ready ahead. Neither
    changes the batches, so a run may resume with other values."""

    # null: 0 (in-process) on the CPU backend or for in-memory datasets, else min(8, cpu_count // 2).
    workers: int | None = None
    prefetch: int = 2


def check_loader(loader: Any) -> None:
    """Raises ``ValueError`` naming the key for a negative ``loader.workers`` or ``loader.prefetch`` (touches no
    JAX device, so it runs before distributed initialisation)."""
    workers, prefetch = loader.get("workers"), loader.get("prefetch", 2)
    if workers is not None and workers < 0:
        raise ValueError(f"`loader.workers`={workers} must be >= 0 (or null: chosen from the backend and dataset)")
    if prefetch is None or prefetch < 0:
        raise ValueError(f"`loader.prefetch`={prefetch} must be >= 0")


def loader_options(loader: Any, source: Any) -> dict[str, int]:
    """``{"workers", "prefetch"}`` for a BatchIterator over ``source`` from the ``loader`` config node (``workers``
    null: :func:`corrjax.data.loader.default_workers`), after :func:`check_loader`."""
    from corrjax.data.loader import default_workers

    check_loader(loader)
    workers = loader.get("workers")
    return {
        "workers": default_workers(source) if workers is None else int(workers),
        "prefetch": int(loader.get("prefetch", 2)),
    }


@dataclass
class LoggerConfig:
    """Which writers run on process 0."""

    jsonl: bool = True
    tensorboard: bool = True
    plots: bool = True


@dataclass
class TrainConfig:
    """The whole run: ``seed`` plus one node per config group."""

    seed: int = 0
    name: str = "run"
    # Train only these tasks of the dataset (e.g. tasks=[left] for a single-task baseline); null: all of them.
    tasks: list[str] | None = None
    # Task name -> regression loss ("mse", "pearson", "concordance", "spearman"); absent tasks use their kind's default.
    task_losses: dict[str, str] = field(default_factory=dict)
    # Packages whose callables `_target_` may name besides corrjax, optax and flax (corrjax.train.targets); set in a
    # config file, not on the command line.
    allowed_targets: list[str] = field(default_factory=list)
    data: Any = MISSING
    model: Any = MISSING
    mtl: Any = MISSING
    optim: Any = MISSING
    regularizer: Any = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


def register_configs() -> None:
    """Registers the schemas in Hydra's ConfigStore (idempotent); ``train.yaml`` lists ``train_schema`` first."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
