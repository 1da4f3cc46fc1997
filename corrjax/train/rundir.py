"""One run per run directory: an exclusive lock for the run's life, and no silent loss of a previous run's results.

:func:`claim` is what the loop calls around a run: process 0 takes ``<run_dir>/.lock`` (:class:`RunLock`, an
exclusive ``fcntl.flock`` held until the run ends) and then prepares the directory (:func:`prepare`), and every other
process of a multi-process run learns the outcome from it, so all of them fail with the same message or none does.

- A second run in a directory that a live run holds fails at once with :class:`RunDirInUseError`, naming the
  directory and the holder's pid and host. The kernel drops a ``flock`` when its process dies (even by SIGKILL), so a
  lock left by a dead run is never in the way; the lock file stays (unlinking it would race with a new holder).
- A fresh run (``trainer.resume=false``) in a directory that holds a previous run's results (:data:`RESULTS`: its
  checkpoints, metrics, summary, TensorBoard and W&B files, plots, representation snapshots) fails with
  :class:`RunDirNotEmptyError`, naming the directory, what is there and the ways out: ``trainer.resume=true``,
  ``trainer.overwrite=true``, or another ``hydra.run.dir``. With ``trainer.overwrite=true`` those results are
  **removed** (moved into a hidden ``.overwritten-<pid>`` folder by renames first, then deleted, so a kill half-way
  never leaves half of an old run looking like a result; a leftover folder is deleted by the next run).
- What Hydra writes into a new run directory before the run starts (``.hydra/``, ``<job>.log``) and
  ``scripts/launch_local.py``'s ``launch_local.<i>.log`` are not results: a new Hydra run directory is not "used".

``flock`` locks are also honoured across NFS clients on Linux (emulated with byte-range locks); on file systems that
do not support locking at all the lock raises ``OSError``, and the message says so.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
# Everything a run writes into its directory besides Hydra's own files (.hydra/, <job>.log) and the lock.
RESULTS = (
    "checkpoints",
    "checkpoints_damaged",
    "metrics.jsonl",
    "metrics.csv",
    "summary.json",
    "tb",
    "wandb",
    "tracking.json",
    "plots",
    "representations",
)
_TRASH_PREFIX = ".overwritten-"


class RunDirInUseError(RuntimeError):
    """Another live run holds the run directory's lock."""


