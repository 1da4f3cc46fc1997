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
uninterrupted run's; a stopped run's summary holds the evaluations of its own invocation only. Every evaluation (of
``trainer.eval_split``, the validation split by default) feeds model selection (:mod:`corrjax.train.selection`: the
monitor, the best checkpoint, early stopping); a finished run then tests the selected checkpoint on
``trainer.test_split`` (``test/...``). ``ckpt_path`` and ``trainer.mode=eval``: :mod:`corrjax.train.eval_run`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import jax
from omegaconf import DictConfig

from corrjax.train import compile_cache, distributed, rundir, targets
from corrjax.train.console import make_console
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


def restore_or_start(
    ckpt: Any, state: Any, iterator: Any, *, resume: bool, selector: Any = None, ckpt_path: str | None = None
) -> tuple[Any, int]:
    """``(state, step)`` to continue from: with ``resume``, the newest valid checkpoint's state, data position and
    model-selection state (:meth:`~corrjax.train.checkpoint.Checkpointer.restore_latest`: damaged ones are reported
    and set aside; the iterator is moved there, ``selector`` continues), else ``state`` at step 0, with the model of
    ``ckpt_path`` when given (fine-tuning: :mod:`corrjax.train.eval_run`)."""
    from corrjax.train import checkpoint, eval_run

    restored = ckpt.restore_latest(checkpoint.abstract_like(state)) if resume else None
    if restored is not None:
        iterator.set_state(restored.data_state)
        if selector is not None:
            selector.load(restored.selection)
        log.info("resumed from step %d (%s)", restored.step, ckpt.directory)
        return restored.state, restored.step
    if resume:
        log.info("trainer.resume=true but no checkpoint in %s: starting from scratch", ckpt.directory)
    if ckpt_path:
        step_dir = eval_run.resolve_ckpt_path(ckpt_path)
        state = eval_run.restore_model(step_dir, state)
        log.info("starting from the model of %s (ckpt_path)", step_dir)
    return state, 0


def _open_writer(run_dir: Path, cfg: DictConfig, tasks: list[str], *, start: int, resume: bool, main: bool):
    """Process 0's metrics writer (:func:`corrjax.train.writers.open_metrics_writer`); a resumed run first drops
    the records (and hides the TensorBoard events) past its checkpoint."""
    from corrjax.train import writers

    if not main:
        return None
    return writers.open_metrics_writer(run_dir, cfg, labels=tasks, start=start, resume=resume)


def _check_finite(state: Any, step: int, limit: int) -> None:
    streak = int(state.nonfinite_max_streak)
    if streak >= limit:
        raise NonFiniteError(
            f"{streak} consecutive steps with non-finite losses or gradients by step {step} "
            f"(trainer.max_nonfinite_in_a_row={limit}); lower the learning rate or check the data"
        )


def _progress(enabled: bool):
    """The rich progress bar, drawn only on a terminal (or notebook) and with ``trainer.progress``."""
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
        console=(console := make_console()),
        disable=not (enabled and (console.is_terminal or console.is_jupyter)),
        transient=False,
    )


def _logged_train_record(run_dir: Path, cfg: DictConfig, main: bool) -> dict[str, Any]:
    """The last train record of ``metrics.jsonl`` (a finished run resumed trains nothing: it still holds)."""
    from corrjax.train import writers

    if not (main and cfg.logger.jsonl and (run_dir / "metrics.jsonl").exists()):
        return {}
    logged = [r for r in writers.read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]
    return {k: v for k, v in logged[-1].items() if k.startswith("train/")} if logged else {}


def _write_outputs(run_dir: Path, cfg: DictConfig, summary: dict[str, Any], tasks: Any, writer: Any = None) -> None:
    """``summary.json`` (and the summary to ``writer``'s trackers), ``plots/``, the report."""
    from corrjax.train import plots, report, writers

    writers.write_summary(run_dir, summary)
    if writer is not None:
        writer.write_summary(writers.to_jsonable(summary))
    if cfg.logger.plots:
        records = writers.read_jsonl(run_dir / "metrics.jsonl") if cfg.logger.jsonl else []
        plots.plot_run(run_dir, records, writers.to_jsonable(summary), [t.name for t in tasks])
    report.print_report(run_dir, summary, tasks, make_console())


