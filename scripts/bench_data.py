"""Input-pipeline throughput vs training-step throughput (sections "data" and "data_images" of BENCHMARKS.md).

For every corrjax.data source, examples/s delivered by :class:`corrjax.data.BatchIterator` (shuffled, prefetching,
as host NumPy batches and as device arrays on a 1-device mesh), next to examples/s of a plain jitted Adam step of
the default model (HPS with the configs/model/hps.yaml MLP trunk, on synthetic data; and HPS-LeNet on multidigits).
Peers on the same in-memory data in the same process: grain ``MapDataset`` (shuffle + batch, per-record reads, its
default read threads) and a torch ``DataLoader`` over tensors (main process). TFDS sources are measured only on
mocked records (``tfds.testing.mock_data``): that times our per-record conversion and batching, not array_record
disk reads.

The image-pipeline table measures what feeds an accelerator: a generated CelebA-like source (random 218x178x3 uint8
records in memory, decoded by corrjax's own CelebA conversion: centre crop, area resize to 64x64, 40 binary tasks)
through :class:`~corrjax.data.BatchIterator` with 0 (in-process), 1 and 2 grain DataLoader worker processes, next to
examples/s of the CelebA preset's train step (HPS-ResNet, configs/experiment/celeba.yaml's trunk) on the same batch
shape. Pipeline ex/s >= train step ex/s means the input keeps up.

    .venv/bin/python scripts/bench_data.py           # rewrites the "data" section of BENCHMARKS.md
    .venv/bin/python scripts/bench_data.py --quick   # fewer batches, prints without writing
    .venv/bin/python scripts/bench_data.py --images-only   # only the image table (section "data_images")
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

from corrjax.data import BatchIterator, RecordDataset, TaskSpec, multidigits, synthetic
from corrjax.data.tfds_sources import celeba_example
from corrjax.models import HPS, MLP, LeNet, ResNet

BATCH = 128


# Every rate is ``num_batches`` batches (several epochs) timed from the creation of a fresh iterator: start-up is
# amortised and no pipeline is timed on batches it prepared before the clock started.


def iterator_rate(source: Any, num_batches: int, batch_size: int = BATCH, skip: int = 0, **kwargs: Any) -> float:
    """Examples/s of ``num_batches`` batches of a fresh prefetching BatchIterator, timed after its first ``skip``
    batches (worker processes' start-up left out when ``skip`` > 0)."""
    it = BatchIterator(source, batch_size, seed=0, **kwargs)
    for _ in range(skip):
        jax.block_until_ready(next(it))
    t0 = time.perf_counter()
    for _ in range(num_batches):
        jax.block_until_ready(next(it))
    dt = time.perf_counter() - t0
    it.close()
    return num_batches * batch_size / dt


class _Repeated:
    """``num_examples`` records cycling over a smaller list (random images cost memory; decoding is what is timed)."""

    def __init__(self, records: list, num_examples: int) -> None:
        self.records, self.num_examples = records, num_examples

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, i: int) -> Any:
        return self.records[int(i) % len(self.records)]


def generated_celeba(
    num_examples: int, *, num_records: int = 256, height: int = 218, width: int = 178, size: int = 64, tasks: int = 40
) -> RecordDataset:
    """A CelebA-like RecordDataset over random uint8 images in memory, decoded by corrjax's CelebA conversion."""
    rng = np.random.default_rng(0)
    names = tuple(f"attr{i}" for i in range(tasks))
    records = [
        {
            "image": rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
            "attributes": {a: bool(v) for a, v in zip(names, rng.integers(0, 2, tasks), strict=True)},
        }
        for _ in range(num_records)
    ]
    convert = functools.partial(celeba_example, image_size=size, attributes=names)
    task_specs = [TaskSpec(a, "binary", 1) for a in names]
    return RecordDataset(_Repeated(records, num_examples), task_specs, convert, name="generated-celeba")


def image_pipeline(
    workers: list[int], num_batches: int, batch: int, repeats: int, mesh: Any, small: bool = False
) -> tuple[list[list[Any]], float, str]:
    """Rows ``[workers, host ex/s, device ex/s]`` of the generated CelebA source and the celeba preset's train step
    ex/s (HPS-ResNet, widths 32/64/128, stem stride 2, 40 binary heads) on the same batch shape. ``small``: 36x30
    images resized to 16x16, a tiny ResNet and 4 tasks (the reduced run of scripts/bench_device.py)."""
    if small:
        src = generated_celeba(4 * batch * num_batches, num_records=16, height=36, width=30, size=16, tasks=4)
        trunk = functools.partial(ResNet, 3, widths=(8,), blocks_per_stage=1, stem_stride=2)
        label = "generated CelebA-like 36x30 -> 16x16x3, T=4; HPS-ResNet(8)"
    else:
        src = generated_celeba(4 * batch * (num_batches + 2))
        trunk = functools.partial(ResNet, 3, widths=(32, 64, 128), blocks_per_stage=2, stem_stride=2)
        label = "generated CelebA-like 218x178 -> 64x64x3, T=40; HPS-ResNet(32, 64, 128)"
    rows = []
    for w in workers:
        skip = 2 if w else 0
        host = iterator_rate(src, num_batches, batch, skip=skip, workers=w)
        dev = iterator_rate(src, num_batches, batch, skip=skip, workers=w, mesh=mesh)
        rows.append([w, host, dev])
        print(["image pipeline", *rows[-1]], flush=True)
    model = HPS(trunk, src.tasks, rngs=nnx.Rngs(0))
    step = train_step_rate(model, src.get_batch(np.arange(batch)), src.tasks, repeats)
    print(["image train step", step], flush=True)
    return rows, step, label


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
    return len(batch["x"]) / t["median"]


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
    parser.add_argument("--images-only", action="store_true", help="only the image-pipeline table, printed")
    parser.add_argument("--workers", default="0,1,2", help="worker counts of the image-pipeline table")
    parser.add_argument("--image-batches", type=int, default=12, help="batches timed per image-pipeline row")
    args = parser.parse_args()
    nb = 60 if args.quick else 400  # several epochs: start-up is amortised
    repeats = 5 if args.quick else 15
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    load = os.getloadavg()
    workers = [int(w) for w in args.workers.split(",")]
    image_rows, image_step, image_label = image_pipeline(workers, args.image_batches, BATCH, min(repeats, 5), mesh)
    image_md = "\n\n".join(
        [
            "## Input pipeline vs the train step (`scripts/bench_data.py`, image table)",
            benchlib.machine_line(["flax", "optax", "grain"]),
            f"Load average at the start: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}. {image_label}; batch "
            f"{BATCH}; {args.image_batches} batches timed per row, after the first 2 where there are worker processes "
            "(their start-up, a spawn and an import of corrjax each, is left out); prefetch 2. `device / step` >= 1: "
            "the input keeps up with the step.",
            benchlib.table(
                ["grain workers", "pipeline host ex/s", "pipeline device ex/s", "train step ex/s", "device / step"],
                [[*r, image_step, r[2] / image_step] for r in image_rows],
            ),
        ]
    )
    print(image_md)
    if not args.quick:
        benchlib.write_section("data_images", image_md)
    if args.images_only:
        return

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
            f"{BATCH}, shuffled; `host` = NumPy batches, `device` = global jax.Arrays placed on a 1-device mesh; "
            "batches made by a grain DataLoader in-process unless a table says otherwise, prefetch 2 (background "
            "thread).",
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
