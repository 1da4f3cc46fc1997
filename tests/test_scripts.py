"""scripts/: compare.py on hand-made multirun folders, launch_local.py's process handling with a stand-in train.py,
the experiment scripts' tables, and the BENCHMARKS.md writers. No training, no benchmarks."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def _load(name: str):
    sys.path.insert(0, str(SCRIPTS))
    try:
        spec = importlib.util.spec_from_file_location(f"_scripts_{name}", SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SCRIPTS))


compare = _load("compare")


def job(folder: Path, name: str, overrides: list[str], summary: dict | None) -> Path:
    d = folder / name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if summary is not None:
        (d / "summary.json").write_text(json.dumps(summary))
    return d


def summary(left, right, *, metric="accuracy", completed=True, step=10, tasks=("left", "right"), **extra):
    out = {"tasks": list(tasks), "completed": completed, "step": step, "eval/loss": 1.0, **extra}
    for task, value in zip(tasks, (left, right), strict=False):
        out[f"eval/{task}/{metric}"] = value
    return out


def run_compare(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPTS / "compare.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------------------------------------------ compare.py


def test_delta_m_is_libmtls_definition():
    # LibMTL: 1/T sum_t mean_k (-1)^{l_k} (M_m - M_b) / M_b * 100, l_k = 1 where lower is better.
    base = {("a", "accuracy"): 0.8, ("b", "rmse"): 2.0, ("b", "pearson"): 0.5}
    method = {("a", "accuracy"): 0.84, ("b", "rmse"): 1.5, ("b", "pearson"): 0.45}
    task_a = (0.84 - 0.8) / 0.8
    task_b = np.mean([-(1.5 - 2.0) / 2.0, (0.45 - 0.5) / 0.5])
    assert compare.delta_m(method, base) == pytest.approx(100 * (task_a + task_b) / 2)
    assert np.isnan(compare.delta_m({("c", "accuracy"): 0.5}, base))  # no baseline for the task


def test_unfinished_and_failed_jobs_are_left_out_and_named(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    job(sweep, "0", ["mtl=ew", "seed=0"], summary(0.5, 0.6))
    job(sweep, "1", ["mtl=ew", "seed=1"], summary(0.7, 0.8))
    job(sweep, "2", ["mtl=pcgrad", "seed=0"], summary(0.6, 0.6))
    job(sweep, "3", ["mtl=pcgrad", "seed=1"], summary(0.1, 0.1, completed=False, step=3, stopped_by_signal="SIGTERM"))
    job(sweep, "4", ["mtl=pcgrad", "seed=2"], None)  # failed before writing a summary
    result = compare.compare(sweep, metrics=("accuracy",), baseline_group="mtl=ew")
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["mtl=pcgrad"]["seeds"] == 1
    assert rows["mtl=pcgrad"]["metrics"]["left/accuracy"][0] == pytest.approx(0.6)
    assert sorted(Path(e["dir"]).name for e in result["excluded"]) == ["3", "4"]
    err = capsys.readouterr().err
    assert "3: did not complete (stopped at step 3 by SIGTERM)" in err and "4: no summary.json" in err


def test_a_null_metric_propagates_and_delta_m_std_is_per_run(tmp_path):
    # summary.json stores a NaN metric as null; it must not shift the other runs' values between seeds.
    sweep = tmp_path / "sweep"
    job(sweep, "0", ["mtl=ew", "seed=0"], summary(0.5, 0.5))
    job(sweep, "1", ["mtl=ew", "seed=1"], summary(0.5, 0.5))
    job(sweep, "2", ["mtl=pcgrad", "seed=0"], summary(0.6, 0.4))
    job(sweep, "3", ["mtl=pcgrad", "seed=1"], summary(0.4, 0.8))
    job(sweep, "4", ["mtl=pcgrad", "seed=2"], summary(0.7, 0.5))
    job(sweep, "5", ["mtl=upgrad", "seed=0"], summary(0.6, 0.6))
    job(sweep, "6", ["mtl=upgrad", "seed=1"], summary(None, 0.9))
    job(sweep, "7", ["mtl=upgrad", "seed=2"], summary(0.4, 0.3))
    result = compare.compare(sweep, metrics=("accuracy",), baseline_group="mtl=ew")
    rows = {r["method"]: r for r in result["rows"]}
    per_run = [100 * ((0.6 - 0.5) + (0.4 - 0.5)) / 2 / 0.5, 100 * (-0.1 + 0.3) / 2 / 0.5, 100 * (0.2 + 0) / 2 / 0.5]
    assert rows["mtl=pcgrad"]["delta_m"] == pytest.approx(np.mean(per_run))
    assert rows["mtl=pcgrad"]["delta_m_std"] == pytest.approx(np.std(per_run, ddof=1))
    assert rows["mtl=pcgrad"]["metrics"]["left/accuracy"][1] == pytest.approx(np.std([0.6, 0.4, 0.7], ddof=1))
    assert rows["mtl=upgrad"]["seeds"] == 3
    assert np.isnan(rows["mtl=upgrad"]["metrics"]["left/accuracy"][0])  # not the mean of the two finite seeds
    assert rows["mtl=upgrad"]["metrics"]["right/accuracy"][0] == pytest.approx(0.6)
    assert np.isnan(rows["mtl=upgrad"]["delta_m"])


def test_single_task_baseline_dir(tmp_path):
    sweep, stl = tmp_path / "mtl", tmp_path / "stl"
    job(sweep, "0", ["mtl=ew", "seed=0"], summary(0.6, 0.9))
    job(sweep, "1", ["mtl=ew", "seed=1"], summary(0.8, 0.9))
    job(stl, "0", ["tasks=[left]", "seed=0"], summary(0.5, None, tasks=("left",)))
    job(stl, "1", ["tasks=[left]", "seed=1"], summary(0.7, None, tasks=("left",)))
    job(stl, "2", ["tasks=[right]", "seed=0"], summary(1.0, None, tasks=("right",)))
    result = compare.compare(sweep, metrics=("accuracy",), baseline_dir=stl)
    (row,) = result["rows"]
    assert row["delta_m"] == pytest.approx(100 * ((0.7 - 0.6) / 0.6 + (0.9 - 1.0) / 1.0) / 2)


def test_cli_rejects_bad_arguments_with_a_message(tmp_path):
    sweep, multi = tmp_path / "sweep", tmp_path / "multi"
    job(sweep, "0", ["mtl=ew", "seed=0"], summary(0.5, 0.6))
    job(sweep, "1", ["mtl=pcgrad", "seed=0"], summary(0.5, 0.6))
    job(multi, "0", ["mtl=ew", "seed=0"], summary(0.5, 0.6))  # not single-task runs
    cases = {
        ("--baseline-group", "mtl=nope"): "'mtl=nope' is not a method of this sweep",
        ("--metrics", "mse"): "invalid choice: 'mse'",
        ("--metrics", "rmse"): "no eval/<task>/<metric> for the metrics ['rmse']",
        ("--baseline-dir", str(multi)): "no finished single-task run",
        ("--baseline-dir", str(tmp_path / "nope")): "no such folder",
        ("--baseline-dir", str(multi), "--baseline-group", "mtl=ew"): "not both",
    }
    for args, message in cases.items():
        out = run_compare(str(sweep), "--out", str(tmp_path / "out"), *args)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
    empty = tmp_path / "empty"
    empty.mkdir()
    out = run_compare(str(empty))
    assert out.returncode == 2 and "no finished run" in out.stderr


def test_cli_writes_the_table(tmp_path):
    sweep = tmp_path / "sweep"
    for k, (m, s, acc) in enumerate([("ew", 0, 0.5), ("ew", 1, 0.7), ("pcgrad", 0, 0.6), ("pcgrad", 1, 0.6)]):
        job(sweep, str(k), [f"mtl={m}", f"seed={s}"], summary(acc, acc))
    out = run_compare(str(sweep), "--metrics", "accuracy", "--baseline-group", "mtl=ew")
    assert out.returncode == 0, out.stderr
    assert "| mtl=pcgrad | 2 | 0.6000 ± 0.0000 |" in out.stdout
    data = json.loads((sweep / "comparison.json").read_text())
    assert data["excluded"] == [] and (sweep / "comparison.png").stat().st_size > 0


# --------------------------------------------------------------------------------------- run_experiment_mmoe.py


def test_mmoe_study_leaves_out_runs_that_did_not_finish(tmp_path, capsys):
    study = _load("run_experiment_mmoe")
    sweep = tmp_path / "sweep"
    for k, (seed, completed, losses) in enumerate([(0, True, [0.3, 0.2, 0.1]), (1, False, [0.9])]):
        d = job(sweep, str(k), ["model=hps", "data.correlation=1.0", f"seed={seed}"], None)
        lines = [json.dumps({"step": 10 * (i + 1), "eval/loss": v}) for i, v in enumerate(losses)]
        (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        (d / "summary.json").write_text(
            json.dumps({"step": 10 * len(losses), "eval/loss": losses[-1], "completed": completed})
        )
    curves = study.load_curves(sweep)
    assert sorted(curves["hps"][1.0]) == [0]
    assert "did not complete" in capsys.readouterr().err
    only_unfinished = tmp_path / "unfinished"
    only_unfinished.mkdir()
    (sweep / "1").rename(only_unfinished / "1")
    out = subprocess.run(
        [sys.executable, str(SCRIPTS / "run_experiment_mmoe.py"), "--sweep-dir", str(only_unfinished)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2 and "no finished run" in out.stderr and "Traceback" not in out.stderr


# ------------------------------------------------------------------------------------------------- launch_local.py

FAKE_TRAIN = """
import os, signal, sys, time
from pathlib import Path
args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
i = int(args["parallel.distributed.process_id"])
run_dir = Path(args["hydra.run.dir"])
def on_term(signum, frame):
    (run_dir / f"term.{i}").write_text(str(signum))
    sys.exit(128 + signum)
