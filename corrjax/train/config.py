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
class EarlyStoppingConfig:
    """Stop after ``patience`` evaluations in a row that did not improve the monitor by more than ``min_delta``
    (null: never); :mod:`corrjax.train.selection`."""

    patience: int | None = None
    min_delta: float = 0.0


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
    # The split evaluated every eval_every steps and selected on (`val`: held out from train, never the test split).
    eval_split: str = "val"
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
    # Micro-batches per optimiser step: each step's batch of `batch_size` examples (the global batch) is split into
    # this many micro-batches of batch_size / grad_accum_steps, whose task-stacked gradients are averaged before the
    # aggregator runs once (corrjax.train.accumulate). batch_size must be a multiple of grad_accum_steps x devices.
    grad_accum_steps: int = 1
    # Log McCandlish et al.'s gradient noise scale (corrjax.train.step: from the two halves of the batch the step
    # already differentiates, or one more forward/backward pass at log steps for batch-level losses), its two
    # estimators smoothed by an EMA of this decay per step.
    noise_scale: bool = True
    noise_scale_decay: float = 0.99
    progress: bool = True
    # Validation and model selection (corrjax.train.selection; README "Validation and model selection").
    # train: train (from `ckpt_path`'s weights when given); eval: evaluate `ckpt_path` only (scripts/eval.py).
    mode: str = "train"
    # What is selected on: auto (delta_m with a reference, else mean_score), mean_score, delta_m, loss, <task>/<metric>.
    monitor: str = "auto"
    monitor_mode: str | None = None  # min | max; null: inferred from the monitor
    # Per-task reference metrics for Delta_m%, e.g. {left: {accuracy: 0.95}, right: {accuracy: 0.93}}.
    monitor_reference: Any = None
    keep_best: bool = True  # keep the best evaluation's checkpoint (Orbax best_fn) besides the latest ones
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    # After training, the selected checkpoint is evaluated on this split into summary.json's test/...; null: skip.
    test_split: str | None = "test"
    # Persistent XLA compilation cache (corrjax.train.compile_cache): auto ($XDG_CACHE_HOME/corrjax/jax or
    # ~/.cache/corrjax/jax unless JAX_COMPILATION_CACHE_DIR is set), a directory, or null (no cache).
    compilation_cache_dir: str | None = "auto"


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
    "grad_accum_steps": 1,
}


def check_trainer(trainer: Any) -> None:
    """Raises ``ValueError`` naming the key when a ``trainer`` count is below its minimum (``log_every`` >= 1,
    ``eval_every`` and ``checkpoint_every`` >= 0 with 0 meaning never, ``stop_after`` null or >= 1, ...).

    The structured schema rejects misspelt keys and wrong types at composition; this catches the well-typed values
    that would otherwise crash mid-run (``log_every=0``) or silently misbehave (``max_nonfinite_in_a_row=0``)."""
    get = trainer.get if hasattr(trainer, "get") else lambda k, d=None: getattr(trainer, k, d)
    for key, minimum in _TRAINER_MINIMUMS.items():
        value = get(key)
        if value is None and key == "stop_after":
            continue
        if value is None or value < minimum:
            raise ValueError(f"`trainer.{key}`={value} must be >= {minimum}")
    accum, batch = get("grad_accum_steps", 1), get("batch_size")
    if batch % accum:
        raise ValueError(f"`trainer.grad_accum_steps`={accum} must divide `trainer.batch_size`={batch}")
    decay = trainer.get("noise_scale_decay", 0.99) if hasattr(trainer, "get") else 0.99
    if not 0 <= decay < 1:
        raise ValueError(f"`trainer.noise_scale_decay`={decay} must be in [0, 1)")


# Keys of the `_target_` groups whose numbers must be positive (sizes) or non-negative (rates, optional sizes),
# wherever they sit in the node (lists checked element by element): `check_values`.
POSITIVE_KEYS = frozenset(
    {
        "hidden", "head_hidden", "tower_hidden", "expert_hidden", "widths", "channels", "out_features",
        "in_features", "gate_in_features", "num_experts", "num_levels", "blocks_per_stage", "stem_stride",
        "num_examples", "num_tasks", "num_features", "image_size", "decay_steps", "transition_steps",
    }
)  # fmt: skip
NON_NEGATIVE_KEYS = frozenset(
    {
        "learning_rate", "peak_value", "init_value", "end_value", "weight_decay", "noise_std", "scale",
        "num_sin", "num_shared_experts", "num_task_experts", "warmup_steps", "max_norm", "weight",
    }
)  # fmt: skip
_VALUE_GROUPS = ("data", "model", "mtl", "optim", "regularizer")