class RunDirNotEmptyError(FileExistsError):
    """A fresh run was started in a directory holding a previous run's results."""


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``<run_dir>/.lock``, with the holder's pid, host and start time
    written into the file for the message a second run gets. Use as a context manager or call
    :meth:`acquire`/:meth:`release`; the kernel releases it when the process exits, however it exits."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Takes the lock or raises :class:`RunDirInUseError` naming the directory and the holder."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirInUseError(
                    f"run directory {self.run_dir} is in use by another run ({self.holder()}); wait for it to "
                    "finish, or start this run in another directory (hydra.run.dir=...)"
                ) from None
            raise OSError(e.errno, f"cannot lock {self.path} (does this file system support flock?): {e}") from e
        previous = _read_owner(fd)
        if previous:
            log.info("run directory %s: taking over the lock of a finished run (%s)", self.run_dir, previous)
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        self._fd = fd

    def holder(self) -> str:
        """``pid <pid> on <host> since <time>`` as written by the holder (or a note that it is unknown)."""
        try:
            owner = json.loads(self.path.read_text())
            return f"pid {owner['pid']} on {owner['host']} since {owner['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return f"holder unknown: {self.path} has no owner record yet"

    def release(self) -> None:
        """Releases the lock (idempotent). The file stays: removing it would let two runs lock two different files."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_owner(fd: int) -> str:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    except OSError:
        return ""
    return text


def previous_results(run_dir: str | Path) -> list[Path]:
    """The entries of :data:`RESULTS` in ``run_dir`` that hold something (a non-empty file or folder)."""
    run_dir = Path(run_dir)
    found = []
    for name in RESULTS:
        path = run_dir / name
        if (path.is_dir() and any(path.iterdir())) or (path.is_file() and path.stat().st_size > 0):
            found.append(path)
    return found


def prepare(run_dir: str | Path, *, resume: bool, overwrite: bool) -> None:
    """Checks (and with ``overwrite``, clears) ``run_dir`` for a run; call it with the run's lock held.

    - ``resume=True``: nothing is touched (the loop truncates what comes after the restored checkpoint).
    - ``resume=False`` and no previous results: nothing to do (Hydra's ``.hydra/`` and log files do not count).
    - ``resume=False`` with previous results: :class:`RunDirNotEmptyError` naming the directory and the ways out,
      unless ``overwrite=True``, which removes them (logged as a warning listing them).

    Raises ``ValueError`` for ``resume`` and ``overwrite`` both true (continue the run or replace it, not both).
    """
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise ValueError(
            "`trainer.resume`=true and `trainer.overwrite`=true contradict each other: resume continues the run in "
            f"{run_dir}, overwrite deletes it; set one of them"
        )
    _remove_trash(run_dir)
    if resume:
        return
    found = previous_results(run_dir)
    if not found:
        return
    names = ", ".join(p.name for p in found)
    if not overwrite:
        raise RunDirNotEmptyError(
            f"run directory {run_dir} holds a previous run's results ({names}); a fresh run would mix with or "
            "delete them. Continue that run with trainer.resume=true, replace it with trainer.overwrite=true "
            "(deletes them), or start in a fresh directory (hydra.run.dir=...)"
        )
    log.warning("trainer.overwrite=true: deleting the previous run's results in %s (%s)", run_dir, names)
    trash = run_dir / f"{_TRASH_PREFIX}{os.getpid()}"
    trash.mkdir(exist_ok=True)
    for path in found:  # renames first: a kill here leaves the results whole, or out of the way
        path.rename(trash / path.name)
    for name in RESULTS:  # empty leftovers (an empty checkpoints/ folder, an empty metrics file)
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    shutil.rmtree(trash)


def check_free(run_dir: str | Path, *, resume: bool, overwrite: bool) -> None:
    """Raises what :func:`claim` would (:class:`RunDirInUseError`, :class:`RunDirNotEmptyError`, ``ValueError``)
    without creating, locking or changing anything: for checks before the run, such as
    :class:`corrjax.train.hydra_callbacks.RunDirGuard` before Hydra writes its ``.hydra/`` files into the
    directory (which would overwrite the recorded config of the run that is there)."""
    run_dir = Path(run_dir)
    if resume and overwrite:
        prepare(run_dir, resume=resume, overwrite=overwrite)  # raises the ValueError naming both keys
    lock = RunLock(run_dir)
    if lock.path.is_file():
        fd = os.open(lock.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirInUseError(
                    f"run directory {run_dir} is in use by another run ({lock.holder()}); wait for it to finish, or "
                    "start this run in another directory (hydra.run.dir=...)"
                ) from None
        finally:
            os.close(fd)  # closing drops the probe's lock too
    if not resume and not overwrite and previous_results(run_dir):
        prepare(run_dir, resume=False, overwrite=False)  # raises RunDirNotEmptyError naming what is there


def _remove_trash(run_dir: Path) -> None:
    """Deletes what an overwrite killed half-way left behind (only this run holds the directory now)."""
    for trash in run_dir.glob(f"{_TRASH_PREFIX}*"):
        log.info("removing %s (left by an interrupted trainer.overwrite)", trash)
        shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def claim(run_dir: str | Path, *, resume: bool, overwrite: bool) -> Iterator[Path]:
    """Holds ``run_dir`` for the ``with`` block: process 0 takes the :class:`RunLock` and runs :func:`prepare`; in a
    multi-process run the others wait for its outcome and raise the same error when it failed. The lock is released
    when the block ends, by an exception too; a killed process releases it by dying."""
    from corrjax.train import distributed

    run_dir = Path(run_dir)
    lock = RunLock(run_dir) if distributed.is_main_process() else None
    error: Exception | None = None
    if lock is not None:
        try:
            lock.acquire()
            prepare(run_dir, resume=resume, overwrite=overwrite)
        except (RunDirInUseError, RunDirNotEmptyError, ValueError, OSError) as e:
            lock.release()
            error = e
    outcome = distributed.broadcast_str(_encode(error))
    if lock is None and outcome:
        error = _decode(outcome)
    if error is not None:
        raise error
    try:
        yield run_dir
    finally:
        if lock is not None:
            lock.release()


_ERRORS = {cls.__name__: cls for cls in (RunDirInUseError, RunDirNotEmptyError, ValueError, OSError)}


def _encode(error: Exception | None) -> str:
    if error is None:
        return ""
    name = type(error).__name__ if type(error).__name__ in _ERRORS else "OSError"
    return f"{name}:{error}"[:4000]


def _decode(outcome: str) -> Exception:
    name, _, message = outcome.partition(":")
    return _ERRORS.get(name, RuntimeError)(f"process 0: {message}")
