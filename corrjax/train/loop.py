"""The training loop behind ``scripts/train.py``: one readable function from a composed config to a summary.

``run(cfg)`` initialises multi-host JAX when asked (before any other JAX call), builds the mesh, data, model and
optimiser from the config groups, restores the latest checkpoint with ``trainer.resume=true``, then steps the
jitted :func:`~corrjax.train.step.make_train_step` over global batches from :class:`corrjax.data.BatchIterator`,
logging every ``trainer.log_every`` steps, evaluating every ``trainer.eval_every`` and checkpointing every
``trainer.checkpoint_every``. Process 0 alone writes ``metrics.jsonl``, TensorBoard events, ``summary.json`` and
``plots/``; every process takes part in checkpointing (Orbax coordinates them). Ctrl-C (SIGINT) finishes the
current step, saves a checkpoint and exits; non-finite steps are skipped and training stops with
:class:`NonFiniteError` after ``trainer.max_nonfinite_in_a_row`` consecutive ones.
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from corrjax.train import distributed, rundir, targets

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Raised when too many consecutive steps had non-finite losses or gradients."""


def hydra_run_dir() -> Path:
    """The Hydra job's output directory (the current directory outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path.cwd()


def make_mesh(parallel: Any) -> jax.sharding.Mesh:
    """A 1-D mesh over ``parallel.data`` devices (-1: all), axis ``parallel.axis_name``, Auto axis type so GSPMD
    propagates shardings inside the model."""
    n = jax.device_count() if parallel.data in (-1, None) else int(parallel.data)
    if n < 1 or n > jax.device_count():
        raise ValueError(f"`parallel.data`={parallel.data} but {jax.device_count()} devices are available")
    auto = (jax.sharding.AxisType.Auto,)
    return jax.make_mesh((n,), (parallel.axis_name,), axis_types=auto, devices=jax.devices()[:n])


def select_tasks(available: Any, names: Any) -> tuple:
    """The dataset's task specs, restricted to ``names`` (in the dataset's order) when given."""
    available = tuple(available)
    if names is None:
        return available
    known = {t.name for t in available}
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"`tasks`={list(names)} must name some of the dataset's tasks {sorted(known)}")
    return tuple(t for t in available if t.name in set(names))


def to_global(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """Host values identical on every process -> global arrays with ``sharding``."""
    host = jax.device_get(tree)
    return jax.tree.map(
        lambda v: jax.make_array_from_callback(np.shape(v), sharding, lambda i, v=v: np.asarray(v)[i]), host
    )


class _Interrupt:
    """SIGINT (Ctrl-C) or SIGTERM (e.g. SLURM preemption) sets a flag the loop checks after each step, so the
    step finishes, a checkpoint is saved and the run exits; a second Ctrl-C interrupts at once. ``signum`` is the
    first signal received (the summary records it as ``stopped_by_signal``)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Interrupt:
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave the handlers alone
                break
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = self.signum or signum
        log.warning("signal %d: finishing this step and saving a checkpoint (Ctrl-C again to abort)", signum)

    def agree(self, signum: int) -> bool:
        """Adopts ``signum`` (the signal some process received, 0 for none) as this process's; True if any."""
        if signum and not self.requested:
            self.requested, self.signum = True, signum
            log.warning("signal %d reached another process: saving a checkpoint and stopping with it", signum)
        return bool(signum)

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


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


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Trains as ``cfg`` says and returns the final summary (also written to ``summary.json`` by process 0).

    Raises ``ValueError`` at once, naming the key, for a ``seed`` outside ``[0, 2**31)``, a ``trainer`` count
    below its minimum (:func:`corrjax.train.config.check_trainer`) or a ``_target_`` outside the allow-list
    (:func:`corrjax.train.targets.check_config`). The run holds its directory for its whole life
    (:func:`corrjax.train.rundir.claim`): a second run there fails at once, and a fresh run in a directory with a
    previous run's results fails unless ``trainer.overwrite=true``."""
    from corrjax.data.iterator import check_seed  # touches no JAX device
    from corrjax.train.config import check_trainer

    check_seed(cfg.seed)
    check_trainer(cfg.trainer)
    targets.check_config(cfg)
    distributed.maybe_initialize(cfg.parallel.distributed)
    run_dir = Path(distributed.broadcast_str(str(Path(run_dir or hydra_run_dir()).absolute())))
    with rundir.claim(run_dir, resume=bool(cfg.trainer.resume), overwrite=bool(cfg.trainer.get("overwrite"))):
        return _train(cfg, run_dir)