signal.signal(signal.SIGTERM, on_term)
signal.signal(signal.SIGINT, on_term)
(run_dir / f"pid.{i}").write_text(str(os.getpid()))
if i == int(os.environ.get("FAKE_FAIL", "-1")):
    sys.exit(3)
time.sleep(120)
"""


@pytest.fixture
def fake_launcher(tmp_path):
    """launch_local.py copied next to a stand-in train.py that records its pid and the signals it gets."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(SCRIPTS / "launch_local.py", tmp_path / "scripts" / "launch_local.py")
    (tmp_path / "scripts" / "train.py").write_text(FAKE_TRAIN)
    run_dir = tmp_path / "run"
    started: list[int] = []
    launchers: list[subprocess.Popen] = []

    def start(n: int, env: dict | None = None) -> subprocess.Popen:
        cmd = [sys.executable, str(tmp_path / "scripts" / "launch_local.py"), "--num-processes", str(n)]
        cmd += ["--", f"hydra.run.dir={run_dir}"]
        proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stderr=subprocess.PIPE, text=True)
        launchers.append(proc)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list(run_dir.glob("pid.*"))) < n and proc.poll() is None:
            time.sleep(0.1)
        started.extend(int(p.read_text()) for p in run_dir.glob("pid.*"))
        return proc

    yield start, run_dir, started
    for pid in started:  # never leave the stand-ins behind, whatever the test did
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for proc in launchers:
        proc.kill()
        proc.wait()
        proc.stderr.close()


