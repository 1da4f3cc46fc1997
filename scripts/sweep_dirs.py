"""Fresh, time-stamped sweep folders for the experiment scripts (``multirun/<study>/<stamp>``)."""

from __future__ import annotations

import datetime
from pathlib import Path


def new_sweep_dir(parent: Path) -> Path:
    """Creates and returns a fresh folder under ``parent`` named by the current time; studies started in the same
    second get ``<stamp>_1``, ``<stamp>_2``, ... instead of sharing one (``mkdir`` claims the name atomically)."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    parent.mkdir(parents=True, exist_ok=True)
    for k in range(1000):
        path = parent / (stamp if k == 0 else f"{stamp}_{k}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free sweep folder for {stamp} under {parent}")
