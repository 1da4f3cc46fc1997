"""Input-pipeline throughput vs training-step throughput (section "data" of BENCHMARKS.md).

For every corrjax.data source, examples/s delivered by :class:`corrjax.data.BatchIterator` (shuffled, prefetching,
as host NumPy batches and as device arrays on a 1-device mesh), next to examples/s of a plain jitted Adam step of
the default model (HPS with the configs/model/hps.yaml MLP trunk, on synthetic data; and HPS-LeNet on multidigits).
Peers on the same in-memory data in the same process: grain ``MapDataset`` (shuffle + batch, per-record reads, its
default read threads) and a torch ``DataLoader`` over tensors (main process). TFDS sources are measured only on
mocked records (``tfds.testing.mock_data``): that times our per-record conversion and batching, not array_record
disk reads.

    .venv/bin/python scripts/bench_data.py           # rewrites the "data" section of BENCHMARKS.md
    .venv/bin/python scripts/bench_data.py --quick   # fewer batches, prints without writing
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib

from corrjax.data import BatchIterator, multidigits, synthetic
from corrjax.models import HPS, MLP, LeNet

BATCH = 128


# Every rate is ``num_batches`` batches (several epochs) timed from the creation of a fresh iterator: start-up is
# amortised and no pipeline is timed on batches it prepared before the clock started.


def iterator_rate(source: Any, num_batches: int, **kwargs: Any) -> float:
    """Examples/s of the first ``num_batches`` batches of a fresh prefetching BatchIterator."""
    t0 = time.perf_counter()
    it = BatchIterator(source, BATCH, seed=0, **kwargs)
    for _ in range(num_batches):
        jax.block_until_ready(next(it))
    dt = time.perf_counter() - t0
    it.close()
    return num_batches * BATCH / dt


def grain_rate(source: Any, num_batches: int) -> float | None:
    try:
        import grain
    except ImportError:
        return None
    t0 = time.perf_counter()
    ds = grain.MapDataset.source(source).shuffle(seed=0).repeat().batch(BATCH, drop_remainder=True)
    it = iter(ds.to_iter_dataset())
    for _ in range(num_batches):
        next(it)
    return num_batches * BATCH / (time.perf_counter() - t0)


def torch_rate(source: Any, num_batches: int) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    t0 = time.perf_counter()
    arrays = [source.arrays["x"]] + [source.arrays[t.name] for t in source.tasks]
    tensors = [torch.as_tensor(np.array(a)) for a in arrays]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*tensors), batch_size=BATCH, shuffle=True, drop_last=True
    )
    it = iter(loader)
    for _ in range(num_batches):
        try:
            next(it)
        except StopIteration:
            it = iter(loader)
            next(it)
    return num_batches * BATCH / (time.perf_counter() - t0)


def train_step_rate(model: nnx.Module, batch: dict[str, np.ndarray], tasks, repeats: int) -> float:
    """Examples/s of a jitted Adam step (summed task losses) on one fixed device batch, parameters donated."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt = optax.adam(1e-3)
    opt_state = opt.init(params)

    def loss_fn(p, b):
        out = nnx.merge(graphdef, p, rest)(b["x"])
        total = 0.0
        for t in tasks:
            if t.kind == "classification":
                total += optax.softmax_cross_entropy_with_integer_labels(out[t.name], b[t.name]).mean()
            elif t.kind == "binary":
                total += optax.sigmoid_binary_cross_entropy(out[t.name], b[t.name]).mean()
            else:
                total += jnp.mean((out[t.name] - b[t.name]) ** 2)
        return total

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(p, s, b):
        loss, g = jax.value_and_grad(loss_fn)(p, b)
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss

    b = jax.device_put(batch)
    state = [params, opt_state]

    def run():
        state[0], state[1], loss = step(state[0], state[1], b)
        return loss

    t = benchlib.timeit(run, repeats=repeats, warmup=2, min_time=0.2)
    return BATCH / t["median"]


