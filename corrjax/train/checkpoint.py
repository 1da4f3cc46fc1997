"""Orbax checkpointing of the whole training state: model, optimiser, RNG, counters and the data-iterator position.

One :class:`orbax.checkpoint.CheckpointManager` under ``<run_dir>/checkpoints`` saves two items per step: ``state``
(the :class:`~corrjax.train.state.TrainState` pytree of arrays, restored onto the shardings of an abstract target)
and ``data`` (the iterator's small JSON position, stored with the step and a fingerprint of the data stream it
belongs to). Saves are asynchronous (training continues while the previous checkpoint is written) and only the last
``keep`` are kept. Every process calls these methods; Orbax coordinates the hosts and writes shared files from the
primary host.

Restoring verifies (:meth:`Checkpointer.restore_latest`): checkpoints are tried newest first, and one that is
damaged or incomplete (an empty step folder, a missing item, an unreadable ``_CHECKPOINT_METADATA`` or item JSON, an
array file that does not read back) is reported with its path and the reason, moved aside into
``<run_dir>/checkpoints_damaged/`` (Orbax would otherwise keep counting it, and a later save of that step would
collide with it), and the next older one is used. Orbax's temporary folders (``<step>.orbax-checkpoint-tmp*``, what
a kill during a save leaves) are never candidates and are deleted when the manager starts. A data position that
does not belong to its checkpoint (another step, another data stream, a position that is not where that many steps
end) is :class:`DataPositionError` naming the file: resuming would silently train on different data.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

ITEMS = ("state", "data")
_DATA_FORMAT = "corrjax.data_position/1"


class CheckpointError(RuntimeError):
    """No checkpoint of a run directory could be restored (the message lists each one and why)."""


class DataPositionError(ValueError):
    """A checkpoint's data position does not belong to it or to this run's data stream."""


class Restored(NamedTuple):
    """A restored checkpoint: the train state, the iterator position (``BatchIterator.set_state``'s input), the
    step, and the model-selection state saved with it (:class:`corrjax.train.selection.SelectionState` as JSON;
    None when it has none)."""

    state: Any
    data_state: dict[str, Any]
    step: int
    selection: dict[str, Any] | None = None


BEST_METRIC = "monitor"  # the Orbax metric of a checkpoint saved at an evaluation: the monitored value


class _MissingMetricsFilter(logging.Filter):
    """Drops Orbax's warning for a save without metrics when best-keeping is on: only evaluations carry one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in record.getMessage()


_MISSING_METRICS_FILTER = _MissingMetricsFilter()


def data_fingerprint(
    data_cfg: Any, *, num_examples: int, seed: int, batch_size: int, steps_per_epoch: int
) -> dict[str, Any]:
    """What identifies a run's stream of batches: the dataset config (less its ``data_dir``, which may move between
    an interruption and the resume), the number of examples, the seed, the global batch size and the batches per
    epoch. Stored with every data position and compared on restore."""
    from omegaconf import DictConfig, OmegaConf

    node = OmegaConf.to_container(data_cfg, resolve=True) if isinstance(data_cfg, DictConfig) else dict(data_cfg)
    node.pop("data_dir", None)
    return {
        "dataset": json.loads(json.dumps(node, sort_keys=True, default=str)),
        "num_examples": int(num_examples),
        "seed": int(seed),
        "batch_size": int(batch_size),
        "steps_per_epoch": int(steps_per_epoch),
    }


class Checkpointer:
    """Keeps the last ``keep`` checkpoints of ``(state, data_state)`` under ``directory``.

    ``fingerprint`` (:func:`data_fingerprint`) is written with every data position and checked by
    :meth:`restore_latest`; without one, positions are stored and restored unchecked apart from their step.

    ``best_mode`` (``"min"`` or ``"max"``; None: off) keeps, besides the last ``keep``, the checkpoint with the best
    ``metrics={"monitor": value}`` passed to :meth:`save` (Orbax's ``best_fn``/``best_mode`` with a preservation
    policy of the latest ``keep`` or the best one); checkpoints saved without metrics compete only for the latest."""

    def __init__(
        self,
        directory: str | Path,
        *,
        keep: int = 3,
        async_save: bool = True,
        fingerprint: dict[str, Any] | None = None,
        best_mode: str | None = None,
    ) -> None:
        from orbax.checkpoint._src.checkpoint_managers import preservation_policy as policy

        self.directory = Path(directory).absolute()
        self.damaged_directory = self.directory.with_name(self.directory.name + "_damaged")
        self.fingerprint = fingerprint
        self.best_mode = best_mode
        best: dict[str, Any] = {}
        if best_mode is not None:
            if best_mode not in ("min", "max"):
                raise ValueError(f"`best_mode`={best_mode!r}; expected min, max or None")
            best_fn = lambda metrics: float(metrics[BEST_METRIC])
            preserve = policy.AnyPreservationPolicy(
                [
                    policy.LatestN(n=keep),
                    policy.BestN(
                        get_metric_fn=best_fn, reverse=best_mode == "min", n=1, keep_checkpoints_without_metrics=False
                    ),
                ]
            )
            best = {"best_fn": best_fn, "best_mode": best_mode, "preservation_policy": preserve}
            logging.getLogger("absl").addFilter(_MISSING_METRICS_FILTER)
        else:
            best = {"max_to_keep": keep}
        self._options = ocp.CheckpointManagerOptions(enable_async_checkpointing=async_save, create=True, **best)
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        """A manager on the directory, once what killed saves left behind (Orbax's temporary folders) is deleted.

        The deletion is ours and synchronous (process 0, the others wait): Orbax's ``cleanup_tmp_directories`` runs in
        a background thread that only a save waits for, so a manager closed before it saved (no checkpoint to
        restore, or reopened after moving damaged ones) could still be deleting, then race the next manager's
        cleanup over the same folder or delete a folder that the next manager's save had just created."""
        from corrjax.train import distributed

        if distributed.is_main_process() and self.directory.is_dir():
            for tmp in ocp.utils.tmp_checkpoints(self.directory):
                log.info("deleting %s, left by an unfinished save", tmp.get())
                tmp.get().rmtree()
        distributed.sync("corrjax-checkpoint-temporary-folders")
        return ocp.CheckpointManager(self.directory, options=self._options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        """The newest finished checkpoint's step (not verified), or None."""
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The step of the best checkpoint kept (by its ``monitor`` metric), or None (no best-keeping, or no
        checkpoint saved with a metric)."""
        if self.best_mode is None:
            return None
        with_metric = [s for s in self._manager.all_steps() if self._manager.metrics(s) is not None]
        return self._manager.best_step() if with_metric else None

    def save(
        self,
        step: int,
        state: Any,
        data_state: dict[str, Any],
        *,
        force: bool = False,
        metric: float | None = None,
        selection: dict[str, Any] | None = None,
    ) -> bool:
        """Starts saving ``state`` and ``data_state`` at ``step`` (asynchronously unless configured otherwise), with
        the model-selection state ``selection`` in the data item and, with best-keeping on, the monitored value
        ``metric`` of an evaluation at this step (None: not a candidate for the best)."""
        data = {"format": _DATA_FORMAT, "step": int(step), "fingerprint": self.fingerprint, "position": data_state}
        if selection is not None:
            data["selection"] = selection
        metrics = {BEST_METRIC: float(metric)} if self.best_mode is not None and metric is not None else None
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)),
            force=force,
            metrics=metrics,
        )
        if saved:
            log.info("checkpoint %d -> %s", step, self.directory)
        return saved

    def restore(self, abstract_state: Any, step: int | None = None) -> Restored:
        """Restores ``step`` (default: the latest) onto ``abstract_state``'s shapes, dtypes and shardings (a pytree
        of ``jax.ShapeDtypeStruct`` with ``sharding`` set), with its data position checked but the files not
        verified: errors are Orbax's. Resuming uses :meth:`restore_latest`, which falls back past damage."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint to restore in {self.directory}")
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
        )
        selection = dict(restored["data"]).get("selection")
        return Restored(restored["state"], self._position(restored["data"], step), step, selection)

    def restore_latest(self, abstract_state: Any) -> Restored | None:
        """The newest checkpoint that restores, or None when there is none at all.

        Damaged checkpoints newer than it are logged (path and reason) and moved into ``checkpoints_damaged/``.
        Raises :class:`CheckpointError` listing every checkpoint and its reason when none restores (nothing is
        moved then: a config that no longer matches its checkpoints fails them all) and
        :class:`DataPositionError` when the restored checkpoint's data position does not belong to it or to this
        run's data stream. In a multi-process run every process tries each candidate and they move on together
        when any of them failed."""
        from corrjax.train import distributed

        steps = self.step_dirs()
        if not steps:
            return None
        reasons: dict[int, str] = {}
        for step in steps:
            reason = self.verify(step)
            restored = None
            if reason is None:
                try:
                    restored = self.restore(abstract_state, step)
                except DataPositionError:
                    raise
                except Exception as e:  # any failure to read the files: a damaged checkpoint
                    reason = f"does not restore: {type(e).__name__}: {_first_line(e)}"
            if distributed.process_max(int(reason is not None)):  # some process could not read it
                reason = reason or "another process could not restore it"
                reasons[step] = reason
                log.warning("checkpoint %s is damaged (%s); trying an older one", self._path(step), reason)
                continue
            if reasons:
                self._move_damaged(reasons)
            return restored
        listing = "; ".join(f"{self._path(s)}: {r}" for s, r in reasons.items())
        raise CheckpointError(
            f"none of the {len(steps)} checkpoints in {self.directory} can be restored ({listing}). If the config "
            "changed since they were written, resume with the original one; otherwise start afresh with "
            "trainer.overwrite=true or in another directory"
        )

    def step_dirs(self) -> list[int]:
        """Steps of the finished-looking step folders under the directory, newest first (Orbax's temporary folders
        and anything not named by an integer are not)."""
        if not self.directory.is_dir():
            return []
        return sorted((int(p.name) for p in self.directory.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True)

    def verify(self, step: int) -> str | None:
        """Why checkpoint ``step`` cannot be used, found from its files without reading the arrays, or None: an
        empty folder, a missing item, an item's metadata missing or not parsing as JSON (the state's ``_METADATA``,
        the data position), or Orbax's ``_CHECKPOINT_METADATA`` not parsing (where it exists)."""
        path = self._path(step)
        if not any(path.iterdir()):
            return "empty step folder"
        for item in ITEMS:
            if not (path / item).is_dir():
                return f"missing item {item}/"
        for name, required in (("state/_METADATA", True), ("data/metadata", True), ("_CHECKPOINT_METADATA", False)):
            file = path / name
            if not file.is_file():
                if required:
                    return f"missing {name}"
                continue
            try:
                json.loads(file.read_text())
            except (ValueError, OSError) as e:
                return f"{name} is not valid JSON ({_first_line(e)})"
        return None

    def _position(self, data: Any, step: int) -> dict[str, Any]:
        """The iterator position of checkpoint ``step``'s data item, checked against the step and the fingerprint."""
        file = self._path(step) / "data" / "metadata"
        data = dict(data)
        if data.get("format") != _DATA_FORMAT:  # written before positions carried their step: unchecked
            log.warning("%s holds a data position without its step and data stream; restoring it unchecked", file)
            return data
        position = dict(data.get("position") or {})
        if int(data.get("step", -1)) != step:
            raise DataPositionError(
                f"{file} is the data position of step {data.get('step')}, not of its checkpoint's step {step}: "
                "resuming would train on different batches. Restore that file or resume from another checkpoint"
            )
        stored, mine = data.get("fingerprint"), self.fingerprint
        if stored is not None and mine is not None and _canonical(stored) != _canonical(mine):
            keys = sorted(k for k in set(stored) | set(mine) if _canonical(stored.get(k)) != _canonical(mine.get(k)))
            diffs = ", ".join(f"{k}: {stored.get(k)!r} in the checkpoint, {mine.get(k)!r} now" for k in keys)
            raise DataPositionError(
                f"{file} belongs to another data stream ({diffs}): this run would resume on different data. Resume "
                "with the original data, seed and batch size, or start afresh (trainer.overwrite=true or another "
                "directory)"
            )
        spe = (stored or mine or {}).get("steps_per_epoch")
        try:
            at = int(position["epoch"]) * int(spe) + int(position["step"]) if spe else step
        except (KeyError, TypeError, ValueError):
            raise DataPositionError(f"{file}: {position!r} is not an iterator position (epoch, step)") from None
        if at != step:
            raise DataPositionError(
                f"{file}: the position {position} is {at} batches into the stream, but its checkpoint is of step "
                f"{step} (one batch per step): resuming would train on different batches"
            )
        return position

    def _path(self, step: int) -> Path:
        return self.directory / str(step)

    def _move_damaged(self, reasons: dict[int, str]) -> None:
        """Moves the damaged step folders out of Orbax's sight (process 0), then reopens the manager."""
        from corrjax.train import distributed

        self._manager.wait_until_finished()
        if distributed.is_main_process():
            self.damaged_directory.mkdir(parents=True, exist_ok=True)
            for step, reason in reasons.items():
                target = self.damaged_directory / str(step)
                n = 1
                while target.exists():
                    target, n = self.damaged_directory / f"{step}.{n}", n + 1
                self._path(step).rename(target)
                (target.parent / f"{target.name}.reason.txt").write_text(reason + "\n")
                log.warning("moved damaged checkpoint %s to %s", self._path(step), target)
        distributed.sync("corrjax-damaged-checkpoints")
        self._manager.close()
        self._manager = self._open()

    def close(self) -> None:
        """Waits for pending asynchronous saves, then closes the manager."""
        self._manager.wait_until_finished()
        self._manager.close()


def _canonical(value: Any) -> str:
    """``value`` as sorted JSON text, so that a NaN in a config (``data.noise_std=nan``) compares equal to itself."""
    return json.dumps(value, sort_keys=True, default=str)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def abstract_like(tree: Any) -> Any:
    """``jax.ShapeDtypeStruct`` of every array leaf of ``tree``, keeping its sharding (the restore target)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)
