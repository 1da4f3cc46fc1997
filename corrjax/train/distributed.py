"""Multi-host start-up: ``jax.distributed.initialize`` before any other JAX call, and one shared run directory.

Initialisation happens when ``parallel.distributed.enabled`` is true, or, when it is left ``None``, when SLURM's
environment describes a multi-task job (``SLURM_NTASKS`` > 1), in which case JAX's cluster auto-detection fills
in the coordinator, process count and id. On CPU the cross-process collectives use gloo (JAX's default
``jax_cpu_collectives_implementation``), which is what :mod:`scripts.launch_local` relies on.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)

_MAX_PATH_BYTES = 4096


def slurm_multiprocess() -> bool:
    """True inside a SLURM job step with more than one task."""
    return "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1


def maybe_initialize(cfg: Any) -> bool:
    """Calls ``jax.distributed.initialize`` when ``cfg`` (a ``parallel.distributed`` node) or SLURM asks for it.

    Returns whether it initialised. Must run before anything touches JAX devices.
    """
    enabled = cfg.enabled if cfg.enabled is not None else slurm_multiprocess()
    if not enabled:
        return False
    kwargs = {
        key: getattr(cfg, key)
        for key in ("coordinator_address", "num_processes", "process_id")
        if getattr(cfg, key) is not None
    }
    if cfg.local_device_ids is not None:
        kwargs["local_device_ids"] = list(cfg.local_device_ids)
    jax.distributed.initialize(initialization_timeout=cfg.initialization_timeout, **kwargs)
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True


def is_main_process() -> bool:
    return jax.process_index() == 0


def broadcast_str(value: str) -> str:
    """Process 0's ``value`` on every process (identity with one process)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    raw = value.encode()
    if len(raw) > _MAX_PATH_BYTES:
        raise ValueError(f"`value` is {len(raw)} bytes; at most {_MAX_PATH_BYTES} can be broadcast")
    buf = np.zeros(_MAX_PATH_BYTES + 2, np.uint8)
    buf[0], buf[1] = divmod(len(raw), 256)
    buf[2 : 2 + len(raw)] = np.frombuffer(raw, np.uint8)
    out = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    n = int(out[0]) * 256 + int(out[1])
    return bytes(out[2 : 2 + n]).decode()


def sync(name: str) -> None:
    """Barrier across processes (no-op with one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def process_max(value: int) -> int:
    """The largest of the processes' ``value`` (non-negative ints below 2**31), on every process; ``value`` itself
    with one process.

    A collective: every process must call it at the same point (the loop calls it at its logging steps with the
    signal it received, 0 for none, so that a signal that reached some processes stops all of them on one step)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(np.asarray(multihost_utils.process_allgather(np.asarray(value, np.int32))).max())
