"""Experiment tracking (corrjax.train.writers, .trackers, .console): the Writer interface and its CSV / TensorBoard /
W&B (offline) / MLflow (local file store) writers, heatmap images at their cadence, learned task weights in the
step metrics, the per-step console lines through a pipe, and a 2-trial Optuna sweep."""

from __future__ import annotations

import importlib
import io
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from omegaconf import OmegaConf

import corrjax.mtl
from corrjax.train import console, trackers, writers
from corrjax.train.step import task_weights

ROOT = Path(__file__).resolve().parents[2]
TINY = ["trainer=tiny", "data.num_examples=256"]


def subprocess_env(tmp_path):
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(tmp_path.parent / "xla_cache_subprocess"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        HYDRA_FULL_ERROR="1",
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    env.pop("COLUMNS", None)
    return env


class Recorder(writers.Writer):
    """A writer that keeps every call."""

    def __init__(self):
        self.calls = []

    def write_scalars(self, step, scalars):
        self.calls.append(("scalars", step, dict(scalars)))

    def write_image(self, step, name, image):
        self.calls.append(("image", step, name, image.shape, image.dtype))

    def write_hparams(self, hparams):
        self.calls.append(("hparams", dict(hparams)))

    def close(self):
        self.calls.append(("close",))


# ---------------------------------------------------------------------------------------------------------------------
# CSV, the fan-out and its image cadence, TensorBoard.


def test_csv_is_wide_sorted_and_widens_for_new_keys(tmp_path):
    path = tmp_path / "metrics.csv"
    w = writers.CsvWriter(path)
    w.write(1, {"train/loss": 1.5, "train/b": 2, "train/grad_cosine": [[1.0, 0.0], [0.0, 1.0]]})
    w.write(2, {"train/loss": float("nan"), "train/b": 3})
    w.write(3, {"train/loss": 0.25, "eval/loss": 0.5})  # a new key: the file is rewritten with the wider header
    w.close()
    lines = path.read_text().splitlines()
    assert lines == [
        "step,eval/loss,train/b,train/loss",
        "1,,2,1.5",
        "2,,3,",
        "3,0.5,,0.25",
    ]
    # Reopened (a resumed run): the header is read back, a torn last line and the rows past the checkpoint dropped.
    with path.open("a") as f:
        f.write("4,0.1,1,0.")
    writers.truncate_csv(path, 2)
    assert writers.read_csv(path) == [
        {"step": 1, "eval/loss": None, "train/b": 2.0, "train/loss": 1.5},
        {"step": 2, "eval/loss": None, "train/b": 3.0, "train/loss": None},
    ]
    w = writers.CsvWriter(path)
    w.write_scalars(3, {"train/loss": 0.125})
    w.close()
    assert path.read_text().splitlines()[0] == "step,eval/loss,train/b,train/loss"
    assert path.read_text().splitlines()[-1] == "3,,,0.125"


def test_metrics_writer_fans_out_and_renders_matrices_at_their_cadence(tmp_path):
    rec = Recorder()
    w = writers.MetricsWriter(tmp_path, tensorboard=False, extra=[rec], labels=["a", "b"], matrix_every=4, last_step=6)
    m = np.array([[1.0, -0.5], [-0.5, 1.0]])
    for step in range(1, 7):
        w.write(step, {"train/loss": float(step), "train/grad_cosine": m, "flag": True, "name": "x"})
    w.write_hparams({"optim.learning_rate": 0.001})
    w.close()
    images = [c for c in rec.calls if c[0] == "image"]
    assert [(c[1], c[2]) for c in images] == [(4, "train/grad_cosine"), (6, "train/grad_cosine")]
    assert all(len(c[3]) == 3 and c[3][2] == 3 and c[4] == np.uint8 for c in images)
    assert [c[1:] for c in rec.calls if c[0] == "scalars"] == [(k, {"train/loss": float(k)}) for k in range(1, 7)]
    assert ("hparams", {"optim.learning_rate": 0.001}) in rec.calls and rec.calls[-1] == ("close",)
    records = writers.read_jsonl(tmp_path / "metrics.jsonl")  # jsonl: every record whole, matrices as lists
    assert records[0] == {"step": 1, "train/loss": 1.0, "train/grad_cosine": m.tolist(), "flag": True, "name": "x"}


def _tb_events(logdir):
    """The Event protos of tensorboardX event files (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(Path(logdir).glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[pos + 12 : pos + 12 + n])
            out.append(event)
            pos += 12 + n + 4
    return out


def test_tensorboard_gets_scalars_heatmaps_and_hparams(tmp_path):
    w = writers.MetricsWriter(tmp_path, jsonl=False, labels=["a", "b"], matrix_every=2, last_step=2)
    w.write_hparams({"optim.learning_rate": 0.001, "tags": "x,y", "tasks": None})
    w.write(1, {"train/loss": 0.5, "train/weights/a": 0.25})
    w.write(2, {"train/loss": 0.25, "eval/pred_corr": np.eye(2)})
    w.write_summary({"step": 2, "eval/loss": 0.125})
    w.close()
    values = [(e.step, v.tag, v) for e in _tb_events(tmp_path / "tb") for v in e.summary.value]
    scalars = {(s, t): v.simple_value for s, t, v in values if v.HasField("simple_value")}
    assert scalars == {(1, "train/loss"): 0.5, (1, "train/weights/a"): 0.25, (2, "train/loss"): 0.25}
    images = [(s, t, v.image) for s, t, v in values if v.HasField("image")]
    assert [(s, t) for s, t, _ in images] == [(2, "eval/pred_corr")]
    assert images[0][2].encoded_image_string.startswith(b"\x89PNG") and images[0][2].width > 50
    plugins = {v.metadata.plugin_data.plugin_name for _, _, v in values}
    assert "hparams" in plugins and "text" in plugins


# ---------------------------------------------------------------------------------------------------------------------
# Learned task weights.


@pytest.mark.parametrize("name", ["uw", "dwa", "gradnorm", "famo", "pcgrad"])
def test_task_weights_are_found_in_the_chain_state(name):
    make = {
        "uw": lambda: corrjax.mtl.uncertainty_weighting(2, learning_rate=0.5),
        "dwa": lambda: corrjax.mtl.dwa(2),
        "gradnorm": lambda: corrjax.mtl.gradnorm(2),
        "famo": lambda: corrjax.mtl.famo(2),
        "pcgrad": corrjax.mtl.pcgrad,
    }[name]
    params = {"w": jnp.ones(3), "head": jnp.ones(2)}
    tx = optax.chain(corrjax.mtl.shared_only(make(), {"w": True, "head": False}), optax.sgd(0.1))
    state = tx.init(params)
    grads = {"w": jnp.array([[1.0, 0.0, 2.0], [0.5, 1.0, 0.0]]), "head": jnp.ones(2)}
    losses = jnp.array([2.0, 0.5])
    for _ in range(2):
        _, state = tx.update(grads, state, params, task_losses=losses)
    got = task_weights(state, 2)
    if name == "pcgrad":
        assert got is None
        return
    np.testing.assert_array_equal(got, state[0].inner_state.weights)
    if name == "uw":  # exact: s_1 = -0.5 * (0.5 - 0.5 * L), weights exp(-s_1) / 2 at the second step
        np.testing.assert_allclose(got, 0.5 * np.exp(0.5 * (0.5 - 0.5 * np.array([2.0, 0.5]))), rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# W&B (offline) and MLflow (local file store).


def _wandb_records(run_dir):
    """The records of an offline W&B run's ``.wandb`` file (LevelDB-log framing: 7-byte header per chunk in 32 KiB
    blocks), as ``(type, proto)`` pairs."""
    from wandb.proto import wandb_internal_pb2 as pb

    paths = list(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert len(paths) <= 1, paths
    data, pos, block, out, buf = (paths[0].read_bytes() if paths else b""), 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if n == 0 and kind == 0:
            break
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append((record.WhichOneof("record_type"), record))
    return out


def test_wandb_offline_run_under_the_run_dir(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    w = trackers.WandbWriter(tmp_path, project="p", name="n", tags=["t1", "t2"])
    w.write_hparams({"optim.learning_rate": 0.001})
    w.write_scalars(1, {"train/loss": 0.5, "train/weights/a": 0.25})
    w.write_image(2, "train/grad_cosine", np.zeros((8, 8, 3), np.uint8))
    w.write_scalars(2, {"train/loss": 0.25})
    w.write_summary({"step": 2, "eval/loss": 0.125, "tags": ["t1"]})
    w.close()
    deadline = time.monotonic() + 60  # wandb's service process may finish writing the file after finish() returns
    records = _wandb_records(tmp_path)
    while not any(k == "exit" for k, _ in records) and time.monotonic() < deadline:
        time.sleep(0.2)
        records = _wandb_records(tmp_path)
    run = next(r.run for k, r in records if k == "run")
    assert run.run_id == json.loads((tmp_path / "tracking.json").read_text())["wandb"] == w.run.id
    assert list(run.tags) == ["t1", "t2"] and run.project == "p" and run.display_name == "n"
    history = []
    for kind, r in records:
        if kind == "history":
            items = {"/".join(i.nested_key) or i.key: i.value_json for i in r.history.item}
            history.append({k: v for k, v in items.items() if not k.startswith("_")})
    assert history[0] == {"train/loss": "0.5", "train/weights/a": "0.25"}
    assert history[1]["train/loss"] == "0.25" and history[1]["train/grad_cosine/_type"] == '"image-file"'
    assert history[1]["train/grad_cosine/width"] == "8"
    updates = {
        ("/".join(u.nested_key) or u.key): u.value_json for k, r in records if k == "summary" for u in r.summary.update
    }
    assert updates["eval/loss"] == "0.125"
    config = {u.key: u.value_json for k, r in records if k == "config" for u in r.config.update}
    config.update({u.key: u.value_json for k, r in records if k == "run" for u in r.run.config.update})
    assert config["optim.learning_rate"] == "0.001"


def test_mlflow_local_store_and_resume(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    w = trackers.MlflowWriter(run_dir, tracking_uri=uri, experiment="e", run_name="n", tags=["t1"])
    w.write_hparams({"optim.learning_rate": 0.001, "x": "y" * 7000})
    w.write_scalars(1, {"train/loss": 0.5})
    w.write_image(1, "train/grad_cosine", np.zeros((8, 8, 3), np.uint8))
    w.close()
    again = trackers.MlflowWriter(run_dir, tracking_uri=uri, experiment="e", run_name="n", tags=["t1"], resume=True)
    assert again.run_id == w.run_id
    again.write_scalars(2, {"train/loss": 0.25})
    again.write_summary({"step": 2, "eval/loss": 0.125, "completed": True})
    again.close()
    client = again.client
    run = client.get_run(w.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "n"
    assert run.data.tags["t1"] == "true" and run.data.tags["corrjax.completed"] == "True"
    assert run.data.params["optim.learning_rate"] == "0.001" and len(run.data.params["x"]) == 6000
    assert [(m.step, m.value) for m in client.get_metric_history(w.run_id, "train/loss")] == [(1, 0.5), (2, 0.25)]
    assert client.get_metric_history(w.run_id, "summary/eval/loss")[0].value == 0.125
    images = [a.path for a in client.list_artifacts(w.run_id, "images")]
    assert any("grad_cosine" in p and "step+1" in p and p.endswith(".png") for p in images)


def test_a_missing_tracker_package_names_the_key_and_the_extra(monkeypatch):
    real = importlib.import_module

    def fail(name, *a, **k):
        if name.startswith("wandb"):
            raise ImportError("No module named 'wandb'")
        return real(name, *a, **k)

    monkeypatch.setattr(trackers.importlib, "import_module", fail)
    cfg = OmegaConf.create({"console": "auto", "wandb": {"enabled": True}})
    with pytest.raises(ImportError, match=r"`logger\.wandb\.enabled`=true .*corrjax\[wandb\]"):
        writers.check_logger(cfg)
    with pytest.raises(ValueError, match=r"`logger\.console`='sometimes'"):
        writers.check_logger(OmegaConf.create({"console": "sometimes"}))
    with pytest.raises(ValueError, match=r"`logger\.matrix_every`=-1"):
        writers.check_logger(OmegaConf.create({"matrix_every": -1}))


def test_flat_config_keeps_unresolvable_interpolations(compose_fn):
    cfg = compose_fn(["mtl=cagrad", "tags=[a,b]"])
    flat = trackers.flat_config(cfg)
    assert flat["mtl.c"] == 0.4 and flat["tags"] == "['a', 'b']" and flat["trainer.max_steps"] == 600
    assert flat["name"].startswith("${hydra:")  # needs Hydra's runtime: kept as written
    assert trackers.tags_of(cfg) == ["a", "b"]


# ---------------------------------------------------------------------------------------------------------------------
# Console lines.


def test_step_and_eval_lines():
    record = {"train/loss": 0.5321, "train/a/loss": 0.21, "train/b/loss": 0.3221, "train/weights/a": 0.4812}
    record["train/weights/b"] = 0.5188
    assert (
        console.step_line(120, 400, record, ["a", "b"], it_per_s=15.24, eta_s=18.2)
        == "step 120/400 loss 0.5321 | a 0.2100 b 0.3221 | w 0.48 0.52 | 15.2 it/s eta 0:00:18"
    )
    ev = {"eval/loss": 0.512, "eval/a/loss": 0.1, "eval/a/rmse": 0.31, "eval/b/loss": 0.4, "eval/b/accuracy": 0.93}
    assert console.eval_line(200, 400, ev, ["a", "b"]) == "eval 200/400 loss 0.5120 | a rmse 0.3100 b accuracy 0.9300"
    many = [f"t{i}" for i in range(40)]
    assert console.step_line(1, 2, {"train/loss": 1e-5}, many) == "step 1/2 loss 1e-05"
    assert [console.lines_enabled(m, shown) for m in ("auto", "always", "never") for shown in (True, False)] == [
        *(False, True),
        *(True, True),
        *(False, False),
    ]


def test_report_console_does_not_wrap_outside_a_terminal():
    buf = io.StringIO()
    c = console.make_console(buf)
    path = "/" + "/".join(["a-rather-long-folder-name"] * 8) + "/metrics.jsonl"
    c.print(f"  {path}")
    assert buf.getvalue() == f"  {path}\n"


def test_lines_on_a_pipe_and_learned_weights_end_to_end(tmp_path):
    """scripts/train.py with stdout a pipe: one line per log step and per evaluation, no progress bar, the
    report's paths on one line each; uw's weights in metrics.jsonl / metrics.csv, tags in summary.json."""
    run_dir = tmp_path / ("a-long-run-directory-name-to-be-wrapped-at-eighty-columns-" * 2) / "run"
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), *TINY, "logger=csv", "logger.tensorboard=false"]
    cmd += ["mtl=uw", "trainer.progress=true", "tags=[smoke]", f"hydra.run.dir={run_dir}"]
    cmd += ["trainer.checkpoint_every=0", "trainer.noise_scale=false", "logger.plots=false"]
    out = subprocess.run(cmd, env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line.split("] - ", 1)[1] for line in out.stdout.splitlines() if "][corrjax.train.loop][INFO] - " in line]
    steps = [line for line in lines if line.startswith("step ")]
    assert [s.split(" loss ")[0] for s in steps] == ["step 1/4", "step 2/4", "step 3/4", "step 4/4"]
    assert all(" | task0 " in s and " | w " in s and s.endswith(tuple("0123456789")) for s in steps), steps
    assert [e.split(" loss ")[0] for e in lines if e.startswith("eval ")] == ["eval 2/4", "eval 4/4"]
    assert not [line for line in out.stdout.splitlines() if line.startswith("train ")]  # no bar outside a terminal
    assert f"  {run_dir}/metrics.jsonl\n" in out.stdout and f"  {run_dir}/metrics.csv\n" in out.stdout
    records = writers.read_jsonl(run_dir / "metrics.jsonl")
    rows = writers.read_csv(run_dir / "metrics.csv")
    assert [r["step"] for r in rows] == [r["step"] for r in records] == [1, 2, 3, 4]
    for r, row in zip(records, rows, strict=True):
        assert r["train/weights/task0"] == row["train/weights/task0"] and row["train/weights/task0"] > 0
    assert records[0]["train/weights/task0"] == 0.5  # exp(-0) / 2 at the first step
    assert json.loads((run_dir / "summary.json").read_text())["tags"] == ["smoke"]


def test_optuna_sweep_two_trials(tmp_path):
    """hparams_search=cagrad_optuna: two tiny trials, the study in sqlite, the best value one of the returned
    values."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    optuna = pytest.importorskip("optuna")
    db = tmp_path / "study.db"
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "hparams_search=cagrad_optuna", *TINY]
    cmd += ["logger=minimal", "trainer.eval_every=0", "trainer.checkpoint_every=0", "trainer.noise_scale=false"]
    cmd += ["hydra.sweeper.n_trials=2", f"hydra.sweeper.storage=sqlite:///{db}", f"hydra.sweep.dir={sweep_dir}"]
    out = subprocess.run(cmd, env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    study = optuna.load_study(study_name="cagrad", storage=f"sqlite:///{db}")
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(trials) == 2 and all(set(t.params) == {"mtl.c", "optim.learning_rate"} for t in trials)
    assert all(0.0 <= t.params["mtl.c"] <= 0.9 and 1e-4 <= t.params["optim.learning_rate"] <= 1e-2 for t in trials)
    for i, t in enumerate(trials):  # each trial's value is what train.py returned: the best validation monitor
        summary = json.loads((sweep_dir / str(i) / "summary.json").read_text())
        assert summary["monitor_mode"] == "max"
        assert t.value == pytest.approx(summary[f"best/{summary['monitor']}"], rel=1e-6)
    results = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert results.best_value == pytest.approx(max(t.value for t in trials))


def test_hparams_search_composes_with_an_experiment(compose_fn):
    cfg = compose_fn(["hparams_search=cagrad_optuna", "experiment=multidigits_mtl"], return_hydra_config=True)
    assert cfg.mtl._target_ == "corrjax.mtl.cagrad" and cfg.optim._target_ == "optax.adam"
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.mode.name == "MULTIRUN"
    assert dict(cfg.hydra.sweeper.params) == {
        "mtl.c": "interval(0.0, 0.9)",
        "optim.learning_rate": "tag(log, interval(1e-4, 1e-2))",
    }