def _train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """:func:`run`'s body, in the run directory it holds."""
    for noisy in ("absl", "orbax", "jax._src.xla_bridge", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    # Imported after distributed initialisation: these touch JAX devices when used.
    from corrjax.data import BatchIterator
    from corrjax.models import shared_mask
    from corrjax.train import builders, checkpoint, evaluate, losses, optimizer, plots, report, state, step, writers

    main = distributed.is_main_process()
    multi_process = jax.process_count() > 1
    tc = cfg.trainer
    mesh = make_mesh(cfg.parallel)
    rep, data_sharding = step.replicated(mesh), step.batch_sharding(mesh, cfg.parallel.axis_name)
    if tc.batch_size % mesh.devices.size:
        raise ValueError(f"`trainer.batch_size`={tc.batch_size} must be divisible by the {mesh.devices.size} devices")

    train_ds = instantiate(cfg.data, split="train")
    eval_ds = instantiate(cfg.data, split=tc.eval_split)
    tasks = select_tasks(train_ds.tasks, cfg.get("tasks"))
    names = [t.name for t in tasks]
    model = builders.build_model(cfg.model, tasks, np.shape(train_ds[0]["x"]), cfg.seed)
    mask = shared_mask(model)
    graphdef, params, rest = state.split_model(model)
    tx = optimizer.build_optimizer(cfg.mtl, cfg.optim, mask, len(tasks))
    regularizer, reg_weight = None, 0.0
    if cfg.get("regularizer") is not None and cfg.regularizer.get("fn") is not None:
        regularizer, reg_weight = instantiate(cfg.regularizer.fn), float(cfg.regularizer.weight)
    loss_fns = losses.task_loss_fns(tasks, OmegaConf.to_container(cfg.task_losses))
    train_step, eval_step, noise_step = step.jit_steps(
        step.make_train_step(
            graphdef, tasks, loss_fns, tx, mask, regularizer=regularizer, regularizer_weight=reg_weight
        ),
        step.make_eval_step(graphdef),
        mesh,
        cfg.parallel.axis_name,
        step.make_noise_scale_step(graphdef, tasks, loss_fns),
    )
    init = jax.jit(lambda p, r: state.create_state(p, r, tx, cfg.seed), out_shardings=rep)
    train_state = init(to_global(params, rep), to_global(rest, rep))
    n_params = sum(int(np.size(x)) for x in jax.tree.leaves(params))
    log.info("model %s: %d parameters; tasks %s; mesh %s", type(model).__name__, n_params, names, dict(mesh.shape))

    rep_fn = evaluate.make_representation_fn(graphdef)
    n_rep = min(len(eval_ds), 256)
    rep_x = np.asarray(eval_ds.get_batch(np.arange(n_rep))["x"])
    # The shared representation at every evaluation (for the CKA over training), kept in the run dir so that a
    # resumed run's matrix covers the evaluations before the interruption too.
    shared_history: list[tuple[int, np.ndarray]] = []
    history_dir = run_dir / "representations"

    def run_eval(at_step: int) -> dict[str, Any]:
        out = evaluate.evaluate(eval_step, train_state, eval_ds, tasks, data_sharding, tc.eval_batch_size)
        if n_rep >= 4:
            diag = evaluate.representation_diagnostics(rep_fn, train_state, rep_x, data_sharding)
            if shared_history and shared_history[-1][0] == at_step:  # re-evaluated (a finished run resumed)
                shared_history.pop()
            shared_history.append((at_step, diag.pop("shared")))
            if main:
                writers.save_snapshot(history_dir, at_step, shared_history[-1][1])
            out.update(diag)
        return out

    iterator = BatchIterator(train_ds, tc.batch_size, seed=cfg.seed, sharding=data_sharding, prefetch=2)
    fingerprint = checkpoint.data_fingerprint(
        cfg.data,
        num_examples=len(train_ds),
        seed=cfg.seed,
        batch_size=tc.batch_size,
        steps_per_epoch=iterator.steps_per_epoch,
    )
    ckpt = checkpoint.Checkpointer(
        run_dir / "checkpoints", keep=tc.keep_checkpoints, async_save=tc.async_checkpointing, fingerprint=fingerprint
    )
    start = 0
    try:
        restored = ckpt.restore_latest(checkpoint.abstract_like(train_state)) if tc.resume else None
    except Exception:
        ckpt.close()
        iterator.close()
        raise
    if restored is not None:
        train_state, data_state, start = restored
        iterator.set_state(data_state)
        log.info("resumed from step %d (%s)", start, ckpt.directory)
    elif tc.resume:
        log.info("trainer.resume=true but no checkpoint in %s: starting from scratch", ckpt.directory)

    writer = None
    if start > 0:
        shared_history.extend(writers.load_snapshots(history_dir, start))
    if main:
        if tc.resume:  # the steps after the checkpoint are trained again: their old records go
            writers.truncate_jsonl(run_dir / "metrics.jsonl", start)
            writers.truncate_snapshots(history_dir, start)
        writer = writers.MetricsWriter(
            run_dir,
            jsonl=cfg.logger.jsonl,
            tensorboard=cfg.logger.tensorboard,
            purge_step=start + 1 if tc.resume else None,
        )

    last_eval: dict[str, Any] = {}
    last_train: dict[str, Any] = {}
    s = start
    t_window, n_window = time.perf_counter(), 0
    t_start = time.perf_counter()
    try:
        with _Interrupt() as interrupt, _progress(tc.progress and main) as progress:
            bar = progress.add_task("train", total=tc.max_steps, completed=start, info="")
            while s < tc.max_steps:
                batch = next(iterator)
                train_state, metrics = train_step(train_state, batch)
                s += 1
                n_window += 1
                progress.update(bar, advance=1)
                record: dict[str, Any] = {}
                if s % tc.log_every == 0 or s == tc.max_steps:
                    if tc.noise_scale:
                        metrics = {**metrics, **noise_step(train_state, batch)}
                    host = jax.device_get(metrics)
                    host.pop("train/finite")
                    dt = time.perf_counter() - t_window
                    host["train/examples_per_s"] = n_window * tc.batch_size / max(dt, 1e-9)
                    host["train/nonfinite_total"] = int(train_state.nonfinite_total)
                    t_window, n_window = time.perf_counter(), 0
                    record.update(host)
                    last_train = host
                    progress.update(bar, info=f"loss {float(host['train/loss']):.4f}")
                    if int(train_state.nonfinite_max_streak) >= tc.max_nonfinite_in_a_row:
                        raise NonFiniteError(
                            f"{int(train_state.nonfinite_max_streak)} consecutive steps with non-finite losses or "
                            f"gradients by step {s} (trainer.max_nonfinite_in_a_row={tc.max_nonfinite_in_a_row}); "
                            "lower the learning rate or check the data"
                        )
                if tc.eval_every and (s % tc.eval_every == 0 or s == tc.max_steps):
                    last_eval = run_eval(s)
                    record.update(last_eval)
                if record and writer is not None:
                    writer.write(s, record)
                signalled = interrupt.requested
                if multi_process:
                    # Processes must stop on the same step (the checkpoint save and the next step are collectives),
                    # but a signal reaches them at different points: they agree at the logging steps, which wait
                    # for the device anyway (a stop then comes at most log_every - 1 steps after the signal), and
                    # those the signal did not reach record it too.
                    signalled = False
                    if s % tc.log_every == 0 or s == tc.max_steps:
                        signalled = interrupt.agree(distributed.process_max(interrupt.signum or 0))
                stop = signalled or (tc.stop_after is not None and s - start >= tc.stop_after)
                if (tc.checkpoint_every and s % tc.checkpoint_every == 0) or s == tc.max_steps or stop:
                    ckpt.save(s, train_state, iterator.get_state(), force=True)
                if stop:
                    log.warning("stopping at step %d (checkpoint saved; continue with trainer.resume=true)", s)
                    break
    finally:
        iterator.close()
        ckpt.close()
        if writer is not None:
            writer.close()

    if not last_eval:
        last_eval = run_eval(s)
    if not last_train and start > 0 and main and cfg.logger.jsonl:
        # Nothing trained in this invocation (a finished run resumed): the last logged train record still holds.
        logged = [r for r in writers.read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]
        if logged:
            last_train = {k: v for k, v in logged[-1].items() if k.startswith("train/")}
    summary: dict[str, Any] = {
        "step": s,
        "completed": s >= tc.max_steps,
        "stopped_by_signal": signal.Signals(interrupt.signum).name if interrupt.signum else None,
        "num_params": n_params,
        "nonfinite_total": int(train_state.nonfinite_total),
        "wall_time_s": time.perf_counter() - t_start,
        "tasks": names,
        **last_train,
        **last_eval,
    }
    if len(shared_history) > 1:
        summary["eval/shared_cka_steps"] = [k for k, _ in shared_history]
        summary["eval/shared_cka_over_training"] = evaluate.cka_over_training([r for _, r in shared_history])
    if main:
        writers.write_summary(run_dir, summary)
        if cfg.logger.plots:
            records = writers.read_jsonl(run_dir / "metrics.jsonl") if cfg.logger.jsonl else []
            plots.plot_run(run_dir, records, writers.to_jsonable(summary), names)
        report.print_report(run_dir, summary, tasks)
    distributed.sync("corrjax-train-end")
    return summary