def _gone(pid: int, wait: float = 30.0) -> bool:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # a zombie child of an exited launcher is reaped by init; /proc tells whether it still runs
        try:
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                return True
        except (OSError, IndexError):
            return True
        time.sleep(0.1)
    return False


def test_launch_local_passes_sigterm_on_and_waits(fake_launcher):
    start, run_dir, pids = fake_launcher
    proc = start(2)
    assert len(pids) == 2, proc.stderr.read() if proc.poll() is not None else "processes did not start"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr.read()
    assert all(_gone(pid, wait=0.5) for pid in pids)  # the launcher waited for them
    assert sorted(p.name for p in run_dir.glob("term.*")) == ["term.0", "term.1"]  # each could save and exit


def test_launch_local_kills_the_others_when_one_fails(fake_launcher):
    start, _, pids = fake_launcher
    proc = start(2, {"FAKE_FAIL": "1"})
    proc.wait(timeout=60)
    assert proc.returncode == 1 and "exit codes" in proc.stderr.read()
    assert all(_gone(pid, wait=0.5) for pid in pids)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_launch_local_processes_die_with_the_launcher(fake_launcher):
    start, _, pids = fake_launcher
    proc = start(2)
    assert len(pids) == 2
    proc.kill()  # SIGKILL: no chance to clean up
    proc.wait(timeout=30)
    assert all(_gone(pid) for pid in pids)


# ------------------------------------------------------------------------------------- BENCHMARKS.md writers


@pytest.fixture
def benchlib(tmp_path, monkeypatch):
    module = _load("benchlib")
    monkeypatch.setattr(module, "BENCHMARKS", tmp_path / "BENCHMARKS.md")
    return module


def test_write_section_replaces_only_its_section(benchlib):
    benchlib.write_section("a", "A1")
    benchlib.write_section("b", "B1")
    benchlib.write_section("a", "A2 with \\1 and $ signs")
    text = benchlib.BENCHMARKS.read_text()
    assert "A1" not in text and "A2 with \\1 and $ signs" in text and "B1" in text
    assert text.index("bench:a:start") < text.index("bench:b:start")


def test_write_section_refuses_broken_markers(benchlib):
    benchlib.write_section("b", "B1")
    text = "# Benchmarks\n\n<!-- bench:a:start -->\nold A, end marker lost\n\n" + benchlib.BENCHMARKS.read_text()
    benchlib.BENCHMARKS.write_text(text)
    with pytest.raises(ValueError, match="markers of section 'a' are broken"):
        benchlib.write_section("a", "A2")
    assert benchlib.BENCHMARKS.read_text() == text  # nothing lost


