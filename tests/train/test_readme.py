"""The README walkthrough: every fenced snippet of README.md runs.

Snippets are found generically (any ```python or ```bash/```sh/```shell block, so new README sections are picked up
without touching this file):

- ``python`` blocks run in README order in one namespace, as a reader pasting them into one session would. The API
  tour leaves some inputs to the reader (``a, b`` samples, ``pred, target``, a model's ``params`` and a ``loss_fn``,
  ...): :func:`reader_inputs` supplies those names, and only those a snippet uses before any snippet defines them.
- ``bash`` blocks: each command (``\\`` continuations joined, comments dropped). Every ``scripts/train.py`` command's
  overrides compose (fast, in-process). The slow test runs the commands as a reader would, in a temporary folder,
  ``scripts/train.py`` ones shortened by :data:`TINY` (which replaces the keys it sets), with ``<name>/<stamp>``
  placeholders pointing at the newest run or sweep folder the walkthrough made; :data:`SKIP` lists, with reasons,
  the commands that need what a test machine lacks (a SLURM cluster, prepared TFDS data, the Makefile's venv).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
FIXTURES = ROOT / "tests" / "data" / "fixtures"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
SHELL = {"bash", "sh", "shell", "console"}
# Appended to every scripts/train.py command of the slow walkthrough (a command's own values of these keys are
# dropped): seconds-long runs on the small built-in data.
TINY = {
    "trainer.max_steps": "4",
    "trainer.batch_size": "16",
    "trainer.eval_batch_size": "64",
    "trainer.eval_every": "2",
    "trainer.log_every": "2",
    "trainer.checkpoint_every": "2",
    "trainer.progress": "false",
    "data.num_examples": "256",
}
# Commands not run, with the reason (matched with re.search on the command).
SKIP = {
    r"^make ": "installs a virtual environment and runs everything (`make run` is scripts/train.py, run here)",
    r"hydra\.launcher\.|hydra/launcher=slurm": "needs a SLURM cluster",
    r"experiment=(multimnist|celeba)|data=(multimnist|celeba|cifar10)|/shared/": "needs prepared TFDS data",
    r"launch_local\.py": "4 devices in 2 processes; tests/train/test_run.py runs the same 2-process path",
    r"^pip install ": "installs an optional extra (the dev extra used by the tests already has it)",
    r"logger=wandb|WANDB_MODE=": "W&B (online needs the network); test_experiment_tracking.py runs it offline",
    r"hparams_search=": "an Optuna sweep of 20-40 trials; test_experiment_tracking.py runs a 2-trial one",
}


def snippets(kinds: set[str]) -> list[tuple[int, str, str]]:
    """``(line, language, text)`` of README.md's fenced blocks whose language is in ``kinds``."""
    text = README.read_text()
    return [
        (text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2))
        for m in FENCE.finditer(text)
        if m.group(1) in kinds
    ]


def commands() -> list[tuple[int, list[str]]]:
    """``(line, argv)`` of every command of the shell blocks, continuations joined and comments dropped."""
    out = []
    for line, _, text in snippets(SHELL):
        for cmd in text.replace("\\\n", " ").splitlines():
            argv = shlex.split(cmd, comments=True)
            if argv:
                out.append((line, argv))
    return out


def skip_reason(argv: list[str]) -> str | None:
    cmd = shlex.join(argv)
    return next((why for pattern, why in SKIP.items() if re.search(pattern, cmd)), None)


def train_overrides(argv: list[str]) -> list[str]:
    """The overrides of a ``python scripts/train.py`` command (Hydra's own flags dropped)."""
    return [a for a in argv[2:] if "=" in a and not a.startswith("-")]


def reader_inputs() -> dict:
    """The inputs the README's API tour leaves to the reader: samples ``a, b`` (n,), ``pred, target`` (n, 3),
    activations ``h`` and views ``z1, z2``, ``scores`` (rows to rank), ``batches`` with per-layer activations
    ``acts_a/acts_b`` (10 layers each), and a 3-task problem (``params``, ``batch``, ``loss_fn(params, batch) ->
    (3,)``)."""
    k = jax.random.split(jax.random.key(0), 8)
    n = 64
    a = jax.random.normal(k[0], (n,))
    w = jax.random.normal(k[1], (5, 3))

    def loss_fn(params, batch):
        pred = batch["x"] @ params["w"] + params["b"]
        return jnp.mean((pred - batch["y"]) ** 2, axis=0)  # (3,) task losses

    return {
        "a": a,
        "b": a + 0.5 * jax.random.normal(k[2], (n,)),
        "pred": jax.random.normal(k[3], (n, 3)),
        "target": jax.random.normal(k[4], (n, 3)),
        "h": jax.random.normal(k[5], (n, 16)),
        "z1": jax.random.normal(k[6], (n, 8)),
        "z2": jax.random.normal(k[7], (n, 8)),
        "batches": [jax.random.normal(jax.random.key(i), (16, 6)) for i in range(3)],
        "acts_a": lambda x: [jnp.tanh(x * (i + 1)) for i in range(10)],
        "acts_b": lambda x: [jnp.sin(x * (i + 1)) for i in range(10)],
        "params": {"w": w, "b": jnp.zeros(3)},
        "batch": {"x": jax.random.normal(k[1], (n, 5)), "y": jax.random.normal(k[2], (n, 3))},
        "loss_fn": loss_fn,
        # AUC inputs: scores / probabilities, binary labels, weights, user ids
        "scores": jax.random.normal(k[3], (n,)),
        "probs": jax.nn.sigmoid(jax.random.normal(k[3], (n,))),
        "labels": jax.random.bernoulli(k[4], 0.4, (n,)),
        "weights": jnp.ones((n,)),
        "users": jnp.arange(n) % 8,
        "num_users": 8,
    }


