"""Validation and model selection (corrjax.train.selection, corrjax.train.eval_run): the monitor's rules, the best
checkpoint and its test, early stopping across a resume, the value handed to sweepers, ``ckpt_path`` evaluation and
fine-tuning, the eval entry point, and errors naming the key."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from corrjax.data import TaskSpec
from corrjax.train import loop, selection
from corrjax.train.ensemble import train_seeds
from corrjax.train.writers import read_jsonl

ROOT = Path(__file__).resolve().parents[2]
TINY = ["trainer=tiny", "logger=minimal", "data.num_examples=256", "trainer.max_steps=6", "trainer.eval_every=1"]
# The summed loss monitored upside down (mode max): training lowers it, so the first evaluation is the best one and
# the last step is not, whatever the exact numbers.
WORST_LOSS = ["trainer.monitor=loss", "trainer.monitor_mode=max"]
TASKS = (TaskSpec("a", "classification", 3), TaskSpec("b", "regression", 1))


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_scripts_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _listing(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def test_update_best_and_patience_rules():
    monitor = selection.Monitor("loss", "min")
    state = selection.init(monitor)
    values = [1.0, 0.9, 0.95, float("nan"), 0.85, 0.849, 0.84]
    seen = []
    for step, v in enumerate(values, 1):
        state, improved = selection.update(state, v, step, patience=2, min_delta=0.01)
        seen.append((improved, state.bad_evals, state.stopped))
    # best: strictly better; patience: only improvements by more than min_delta=0.01 restart the count
    assert [s[0] for s in seen] == [True, True, False, False, True, True, True]
    assert [s[1] for s in seen] == [0, 0, 1, 2, 0, 1, 2]
    assert [s[2] for s in seen] == [False, False, False, True, True, True, True]
    assert state.best_step == 7 and state.best_value == 0.84
    again, improved = selection.update(state, 0.0, 7)  # an evaluation observed twice counts once
    assert again == state and not improved
    assert selection.SelectionState.from_json(json.loads(json.dumps(state.to_json()))) == state
    stop_at_first, _ = selection.update(
        selection.update(selection.init(monitor), 1.0, 1, patience=0)[0], 2.0, 2, patience=0
    )
    assert stop_at_first.stopped


def test_monitor_resolution_and_metrics():
    resolve = lambda **kw: selection.resolve_monitor(kw, TASKS)
    assert resolve() == selection.Monitor("mean_score", "max")
    assert resolve(monitor="b/rmse").mode == "min" and resolve(monitor="a/accuracy").mode == "max"
    assert resolve(monitor="loss", monitor_mode="max").mode == "max"
    ref = {"a": {"accuracy": 0.5}, "b": {"rmse": 2.0, "r2": 0.25}}
    assert resolve(monitor_reference=ref).name == "delta_m"
    record = {"eval/a/accuracy": 0.6, "eval/b/rmse": 1.5, "eval/b/r2": 0.5, "eval/b/pearson": 0.1}
    assert selection.mean_score(record, TASKS) == pytest.approx((0.6 + 0.5) / 2)
    # LibMTL's Delta_m%: task a +20%; task b mean(+25% rmse (lower is better), +100% r2)
    assert selection.delta_m(record, ref) == pytest.approx(100 * (0.2 + (0.25 + 1.0) / 2) / 2)
    compare = _script("compare")
    as_pairs = lambda d: {(t, m): v for t, ms in d.items() for m, v in ms.items()}
    got = {
        (k.split("/")[1], k.split("/")[2]): v
        for k, v in record.items()
        if k.split("/")[2] in ("accuracy", "rmse", "r2")
    }
    assert compare.delta_m(got, as_pairs(ref)) == pytest.approx(selection.delta_m(record, ref))
    assert math.isnan(selection.mean_score({"eval/a/accuracy": 0.6}, TASKS))
    for kw, match in [
        ({"monitor": "a/rmse"}, r"unknown `trainer.monitor`='a/rmse'"),
        ({"monitor": "delta_m"}, r"`trainer.monitor`=delta_m needs `trainer.monitor_reference`"),
        ({"monitor_mode": "up"}, r"`trainer.monitor_mode`='up'"),
        ({"monitor_reference": {"a": {"accuracy": 0.5}}}, r"`trainer.monitor_reference`.*missing: \['b'\]"),
        ({"monitor_reference": {**ref, "b": {"accuracy": 1.0}}}, r"`trainer.monitor_reference.b.accuracy`"),
        ({"monitor_reference": {**ref, "b": {"rmse": 0}}}, r"`trainer.monitor_reference.b.rmse`=0"),
    ]:
        with pytest.raises(ValueError, match=match):
            resolve(**kw)


@pytest.mark.parametrize(
    "override, error, match",
    [
        ("trainer.early_stopping.patience=-1", ValueError, r"`trainer.early_stopping.patience`=-1"),
        ("trainer.early_stopping.min_delta=-0.1", ValueError, r"`trainer.early_stopping.min_delta`=-0.1"),
        ("+data.val_fraction=1.5", ValueError, r"`data.val_fraction`=1.5 must be in \(0, 1\)"),
        ("ckpt_path=/nonexistent/run", FileNotFoundError, r"`ckpt_path`=/nonexistent/run"),
        ("trainer.mode=eval", ValueError, r"`trainer.mode`=eval needs `ckpt_path`"),
        ("trainer.monitor_mode=low", ValueError, r"`trainer.monitor_mode`='low'"),
    ],
)
def test_bad_selection_values_fail_first_naming_the_key(compose_fn, tmp_path, override, error, match):
    with pytest.raises(error, match=match):
        loop.run(compose_fn([*TINY, override]), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_best_checkpoint_its_test_and_ckpt_path(compose_fn, tmp_path, monkeypatch):
    """The best evaluation (not the last) is kept besides the latest checkpoint, tested into test/...; the sweeper
    gets its validation value; ckpt_path evaluates it (run dir -> its best, or a step dir) and fine-tunes from it
    without touching the source run; the eval run refuses the source's own directory."""
    source = tmp_path / "source"
    over = [*TINY, *WORST_LOSS, "trainer.eval_every=2", "trainer.checkpoint_every=0", "trainer.keep_checkpoints=1"]
    monkeypatch.setattr(loop, "hydra_run_dir", lambda: source)
    returned = _script("train").main.__wrapped__(compose_fn(over))  # what a Hydra sweeper receives
    summary = json.loads((source / "summary.json").read_text())
    evals = {r["step"]: r["eval/loss"] for r in read_jsonl(source / "metrics.jsonl") if "eval/loss" in r}
    best = max(evals, key=evals.get)
    assert sorted(evals) == [2, 4, 6] and best != 6  # the last step is not the best
    assert summary["best/step"] == best == summary["test/step"] and summary["monitor"] == "loss"
    assert summary["best/loss"] == evals[best] == returned and summary["monitor_mode"] == "max"
    assert summary["eval/loss"] == evals[6] and summary["completed"] and not summary["early_stopped"]
    assert sorted(int(p.name) for p in (source / "checkpoints").iterdir()) == [best, 6]  # best + the latest
    before = _listing(source)

    # Eval entry point on the run directory: its best checkpoint, the same numbers as the run's own evaluations.
    monkeypatch.setattr(loop, "hydra_run_dir", lambda: tmp_path / "eval_run")
    got = _script("eval").main.__wrapped__(compose_fn([*over, f"ckpt_path={source}"]))
    evaluated = json.loads((tmp_path / "eval_run" / "summary.json").read_text())
    assert evaluated["ckpt_step"] == best and evaluated["eval/loss"] == evals[best] == got
    for key in [k for k in summary if k.startswith("test/") and k != "test/step"]:
        np.testing.assert_array_equal(evaluated[key], summary[key], err_msg=key)
    # trainer.mode=eval on a step directory
    step_dir = source / "checkpoints" / "6"
    last = loop.run(compose_fn([*over, "trainer.mode=eval", f"ckpt_path={step_dir}"]), run_dir=tmp_path / "eval6")
    assert last["ckpt_step"] == 6 and last["eval/loss"] == evals[6]
    # Fine-tuning starts from the checkpoint's model (max_steps=0: its evaluation is the checkpoint's).
    tuned = loop.run(compose_fn([*over, f"ckpt_path={source}", "trainer.max_steps=0"]), run_dir=tmp_path / "tune")
    assert tuned["step"] == 0 and tuned["eval/loss"] == evals[best] and tuned["test/step"] == 0
    tuned = loop.run(compose_fn([*over, f"ckpt_path={step_dir}", "trainer.max_steps=2"]), run_dir=tmp_path / "tune2")
    assert tuned["completed"] and tuned["step"] == 2 and tuned["eval/loss"] != evals[6]
    # The source run's own directory is refused (an overwrite would delete the checkpoint being read).
    for extra in (["trainer.mode=eval"], ["trainer.overwrite=true"]):
        with pytest.raises(ValueError, match=r"`ckpt_path`=.* is in this run's directory"):
            loop.run(compose_fn([*over, *extra, f"ckpt_path={step_dir}"]), run_dir=source)
    assert _listing(source) == before