def _initialize(cfg: DictConfig) -> None:
    """Refuses a bad ``seed``, ``trainer`` count or ``_target_`` before anything runs, then initialises multi-host
    JAX when asked (before any other JAX call) and quietens the libraries' loggers."""
    from corrjax.data.iterator import check_seed  # touches no JAX device
    from corrjax.train.config import check_loader, check_trainer, check_values
    from corrjax.train.selection import check_config
    from corrjax.train.writers import check_logger

    check_seed(cfg.seed)
    check_trainer(cfg.trainer)
    check_config(cfg)
    check_logger(cfg.logger)
    check_values(cfg)
    check_loader(cfg.get("loader", {}))
    targets.check_config(cfg)
    distributed.maybe_initialize(cfg.parallel.distributed)
    compile_cache.configure(cfg.trainer.get("compilation_cache_dir", "auto"))
    for noisy in ("absl", "orbax", "jax._src.xla_bridge", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _train(state, start, iterator, steps, evaluator, writer, ckpt, interrupt, tc, progress, selector, lines=None):
    """Steps from ``start`` to ``trainer.max_steps`` (or a stop, or early stopping); returns ``(state, step, last
    train record, last evaluation)``. Periodic work by :func:`every`: log (and the noise scale, and a console line
    with ``lines``, a :class:`corrjax.train.console.StepLines`), evaluate (and select:
    :mod:`corrjax.train.selection`), checkpoint (also at an evaluation that improved the monitor, with
    ``trainer.keep_best``)."""
    from corrjax.train import tracking

    last_train, last_eval, s = {}, {}, start
    throughput = tracking.Throughput(tc.batch_size)
    bar = progress.add_task("train", total=tc.max_steps, completed=start, info="")
    while s < tc.max_steps and not selector.stopped:
        batch = next(iterator)
        state, metrics = steps.train(state, batch)
        s, record, logging_step = s + 1, {}, every(s + 1, tc.log_every, tc.max_steps)
        throughput.tick()
        progress.update(bar, advance=1)
        if logging_step:
            if steps.noise is not None:
                state, noise_metrics = steps.noise(state, batch)
                metrics = {**metrics, **noise_metrics}
            record = last_train = tracking.train_record(
                jax.device_get(metrics), examples_per_s=throughput.rate(), nonfinite_total=state.nonfinite_total
            )
            progress.update(bar, info=f"loss {float(last_train['train/loss']):.4f}")
            if lines is not None:
                lines.train(s, last_train, examples_per_s=last_train["train/examples_per_s"])
            _check_finite(state, s, tc.max_nonfinite_in_a_row)
        improved = False
        if every(s, tc.eval_every, tc.max_steps):
            last_eval, improved = selector.observe(evaluator(state, s), s)
            record = {**record, **last_eval}
            if lines is not None:
                lines.eval(s, last_eval)
        if record and writer is not None:
            writer.write(s, record)
        stop = interrupt.should_stop(logging_step) or (tc.stop_after is not None and s - start >= tc.stop_after)
        if (
            every(s, tc.checkpoint_every, tc.max_steps)
            or s == tc.max_steps
            or stop
            or selector.stopped
            or (improved and tc.keep_best)
        ):
            ckpt.save(
                s,
                state,
                iterator.get_state(),
                force=True,
                metric=selector.metric_at(s),
                selection=selector.state.to_json(),
            )
        if selector.stopped:
            log.info(
                "early stopping at step %d: %s did not improve for %d evaluations",
                s,
                selector.monitor.name,
                selector.state.bad_evals,
            )
            break
        if stop:
            log.warning("stopping at step %d (checkpoint saved; continue with trainer.resume=true)", s)
            break
    return state, s, last_train, last_eval


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Trains as ``cfg`` says and returns the final summary (also written to ``summary.json`` by process 0).

    Raises ``ValueError`` at once, naming the key, for a ``seed`` outside ``[0, 2**31)``, a ``trainer`` count
    below its minimum (:func:`corrjax.train.config.check_trainer`), a negative rate or non-positive size in the
    target groups (:func:`corrjax.train.config.check_values`) or a ``_target_`` outside the allow-list
    (:func:`corrjax.train.targets.check_config`). The run holds its directory for its whole life
    (:func:`corrjax.train.rundir.claim`): a second run there fails at once, and a fresh run in a directory with a
    previous run's results fails unless ``trainer.overwrite=true``."""
    from corrjax.train import eval_run

    _initialize(cfg)
    run_dir = Path(distributed.broadcast_str(str(Path(run_dir or hydra_run_dir()).absolute())))
    eval_run.check_source(cfg, run_dir)
    with rundir.claim(run_dir, resume=bool(cfg.trainer.resume), overwrite=bool(cfg.trainer.overwrite)):
        return eval_run.run_eval(cfg, run_dir) if cfg.trainer.mode == "eval" else _run(cfg, run_dir)


def _run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """:func:`run`'s body, in the run directory it holds."""
    from corrjax.data import BatchIterator  # imported after distributed initialisation, as everything below
    from corrjax.train import checkpoint, config, console, eval_run, evaluate, selection, sharding, tracking
    from corrjax.train.setup import build

    tc, main, t_start = cfg.trainer, distributed.is_main_process(), time.perf_counter()
    mesh = sharding.make_mesh(cfg.parallel)
    if tc.batch_size % mesh.devices.size:
        raise ValueError(f"`trainer.batch_size`={tc.batch_size} must be divisible by the {mesh.devices.size} devices")
    if (tc.batch_size // tc.grad_accum_steps) % mesh.devices.size:  # every device holds part of every micro-batch
        raise ValueError(
            f"`trainer.batch_size`={tc.batch_size} must be divisible by `trainer.grad_accum_steps`="
            f"{tc.grad_accum_steps} x the {mesh.devices.size} devices"
        )
    min_size = int(cfg.parallel.get("fsdp_min_size", 2**14))
    setup = build(cfg, task_grad_constraint=sharding.task_grad_constraint(mesh, min_size))
    selector = selection.Selector.from_config(tc, setup.tasks)
    state_sharding = sharding.state_shardings(setup.abstract_state(), mesh, min_size)
    steps = sharding.jit_setup_steps(setup, mesh, cfg.parallel.axis_name, state_sharding)
    data_sharding = sharding.batch_sharding(mesh, cfg.parallel.axis_name)
    state = setup.init_state(state_sharding)
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
        run_dir / "checkpoints",
        keep=tc.keep_checkpoints,
        async_save=tc.async_checkpointing,
        fingerprint=fingerprint,
        best_mode=selector.monitor.mode if tc.keep_best else None,
    )
    try:
        state, start = restore_or_start(
            ckpt, state, iterator, resume=tc.resume, selector=selector, ckpt_path=cfg.get("ckpt_path")
        )
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
        reported=setup.reported_tasks,  # untrained extra outputs (ESMM's CVR), evaluated too
        **config.loader_options(cfg.loader, setup.eval_data),
    )
    writer = _open_writer(run_dir, cfg, setup.names, start=start, resume=tc.resume, main=main)
    try:
        with Interrupt() as interrupt, _progress(tc.progress and main) as progress, console.logs_above(progress):
            lines = None
            if main and console.lines_enabled(cfg.logger.console, bar_shown=not progress.disable):
                lines = console.StepLines(setup.names, tc.max_steps, tc.batch_size, progress)
            state, s, last_train, last_eval = _train(
                state, start, iterator, steps, evaluator, writer, ckpt, interrupt, tc, progress, selector, lines
            )
    except BaseException:
        if writer is not None:
            writer.close()
        raise
    finally:
        iterator.close()
        evaluator.close()
        ckpt.close()

    try:  # the writer stays open for the final summary (W&B / MLflow get it too)
        finished = s >= tc.max_steps or selector.stopped
        if finished and evaluator.last_step != s:  # eval_every=0, or a finished run resumed: evaluate once
            last_eval, _ = selector.observe(evaluator(state, s), s)
            evaluator.close()
        test = {}  # the selected state on trainer.test_split
        if finished and tc.test_split:
            test = eval_run.test_best(cfg, setup, steps, state, s, selector, run_dir, data_sharding)
        summary = tracking.summary(
            step=s,
            completed=finished,
            signum=interrupt.signum,
            num_params=setup.num_params,
            nonfinite_total=int(state.nonfinite_total),
            wall_time_s=time.perf_counter() - t_start,
            tasks=setup.names,
            last_train=last_train or (_logged_train_record(run_dir, cfg, main) if start > 0 else {}),
            last_eval=last_eval,
            tracker=tracker,
            tags=list(cfg.get("tags") or []),
            **selector.summary(),
        )
        summary.update(test)
        if main:
            _write_outputs(run_dir, cfg, summary, setup.tasks, writer)
    finally:
        if writer is not None:
            writer.close()
    distributed.sync("corrjax-train-end")
    return summary
