"""Checkpoints as inputs: ``ckpt_path=`` resolution, the final test of the selected checkpoint, and eval-only runs.

- :func:`resolve_ckpt_path`: ``ckpt_path`` may be a run directory (its ``checkpoints/``), a ``checkpoints/`` folder
  or one checkpoint step folder (``<run>/checkpoints/<step>``). A folder of checkpoints gives its best one (the
  ``best_step`` of the model-selection state saved with its newest checkpoint, when that step is still there), else
  its newest.
- :func:`restore_model`: the checkpoint's model (``params`` and ``rest``) into a freshly built state, onto its
  shardings; the optimiser state, RNG and counters stay the fresh state's. Fine-tuning (``ckpt_path`` with
  ``trainer.mode=train``) starts so: step 0, a new optimiser state, the checkpoint's weights. The model config must
  build the same model: a mismatch is a ``ValueError`` naming ``ckpt_path``.
- :func:`test_best`: after training, the selected state (the best checkpoint, or the final state) evaluated on
  ``trainer.test_split`` as ``test/...``.
- :func:`run_eval` (``trainer.mode=eval``, ``scripts/eval.py``): evaluates ``ckpt_path`` on ``trainer.eval_split``
  (``eval/...``) and ``trainer.test_split`` (``test/...``) and writes ``summary.json`` into its own run directory,
  held like a training run's (:func:`corrjax.train.rundir.claim`).
  :func:`check_source` refuses a run directory that holds the checkpoint being read.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import jax

log = logging.getLogger(__name__)


def _step_dirs(folder: Path) -> list[int]:
    return sorted((int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True)


def _selection_of(step_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((step_dir / "data" / "metadata").read_text()).get("selection")
    except (OSError, ValueError, AttributeError):
        return None


def resolve_ckpt_path(ckpt_path: str | Path) -> Path:
    """The checkpoint step folder that ``ckpt_path`` names (see the module docstring). Raises
    ``FileNotFoundError`` naming ``ckpt_path`` when it is not a run directory, a checkpoints folder or a step
    folder, or holds no checkpoint."""
    path = Path(str(ckpt_path)).expanduser().absolute()
    if not path.exists():
        raise FileNotFoundError(f"`ckpt_path`={ckpt_path}: no such file or directory")
    if path.is_dir() and path.name.isdigit() and (path / "state").is_dir():
        return path
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = _step_dirs(folder) if folder.is_dir() else []
    steps = [s for s in steps if (folder / str(s) / "state").is_dir()]
    if not steps:
        raise FileNotFoundError(
            f"`ckpt_path`={ckpt_path} holds no checkpoint: give a run directory (with checkpoints/), its "
            "checkpoints/ folder or a checkpoint step folder (checkpoints/<step>)"
        )
    best = (_selection_of(folder / str(steps[0])) or {}).get("best_step")
    if best is not None and int(best) in steps:
        log.info("ckpt_path %s: its best checkpoint, step %d", ckpt_path, int(best))
        return folder / str(int(best))
    log.info("ckpt_path %s: its newest checkpoint, step %d (no best recorded)", ckpt_path, steps[0])
    return folder / str(steps[0])


def check_source(cfg: Any, run_dir: Path) -> None:
    """Refuses (``ValueError`` naming ``ckpt_path``) a run directory that holds ``ckpt_path`` or lies inside it: the
    run would write into (or with ``trainer.overwrite=true`` delete) the checkpoint it reads."""
    ckpt_path = cfg.get("ckpt_path")
    if not ckpt_path:
        return
    source, run_dir = Path(str(ckpt_path)).expanduser().absolute(), Path(run_dir).absolute()
    if source == run_dir or run_dir in source.parents or source in run_dir.parents:
        raise ValueError(
            f"`ckpt_path`={ckpt_path} is in this run's directory {run_dir}: an evaluation or fine-tuning run writes "
            "its own results; give it another directory (hydra.run.dir=...)"
        )


def restore_model(step_dir: str | Path, state: Any) -> Any:
    """``state`` with ``params`` and ``rest`` restored from checkpoint ``step_dir`` onto ``state``'s shardings
    (``ValueError`` naming ``ckpt_path`` when the checkpoint holds another model)."""
    import orbax.checkpoint as ocp

    from corrjax.train.checkpoint import abstract_like

    target = {"params": abstract_like(state.params), "rest": abstract_like(state.rest)}
    args = jax.tree.map(
        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype), target
    )
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            out = checkpointer.restore(
                Path(step_dir) / "state",
                args=ocp.args.PyTreeRestore(item=target, restore_args=args, partial_restore=True),
            )
    except Exception as e:
        raise ValueError(
            f"`ckpt_path`: checkpoint {step_dir} does not hold this config's model ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}); compose the config it was trained "
            "with (its run's .hydra/overrides.yaml)"
        ) from e
    return state.replace(params=out["params"], rest=out["rest"])


def split_data(cfg: Any, setup: Any, split: str) -> Any:
    """``split`` of the run's dataset (the setup's own eval split when it is that one)."""
    from hydra.utils import instantiate

    return setup.eval_data if split == cfg.trainer.eval_split else instantiate(cfg.data, split=split)


def evaluate_split(steps: Any, state: Any, data: Any, setup: Any, sharding: Any, batch_size: int, prefix: str):
    """The evaluation metrics of ``state`` on ``data`` under ``prefix`` (``eval/`` or ``test/``)."""
    from corrjax.train import evaluate, selection

    record = evaluate.evaluate(steps.eval, state, data, setup.tasks, sharding, batch_size, setup.reported_tasks)
    return selection.with_prefix(record, "eval/", prefix)


def test_best(
    cfg: Any, setup: Any, steps: Any, state: Any, step: int, selector: Any, run_dir: Path, sharding: Any
) -> dict[str, Any]:
    """``test/...`` of the selected state on ``trainer.test_split``: the best checkpoint when best-keeping kept one
    other than the final step, else the final ``state``; ``test/step`` says which step was tested."""
    from corrjax.train import selection

    tc = cfg.trainer
    best = selector.state.best_step
    tested, at = state, step
    if tc.keep_best and best is not None and best != step:
        step_dir = run_dir / "checkpoints" / str(best)
        if (step_dir / "state").is_dir():
            tested, at = restore_model(step_dir, state), best
        else:
            log.warning("the best checkpoint %s is gone; testing the final state (step %d)", step_dir, step)
    data = split_data(cfg, setup, tc.test_split)
    record = evaluate_split(steps, tested, data, setup, sharding, tc.eval_batch_size, "test/")
    record.update(selection.derived_metrics(record, setup.tasks, selector.monitor, "test/"))
    log.info(
        "test (%s split, step %d): %s %.4f",
        tc.test_split,
        at,
        selector.monitor.name,
        record.get(f"test/{selector.monitor.name}", float("nan")),
    )
    return {**record, "test/step": int(at)}


def run_eval(cfg: Any, run_dir: Path) -> dict[str, Any]:
    """``trainer.mode=eval``: evaluates ``ckpt_path`` on ``trainer.eval_split`` and ``trainer.test_split`` and
    writes the summary into ``run_dir`` (the caller holds it). Returns the summary: ``eval/...``, ``test/...``,
    ``monitor``, ``eval/<monitor>``, ``ckpt_path`` and ``ckpt_step``."""
    from corrjax.train import distributed, selection, sharding, writers
    from corrjax.train.setup import build

    tc, t_start = cfg.trainer, time.perf_counter()
    step_dir = resolve_ckpt_path(cfg.ckpt_path)
    mesh = sharding.make_mesh(cfg.parallel)
    setup = build(cfg)
    monitor = selection.resolve_monitor(tc, setup.tasks)
    steps = sharding.jit_setup_steps(setup, mesh, cfg.parallel.axis_name)
    data_sharding = sharding.batch_sharding(mesh, cfg.parallel.axis_name)
    state = restore_model(step_dir, setup.init_state(sharding.replicated(mesh)))
    record = evaluate_split(steps, state, setup.eval_data, setup, data_sharding, tc.eval_batch_size, "eval/")
    record.update(selection.derived_metrics(record, setup.tasks, monitor, "eval/"))
    if tc.test_split:
        test = evaluate_split(
            steps, state, split_data(cfg, setup, tc.test_split), setup, data_sharding, tc.eval_batch_size, "test/"
        )
        record.update({**test, **selection.derived_metrics(test, setup.tasks, monitor, "test/")})
    summary = {
        "mode": "eval",
        "ckpt_path": str(step_dir),
        "ckpt_step": int(step_dir.name),
        "completed": True,
        "num_params": setup.num_params,
        "tasks": setup.names,
        "monitor": monitor.name,
        "monitor_mode": monitor.mode,
        "wall_time_s": time.perf_counter() - t_start,
        **record,
    }
    if distributed.is_main_process():
        writers.write_summary(run_dir, summary)
        log.info(
            "evaluated %s: %s = %.4f (%s split)",
            step_dir,
            monitor.name,
            record.get(f"eval/{monitor.name}", float("nan")),
            tc.eval_split,
        )
    distributed.sync("corrjax-eval-end")
    return writers.to_jsonable(summary)