def _walk_numbers(node: Any, path: str):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk_numbers(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk_numbers(value, f"{path}[{i}]")
    elif isinstance(node, int | float) and not isinstance(node, bool):
        yield path, node


def check_values(cfg: Any) -> None:
    """Raises ``ValueError`` naming the key for a negative rate (``learning_rate``, ``weight_decay``,
    ``data.noise_std``, ...: :data:`NON_NEGATIVE_KEYS`) or a size below 1 (``hidden``, ``num_examples``, ...:
    :data:`POSITIVE_KEYS`) anywhere in the ``data``, ``model``, ``mtl``, ``optim`` and ``regularizer`` nodes.

    The targets would accept most of them (``optax.adam(-1e-3)`` ascends; a negative noise std flips the noise's
    sign) or fail far from the key; null values (sizes filled from the data) are skipped, and a node whose
    interpolations do not resolve is left to its instantiation to report."""
    from omegaconf import OmegaConf

    for group in _VALUE_GROUPS:
        node = cfg.get(group) if hasattr(cfg, "get") else getattr(cfg, group, None)
        if node is None:
            continue
        try:
            plain = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        except Exception:  # an interpolation that only resolves later (or never): instantiation reports it
            continue
        for path, value in _walk_numbers(plain, group):
            key = path.rsplit(".", 1)[-1].split("[", 1)[0]
            if key in POSITIVE_KEYS and not value >= 1:
                raise ValueError(f"`{path}`={value} must be >= 1 (a size)")
            if key in NON_NEGATIVE_KEYS and value < 0:  # NaN passes: `data.noise_std=nan` makes non-finite data
                raise ValueError(f"`{path}`={value} must be >= 0")


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
    """Mesh shape: the data axis spans ``data`` devices (-1: every device of every process), or ``mesh`` gives a
    2-D ``{data: -1, fsdp: 2}`` mesh whose ``fsdp`` axis shards parameters and optimiser state (leaves of at least
    ``fsdp_min_size`` elements; :mod:`corrjax.train.sharding`). Precision (:mod:`corrjax.train.precision`): the
    layers compute in ``compute_dtype`` and store parameters (hence gradients and optimiser state) in
    ``param_dtype``; ``auto`` is bfloat16 compute on accelerators and float32 on CPU, and float32 parameters
    everywhere; float16 turns on dynamic loss scaling."""

    data: int = -1
    axis_name: str = "data"
    mesh: dict[str, int] | None = None
    fsdp_min_size: int = 16384
    compute_dtype: str = "auto"
    param_dtype: str = "auto"
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


@dataclass
class WandbConfig:
    """Weights & Biases (``pip install 'corrjax[wandb]'``): ``wandb.init`` arguments; ``mode`` null follows
    ``WANDB_MODE`` (``offline`` needs no network; the files go under ``<run_dir>/wandb/``); ``name`` null:
    ``<name>-<run dir's name>``."""

    enabled: bool = False
    project: str = "corrjax"
    entity: str | None = None
    group: str | None = None
    name: str | None = None
    mode: str | None = None


@dataclass
class MlflowConfig:
    """MLflow (``pip install 'corrjax[mlflow]'``): ``tracking_uri`` null follows ``MLFLOW_TRACKING_URI`` (or MLflow's
    default); ``name`` null: ``<name>-<run dir's name>``."""

    enabled: bool = False
    tracking_uri: str | None = None
    experiment: str = "corrjax"
    name: str | None = None


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
    """What process 0 records (corrjax.train.writers, corrjax.train.trackers) and prints (corrjax.train.console)."""

    jsonl: bool = True
    tensorboard: bool = True
    # One wide metrics.csv (step, then every scalar metric in sorted order).
    csv: bool = False
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    plots: bool = True
    # Heatmaps of the T x T matrices (gradient cosines, task correlations) as images in TensorBoard/W&B/MLflow every
    # this many steps and at the last; null: at the evaluation steps (trainer.eval_every); 0: never.
    matrix_every: int | None = None
    # One line per log step on the console: auto (when no progress bar is shown: stdout is not a terminal, or
    # trainer.progress=false) | always | never.
    console: str = "auto"


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
    # A run directory or a checkpoint step directory: evaluate it (trainer.mode=eval, scripts/eval.py) or start
    # training from its weights (a fresh optimiser, step 0). A run directory gives its best checkpoint, else its latest.
    ckpt_path: str | None = None
    # Free-form labels, passed to W&B / MLflow and recorded in summary.json.
    tags: list[str] = field(default_factory=list)
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