def mocked_tfds_sources(tmp: Path):
    """Context: fake prepared dirs + TFDS mocked records (see tests/data/test_tfds.py for the __getitems__ fix)."""
    import tensorflow_datasets as tfds
    import tensorflow_datasets.testing.mocking as mocking

    from corrjax.data.tfds_sources import VERSIONS

    for name, version in VERSIONS.items():
        d = tmp / name / version
        d.mkdir(parents=True, exist_ok=True)
        (d / "dataset_info.json").write_text(json.dumps({"name": name}))

    def getitems(record_keys, generator, serialized=False):
        return [generator[k] for k in record_keys]

    stack = [
        mock.patch.object(mocking, "_getitems", getitems),
        tfds.testing.mock_data(num_examples=4096, policy=tfds.testing.MockPolicy.USE_CODE),
    ]
    return stack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    nb = 60 if args.quick else 400  # several epochs: start-up is amortised
    repeats = 5 if args.quick else 15
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    load = os.getloadavg()

    syn = synthetic("train")
    md = multidigits("train")
    rows = []
    for name, src in [("synthetic (d=100, T=2)", syn), ("multidigits (12x12x1, T=2)", md)]:
        host = iterator_rate(src, nb)
        dev = iterator_rate(src, nb, mesh=mesh)
        g = grain_rate(src, nb)
        tr = torch_rate(src, nb)
        rows.append([name, host, dev, g if g else "n/a", tr if tr else "n/a", host / g if g else "n/a"])
        print(rows[-1], flush=True)

    from corrjax.data import celeba, cifar10, multimnist

    with tempfile.TemporaryDirectory() as tmp:
        ctxs = mocked_tfds_sources(Path(tmp))
        for c in ctxs:
            c.__enter__()
        try:
            for name, src in [
                ("multimnist (mocked mnist, 36x36x1)", multimnist("train", data_dir=tmp)),
                ("cifar10 (mocked, 32x32x3)", cifar10("train", data_dir=tmp)),
                ("celeba (mocked 218x178 -> 64x64x3, T=40)", celeba("train", data_dir=tmp)),
            ]:
                n = 4 if "celeba" in name else 20
                rows.append([name, iterator_rate(src, n), iterator_rate(src, n, mesh=mesh), "n/a", "n/a", "n/a"])
                print(rows[-1], flush=True)
        finally:
            for c in reversed(ctxs):
                c.__exit__(None, None, None)

    # Training steps: the default model (configs/model/hps.yaml: MLP trunk [113], heads [8]) on synthetic data, and
    # HPS-LeNet on multidigits.
    steps = []
    hps = HPS(functools.partial(MLP, 100, (113,)), syn.tasks, head_hidden=(8,), rngs=nnx.Rngs(0))
    steps.append(
        ["HPS-MLP (default) on synthetic", train_step_rate(hps, syn.get_batch(np.arange(BATCH)), syn.tasks, repeats)]
    )
    lenet = HPS(functools.partial(LeNet, (12, 12, 1)), md.tasks, rngs=nnx.Rngs(0))
    steps.append(
        ["HPS-LeNet on multidigits", train_step_rate(lenet, md.get_batch(np.arange(BATCH)), md.tasks, repeats)]
    )
    for s in steps:
        print(s, flush=True)

    md_text = "\n\n".join(
        [
            "## Data pipeline (`scripts/bench_data.py`)",
            benchlib.machine_line(["flax", "optax", "grain", "tensorflow-datasets", "torch"]),
            f"Load average during the run: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (other jobs share the "
            "CPU; ratios within one run are what count). Batch size "
            f"{BATCH}, shuffled; `host` = NumPy batches, `device` = global jax.Arrays via "
            "`make_array_from_process_local_data` on a 1-device mesh; prefetch 2 (background thread).",
            benchlib.table(
                [
                    "source",
                    "BatchIterator host ex/s",
                    "BatchIterator device ex/s",
                    "grain MapDataset ex/s",
                    "torch DataLoader ex/s",
                    "ours / grain",
                ],
                rows,
            ),
            "Training step (jitted Adam, summed task losses, donated params, one fixed device batch):",
            benchlib.table(["model", "train step ex/s"], steps),
            "TFDS rows use `tfds.testing.mock_data` records (random images generated in Python), so they bound the "
            "cost of our conversion (composition, crop + area resize, stacking) plus the mock's generation; real "
            "array_record reads are not measured here (no prepared data on this machine).",
        ]
    )
    if args.quick:
        print(md_text)
    else:
        benchlib.write_section("data", md_text)
        print(md_text)


if __name__ == "__main__":
    main()
