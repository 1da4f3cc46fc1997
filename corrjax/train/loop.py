"""The training loop behind ``scripts/train.py``: one readable function from a composed config to a summary.

``run(cfg)`` initialises multi-host JAX when asked (before any other JAX call), builds the run with
:func:`corrjax.train.setup.build`, jits its steps with the mesh's shardings (:mod:`corrjax.train.sharding`),
restores the latest checkpoint with ``trainer.resume=true``, then steps over global batches from
:class:`corrjax.data.BatchIterator`. Periodic work follows one rule, :func:`every`: logging every
``trainer.log_every`` steps, evaluating every ``trainer.eval_every`` and checkpointing every
``trainer.checkpoint_every``, each also at the last step. Process 0 alone writes ``metrics.jsonl``, TensorBoard
events, ``summary.json`` and ``plots/``; every process takes part in checkpointing (Orbax coordinates them). Ctrl-C
or SIGTERM finishes the current step, saves a checkpoint and stops (:mod:`corrjax.train.signals`); non-finite steps
are skipped and training stops with :class:`NonFiniteError` after ``trainer.max_nonfinite_in_a_row`` consecutive
ones. A stop evaluates nothing the uninterrupted run would not, so a resumed run's files and summary equal the
uninterrupted run's; a stopped run's summary holds the evaluations of its own invocation only.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import jax
from omegaconf import DictConfig

from corrjax.train import distributed, rundir, targets
from corrjax.train.signals import Interrupt

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Raised when too many consecutive steps had non-finite losses or gradients."""


def every(step: int, period: int, last: int | None = None) -> bool:
    """The loop's one rule for periodic work: True when ``period`` > 0 and ``step`` is a multiple of it or the
    ``last`` step (a period of 0 means never)."""
    return period > 0 and (step % period == 0 or step == last)


