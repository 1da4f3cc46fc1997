"""scripts/run_experiment_mmoe.py: the study's tables from sweep folders (no training; fake runs on disk)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_script():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        spec = importlib.util.spec_from_file_location(
            "run_experiment_mmoe", ROOT / "scripts" / "run_experiment_mmoe.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "scripts"))


study = _load_script()


def loss_curve(model: str, corr: float, seed: int) -> list[float]:
    """A made-up curve: MMoE ignores the correlation, shared-bottom loses 0.01 per unit of (1 - corr) plus a seed
    term that the pairing cancels."""
    base = 0.05 + 0.01 * seed
    slope = {"hps": 0.01, "mmoe": 0.0}[model]
    return [base + slope * (1.0 - corr) + 0.1 / k for k in (1, 2, 3)]


def write_sweep(folder: Path, seeds: list[int], models=("hps", "mmoe"), corrs=(1.0, 0.0)) -> Path:
    job = 0
    for model in models:
        for corr in corrs:
            for seed in seeds:
                run = folder / str(job)
                (run / ".hydra").mkdir(parents=True)
                overrides = [f"model={model}", f"data.correlation={corr}", f"seed={seed}"]
                (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
                curve = loss_curve(model, corr, seed)
                lines = [json.dumps({"step": 10 * (k + 1), "eval/loss": v}) for k, v in enumerate(curve)]
                (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
                (run / "summary.json").write_text(json.dumps({"step": 30, "eval/loss": curve[-1]}))
                job += 1
    return folder


def test_effect_is_the_paired_difference(tmp_path):
    a = write_sweep(tmp_path / "a", [0, 1, 2])
    b = write_sweep(tmp_path / "b", [3, 4])
    curves = study.load_curves(a, b)
    assert sorted(curves["hps"][0.0]) == [0, 1, 2, 3, 4]
    final = lambda steps, loss: float(loss[-1])
    effect = study.correlation_effect(curves, 0.0, 1.0, final)
    np.testing.assert_allclose(list(effect["hps"].values()), [0.01] * 5, atol=1e-12)
    np.testing.assert_allclose(list(effect["mmoe"].values()), [0.0] * 5, atol=1e-12)
    md, _ = study.tabulate(a, b, budgets=[20])
    assert "mean ± std over 5 seeds" in md and "Test loss at step 20" in md
    # The effect table: shared-bottom degrades on every seed by exactly 0.01, MMoE on none.
    hps_row = next(line for line in md.splitlines() if line.startswith("| shared-bottom | 5 |"))
    assert "+0.0100 [+0.0100, +0.0100]" in hps_row and "5/5" in hps_row
    mmoe_row = next(line for line in md.splitlines() if line.startswith("| MMoE | 5 |"))
    assert "0/5" in mmoe_row
    assert "effect minus MMoE's" in md


def test_overlapping_sweeps_are_refused(tmp_path):
    a = write_sweep(tmp_path / "a", [0, 1])
    b = write_sweep(tmp_path / "b", [1, 2])
    with pytest.raises(ValueError, match="seed=1 appears twice"):
        study.load_curves(a, b)


def test_bootstrap_interval_brackets_the_mean_and_is_seeded():
    x = np.random.default_rng(1).normal(0.3, 1.0, 40)
    lo, hi = study.bootstrap_ci(x)
    assert lo < x.mean() < hi
    assert (lo, hi) == study.bootstrap_ci(x)
    # The percentile interval of a mean is about +-1.96 standard errors for a sample this size.
    se = x.std(ddof=1) / np.sqrt(x.size)
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert all(np.isnan(study.bootstrap_ci(x[:1])))


def test_new_sweep_dir_never_reuses_a_folder(tmp_path):
    first, second = study.new_sweep_dir(tmp_path), study.new_sweep_dir(tmp_path)
    assert first != second and first.is_dir() and second.is_dir()


def test_cli_tabulates_several_folders_and_names_a_missing_one(tmp_path):
    a = write_sweep(tmp_path / "a", [0, 1])
    b = write_sweep(tmp_path / "b", [2])
    script = str(ROOT / "scripts" / "run_experiment_mmoe.py")
    out = subprocess.run(
        [sys.executable, script, "--sweep-dir", str(a), str(b)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "mean ± std over 3 seeds" in (a / "mmoe_synthetic.md").read_text()
    assert (a / "mmoe_synthetic.png").stat().st_size > 0
    bad = subprocess.run(
        [sys.executable, script, "--sweep-dir", str(a), str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "nope" in bad.stderr


@pytest.mark.slow
def test_two_workers_run_and_tabulate_one_study(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "run_experiment_mmoe.py"), "--out", str(tmp_path)]
    cmd += ["--models", "hps", "--correlations", "1.0", "0.0", "--seeds", "0", "1", "--workers", "2", "--steps", "2"]
    cmd += ["--budgets", "1", "--", "data.num_examples=256", "trainer.batch_size=32", "trainer.eval_every=1"]
    cmd += ["trainer.eval_batch_size=256", "trainer.log_every=1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    sweeps = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(sweeps) == 2 and all((s / "study.log").exists() for s in sweeps)
    assert len(list(tmp_path.rglob("summary.json"))) == 4
    md = (sweeps[0] / "mmoe_synthetic.md").read_text()
    assert "mean ± std over 2 seeds" in md and "| shared-bottom | 2 |" in md
