"""End-to-end tiny runs: outputs present and well-formed, exact resume, the non-finite stop, a local multirun with
scripts/compare.py, and a 2-process run through scripts/launch_local.py equal to the 1-process run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from corrjax.train import loop

ROOT = Path(__file__).resolve().parents[2]
TINY = ["trainer=tiny", "logger=minimal", "data.num_examples=256"]
NONDETERMINISTIC = ("train/examples_per_s",)


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def deterministic(records):
    return [{k: v for k, v in r.items() if k not in NONDETERMINISTIC} for r in records]


def assert_close_records(a, b, rtol):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for k in ra:
            if isinstance(ra[k], (int, float, list)) and not isinstance(ra[k], bool):
                np.testing.assert_allclose(np.asarray(ra[k], float), np.asarray(rb[k], float), rtol=rtol, atol=1e-6)


def subprocess_env(tmp_path):
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(tmp_path.parent / "xla_cache_subprocess"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        HYDRA_FULL_ERROR="1",
    )
    return env


def test_tiny_run_outputs(compose_fn, tmp_path):
    cfg = compose_fn([*TINY, "logger=default", "model=mmoe", "mtl=pcgrad", "optim=msvag", "regularizer=decov"])
    summary = loop.run(cfg, run_dir=tmp_path)
    assert summary["completed"] and summary["step"] == 4
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["eval/loss"] == pytest.approx(sum(on_disk[f"eval/task{i}/loss"] for i in range(2)), rel=1e-5)
    for task in ("task0", "task1"):
        for metric in ("loss", "rmse", "pearson"):
            assert np.isfinite(on_disk[f"eval/{task}/{metric}"])
    assert np.asarray(on_disk["eval/pred_corr"]).shape == (2, 2)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(np.isfinite(r["train/regularizer"]) for r in records)
    assert "eval/loss" in records[1] and "eval/loss" not in records[0]
    assert records[-1]["train/trace_cov"] > 0 and np.isfinite(records[-1]["train/noise_scale"])
    assert np.asarray(on_disk["eval/gate_usage"]).shape == (2, 8)  # MMoE: 2 tasks x 8 experts
    np.testing.assert_allclose(np.asarray(on_disk["eval/gate_usage"]).sum(1), 1.0, rtol=1e-5)
    assert np.asarray(on_disk["eval/shared_cka_over_training"]).shape == (2, 2)  # evals at steps 2 and 4
    cos = np.asarray(records[-1]["train/grad_cosine"])
    assert cos.shape == (2, 2) and np.allclose(np.diag(cos), 1, atol=1e-5) and np.allclose(cos, cos.T)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    pngs = {p.name for p in (tmp_path / "plots").glob("*.png")}
    assert {"train_grad_cosine.png", "eval_pred_corr.png", "eval_error_corr.png", "curve_train_loss.png"} <= pngs
    assert {"eval_task_rep_cka.png", "eval_expert_cka.png", "eval_shared_cka_over_training.png"} <= pngs
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]


@pytest.mark.parametrize("stop_after", [4, 2])
def test_resume_reproduces_the_uninterrupted_run(compose_fn, tmp_path, stop_after):
    """Stopped after an evaluation (4) or before the first one (2): the resumed run's metrics and summary equal the
    uninterrupted run's. A stop evaluates nothing the uninterrupted run would not (the stop at 2 used to evaluate
    there, and the resumed summary's CKA over training gained that point: steps [2, 3, 6])."""
    over = [*TINY, "trainer.max_steps=6", "trainer.eval_every=3", "trainer.async_checkpointing=true", "mtl=rlw"]
    full = loop.run(compose_fn(over), run_dir=tmp_path / "full")
    part = loop.run(compose_fn([*over, f"trainer.stop_after={stop_after}"]), run_dir=tmp_path / "resumed")
    assert not part["completed"] and part["step"] == stop_after
    snapshots = sorted(int(p.stem) for p in (tmp_path / "resumed" / "representations").glob("*.npy"))
    assert snapshots == [k for k in (3,) if k <= stop_after]
    assert ("eval/loss" in part) == (stop_after >= 3)  # the evaluations of the stopped invocation only
    resumed = loop.run(compose_fn([*over, "trainer.resume=true"]), run_dir=tmp_path / "resumed")
    assert resumed["completed"]
    a = deterministic(read_jsonl(tmp_path / "full" / "metrics.jsonl"))
    b = deterministic(read_jsonl(tmp_path / "resumed" / "metrics.jsonl"))
    assert a == b  # exactly: model, optimiser (rlw's key), RNG and data position restored
    assert full["eval/shared_cka_steps"] == resumed["eval/shared_cka_steps"] == [3, 6]
    again = loop.run(compose_fn([*over, "trainer.resume=true"]), run_dir=tmp_path / "resumed")  # already finished
    assert again["step"] == 6 and again["eval/shared_cka_steps"] == [3, 6]
    assert full.keys() == resumed.keys() == again.keys()
    for k in full:  # the CKA over training included: its snapshots before the interruption are kept in the run dir
        if k.startswith(("eval/", "train/")) and k != "train/examples_per_s":
            np.testing.assert_array_equal(full[k], resumed[k], err_msg=k)
            np.testing.assert_array_equal(full[k], again[k], err_msg=k)