def test_readme_python_snippets_compile():
    """Every python snippet is valid Python (the slow test below runs them)."""
    blocks = snippets({"python"})
    assert len(blocks) >= 5
    for line, _, text in blocks:
        compile(text, f"README.md:{line}", "exec")


@pytest.mark.slow
def test_readme_python_snippets_run(tmp_path, monkeypatch):
    """The python snippets in README order, in one namespace (~5 minutes on a busy 2-core CPU: every corrjax.stats
    function of the tour compiles)."""
    blocks = snippets({"python"})
    assert blocks, "README.md has no python snippet"
    monkeypatch.chdir(tmp_path)  # anything a snippet writes stays here
    # The reader's downloaded census-income / Ali-CCP files: the fixtures in their formats, under a home of its own.
    import shutil

    for name in ("census_income", "ali_ccp"):
        shutil.copytree(FIXTURES / name, tmp_path / "home" / "data" / name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    inputs, namespace = reader_inputs(), {"__name__": "__readme__"}
    for line, _, text in blocks:
        code = compile(text, f"README.md:{line}", "exec")
        for name in set(code.co_names) & set(inputs):
            namespace.setdefault(name, inputs[name])
        try:
            exec(code, namespace)
        except Exception as e:
            raise AssertionError(f"the python snippet at README.md line {line} failed: {e!r}") from e


def test_readme_train_commands_compose(compose_fn):
    """Every documented scripts/train.py command composes (a renamed key or option fails here at once); a sweep
    composes with the first value of each swept override."""
    found = [(line, argv) for line, argv in commands() if argv[:2] == ["python", "scripts/train.py"]]
    assert len(found) >= 5
    for line, argv in found:
        overrides = [o.split(",")[0] if "-m" in argv else o for o in train_overrides(argv)]
        overrides = [o.replace("<name>/<stamp>", "name/stamp") for o in overrides]  # a placeholder path
        try:
            compose_fn([o for o in overrides if not o.startswith("hydra.")])
        except Exception as e:
            raise AssertionError(f"README.md line {line}: {shlex.join(argv)} does not compose: {e}") from e


def _tiny(argv: list[str]) -> list[str]:
    kept = [a for a in argv if a.split("=", 1)[0] not in TINY]
    return [*kept, *(f"{k}={v}" for k, v in TINY.items())]


def _fill_placeholders(argv: list[str], cwd: Path) -> list[str]:
    """``multirun/<name>/<stamp>`` -> the newest sweep folder under ``cwd``; ``outputs/<name>/<stamp>`` -> the newest
    run of the command's own data-model-mtl choices (the run ``name``: resuming needs the run's config)."""
    choices = {"data": "synthetic", "model": "hps", "mtl": "ew"}
    choices.update(a.split("=", 1) for a in argv if a.split("=", 1)[0] in choices)

    def newest(kind: str) -> str:
        pattern = "*/*" if kind == "multirun" else f"{'-'.join(choices.values())}/*"
        # A run placeholder (resume, replace, ckpt_path) means a training run: one with checkpoints (an eval-only
        # run of scripts/eval.py has none).
        found = sorted(
            (
                p
                for p in (cwd / kind).glob(pattern)
                if p.is_dir() and (kind == "multirun" or (p / "checkpoints").is_dir())
            ),
            key=lambda p: p.stat().st_mtime,
        )
        assert found, f"no {kind}/{pattern} folder for the placeholder yet"
        return str(found[-1].relative_to(cwd))

    return [re.sub(r"(outputs|multirun)/<name>/<stamp>", lambda m: newest(m.group(1)), a) for a in argv]


@pytest.mark.slow
def test_readme_commands_run(tmp_path):
    """Every command of the README's shell blocks runs (tiny settings), in order, in one folder (~2-4 minutes on a
    2-core CPU)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HYDRA_FULL_ERROR": "1", "PYTHONPATH": str(ROOT)}
    ran = 0
    for line, argv in commands():
        if skip_reason(argv) or argv[0] != "python" or not argv[1].startswith("scripts/"):
            continue
        argv = _fill_placeholders(argv, tmp_path)
        if argv[1] == "scripts/train.py":
            argv = _tiny(argv)
        cmd = [sys.executable, str(ROOT / argv[1]), *argv[2:]]
        out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f"README.md line {line}: {shlex.join(argv)}\n{out.stderr[-3000:]}"
        ran += 1
    assert ran >= 5
    summaries = list((tmp_path / "outputs").glob("*/*/summary.json"))
    assert summaries and all(np.isfinite(json.loads(p.read_text())["eval/loss"]) for p in summaries)


def test_every_skipped_command_has_a_reason():
    """The skip-list leaves out only what needs a cluster, TFDS data or the Makefile; everything else in the shell
    blocks is a `python scripts/...` command the slow test runs."""
    for line, argv in commands():
        assert skip_reason(argv) or (argv[0] == "python" and argv[1].startswith("scripts/")), (line, argv)
