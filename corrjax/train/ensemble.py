"""Many seeds of one configuration trained at once: the run's own train step, mapped over seeds in one program.

A seed study of a small model (the MMoE paper's synthetic experiment trains ~15k-parameter networks on batches of
128) spends much of each :func:`corrjax.train.loop.run` step in dispatch rather than arithmetic, and compiles again
for every seed. :func:`train_seeds` builds every seed with the loop's own :func:`corrjax.train.setup.build` (its
data, model, regulariser and optimiser state, from the config with that seed), stacks the states along a leading
seed axis, and compiles one program: a ``lax.scan`` over the steps between two evaluations whose body runs the
setup's train step for every seed (``jax.lax.map`` over the seed axis, ``seed_batch`` seeds vectorised at a time)
and, at the logging steps, its gradient-noise-scale step (when the train step does not estimate the noise scale
itself: :func:`corrjax.train.setup.noise_scale_in_step`), as the loop does. Each seed
reads the batches its own :class:`~corrjax.data.BatchIterator` would hand it (the epoch order depends on the seed),
so seed ``s`` of an ensemble computes what the single run with ``seed=s`` computes, up to floating-point
reassociation: the two agree to ~1e-7 over the tests' short runs, and over long runs the rounding differences grow
as any perturbation of a training trajectory does (the MMoE study's 3000-step test-loss curves: median 0.1% apart
per point), so an ensemble reproduces a Hydra sweep statistically, not bit for bit.

On CPU, running the seeds one after another inside the program (``seed_batch=1``) is the fastest choice measured for
the MMoE study's models: 50 seeds take 14 ms per step for the shared-bottom model (25 ms vectorised with
``jax.vmap``) and 21 ms for MMoE (20 ms vectorised; 18 ms ten at a time), against 1.0 ms per step for one
shared-bottom seed in the loop (so 3.5x per seed). Evaluation is 3.5x faster seed by seed than vectorised, where XLA
turns the seeds' products into one batched product of small matrices.

Every seed gets a run directory in the loop's layout (``metrics.jsonl`` with the train metrics every
``trainer.log_every`` steps and the evaluation every ``trainer.eval_every``; ``summary.json``;
``.hydra/config.yaml`` and ``.hydra/overrides.yaml``), so ``scripts/compare.py`` and the experiment scripts read
ensemble runs like Hydra multirun jobs. Evaluation covers the whole eval split: per-task ``loss`` and
``accuracy``/``rmse``/``pearson``, the summed ``eval/loss``, ``eval/pred_corr`` and ``eval/error_corr``, and the
loop's representation diagnostics on the first 256 eval examples (MoE gate usage, expert and task-representation
CKA; the CKA over training in the summary). The records and summaries are built by :mod:`corrjax.train.tracking`, as
the loop's are.

Scope: one device and one process (the seeds are the parallel axis), every split held in memory as arrays
(``ArrayDataset``), no checkpoints (an ensemble is a short job: re-run the seeds that did not finish; the experiment
scripts skip finished runs), so no representation snapshots either (the CKA over training is kept in memory).
Non-finite steps are dropped per seed as in the loop; a seed with ``trainer.max_nonfinite_in_a_row`` of them in a
row is stopped at the end of that evaluation block (its summary says so and its files end there) while the others
train on. Model selection follows the loop's rules (:mod:`corrjax.train.selection`): every evaluation is observed
per seed, a seed's best model is kept in memory (not in a checkpoint), early stopping stops a seed as the loop would,
and the selected model is tested on ``trainer.test_split`` into the seed's ``test/...``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from omegaconf import DictConfig, OmegaConf

from corrjax.train import compile_cache
from corrjax.train.config import check_trainer, check_values
from corrjax.train.selection import check_config as selection_check_config
from corrjax.train.setup import with_seed
from corrjax.train.targets import check_config

log = logging.getLogger(__name__)


def _check(cfg: DictConfig, seeds: Sequence[int], run_dirs: Sequence[str | Path], seed_batch: int) -> None:
    if not seeds:
        raise ValueError("`seeds` is empty")
    if isinstance(seed_batch, bool) or not isinstance(seed_batch, int) or seed_batch < 1:
        raise ValueError(f"`seed_batch` must be a positive int, got {seed_batch!r}")
    if any(not 0 <= s < 2**31 for s in seeds):
        raise ValueError(
            f"`seeds` must be ints in [0, 2**31) (non-negative int32, as the loop's `seed`: the PRNG keys are built "
            f"from them as int32 and the batch order takes no negative seed), got {list(seeds)}"
        )
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"`seeds` has duplicates: {list(seeds)}")
    if len(run_dirs) != len(seeds):
        raise ValueError(f"{len(run_dirs)} `run_dirs` for {len(seeds)} `seeds`; give one directory per seed")
    check_trainer(cfg.trainer)
    check_values(cfg)
    check_config(cfg)
    selection_check_config(cfg)
    if cfg.get("ckpt_path") or cfg.trainer.get("mode", "train") != "train":
        raise ValueError(
            "`ckpt_path` / `trainer.mode`=eval: ensemble runs train every seed from its own initialisation; evaluate "
            "or fine-tune a checkpoint with scripts/eval.py or scripts/train.py"
        )
    if cfg.trainer.resume:
        raise ValueError("`trainer.resume`=true: ensemble runs keep no checkpoints; re-run the unfinished seeds")
    if jax.process_count() > 1:
        raise ValueError(f"ensemble runs use one process, got jax.process_count()={jax.process_count()}")


def _stack(trees: Sequence[Any]) -> Any:
    return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *trees)


class _Stacked:
    """Every seed's ``split`` as ``{key: (S, N, ...)}`` host arrays, each seed's data written in as its setup is
    built (one seed's dataset alive at a time)."""

    def __init__(self, num_seeds: int, split: str, keys: Sequence[str]) -> None:
        self.num_seeds, self.split, self.keys = num_seeds, split, tuple(keys)
        self.arrays: dict[str, np.ndarray] = {}
        self._first_seed: int | None = None

    def add(self, i: int, seed: int, dataset: Any) -> None:
        if not hasattr(dataset, "arrays"):
            raise TypeError(f"ensemble runs need in-memory datasets (ArrayDataset), got {type(dataset).__name__}")
        for k in self.keys:
            value = dataset.arrays[k]
            if i == 0:
                self.arrays[k] = np.empty((self.num_seeds, *value.shape), value.dtype)
                self._first_seed = seed
            elif value.shape != self.arrays[k].shape[1:]:
                raise ValueError(
                    f"seed {seed}'s {self.split} `{k}` has shape {value.shape}, seed {self._first_seed}'s "
                    f"{self.arrays[k].shape[1:]}: the seeds' datasets must have equal shapes"
                )
            self.arrays[k][i] = value

    def to_device(self) -> dict[str, jax.Array]:
        out = {}
        for k in self.keys:  # one key at a time, so the host and device copies of the whole stack are never all alive
            out[k] = jax.device_put(self.arrays.pop(k))
        return out


def _eval_fn(eval_step, representation_step, tasks, batch_size: int, seed_batch: int):
    """Jitted ``(states, x (S, N, ...), labels {task: (S, N, ...)}) -> (metrics, representations)`` over the whole
    split: the seeds one after another (``seed_batch`` at a time), each in blocks of ``batch_size`` examples (the
    last padded, then cut), and the representation step on each seed's first ``min(N, 256)`` examples (the loop's
    subset; none below 4 examples)."""
    from corrjax.stats import corrcoef
    from corrjax.train.evaluate import score_outputs

    def one_seed(args):
        state, x, labels = args
        n = x.shape[0]
        blocks = -(-n // batch_size)
        pad = blocks * batch_size - n
        xb = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(blocks, batch_size, *x.shape[1:])
        out = jax.lax.map(lambda xi: eval_step(state, {"x": xi}), xb)
        out = jax.tree.map(lambda o: o.reshape(blocks * batch_size, *o.shape[2:])[:n], out)
        metrics, scores, errors = score_outputs(tasks, out, labels, jnp.ones((n,), bool))
        if len(tasks) > 1:
            metrics["eval/pred_corr"] = corrcoef(scores)
            metrics["eval/error_corr"] = corrcoef(errors)
        reps = representation_step(state, x[: min(n, 256)]) if n >= 4 else {}
        return metrics, reps

    return jax.jit(lambda states, x, labels: jax.lax.map(one_seed, (states, x, labels), batch_size=seed_batch))


def _scan_fn(train_step, noise_step, names: Sequence[str], seed_batch: int):
    """Jitted ``(states, train arrays (S, N, ...), indices (K, S, B), logged (K,)) -> (states, metrics (K, S, ...))``:
    K steps, each running the train step for every seed (``seed_batch`` seeds vectorised at a time) on its own batch
    rows, and at the ``logged`` steps the noise-scale step on the new state and the same batch, as the loop does
    (``noise_step`` None: none; its metrics are NaN at the other steps)."""

    def one_seed(st, batch, logged):
        st, metrics = train_step(st, batch)
        if noise_step is not None:
            shapes = jax.eval_shape(noise_step, st, batch)[1]
            skip = lambda: (st, jax.tree.map(lambda a: jnp.full(a.shape, jnp.nan, a.dtype), shapes))
            st, noise_metrics = jax.lax.cond(logged, lambda: noise_step(st, batch), skip)
            metrics = {**metrics, **noise_metrics}
        return st, metrics

    def run(states, arrays, indices, logged):
        def body(sts, xs):
            idx, log_here = xs
            # Gather every seed's rows first: mapping over the (S, N, ...) arrays would slice (copy) each seed's
            # whole split at every step. The flag is closed over, not mapped, so the noise step stays a real branch
            # when seeds are vectorised.
            rows = jnp.arange(idx.shape[0])[:, None]
            batch = {k: arrays[k][rows, idx] for k in ("x", *names)}
            return jax.lax.map(lambda a: one_seed(*a, log_here), (sts, batch), batch_size=seed_batch)

        return jax.lax.scan(body, states, (indices, logged))

    return jax.jit(run, donate_argnums=0)


def _write_hydra(run_dir: Path, cfg: DictConfig, overrides: Sequence[str]) -> None:
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    (hydra_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (hydra_dir / "overrides.yaml").write_text(yaml.safe_dump(list(overrides), default_flow_style=False))


def _build_seeds(cfg: DictConfig, seeds: Sequence[int]) -> tuple[Any, Any, _Stacked, _Stacked, _Stacked | None]:
    """``(first setup, stacked initial states, stacked train split, stacked eval split, stacked test split or
    None)``: one :func:`corrjax.train.setup.build` per seed (its own data, model, optimiser state), keeping only
    what the ensemble needs of the later ones."""
    from corrjax.train.eval_run import split_data
    from corrjax.train.setup import build

    test_split = cfg.trainer.get("test_split")
    first = None
    states = []
    for i, seed in enumerate(seeds):
        setup = build(cfg, seed)
        if first is None:
            first = setup
            keys = ("x", *setup.names)
            train = _Stacked(len(seeds), "train", keys)
            evals = _Stacked(len(seeds), cfg.trainer.eval_split, keys)
            tests = _Stacked(len(seeds), test_split, keys) if test_split else None
        train.add(i, seed, setup.train_data)
        evals.add(i, seed, setup.eval_data)
        if tests is not None:
            tests.add(i, seed, split_data(setup.cfg, setup, test_split))
        states.append(setup.init_state())
        del setup
    return first, _stack(states), train, evals, tests


def train_seeds(
    cfg: DictConfig,
    seeds: Sequence[int],
    run_dirs: Sequence[str | Path],
    overrides: Sequence[Sequence[str]] | None = None,
    *,
    seed_batch: int = 1,
) -> list[dict[str, Any]]:
    """Trains ``cfg`` once per seed, all seeds at once, and returns their summaries (also written per run dir).

    Args:
      cfg: a composed training config (``configs/train.yaml``); its ``seed`` is replaced by each of ``seeds``.
      seeds: the seeds, one ensemble member each (distinct).
      run_dirs: one output directory per seed (created).
      overrides: per seed, the override strings recorded in ``.hydra/overrides.yaml`` (what a Hydra multirun job
        would record; the experiment scripts read the model, correlation and seed from them). Default:
        ``["seed=<s>"]``.
      seed_batch: seeds vectorised together inside the compiled step (``jax.lax.map``'s ``batch_size``). The
        default, 1, runs the seeds one after another inside one compiled program: on CPU this beats vectorising
        them for small models (each seed's products stay plain matrix products; timings in the module
        docstring); larger values may suit accelerators.

    Raises ``ValueError`` for what an ensemble cannot do (see the module docstring) and ``TypeError`` for data that is
    not held in memory. Each run directory is held as the loop holds its own (:func:`corrjax.train.rundir.claim`):
    a directory in use by another run, or holding a previous run's results without ``trainer.overwrite=true``, is
    refused before anything is trained.
    """
    from corrjax.train import rundir

    seeds = [int(s) for s in seeds]
    _check(cfg, seeds, run_dirs, seed_batch)
    compile_cache.configure(cfg.trainer.get("compilation_cache_dir", "auto"))
    run_dirs = [Path(d).absolute() for d in run_dirs]
    overrides = [list(o) for o in overrides] if overrides is not None else [[f"seed={s}"] for s in seeds]
    if len(overrides) != len(seeds):
        raise ValueError(f"{len(overrides)} `overrides` lists for {len(seeds)} `seeds`")
    with contextlib.ExitStack() as held:
        for d in run_dirs:
            held.enter_context(rundir.claim(d, resume=False, overwrite=bool(cfg.trainer.overwrite)))
        return _train_seeds(cfg, seeds, run_dirs, overrides, seed_batch)


def _train_seeds(
    cfg: DictConfig,
    seeds: list[int],
    run_dirs: list[Path],
    overrides: list[list[str]],
    seed_batch: int,
) -> list[dict[str, Any]]:
    """:func:`train_seeds`' body, in the run directories it holds."""
    from corrjax.data import BatchIterator
    from corrjax.train import evaluate, selection, tracking, writers
    from corrjax.train.loop import every

    tc = cfg.trainer

    setup, states, train_stack, eval_stack, test_stack = _build_seeds(cfg, seeds)
    names = setup.names
    selectors = [selection.Selector.from_config(tc, setup.tasks) for _ in seeds]
    best_model = jax.tree.map(jnp.copy, (states.params, states.rest))  # each seed's best evaluation's model
    at_stop = None  # the model of the seeds stopped early, at their stop
    log.info(
        "ensemble of %d seeds: model %s, %d parameters each; tasks %s",
        *(len(seeds), setup.model_name, setup.num_params, names),
    )
    train_arrays = train_stack.to_device()
    eval_arrays = eval_stack.to_device()
    eval_x, eval_labels = eval_arrays.pop("x"), eval_arrays
    # The epoch order depends on the seed and the number of examples only (equal for every seed, checked above).
    iterators = [BatchIterator(setup.train_data, tc.batch_size, seed=s, prefetch=0) for s in seeds]
    per_epoch = iterators[0].steps_per_epoch

    scan = _scan_fn(setup.train_step, setup.noise_step, names, seed_batch)
    evaluate_all = _eval_fn(
        setup.eval_step, setup.representation_step, setup.tasks, int(tc.eval_batch_size), seed_batch
    )

    for d, s, o in zip(run_dirs, seeds, overrides, strict=True):
        _write_hydra(d, with_seed(cfg, s), o)
    out: list[writers.MetricsWriter] = []
    try:
        for d, s_ in zip(run_dirs, seeds, strict=True):
            out.append(writers.open_metrics_writer(d, with_seed(cfg, s_), labels=names))
    except BaseException:
        for w in out:
            w.close()
        raise
    trackers = [tracking.RepresentationTracker() for _ in seeds]
    active = np.ones(len(seeds), bool)
    skipped = np.zeros(len(seeds), np.int64)
    stopped_at: dict[int, tuple[int, int, str | None]] = {}  # seed index -> (step, skipped steps, error or None)
    last_train: list[dict[str, Any]] = [{} for _ in seeds]
    last_eval: list[dict[str, Any]] = [{} for _ in seeds]
    ends = sorted({k for k in range(1, tc.max_steps + 1) if every(k, tc.eval_every, tc.max_steps)} | {tc.max_steps})
    t_start = time.perf_counter()
    s = 0
    try:
        for end in ends:
            t0 = time.perf_counter()
            positions = [divmod(k, per_epoch) for k in range(s, end)]
            idx = np.asarray([[it.global_indices(e, b) for it in iterators] for e, b in positions], np.int32)
            logged = np.asarray([every(k + 1, tc.log_every, tc.max_steps) for k in range(s, end)])
            states, metrics = scan(states, train_arrays, jnp.asarray(idx), jnp.asarray(logged))
            metrics = jax.device_get(metrics)
            streaks = np.asarray(jax.device_get(states.nonfinite_max_streak))
            rate = (end - s) * tc.batch_size / max(time.perf_counter() - t0, 1e-9)
            # Skipped steps so far, step by step: the count before the block plus the block's non-finite steps.
            totals = skipped[None, :] + np.cumsum(~np.asarray(metrics["train/finite"], bool), axis=0)
            skipped = totals[-1]
            evals, reps = jax.device_get(evaluate_all(states, eval_x, eval_labels))  # every block ends at an eval
            evals = [
                _evaluation(evaluate, trackers[i], end, evals, reps, i) if active[i] else {} for i in range(len(seeds))
            ]
            improved = np.zeros(len(seeds), bool)
            for i in np.nonzero(active)[0]:
                evals[i], improved[i] = selectors[i].observe(evals[i], end)
            if improved.any():
                best_model = _keep_improved(best_model, (states.params, states.rest), improved)
            for k in range(s, end):
                at = k + 1
                is_eval = at == end and bool(tc.eval_every)
                if not (logged[k - s] or is_eval):
                    continue
                for i in np.nonzero(active)[0]:
                    record: dict[str, Any] = {}
                    if logged[k - s]:
                        last_train[i] = tracking.train_record(
                            {name: v[k - s, i] for name, v in metrics.items()},
                            examples_per_s=rate,
                            nonfinite_total=totals[k - s, i],
                        )
                        record.update(last_train[i])
                    if is_eval:
                        last_eval[i] = evals[i]
                        record.update(last_eval[i])
                    out[i].write(at, record)
            newly_stopped = active & np.asarray([sel.stopped for sel in selectors])
            if newly_stopped.any():  # their model at the stop (the compiled steps go on training every seed)
                current = (states.params, states.rest)
                at_stop = _keep_improved(
                    jax.tree.map(jnp.copy, current) if at_stop is None else at_stop, current, newly_stopped
                )
            for i in np.nonzero(newly_stopped)[0]:
                active[i] = False
                stopped_at[i] = (end, int(totals[-1, i]), None)
                log.info("seed %d stopped early at step %d (trainer.early_stopping)", seeds[i], end)
            for i in np.nonzero(active & (streaks >= tc.max_nonfinite_in_a_row))[0]:
                active[i] = False
                stopped_at[i] = (
                    end,
                    int(skipped[i]),
                    f"{int(streaks[i])} consecutive steps with non-finite losses or gradients by step {end} "
                    f"(trainer.max_nonfinite_in_a_row={tc.max_nonfinite_in_a_row})",
                )
                log.warning("seed %d stopped: %s", seeds[i], stopped_at[i][2])
            s = end
            log.info("ensemble step %d/%d (%.0f examples/s over %d seeds)", s, tc.max_steps, rate, len(seeds))
            if not active.any():
                break
    except BaseException:
        for w in out:
            w.close()
        raise

    wall = time.perf_counter() - t_start
    if not tc.eval_every:  # the final evaluation goes to the summary only, as in the loop
        last_eval = evals
    tests = _test(tc, selectors, evaluate_all, states, best_model, at_stop, test_stack, stopped_at, s)
    summaries = []
    try:  # the writers stay open for the summaries (W&B / MLflow get them too)
        for i, (seed, d) in enumerate(zip(seeds, run_dirs, strict=True)):
            end, nonfinite, error = stopped_at.get(i, (s, int(skipped[i]), None))
            summary = tracking.summary(
                step=end,
                completed=error is None and (s >= tc.max_steps or selectors[i].stopped),
                num_params=setup.num_params,
                nonfinite_total=nonfinite,
                wall_time_s=wall,
                tasks=names,
                last_train=last_train[i],
                last_eval=last_eval[i],
                tracker=trackers[i],
                seed=seed,
                ensemble_size=len(seeds),
                tags=list(cfg.get("tags") or []),
                **selectors[i].summary(),
            )
            summary.update(tests[i])
            if error is not None:
                summary["error"] = error
            writers.write_summary(d, summary)
            summaries.append(writers.to_jsonable(summary))
        for w, summary in zip(out, summaries, strict=True):
            w.write_summary(summary)
    finally:
        for w in out:
            w.close()
    return summaries


def _keep_improved(best: Any, current: Any, improved: np.ndarray) -> Any:
    """``best`` with the seeds marked ``improved`` replaced by ``current`` (leaves with a leading seed axis)."""
    mask = jnp.asarray(improved)
    return jax.tree.map(lambda b, c: jnp.where(mask.reshape(-1, *[1] * (c.ndim - 1)), c, b), best, current)


def _test(
    tc, selectors, evaluate_all, states, best_model, at_stop, test_stack, stopped_at, step
) -> list[dict[str, Any]]:
    """Per seed, ``test/...`` of its selected model on ``trainer.test_split`` (the best evaluation's with
    ``trainer.keep_best`` when there was one, else the model where it stopped) and ``test/step``; empty for a seed
    stopped by non-finite steps or without ``test_split``. The best models are kept in memory (the ensemble writes
    no checkpoints)."""
    from corrjax.train import selection

    if test_stack is None:
        return [{} for _ in selectors]
    model = (states.params, states.rest)
    if at_stop is not None:
        model = _keep_improved(model, at_stop, np.asarray([sel.stopped for sel in selectors]))
    use_best = np.asarray([bool(tc.keep_best) and sel.state.best_step is not None for sel in selectors])
    model = _keep_improved(model, best_model, use_best)
    tested = states.replace(params=model[0], rest=model[1])
    arrays = test_stack.to_device()
    metrics, _ = jax.device_get(evaluate_all(tested, arrays.pop("x"), arrays))
    out = []
    for i, sel in enumerate(selectors):
        end, _, error = stopped_at.get(i, (step, 0, None))
        if error is not None:
            out.append({})
            continue
        record = selection.with_prefix({k: v[i] for k, v in metrics.items()}, "eval/", "test/")
        record.update(selection.derived_metrics(record, sel.tasks, sel.monitor, "test/"))
        at = sel.state.best_step if use_best[i] else end
        out.append({**record, "test/step": int(at)})
    return out


def _evaluation(evaluate: Any, tracker: Any, step: int, evals: dict, reps: dict, i: int) -> dict[str, Any]:
    """Seed ``i``'s evaluation record at ``step`` from the stacked results: the metrics, the representation
    diagnostics, and the shared representation handed to its tracker."""
    record = {name: v[i] for name, v in evals.items()}
    if reps:
        diag = evaluate.representation_diagnostics({k: v[i] for k, v in reps.items()})
        tracker.add(step, diag.pop("shared"))
        record.update(diag)
    return record
