"""One run per run directory (corrjax.train.rundir): the lock, stale locks of dead processes, the refusal to start
afresh over a previous run's results, trainer.overwrite, and two real runs started in one directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from corrjax.train import loop, rundir

ROOT = Path(__file__).resolve().parents[2]
TINY = ["trainer=tiny", "logger=minimal", "data.num_examples=256"]

# Holds the lock of argv[1] and prints "locked" until killed (a run in another process).
HOLDER = """
import sys, time
from corrjax.train.rundir import RunLock
lock = RunLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
time.sleep(600)
"""


def _holder(run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_is_exclusive_and_names_the_holder(tmp_path):
    with rundir.RunLock(tmp_path / "run") as first:
        assert first.held
        owner = json.loads((tmp_path / "run" / ".lock").read_text())
        assert owner["pid"] == os.getpid()
        with pytest.raises(rundir.RunDirInUseError) as e:
            rundir.RunLock(tmp_path / "run").acquire()
        assert str(tmp_path / "run") in str(e.value) and f"pid {os.getpid()}" in str(e.value)
    assert not first.held
    with rundir.RunLock(tmp_path / "run"):  # released: a later run takes it
        pass


def test_lock_held_by_another_process_then_freed_by_its_death(tmp_path):
    """A live holder in another process blocks; after SIGKILL (no clean-up ran) the lock is free at once: the kernel
    drops a dead process's flock, so a stale lock file never blocks a run."""
    proc = _holder(tmp_path)
    try:
        with pytest.raises(rundir.RunDirInUseError, match=rf"pid {proc.pid} on "):
            rundir.RunLock(tmp_path).acquire()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert (tmp_path / ".lock").exists()  # the dead run's lock file is still there ...
    with rundir.RunLock(tmp_path) as lock:  # ... and does not block
        assert lock.held


def test_lock_is_released_when_the_run_raises(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), rundir.claim(tmp_path, resume=False, overwrite=False):
        raise RuntimeError("boom")
    with rundir.claim(tmp_path, resume=False, overwrite=False):
        pass


def _fill(run_dir: Path) -> None:
    (run_dir / "checkpoints" / "4").mkdir(parents=True)
    (run_dir / "checkpoints" / "4" / "x").write_text("x")
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    (run_dir / "tb").mkdir()
    (run_dir / "tb" / "events").write_text("e")


def test_hydra_files_do_not_make_a_directory_used(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "train.log").write_text("log\n")
    (tmp_path / "launch_local.1.log").write_text("log\n")
    (tmp_path / "checkpoints").mkdir()  # empty: what Orbax leaves when a run dies before its first save
    assert rundir.previous_results(tmp_path) == []
    rundir.prepare(tmp_path, resume=False, overwrite=False)


def test_fresh_run_over_results_is_refused_naming_the_ways_out(tmp_path):
    _fill(tmp_path)
    with pytest.raises(rundir.RunDirNotEmptyError) as e:
        rundir.prepare(tmp_path, resume=False, overwrite=False)
    text = str(e.value)
    assert str(tmp_path) in text and "trainer.resume=true" in text and "trainer.overwrite=true" in text
    assert "hydra.run.dir" in text and "checkpoints" in text and "metrics.jsonl" in text
    assert (tmp_path / "checkpoints" / "4" / "x").exists() and (tmp_path / "metrics.jsonl").read_text()
    rundir.prepare(tmp_path, resume=True, overwrite=False)  # resume touches nothing
    assert (tmp_path / "checkpoints" / "4" / "x").exists()
    with pytest.raises(ValueError, match=r"trainer\.resume.*trainer\.overwrite"):
        rundir.prepare(tmp_path, resume=True, overwrite=True)


def test_overwrite_removes_the_results_and_only_them(tmp_path):
    _fill(tmp_path)
    (tmp_path / ".hydra").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / ".overwritten-12345" / "checkpoints").mkdir(parents=True)  # an earlier overwrite killed half-way
    rundir.prepare(tmp_path, resume=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hydra", "notes.txt"]


def test_second_run_in_a_held_directory_fails_fast(compose_fn, tmp_path):
    """loop.run refuses a directory held by another run before building anything (no data, model or compilation),
    whether it starts afresh or resumes (a scheduler requeueing a running job)."""
    with rundir.RunLock(tmp_path):
        for resume in ("false", "true"):
            t0 = time.perf_counter()
            with pytest.raises(rundir.RunDirInUseError, match=str(tmp_path)):
                loop.run(compose_fn([*TINY, f"trainer.resume={resume}"]), run_dir=tmp_path)
            assert time.perf_counter() - t0 < 5
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


def test_fresh_run_in_a_used_directory_keeps_the_old_results(compose_fn, tmp_path):
    """Before, a fresh run deleted the old checkpoints, tb/ and metrics with a warning; now it stops before building
    anything and leaves every byte, and trainer.overwrite=true replaces them."""
    _fill(tmp_path)
    over = [*TINY, "trainer.max_steps=2", "trainer.eval_every=0"]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(rundir.RunDirNotEmptyError, match=r"trainer\.overwrite=true"):
        loop.run(compose_fn(over), run_dir=tmp_path)
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before
    summary = loop.run(compose_fn([*over, "trainer.overwrite=true"]), run_dir=tmp_path)
    assert summary["completed"]
    assert [r["step"] for r in loop_records(tmp_path)] == [1, 2]
    assert not (tmp_path / "checkpoints" / "4").exists() and (tmp_path / "checkpoints" / "2").is_dir()


def loop_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def subprocess_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(tmp_path.parent / "xla_cache_subprocess"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        HYDRA_FULL_ERROR="1",
    )
    return env


def _train_cmd(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "train.py"), *TINY, f"hydra.run.dir={run_dir}", *extra]


def test_refused_train_script_leaves_the_recorded_config_alone(tmp_path):
    """scripts/train.py refuses a fresh run over a previous run's results before Hydra writes into the directory:
    the old run's .hydra/overrides.yaml (which scripts/compare.py groups runs by) is not replaced."""
    _fill(tmp_path)
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- seed=5\n")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    out = subprocess.run(_train_cmd(tmp_path, "seed=1"), env=subprocess_env(tmp_path), capture_output=True, text=True)
    assert out.returncode == 1 and f"run directory {tmp_path} holds a previous run's results" in out.stderr
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_two_processes_in_one_directory(tmp_path):
    """A second `scripts/train.py` in a running run's directory (fresh, or `trainer.resume=true` as a scheduler's
    requeue would) exits non-zero at once naming the directory and the first run's pid; the first run goes on and
    its records stay one per step, in order."""
    run = tmp_path / "run"
    env = subprocess_env(tmp_path)
    long = ["trainer.max_steps=1000000", "trainer.eval_every=0", "trainer.checkpoint_every=50", "parallel.data=1"]
    with (tmp_path / "first.txt").open("wb") as err:
        first = subprocess.Popen(_train_cmd(run, *long), env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 300
        while not (run / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, (tmp_path / "first.txt").read_text()[-2000:]
        for extra in ([], ["trainer.resume=true"], ["seed=1", "trainer.overwrite=true"]):
            second = subprocess.run(
                _train_cmd(run, *long, *extra), env=env, capture_output=True, text=True, timeout=300
            )
            assert second.returncode != 0
            assert f"run directory {run} is in use" in second.stderr and f"pid {first.pid}" in second.stderr
        assert first.poll() is None
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 128 + signal.SIGTERM
    steps = [r["step"] for r in loop_records(run)]
    assert steps == list(range(1, len(steps) + 1))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == steps[-1] and summary["stopped_by_signal"] == "SIGTERM"
