"""Many seeds of one configuration trained at once: the run's own train step, mapped over seeds in one program.

A seed study of a small model (the MMoE paper's synthetic experiment trains ~15k-parameter networks on batches of
128) spends much of each :func:`corrjax.train.loop.run` step in dispatch rather than arithmetic, and compiles again
for every seed. :func:`train_seeds` builds every seed's data, model and optimiser state exactly as ``run`` does,
stacks them along a leading seed axis, and compiles one program: a ``lax.scan`` over the steps between two
evaluations whose body runs :func:`corrjax.train.step.make_train_step` for every seed (``jax.lax.map`` over the seed
axis, ``seed_batch`` seeds vectorised at a time). Each seed reads the batches its own
:class:`~corrjax.data.BatchIterator` would hand it (the epoch order depends on the seed), so seed ``s`` of an
ensemble computes what the single run with ``seed=s`` computes, up to floating-point reassociation: the two agree to
~1e-7 over the tests' short runs, and over long runs the rounding differences grow as any perturbation of a training
trajectory does (the MMoE study's 3000-step test-loss curves: median 0.1% apart per point), so an ensemble reproduces
a Hydra sweep statistically, not bit for bit.

On CPU, running the seeds one after another inside the program (``seed_batch=1``) is the fastest choice measured
for the MMoE study's models: 50 seeds take 14 ms per step for the shared-bottom model (25 ms vectorised with
``jax.vmap``) and 21 ms for MMoE (20 ms vectorised; 18 ms ten at a time), against 1.0 ms per step for one
shared-bottom seed in the loop (so 3.5x per seed). Evaluation is 3.5x faster seed by seed than vectorised, where
XLA turns the seeds' products into one batched product of small matrices.

Every seed gets a run directory in the loop's layout (``metrics.jsonl`` with the train metrics every
``trainer.log_every`` steps and the evaluation every ``trainer.eval_every``; ``summary.json``; ``.hydra/config.yaml``
and ``.hydra/overrides.yaml``), so ``scripts/compare.py`` and the experiment scripts read ensemble runs like Hydra
multirun jobs. Evaluation covers the whole eval split: per-task ``loss`` and ``accuracy``/``rmse``/``pearson``, the
summed ``eval/loss``, ``eval/pred_corr`` and ``eval/error_corr``; the representation (CKA) diagnostics of the loop
are left out.

Scope: one device and one process (the seeds are the parallel axis), every split held in memory as arrays
(``ArrayDataset``), no checkpoints (an ensemble is a short job: re-run the seeds that did not finish; the experiment
scripts skip finished runs). Non-finite steps are dropped per seed as in the loop; a seed with
``trainer.max_nonfinite_in_a_row`` of them in a row is stopped at the end of that evaluation block (its summary says
so and its files end there) while the others train on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from corrjax.train.config import check_trainer
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
    check_config(cfg)
    if cfg.trainer.resume:
        raise ValueError("`trainer.resume`=true: ensemble runs keep no checkpoints; re-run the unfinished seeds")
    if jax.process_count() > 1:
        raise ValueError(f"ensemble runs use one process, got jax.process_count()={jax.process_count()}")
    if cfg.get("regularizer") is not None and cfg.regularizer.get("fn") is not None:
        raise ValueError("`regularizer` is not supported by ensemble runs (train those seeds with scripts/train.py)")


def _seed_cfg(cfg: DictConfig, seed: int) -> DictConfig:
    out = cfg.copy()
    out.seed = int(seed)
    return out


def _stack(trees: Sequence[Any]) -> Any:
    return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *trees)


def _stacked_split(cfgs: Sequence[DictConfig], split: str, first: Any, keys: Sequence[str]) -> dict[str, jax.Array]:
    """Every seed's ``split`` as ``{key: (S, N, ...)}`` arrays, each seed's data written into the stack as it is
    generated (one seed's copy alive at a time); ``first`` is seed 0's dataset of the split, already built."""
    stacked: dict[str, np.ndarray] = {}
    for i, c in enumerate(cfgs):
        dataset = first if i == 0 else instantiate(c.data, split=split)
        if not hasattr(dataset, "arrays"):
            raise TypeError(f"ensemble runs need in-memory datasets (ArrayDataset), got {type(dataset).__name__}")
        for k in keys:
            value = dataset.arrays[k]
            if i == 0:
                stacked[k] = np.empty((len(cfgs), *value.shape), value.dtype)
            elif value.shape != stacked[k].shape[1:]:
                raise ValueError(
                    f"seed {c.seed}'s {split} `{k}` has shape {value.shape}, seed {cfgs[0].seed}'s "
                    f"{stacked[k].shape[1:]}: the seeds' datasets must have equal shapes"
                )
            stacked[k][i] = value
    out = {}
    for k in keys:  # one key at a time, so the host and device copies of the whole stack are never all alive
        out[k] = jax.device_put(stacked.pop(k))
    return out


def _eval_fn(eval_step, tasks, batch_size: int, seed_batch: int):
    """Jitted ``(states, x (S, N, ...), labels {task: (S, N, ...)}) -> metrics`` over the whole split: the seeds one
    after another (``seed_batch`` at a time), each in blocks of ``batch_size`` examples (the last padded, then cut)."""
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
        return metrics

    return jax.jit(lambda states, x, labels: jax.lax.map(one_seed, (states, x, labels), batch_size=seed_batch))


def _scan_fn(train_step, names: Sequence[str], seed_batch: int):
    """Jitted ``(states, train arrays (S, N, ...), indices (K, S, B)) -> (states, metrics (K, S, ...))``: K steps,
    each running the train step for every seed (``seed_batch`` seeds vectorised at a time) on its own batch rows."""

    def one_seed(args):
        st, batch = args
        return train_step(st, batch)

    def run(states, arrays, indices):
        def body(sts, idx):
            # Gather every seed's rows first: mapping over the (S, N, ...) arrays would slice (copy) each seed's
            # whole split at every step.
            rows = jnp.arange(idx.shape[0])[:, None]
            batch = {k: arrays[k][rows, idx] for k in ("x", *names)}
            return jax.lax.map(one_seed, (sts, batch), batch_size=seed_batch)

        return jax.lax.scan(body, states, indices)

    return jax.jit(run, donate_argnums=0)


def _write_hydra(run_dir: Path, cfg: DictConfig, overrides: Sequence[str]) -> None:
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    (hydra_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (hydra_dir / "overrides.yaml").write_text(yaml.safe_dump(list(overrides), default_flow_style=False))


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
      run_dirs: one output directory per seed (created; an existing ``metrics.jsonl`` is replaced).
      overrides: per seed, the override strings recorded in ``.hydra/overrides.yaml`` (what a Hydra multirun job
        would record; the experiment scripts read the model, correlation and seed from them). Default:
        ``["seed=<s>"]``.
      seed_batch: seeds vectorised together inside the compiled step (``jax.lax.map``'s ``batch_size``). The
        default, 1, runs the seeds one after another inside one compiled program: on CPU this beats vectorising
        them for small models (each seed's products stay plain matrix products; timings in the module
        docstring); larger values may suit accelerators.

    Raises ``ValueError`` for what an ensemble cannot do (see the module docstring) and ``TypeError`` for data that is
    not held in memory.
    """
    from corrjax.models import shared_mask
    from corrjax.train import builders, losses, optimizer, state, step, writers
    from corrjax.train.loop import select_tasks

    seeds = [int(s) for s in seeds]
    _check(cfg, seeds, run_dirs, seed_batch)
    run_dirs = [Path(d).absolute() for d in run_dirs]
    overrides = [list(o) for o in overrides] if overrides is not None else [[f"seed={s}"] for s in seeds]
    if len(overrides) != len(seeds):
        raise ValueError(f"{len(overrides)} `overrides` lists for {len(seeds)} `seeds`")
    tc = cfg.trainer
    cfgs = [_seed_cfg(cfg, s) for s in seeds]

    first_train = instantiate(cfgs[0].data, split="train")
    tasks = select_tasks(first_train.tasks, cfg.get("tasks"))
    names = [t.name for t in tasks]
    input_shape = np.shape(first_train[0]["x"])
    models = [builders.build_model(cfg.model, tasks, input_shape, s) for s in seeds]
    mask = shared_mask(models[0])
    model_name = type(models[0]).__name__
    splits = [state.split_model(m) for m in models]
    graphdef = splits[0][0]
    tx = optimizer.build_optimizer(cfg.mtl, cfg.optim, mask, len(tasks))
    loss_fns = losses.task_loss_fns(tasks, OmegaConf.to_container(cfg.task_losses))
    train_step = step.make_train_step(graphdef, tasks, loss_fns, tx, mask)
    params, rest = _stack([p for _, p, _ in splits]), _stack([r for _, _, r in splits])
    del models, splits
    init = jax.jit(jax.vmap(lambda p, r, s: state.create_state(p, r, tx, s)))
    states = init(params, rest, jnp.asarray(seeds, jnp.int32))
    n_params = sum(int(np.size(x)) for x in jax.tree.leaves(params)) // len(seeds)
    log.info("ensemble of %d seeds: model %s, %d parameters each; tasks %s", len(seeds), model_name, n_params, names)
    del params, rest

    from corrjax.data import BatchIterator

    train_arrays = _stacked_split(cfgs, "train", first_train, ("x", *names))
    eval_arrays = _stacked_split(cfgs, tc.eval_split, instantiate(cfgs[0].data, split=tc.eval_split), ("x", *names))
    eval_x, eval_labels = eval_arrays.pop("x"), eval_arrays
    # The epoch order depends on the seed and the number of examples only (equal for every seed, checked above).
    iterators = [BatchIterator(first_train, tc.batch_size, seed=s, prefetch=0) for s in seeds]
    per_epoch = iterators[0].steps_per_epoch

    scan = _scan_fn(train_step, names, seed_batch)
    evaluate = _eval_fn(step.make_eval_step(graphdef), tuple(tasks), int(tc.eval_batch_size), seed_batch)

    for d in run_dirs:
        d.mkdir(parents=True, exist_ok=True)
        if (d / "metrics.jsonl").exists():
            (d / "metrics.jsonl").unlink()
    for d, c, o in zip(run_dirs, cfgs, overrides, strict=True):
        _write_hydra(d, c, o)
    out = [writers.MetricsWriter(d, jsonl=cfg.logger.jsonl, tensorboard=cfg.logger.tensorboard) for d in run_dirs]
    active = np.ones(len(seeds), bool)
    skipped = np.zeros(len(seeds), np.int64)
    stopped_at: dict[int, tuple[int, int, str]] = {}  # seed index -> (step, skipped steps, message)
    last_train: list[dict[str, Any]] = [{} for _ in seeds]
    last_eval: list[dict[str, Any]] = [{} for _ in seeds]
    ends = sorted({s for s in range(1, tc.max_steps + 1) if tc.eval_every and s % tc.eval_every == 0} | {tc.max_steps})
    t_start = time.perf_counter()
    s = 0
    try:
        for end in ends:
            t0 = time.perf_counter()
            positions = [divmod(k, per_epoch) for k in range(s, end)]
            idx = np.asarray([[it.global_indices(e, b) for it in iterators] for e, b in positions], np.int32)
            states, metrics = scan(states, train_arrays, jnp.asarray(idx))
            metrics = jax.device_get(metrics)
            streaks = np.asarray(jax.device_get(states.nonfinite_max_streak))
            rate = (end - s) * tc.batch_size / max(time.perf_counter() - t0, 1e-9)
            # Skipped steps so far, step by step: the count before the block plus the block's non-finite steps.
            totals = skipped[None, :] + np.cumsum(~np.asarray(metrics["train/finite"], bool), axis=0)
            skipped = totals[-1]
            evals = jax.device_get(evaluate(states, eval_x, eval_labels))  # every block ends at an evaluation
            for k in range(s, end):
                at = k + 1
                is_log = at % tc.log_every == 0 or at == tc.max_steps
                is_eval = at == end and bool(tc.eval_every)
                if not (is_log or is_eval):
                    continue
                for i in np.nonzero(active)[0]:
                    record: dict[str, Any] = {}
                    if is_log:
                        host = {name: v[k - s, i] for name, v in metrics.items() if name != "train/finite"}
                        host["train/examples_per_s"] = rate
                        host["train/nonfinite_total"] = int(totals[k - s, i])
                        record.update(host)
                        last_train[i] = host
                    if is_eval:
                        last_eval[i] = {name: v[i] for name, v in evals.items()}
                        record.update(last_eval[i])
                    out[i].write(at, record)
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
    finally:
        for w in out:
            w.close()

    wall = time.perf_counter() - t_start
    if not tc.eval_every:  # the final evaluation goes to the summary only, as in the loop
        last_eval = [{name: v[i] for name, v in evals.items()} for i in range(len(seeds))]
    summaries = []
    for i, (seed, d) in enumerate(zip(seeds, run_dirs, strict=True)):
        end, nonfinite, error = stopped_at.get(i, (s, int(skipped[i]), None))
        summary: dict[str, Any] = {
            "step": int(end),
            "completed": error is None and s >= tc.max_steps,
            "stopped_by_signal": None,
            "num_params": n_params,
            "nonfinite_total": nonfinite,
            "wall_time_s": wall,
            "tasks": names,
            "seed": seed,
            "ensemble_size": len(seeds),
            **last_train[i],
            **last_eval[i],
        }
        if error is not None:
            summary["error"] = error
        writers.write_summary(d, summary)
        summaries.append(writers.to_jsonable(summary))
    return summaries
