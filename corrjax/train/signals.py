"""Stopping on a signal: SIGINT (Ctrl-C) or SIGTERM (e.g. SLURM preemption) finishes the step, saves and stops.

:class:`Interrupt` sets a flag that the loop polls after each step; a second Ctrl-C interrupts at once. With several
processes the stop is agreed in one place, :meth:`Interrupt.should_stop`: the processes must stop on the same step
(the checkpoint save and the next step are collectives) but a signal reaches them at different points, so they
agree at the sync points the loop names (its logging steps, which wait for the device anyway; a stop then comes at
most ``log_every - 1`` steps after the signal), and those the signal did not reach record it too.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

import jax

from corrjax.train import distributed

log = logging.getLogger(__name__)


class Interrupt:
    """Context manager installing the SIGINT/SIGTERM handlers (restored on exit); ``signum`` is the first signal
    received (the summary records it as ``stopped_by_signal``)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Interrupt:
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

    def should_stop(self, sync_point: bool) -> bool:
        """Whether to stop after this step: the flag itself with one process; with several, the processes' agreed
        flag at a ``sync_point`` (a collective: every process calls it with the same ``sync_point``) and False
        elsewhere."""
        if jax.process_count() == 1:
            return self.requested
        return sync_point and self.agree(distributed.process_max(self.signum or 0))

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