def hydra_run_dir() -> Path:
    """The Hydra job's output directory (the current directory outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path.cwd()


def restore_or_start(ckpt: Any, state: Any, iterator: Any, *, resume: bool) -> tuple[Any, int]:
    """``(state, step)`` to continue from: with ``resume``, the newest valid checkpoint's state and data position
    (:meth:`~corrjax.train.checkpoint.Checkpointer.restore_latest`: damaged ones are reported and set aside; the
    iterator is moved there), else ``state`` at step 0."""
    from corrjax.train import checkpoint

    restored = ckpt.restore_latest(checkpoint.abstract_like(state)) if resume else None
    if restored is not None:
        state, data_state, start = restored
        iterator.set_state(data_state)
        log.info("resumed from step %d (%s)", start, ckpt.directory)
        return state, start
    if resume:
        log.info("trainer.resume=true but no checkpoint in %s: starting from scratch", ckpt.directory)
    return state, 0


def _open_writer(run_dir: Path, logger: Any, *, start: int, resume: bool, main: bool):
    """Process 0's metrics writer; a resumed run first drops the records (and hides the TensorBoard events) past
    its checkpoint."""
    from corrjax.train import writers

    if not main:
        return None
    if resume:
        writers.truncate_jsonl(run_dir / "metrics.jsonl", start)
    return writers.MetricsWriter(
        run_dir, jsonl=logger.jsonl, tensorboard=logger.tensorboard, purge_step=start + 1 if resume else None
    )


def _check_finite(state: Any, step: int, limit: int) -> None:
    streak = int(state.nonfinite_max_streak)
    if streak >= limit:
        raise NonFiniteError(
            f"{streak} consecutive steps with non-finite losses or gradients by step {step} "
            f"(trainer.max_nonfinite_in_a_row={limit}); lower the learning rate or check the data"
        )


def _progress(enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        disable=not enabled,
        transient=False,
    )


def _logged_train_record(run_dir: Path, cfg: DictConfig, main: bool) -> dict[str, Any]:
    """The last train record of ``metrics.jsonl`` (a finished run resumed trains nothing: it still holds)."""
    from corrjax.train import writers

    if not (main and cfg.logger.jsonl and (run_dir / "metrics.jsonl").exists()):
        return {}
    logged = [r for r in writers.read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]
    return {k: v for k, v in logged[-1].items() if k.startswith("train/")} if logged else {}


def _write_outputs(run_dir: Path, cfg: DictConfig, summary: dict[str, Any], tasks: Any) -> None:
    from corrjax.train import plots, report, writers

    writers.write_summary(run_dir, summary)
    if cfg.logger.plots:
        records = writers.read_jsonl(run_dir / "metrics.jsonl") if cfg.logger.jsonl else []
        plots.plot_run(run_dir, records, writers.to_jsonable(summary), [t.name for t in tasks])
    report.print_report(run_dir, summary, tasks)


def _initialize(cfg: DictConfig) -> None:
    """Refuses a bad ``seed``, ``trainer`` count or ``_target_`` before anything runs, then initialises multi-host
    JAX when asked (before any other JAX call) and quietens the libraries' loggers."""
    from corrjax.data.iterator import check_seed  # touches no JAX device
    from corrjax.train.config import check_loader, check_trainer

    check_seed(cfg.seed)
    check_trainer(cfg.trainer)
    check_loader(cfg.get("loader", {}))
    targets.check_config(cfg)
    distributed.maybe_initialize(cfg.parallel.distributed)
    for noisy in ("absl", "orbax", "jax._src.xla_bridge", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _train(state, start, iterator, steps, evaluator, writer, ckpt, interrupt, tc, progress):
    """Steps from ``start`` to ``trainer.max_steps`` (or a stop); returns ``(state, step, last train record, last
    evaluation)``. Periodic work by :func:`every`: log (and the noise scale), evaluate, checkpoint."""
    from corrjax.train import tracking

    last_train, last_eval, s = {}, {}, start
    throughput = tracking.Throughput(tc.batch_size)
    bar = progress.add_task("train", total=tc.max_steps, completed=start, info="")
    while s < tc.max_steps:
        batch = next(iterator)
        state, metrics = steps.train(state, batch)
        s, record, logging_step = s + 1, {}, every(s + 1, tc.log_every, tc.max_steps)
        throughput.tick()
        progress.update(bar, advance=1)
        if logging_step:
            if tc.noise_scale:
                metrics = {**metrics, **steps.noise(state, batch)}
            record = last_train = tracking.train_record(
                jax.device_get(metrics), examples_per_s=throughput.rate(), nonfinite_total=state.nonfinite_total
            )
            progress.update(bar, info=f"loss {float(last_train['train/loss']):.4f}")
            _check_finite(state, s, tc.max_nonfinite_in_a_row)
        if every(s, tc.eval_every, tc.max_steps):
            last_eval = evaluator(state, s)
            record = {**record, **last_eval}
        if record and writer is not None:
            writer.write(s, record)
        stop = interrupt.should_stop(logging_step) or (tc.stop_after is not None and s - start >= tc.stop_after)
        if every(s, tc.checkpoint_every, tc.max_steps) or s == tc.max_steps or stop:
            ckpt.save(s, state, iterator.get_state(), force=True)
        if stop:
            log.warning("stopping at step %d (checkpoint saved; continue with trainer.resume=true)", s)
            break
    return state, s, last_train, last_eval


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Trains as ``cfg`` says and returns the final summary (also written to ``summary.json`` by process 0).

    Raises ``ValueError`` at once, naming the key, for a ``seed`` outside ``[0, 2**31)``, a ``trainer`` count
    below its minimum (:func:`corrjax.train.config.check_trainer`) or a ``_target_`` outside the allow-list
    (:func:`corrjax.train.targets.check_config`). The run holds its directory for its whole life
    (:func:`corrjax.train.rundir.claim`): a second run there fails at once, and a fresh run in a directory with a
    previous run's results fails unless ``trainer.overwrite=true``."""
    _initialize(cfg)
    run_dir = Path(distributed.broadcast_str(str(Path(run_dir or hydra_run_dir()).absolute())))
    with rundir.claim(run_dir, resume=bool(cfg.trainer.resume), overwrite=bool(cfg.trainer.overwrite)):
        return _run(cfg, run_dir)


def _run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """:func:`run`'s body, in the run directory it holds."""
    from corrjax.data import BatchIterator  # imported after distributed initialisation, as everything below
    from corrjax.train import checkpoint, config, evaluate, sharding, tracking
    from corrjax.train.setup import build

    tc, main, t_start = cfg.trainer, distributed.is_main_process(), time.perf_counter()
    mesh = sharding.make_mesh(cfg.parallel)
    if tc.batch_size % mesh.devices.size:
        raise ValueError(f"`trainer.batch_size`={tc.batch_size} must be divisible by the {mesh.devices.size} devices")
    setup = build(cfg)
    steps = sharding.jit_setup_steps(setup, mesh, cfg.parallel.axis_name)
    data_sharding = sharding.batch_sharding(mesh, cfg.parallel.axis_name)
    state = setup.init_state(sharding.replicated(mesh))
    log.info("model %s: %d parameters; tasks %s; mesh %s", setup.model_name, setup.num_params, setup.names, mesh.shape)

    loader = config.loader_options(cfg.loader, setup.train_data)
    iterator = BatchIterator(setup.train_data, tc.batch_size, seed=cfg.seed, sharding=data_sharding, **loader)
    fingerprint = checkpoint.data_fingerprint(
        cfg.data,
        num_examples=len(setup.train_data),
        seed=cfg.seed,
        batch_size=tc.batch_size,
        steps_per_epoch=iterator.steps_per_epoch,
    )
    ckpt = checkpoint.Checkpointer(
        run_dir / "checkpoints", keep=tc.keep_checkpoints, async_save=tc.async_checkpointing, fingerprint=fingerprint
    )
    try:
        state, start = restore_or_start(ckpt, state, iterator, resume=tc.resume)
    except Exception:
        ckpt.close()
        iterator.close()
        raise
    tracker = tracking.RepresentationTracker(run_dir / "representations", write=main)
    tracker.load(start)
    evaluator = evaluate.Evaluator(
        steps.eval,
        steps.representation,
        setup.eval_data,
        setup.tasks,
        data_sharding,
        tc.eval_batch_size,
        tracker,
        **config.loader_options(cfg.loader, setup.eval_data),
    )
    writer = _open_writer(run_dir, cfg.logger, start=start, resume=tc.resume, main=main)
    try:
        with Interrupt() as interrupt, _progress(tc.progress and main) as progress:
            state, s, last_train, last_eval = _train(
                state, start, iterator, steps, evaluator, writer, ckpt, interrupt, tc, progress
            )
    finally:
        iterator.close()
        evaluator.close()
        ckpt.close()
        if writer is not None:
            writer.close()

    if s >= tc.max_steps and evaluator.last_step != s:  # eval_every=0, or a finished run resumed: evaluate once
        last_eval = evaluator(state, s)
        evaluator.close()
    summary = tracking.summary(
        step=s,
        completed=s >= tc.max_steps,
        signum=interrupt.signum,
        num_params=setup.num_params,
        nonfinite_total=int(state.nonfinite_total),
        wall_time_s=time.perf_counter() - t_start,
        tasks=setup.names,
        last_train=last_train or (_logged_train_record(run_dir, cfg, main) if start > 0 else {}),
        last_eval=last_eval,
        tracker=tracker,
    )
    if main:
        _write_outputs(run_dir, cfg, summary, setup.tasks)
    distributed.sync("corrjax-train-end")
    return summary