def test_early_stopping_stops_and_survives_resume(compose_fn, tmp_path):
    over = [*TINY, *WORST_LOSS, "trainer.early_stopping.patience=2", "trainer.max_steps=10"]
    full = loop.run(compose_fn(over), run_dir=tmp_path / "full")
    evals = [(r["step"], r["eval/loss"]) for r in read_jsonl(tmp_path / "full" / "metrics.jsonl")]
    state = selection.init(selection.Monitor("loss", "max"))
    for step, value in evals:  # the pure rule replayed over the logged evaluations
        state, _ = selection.update(state, value, step, patience=2)
        if state.stopped:
            break
    assert state.stopped and full["early_stopped"] and full["completed"]
    assert full["step"] == step < 10 and [s for s, _ in evals][-1] == step
    assert full["best/step"] == state.best_step == full["test/step"]
    part = loop.run(compose_fn([*over, f"trainer.stop_after={step - 1}"]), run_dir=tmp_path / "resumed")
    assert not part["completed"] and not part["early_stopped"]
    resumed = loop.run(compose_fn([*over, "trainer.resume=true"]), run_dir=tmp_path / "resumed")
    again = loop.run(compose_fn([*over, "trainer.resume=true"]), run_dir=tmp_path / "resumed")  # stays stopped
    strip = lambda rs: [{k: v for k, v in r.items() if k != "train/examples_per_s"} for r in rs]
    assert strip(read_jsonl(tmp_path / "resumed" / "metrics.jsonl")) == strip(
        read_jsonl(tmp_path / "full" / "metrics.jsonl")
    )
    for other in (resumed, again):
        assert other["step"] == step and other["early_stopped"] and other["best/step"] == full["best/step"]
        for key in [k for k in full if k.startswith(("test/", "best/"))]:
            np.testing.assert_array_equal(other[key], full[key], err_msg=key)
    with pytest.raises(ValueError, match=r"`trainer.monitor`='mean_score'.*selected on 'loss'"):
        loop.run(compose_fn([*TINY, "trainer.max_steps=10", "trainer.resume=true"]), run_dir=tmp_path / "resumed")
    # The seed ensemble selects and stops by the same rules (its best model kept in memory).
    (ens,) = train_seeds(compose_fn(over), [0], [tmp_path / "ens"])
    assert ens["step"] == step and ens["early_stopped"] and ens["completed"]
    assert ens["best/step"] == full["best/step"] == ens["test/step"]
    for key in [k for k in full if k.startswith(("test/", "best/")) and k != "best/step"]:
        np.testing.assert_allclose(np.asarray(ens[key], float), np.asarray(full[key], float), rtol=2e-5, err_msg=key)


def test_ensemble_refuses_what_it_cannot_do(compose_fn, tmp_path):
    with pytest.raises(ValueError, match=r"`trainer.early_stopping.patience`=-2"):
        train_seeds(compose_fn([*TINY, "trainer.early_stopping.patience=-2"]), [0], [tmp_path / "a"])
    with pytest.raises(ValueError, match=r"`ckpt_path` / `trainer.mode`=eval: ensemble runs"):
        train_seeds(compose_fn([*TINY, f"ckpt_path={tmp_path}"]), [0], [tmp_path / "b"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
