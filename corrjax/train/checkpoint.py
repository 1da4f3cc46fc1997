"""Orbax checkpointing of the whole training state: model, optimiser, RNG, counters and the data-iterator position.

One :class:`orbax.checkpoint.CheckpointManager` under ``<run_dir>/checkpoints`` saves two items per step: ``state``
(the :class:`~corrjax.train.state.TrainState` pytree of arrays, restored onto the shardings of an abstract target)
and ``data`` (the iterator's small JSON position). Saves are asynchronous (training continues while the previous
checkpoint is written) and only the last ``keep`` are kept. Every process calls these methods; Orbax coordinates
the hosts and writes shared files from the primary host.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    """Keeps the last ``keep`` checkpoints of ``(state, data_state)`` under ``directory``."""

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True) -> None:
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        """The newest finished checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict[str, Any], *, force: bool = False) -> bool:
        """Starts saving ``state`` and ``data_state`` at ``step`` (asynchronously unless configured otherwise)."""
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
            force=force,
        )
        if saved:
            log.info("checkpoint %d -> %s", step, self.directory)
        return saved

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any], int]:
        """Restores ``(state, data_state, step)`` from ``step`` (default: the latest) onto ``abstract_state``'s
        shapes, dtypes and shardings (a pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint to resume from in {self.directory}")
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
        )
        return restored["state"], dict(restored["data"]), step

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree: Any) -> Any:
    """``jax.ShapeDtypeStruct`` of every array leaf of ``tree``, keeping its sharding (the restore target)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)
