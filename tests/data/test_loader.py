"""BatchIterator through grain's DataLoader: the same batches with 0 and 2 worker processes on mocked TFDS CelebA
(decoding, crop and resize in the workers), resume mid-epoch with another worker count, and the loader pieces."""

import os

import numpy as np
import pytest

from corrjax.data import ArrayDataset, BatchIterator, TaskSpec
from corrjax.data import loader as grain_loader


def tag_pid(batch):
    """A picklable transform that records which process built the batch (and flips images, as augmentation)."""
    return {**batch, "x": batch["x"][:, :, ::-1], "pid": np.full(batch["x"].shape[0], os.getpid())}


def take(it, k):
    return [next(it) for _ in range(k)]


@pytest.mark.slow
def test_workers_give_the_same_batches_and_resume(mocked):
    """2 worker processes (spawned: grain pickles the source, whose records are the mocked ones materialised, as
    the mock does not reach a spawned process) give exactly the in-process batches, which are the source's
    ``get_batch`` of the documented epoch order; the decoding ran in the workers; a fresh iterator with another
    worker count set to a mid-epoch position continues identically."""
    from corrjax.data.tfds_sources import celeba

    ds = celeba("val", data_dir=mocked, image_size=8)
    ds.records = [ds.records[i] for i in range(len(ds))]  # 24 plain dicts of NumPy arrays: picklable
    kwargs = dict(seed=5, drop_remainder=False, transform=tag_pid)  # 3 batches of 10 per epoch, the last padded
    ref_it = BatchIterator(ds, 10, workers=0, prefetch=0, **kwargs)
    ref = take(ref_it, 5)
    it = BatchIterator(ds, 10, workers=2, prefetch=2, **kwargs)
    try:
        got = take(it, 5)
        state = it.get_state()
        after = take(it, 2)
    finally:
        it.close()
    assert state == {"epoch": 1, "step": 2}
    for s, (a, b) in enumerate(zip(ref, got, strict=True)):
        assert set(a) == set(b) == {"x", "mask", "pid", *(t.name for t in ds.tasks)}
        e, k = divmod(s, 3)
        want = ds.get_batch(ref_it.global_indices(e, k))
        np.testing.assert_array_equal(a["x"], want["x"][:, :, ::-1])
        for key in a:
            if key != "pid":
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        assert (a["pid"] == os.getpid()).all() and (b["pid"] != os.getpid()).all()  # decoded off the main process
    assert len({int(b["pid"][0]) for b in got}) == 2  # by both workers
    np.testing.assert_array_equal(got[2]["mask"], np.arange(20, 30) < 24)

    fresh = BatchIterator(ds, 10, workers=0, prefetch=1, **kwargs)
    fresh.set_state(state)
    for a, b in zip(after, take(fresh, 2), strict=True):
        np.testing.assert_array_equal(a["x"], b["x"])
        np.testing.assert_array_equal(a["Smiling"], b["Smiling"])
    fresh.close()


def test_loader_records_carry_their_position_and_sampler_bounds():
    ds = ArrayDataset({"x": np.arange(10.0)[:, None], "y": np.arange(10)}, [TaskSpec("y", "regression", 1)])
    geometry = grain_loader.BatchGeometry(10, 4, 0, True, True, slice(2, 4))  # this process holds rows 2..3
    loader = grain_loader.make_data_loader(ds, geometry, start=3, num_epochs=2)  # 2 batches per epoch: 4 in all
    batches = list(loader)
    assert [int(b[grain_loader.POSITION_KEY]) for b in batches] == [3]
    np.testing.assert_array_equal(batches[0]["y"], geometry.global_indices(1, 1)[2:4])
    sampler = grain_loader.BatchSampler(3, 5)
    assert len(sampler) == 2 and sampler[1].record_key == 4
    with pytest.raises(IndexError):
        sampler[2]
    with pytest.raises(ValueError, match="workers"):
        BatchIterator(ds, 2, workers=-1)
