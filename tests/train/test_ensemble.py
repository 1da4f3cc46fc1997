"""corrjax.train.ensemble: seeds trained at once follow the single runs, write the loop's files, refuse what they
cannot do, and stop seeds that go non-finite; scripts/run_experiment_mmoe.py --ensemble skips finished runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from corrjax.train import loop
from corrjax.train.ensemble import train_seeds
from corrjax.train.writers import read_jsonl

ROOT = Path(__file__).resolve().parents[2]
TINY = ["trainer=tiny", "logger=minimal", "data.num_examples=256", "trainer.max_steps=6", "trainer.eval_every=3"]


@pytest.mark.parametrize(
    "over",
    [
        # MMoE: the representation diagnostics (gate usage, expert and task-representation CKA, CKA over training)
        ["model=mmoe", "mtl=pcgrad", "trainer.noise_scale=false"],
        # the regulariser, the gradient noise scale, and rlw's seeded key (each seed's optimiser state is its own)
        ["model=hps", "mtl=rlw", "regularizer=decov", "trainer.noise_scale=true", "trainer.log_every=2"],
    ],
)
def test_each_seed_follows_its_single_run(compose_fn, tmp_path, over):
    over = [*TINY, *over]
    seeds = [0, 5]
    summaries = train_seeds(compose_fn(over), seeds, [tmp_path / f"ens{s}" for s in seeds])
    for seed, summary in zip(seeds, summaries, strict=True):
        single = loop.run(compose_fn([*over, f"seed={seed}"]), run_dir=tmp_path / f"single{seed}")
        a, b = (
            read_jsonl(tmp_path / f"ens{seed}" / "metrics.jsonl"),
            read_jsonl(tmp_path / f"single{seed}" / "metrics.jsonl"),
        )
        assert [r["step"] for r in a] == [r["step"] for r in b]
        assert [r["step"] for r in b] == ([2, 3, 4, 6] if "trainer.log_every=2" in over else [1, 2, 3, 4, 5, 6])
        for ra, rb in zip(a, b, strict=True):
            assert set(ra) == set(rb), set(ra) ^ set(rb)
            for key in set(ra) - {"step", "train/examples_per_s"}:
                np.testing.assert_allclose(
                    np.asarray(ra[key], float), np.asarray(rb[key], float), rtol=2e-5, atol=1e-6, err_msg=key
                )
        assert summary["completed"] and summary["step"] == 6 and summary["seed"] == seed
        assert summary["eval/loss"] == pytest.approx(single["eval/loss"], rel=2e-5)
        assert summary["num_params"] == single["num_params"]
        assert set(summary) - {"seed", "ensemble_size"} == set(single), set(summary) ^ set(single)
        for key in single:  # test/ and best/: the ensemble selects and tests as the loop does
            if key.startswith(("eval/", "train/", "test/", "best/")) and key != "train/examples_per_s":
                np.testing.assert_allclose(
                    np.asarray(summary[key], float), np.asarray(single[key], float), rtol=2e-5, atol=1e-6, err_msg=key
                )
        on_disk = json.loads((tmp_path / f"ens{seed}" / "summary.json").read_text())
        assert on_disk["eval/loss"] == pytest.approx(summary["eval/loss"])
        overrides = yaml.safe_load((tmp_path / f"ens{seed}" / ".hydra" / "overrides.yaml").read_text())
        assert overrides == [f"seed={seed}"]
        config = yaml.safe_load((tmp_path / f"ens{seed}" / ".hydra" / "config.yaml").read_text())
        assert config["seed"] == seed


def test_refuses_what_it_cannot_do(compose_fn, tmp_path):
    cfg = compose_fn(TINY)
    with pytest.raises(ValueError, match="duplicates"):
        train_seeds(cfg, [1, 1], [tmp_path / "a", tmp_path / "b"])
    with pytest.raises(ValueError, match="1 `run_dirs` for 2 `seeds`"):
        train_seeds(cfg, [0, 1], [tmp_path / "a"])
    with pytest.raises(ValueError, match="int32"):
        train_seeds(cfg, [0, 2**31], [tmp_path / "a", tmp_path / "b"])
    with pytest.raises(ValueError, match=r"`seeds`.*\[0, 2\*\*31\).*-1"):  # the batch order needs seed >= 0
        train_seeds(cfg, [0, -1], [tmp_path / "a", tmp_path / "b"])
    with pytest.raises(ValueError, match="empty"):
        train_seeds(cfg, [], [])
    with pytest.raises(ValueError, match=r"trainer\.resume"):
        train_seeds(compose_fn([*TINY, "trainer.resume=true"]), [0], [tmp_path / "a"])
    with pytest.raises(ValueError, match="1 `overrides` lists for 2"):
        train_seeds(cfg, [0, 1], [tmp_path / "a", tmp_path / "b"], overrides=[["seed=0"]])
    assert not (tmp_path / "a").exists()


def test_nonfinite_seeds_stop_with_a_message(compose_fn, tmp_path):
    cfg = compose_fn([*TINY, "data.noise_std=nan", "trainer.max_nonfinite_in_a_row=2", "trainer.eval_every=2"])
    summaries = train_seeds(cfg, [0, 1], [tmp_path / "a", tmp_path / "b"])
    for summary, d in zip(summaries, ("a", "b"), strict=True):
        assert not summary["completed"] and summary["step"] == 2 and summary["nonfinite_total"] == 2
        assert "2 consecutive steps with non-finite" in summary["error"]
        records = read_jsonl(tmp_path / d / "metrics.jsonl")
        assert [r["step"] for r in records] == [1, 2]  # nothing after the stop
        assert all(r["train/nonfinite_total"] == r["step"] for r in records)


def test_study_script_ensemble_skips_finished_runs(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "run_experiment_mmoe.py"), "--sweep-into", str(tmp_path / "sweep")]
    cmd += ["--ensemble", "2", "--models", "hps", "--correlations", "1.0", "0.0", "--seeds", "0", "1", "--steps", "2"]
    cmd += ["--budgets", "1", "--", "data.num_examples=256", "trainer.batch_size=32", "trainer.eval_every=1"]
    cmd += ["trainer.eval_batch_size=256", "trainer.log_every=1"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    runs = sorted((tmp_path / "sweep").rglob("summary.json"))
    assert [str(p.parent.relative_to(tmp_path / "sweep")) for p in runs] == [
        "hps/corr0/seed0",
        "hps/corr0/seed1",
        "hps/corr1/seed0",
        "hps/corr1/seed1",
    ]
    stamps = [p.stat().st_mtime_ns for p in runs]
    md = (tmp_path / "sweep" / "mmoe_synthetic.md").read_text()
    assert "mean ± std over 2 seeds" in md and "| shared-bottom | 2 |" in md
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert [p.stat().st_mtime_ns for p in runs] == stamps  # finished runs are not trained again
    assert "seeds 0..1" not in again.stdout
    bad = subprocess.run([*cmd[:2], "--sweep-into", str(tmp_path / "x")], capture_output=True, text=True)
    assert bad.returncode == 2 and "--sweep-into needs --ensemble" in bad.stderr
