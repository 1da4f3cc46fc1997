"""kill -9 at random moments, including while a checkpoint is being written: `scripts/train.py trainer.resume=true`
started again after each kill (what a scheduler's requeue does) ends with the uninterrupted run's metrics and
summary, bit for bit."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["trainer=tiny", "logger=minimal", "data.num_examples=256"]
# A checkpoint at every step, written asynchronously: a kill at a random moment often lands inside a save.
RUN = [
    *TINY,
    "trainer.max_steps=40",
    "trainer.checkpoint_every=1",
    "trainer.async_checkpointing=true",
    "trainer.eval_every=10",
    "parallel.data=1",
    "trainer.resume=true",
]
NONDETERMINISTIC = ("train/examples_per_s", "wall_time_s")


def env_for(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(tmp_path.parent / "xla_cache_subprocess"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        HYDRA_FULL_ERROR="1",
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    return env


def start(run_dir: Path, tmp_path: Path, log: str) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), *RUN, f"hydra.run.dir={run_dir}"]
    with (tmp_path / log).open("wb") as err:
        return subprocess.Popen(cmd, env=env_for(tmp_path), stdout=subprocess.DEVNULL, stderr=err)


def saving(run_dir: Path) -> bool:
    """Whether an Orbax save is under way (its temporary folder exists)."""
    folder = run_dir / "checkpoints"
    return folder.is_dir() and any("orbax-checkpoint-tmp" in p.name for p in folder.iterdir())


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300, every: float = 0.002) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(every)
    return False


def results(run_dir: Path) -> tuple[list[dict], dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    strip = lambda r: {k: v for k, v in r.items() if k not in NONDETERMINISTIC}
    return [strip(r) for r in records], strip(summary)


@pytest.mark.slow
def test_kill_9_anywhere_then_resume_is_exact(tmp_path):
    ref = tmp_path / "reference"
    proc = start(ref, tmp_path, "reference.txt")
    assert proc.wait(timeout=600) == 0, (tmp_path / "reference.txt").read_text()[-3000:]
    expected = results(ref)

    run = tmp_path / "killed"
    rng = random.Random(18)
    kills = []
    # 1: as soon as a checkpoint is being written; 2 and 3: a random delay after training has (re)started.
    for attempt, moment in enumerate(("saving", "random", "random")):
        proc = start(run, tmp_path, f"attempt{attempt}.txt")
        try:
            if moment == "saving":
                hit = wait_for(lambda: saving(run), proc)
            else:
                hit = wait_for(lambda: (run / "metrics.jsonl").exists(), proc)
                time.sleep(rng.uniform(0.0, 1.5))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            proc.kill()
        assert hit, (tmp_path / f"attempt{attempt}.txt").read_text()[-3000:]
        kills.append((moment, proc.returncode, saving(run)))
    assert kills[0] == ("saving", -signal.SIGKILL, True), kills  # the first kill left a save half-written
    proc = start(run, tmp_path, "final.txt")
    assert proc.wait(timeout=600) == 0, (tmp_path / "final.txt").read_text()[-3000:]
    records, summary = results(run)
    assert [r["step"] for r in records] == list(range(1, 41))
    assert records == expected[0]
    assert summary == expected[1]
    assert not saving(run)  # the half-written saves were cleaned up