def test_write_section_waits_for_another_writer(benchlib):
    import fcntl

    benchlib.write_section("a", "A1")
    with open(benchlib.BENCHMARKS, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another bench script in the middle of its read-modify-write
        writer = threading.Thread(target=benchlib.write_section, args=("b", "B1"))
        writer.start()
        writer.join(timeout=0.5)
        assert "B1" not in benchlib.BENCHMARKS.read_text()
        held.seek(0)
        held.write("")
        fcntl.flock(held, fcntl.LOCK_UN)
    writer.join(timeout=30)
    assert not writer.is_alive() and "A1" in benchlib.BENCHMARKS.read_text() and "B1" in benchlib.BENCHMARKS.read_text()


def test_bench_stats_only_does_not_rewrite_the_section(tmp_path, monkeypatch, benchlib, capsys):
    bench_stats = _load("bench_stats")
    parts = tmp_path / "parts"
    parts.mkdir()
    for name in ("stats_one", "stats_two"):
        (parts / f"{name}.py").write_text(f"def run(quick=False):\n    return '### {name} table'\n")
    monkeypatch.setattr(bench_stats, "PARTS", parts)
    monkeypatch.setattr(bench_stats, "benchlib", benchlib)
    bench_stats.main([])
    full = benchlib.BENCHMARKS.read_text()
    assert "stats_one table" in full and "stats_two table" in full
    bench_stats.main(["--only", "stats_one"])
    assert benchlib.BENCHMARKS.read_text() == full  # printed, not written over the other part
    assert "stats_one table" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        bench_stats.main(["--only", "stats_three"])
    assert exit_info.value.code == 2 and "stats_three" in capsys.readouterr().err
    assert benchlib.BENCHMARKS.read_text() == full


def test_bench_device_peaks_and_failures_are_reported(tmp_path, monkeypatch):
    """Known devices map to their data-sheet peaks (the PCIe H100 is not the SXM one); a part that raises is a row
    saying so, and parts past the time budget are marked skipped, without stopping the script."""
    bench_device = _load("bench_device")
    assert bench_device.device_peaks("NVIDIA H100 80GB HBM3")["bf16"] == 989.0
    assert bench_device.device_peaks("NVIDIA H100 PCIe")["bf16"] == 756.0
    assert bench_device.device_peaks("NVIDIA H200")["hbm"] == 4.8
    assert bench_device.device_peaks("NVIDIA A100-SXM4-40GB")["hbm"] == 1.555
    assert bench_device.device_peaks("TPU v5 lite")["bf16"] == 197.0
    assert bench_device.device_peaks("cpu") is None
    assert bench_device.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"

    def boom(*args):
        raise RuntimeError("no scipy here")

    monkeypatch.setattr(bench_device, "part_ranks", boom)
    md = bench_device.main(["--reduced", "--parts", "ranks", "--no-write"])
    assert "### Rank correlations vs scipy (CPU)" in md and "failed: RuntimeError: no scipy here" in md
    md = bench_device.main(["--reduced", "--budget", "0", "--no-write", "--out", str(tmp_path / "none.md")])
    assert md.count("skipped: the time budget") == 5 and not (tmp_path / "none.md").exists()


@pytest.mark.slow
def test_bench_device_reduced_writes_its_section(tmp_path):
    """The reduced run on the CPU measures every part and replaces the section of its device, nothing else."""
    import jax

    bench_device = _load("bench_device")
    name = bench_device.slug(jax.devices()[0].device_kind)
    out = tmp_path / "BENCH.md"
    out.write_text(
        "# Benchmarks\n\n<!-- bench:other:start -->\nkept\n<!-- bench:other:end -->\n\n"
        f"<!-- bench:device:{name}:start -->\nold numbers\n<!-- bench:device:{name}:end -->\n"
    )
    bench_device.main(["--reduced", "--out", str(out), "--budget", "300"])
    text = out.read_text()
    assert "kept" in text and "old numbers" not in text
    assert text.count(f"<!-- bench:device:{name}:start -->") == 1
    section = text[text.index(f"<!-- bench:device:{name}:start -->") :]
    assert f"## Device: {jax.devices()[0].device_kind}" in section and f"JAX {jax.__version__}" in section
    for title in ("Peaks", "corrjax.stats GEMM-bound", "Rank correlations", "MTL step", "Input pipeline"):
        assert f"### {title}" in section
    assert "failed" not in section and "skipped" not in section
    assert "| cov 1024x64 | bfloat16 |" in section and "| 4 | bfloat16 | upgrad |" in section