def test_nonfinite_losses_stop_the_run(compose_fn, tmp_path):
    cfg = compose_fn([*TINY, "data.noise_std=nan", "trainer.max_nonfinite_in_a_row=2"])
    with pytest.raises(loop.NonFiniteError, match="2 consecutive steps with non-finite"):
        loop.run(cfg, run_dir=tmp_path)
    assert all(r["train/nonfinite_total"] == r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl"))


def test_single_task_subset_and_bad_subset(compose_fn, tmp_path):
    summary = loop.run(compose_fn([*TINY, "tasks=[task1]", "trainer.max_steps=2"]), run_dir=tmp_path)
    assert summary["tasks"] == ["task1"] and "eval/task0/loss" not in summary
    with pytest.raises(ValueError, match="dataset's tasks"):
        loop.run(compose_fn([*TINY, "tasks=[nope]"]), run_dir=tmp_path / "bad")


@pytest.mark.parametrize("seed", [-1, 2**32 + 3])
def test_bad_seed_fails_before_anything_naming_it(compose_fn, tmp_path, seed):
    """Negative seeds used to fail on the first batch with NumPy's SeedSequence message (after data, model and
    compilation); seeds past 2**31 would silently share JAX keys with smaller ones. Refused first, naming `seed`."""
    with pytest.raises(ValueError, match=r"`seed`.*\[0, 2\*\*31\)"):
        loop.run(compose_fn([*TINY, f"seed={seed}"]), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "key, value",
    [
        ("log_every", 0),
        ("eval_batch_size", 0),
        ("batch_size", 0),
        ("max_steps", -1),
        ("eval_every", -2),
        ("checkpoint_every", -1),
        ("keep_checkpoints", 0),
        ("max_nonfinite_in_a_row", 0),
        ("stop_after", 0),
    ],
)
def test_bad_trainer_values_fail_first_naming_the_key(compose_fn, tmp_path, key, value):
    """Well-typed but meaningless trainer values used to crash mid-run (``log_every=0``: modulo by zero after the
    first step; ``eval_batch_size=0``: range() step 0) or misbehave (``max_nonfinite_in_a_row=0`` stopped every run
    at its first log step); they are refused before anything runs, naming the key."""
    from corrjax.train.ensemble import train_seeds

    cfg = compose_fn([*TINY, f"trainer.{key}={value}"])
    with pytest.raises(ValueError, match=rf"`trainer\.{key}`={value}"):
        loop.run(cfg, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=rf"`trainer\.{key}`={value}"):
        train_seeds(cfg, [0], [tmp_path / "ens"])
    assert not (tmp_path / "ens").exists()


def test_interrupt_flag():
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs as a background job
    from corrjax.train.signals import Interrupt

    with Interrupt() as interrupt:
        signal.raise_signal(signal.SIGINT)
        assert interrupt.requested and interrupt.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before  # restored


def _start_logged(cmd: list[str], tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """Starts ``cmd`` with its stderr in a file (a pipe nobody reads fills up and blocks the run)."""
    log = tmp_path / "stderr.txt"
    with log.open("wb") as err:
        return subprocess.Popen(cmd, env=subprocess_env(tmp_path), stdout=subprocess.DEVNULL, stderr=err), log


@pytest.mark.slow
def test_sigterm_saves_and_stops_the_sweep(tmp_path):
    """SIGTERM (preemption) during a local multirun: the running job saves a checkpoint and a summary marked
    stopped_by_signal, then the process exits with 128 + SIGTERM instead of starting the sweep's next job."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "-m", *TINY, "trainer.eval_every=0"]
    cmd += ["trainer.max_steps=1000000", "trainer.checkpoint_every=0", "seed=0,1", f"hydra.sweep.dir={sweep}"]
    cmd += ["parallel.data=1"]
    proc, log = _start_logged(cmd, tmp_path)
    try:
        deadline = time.monotonic() + 300
        while not list(sweep.glob("0/metrics.jsonl")) and time.monotonic() < deadline:  # training has started
            time.sleep(0.5)
        assert proc.poll() is None, log.read_text()[-2000:]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    summary = json.loads((sweep / "0" / "summary.json").read_text())
    assert summary["stopped_by_signal"] == "SIGTERM" and not summary["completed"]
    assert any((sweep / "0" / "checkpoints").iterdir())
    assert not (sweep / "1").exists()


@pytest.mark.slow
def test_local_multirun_and_compare(tmp_path):
    # The default sweep folder, multirun/<name>/<time stamp> under the working directory (its `name` resolves
    # ${hydra:runtime.choices.*} before any job has run: corrjax.train.hydra_callbacks.SweepDir).
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "-m", *TINY, "trainer.eval_every=0"]
    cmd += ["mtl=ew,sum", "seed=0,1", "parallel.data=1"]
    subprocess.run(cmd, check=True, env=subprocess_env(tmp_path), capture_output=True, timeout=600, cwd=tmp_path)
    (sweep,) = (tmp_path / "multirun" / "synthetic-hps-ew+sum").iterdir()
    assert len(list(sweep.glob("*/summary.json"))) == 4
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "compare.py"),
            str(sweep),
            "--metrics",
            "rmse",
            "--baseline-group",
            "mtl=ew",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "mtl=sum" in out.stdout and "±" in out.stdout
    result = json.loads((sweep / "comparison.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["mtl=ew"]["seeds"] == 2 and rows["mtl=ew"]["delta_m"] == pytest.approx(0.0, abs=1e-9)
    assert (sweep / "comparison.png").stat().st_size > 0


def _pids_with(*parts: str) -> list[int]:
    """PIDs of the processes whose command line contains every one of ``parts`` (Linux /proc)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if proc.name.isdigit() and all(p in cmdline for p in parts):
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the second process through /proc")
def test_a_signal_to_one_process_stops_both_on_one_step(tmp_path):
    """SIGTERM to process 1 alone: the processes agree at the next logging step, both save there and exit with
    128 + SIGTERM (before, process 1 stopped for a checkpoint while process 0 went on into the next step's
    collectives, and the run hung)."""
    run = tmp_path / "two"
    over = [*TINY, "trainer.max_steps=1000000", "trainer.eval_every=0", "trainer.checkpoint_every=0"]
    over += ["trainer.log_every=5", f"hydra.run.dir={run}"]
    cmd = [sys.executable, str(ROOT / "scripts" / "launch_local.py"), "--num-processes", "2"]
    cmd += ["--devices-per-process", "1", "--", *over]
    proc, log = _start_logged(cmd, tmp_path)
    try:
        deadline = time.monotonic() + 300
        while not (run / "metrics.jsonl").exists() and time.monotonic() < deadline:  # training has started
            time.sleep(0.5)
        assert proc.poll() is None, log.read_text()[-3000:]
        (second,) = _pids_with(str(run), "parallel.distributed.process_id=1")
        os.kill(second, signal.SIGTERM)
        proc.wait(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, log.read_text()[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_by_signal"] == "SIGTERM" and not summary["completed"]
    assert summary["step"] % 5 == 0
    assert (run / "checkpoints" / str(summary["step"])).is_dir()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_equal_one(compose_fn, tmp_path):
    over = [*TINY, "trainer.max_steps=3", "trainer.eval_every=3", "trainer.checkpoint_every=0"]
    loop.run(compose_fn([*over, "parallel.data=4"]), run_dir=tmp_path / "one")
    cmd = [sys.executable, str(ROOT / "scripts" / "launch_local.py"), "--num-processes", "2"]
    cmd += ["--devices-per-process", "2", "--", *over, f"hydra.run.dir={tmp_path / 'two'}"]
    subprocess.run(cmd, check=True, env=subprocess_env(tmp_path), capture_output=True, timeout=600)
    one = deterministic(read_jsonl(tmp_path / "one" / "metrics.jsonl"))
    two = deterministic(read_jsonl(tmp_path / "two" / "metrics.jsonl"))
    assert_close_records(one, two, rtol=1e-5)
    # One shared run dir: process 0's summary and Hydra config; process 1's output went to its log file.
    assert (tmp_path / "two" / "summary.json").exists() and (tmp_path / "two" / ".hydra" / "config.yaml").exists()
    assert (tmp_path / "two" / "launch_local.1.log").exists()
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["step"] == 3
