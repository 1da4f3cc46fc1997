"""BatchIterator: seeded epochs, resume, per-process shards, padding masks, global batches on an 8-device mesh."""

import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from corrjax.data import ArrayDataset, BatchIterator, TaskSpec, epoch_order


def make_ds(n):
    return ArrayDataset(
        {"x": np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32), "y": np.arange(n)},
        [TaskSpec("y", "classification", max(n, 2))],
    )


def take(it, k):
    return [next(it) for _ in range(k)]


@given(
    n=st.integers(1, 40),
    b=st.integers(1, 12),
    seed=st.integers(0, 99),
    drop=st.booleans(),
    prefetch=st.sampled_from([0, 2]),
)
def test_epochs_cover_the_data_once(n, b, seed, drop, prefetch):
    if drop and b > n:
        with pytest.raises(ValueError, match="no complete batch"):
            BatchIterator(make_ds(n), b, drop_remainder=drop)
        return
    it = BatchIterator(make_ds(n), b, seed=seed, num_epochs=2, drop_remainder=drop, prefetch=prefetch)
    batches = list(it)
    assert len(batches) == 2 * it.steps_per_epoch
    for e in range(2):
        ep = batches[e * it.steps_per_epoch : (e + 1) * it.steps_per_epoch]
        ys = np.concatenate([bt["y"][bt["mask"]] if not drop else bt["y"] for bt in ep])
        for bt in ep:
            assert bt["y"].shape == (b,) and bt["x"].shape == (b, 3)
            np.testing.assert_array_equal(bt["x"][:, 0], bt["y"])
        if drop:
            assert len(set(ys.tolist())) == len(ys) == (n // b) * b
            np.testing.assert_array_equal(ys, epoch_order(n, seed, e)[: (n // b) * b])
        else:
            np.testing.assert_array_equal(ys, epoch_order(n, seed, e))  # every example exactly once, in order
    with pytest.raises(StopIteration):
        next(it)


def test_resume_yields_the_same_batches():
    ds = make_ds(23)
    it = BatchIterator(ds, 4, seed=3, prefetch=3)
    take(it, 7)  # into epoch 1 (5 steps per epoch)
    state = it.get_state()
    assert state == {"epoch": 1, "step": 2}
    ref = take(it, 9)
    fresh = BatchIterator(ds, 4, seed=3, prefetch=0)
    fresh.set_state(dict(state))
    got = take(fresh, 9)
    for a, b in zip(ref, got, strict=True):
        np.testing.assert_array_equal(a["y"], b["y"])
    it.set_state(state)  # rewinding a running iterator with a live prefetch thread
    np.testing.assert_array_equal(next(it)["y"], ref[0]["y"])
    it.close()
    assert BatchIterator(ds, 4, seed=4).get_state() == {"epoch": 0, "step": 0}
    assert not np.array_equal(next(BatchIterator(ds, 4, seed=4))["y"], next(BatchIterator(ds, 4, seed=3))["y"])
    with pytest.raises(ValueError, match="state"):
        fresh.set_state({"epoch": 0})


def test_process_shards_partition_the_global_batch():
    ds = make_ds(30)
    whole = take(BatchIterator(ds, 8, seed=1, prefetch=0), 6)
    parts = [take(BatchIterator(ds, 8, seed=1, prefetch=0, process_index=p, process_count=4), 6) for p in range(4)]
    for s in range(6):
        np.testing.assert_array_equal(np.concatenate([parts[p][s]["y"] for p in range(4)]), whole[s]["y"])
    with pytest.raises(ValueError, match="divisible"):
        BatchIterator(ds, 6, process_count=4, process_index=0)


@pytest.mark.parametrize("single_transfer", [True, False])
def test_global_batches_on_mesh(mesh8, single_transfer):
    ds = make_ds(50)
    it = BatchIterator(ds, 16, seed=2, mesh=mesh8, drop_remainder=False)
    assert it._single_transfer
    it._single_transfer = single_transfer  # False: the multi-process path (make_array_from_process_local_data)
    ref = BatchIterator(ds, 16, seed=2, prefetch=0, drop_remainder=False)
    sharding = NamedSharding(mesh8, P("data"))
    for _ in range(4):
        got, want = next(it), next(ref)
        for k in ("x", "y", "mask"):
            assert isinstance(got[k], jax.Array) and got[k].sharding.is_equivalent_to(sharding, got[k].ndim)
            assert got[k].shape == want[k].shape
            assert len(got[k].addressable_shards) == 8
            assert got[k].addressable_shards[0].data.shape[0] == 2
            np.testing.assert_array_equal(np.asarray(got[k]), want[k])
    assert int(np.asarray(got["mask"]).sum()) == 50 - 3 * 16


def test_bad_arguments():
    ds = make_ds(10)
    for kwargs, match in [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2, "num_epochs": 0}, "num_epochs"),
        ({"batch_size": 2, "prefetch": -1}, "prefetch"),
    ]:
        with pytest.raises(ValueError, match=match):
            BatchIterator(ds, **kwargs)


def test_errors_in_the_prefetch_thread_reach_the_caller():
    def boom(batch):
        raise RuntimeError("bad transform")

    it = BatchIterator(make_ds(10), 2, transform=boom)
    with pytest.raises(RuntimeError, match="bad transform"):
        next(it)


@pytest.mark.parametrize("seed", [-1, -(2**31), 2**31, 2**32 + 3, 1.5, True, "0"])
def test_bad_seeds_fail_at_construction_naming_seed(seed):
    """Seeds are ints in [0, 2**31): negative ones used to fail on the first batch (in the prefetch thread) with
    NumPy's SeedSequence message; larger ones collide in JAX's 32-bit keys (2**32 + 3 seeds like 3)."""
    with pytest.raises(ValueError, match=r"`seed`.*\[0, 2\*\*31\)"):
        BatchIterator(make_ds(10), 2, seed=seed)
    with pytest.raises(ValueError, match=r"`seed`"):
        epoch_order(10, seed, 0)
    it = BatchIterator(make_ds(10), 2, seed=np.int64(2**31 - 1), prefetch=0)  # the largest valid seed
    np.testing.assert_array_equal(next(it)["y"], epoch_order(10, 2**31 - 1, 0)[:2])


def test_batch_size_that_does_not_split_over_the_mesh_names_it(mesh8):
    with pytest.raises(ValueError, match=r"`batch_size`=12 .*8"):
        BatchIterator(make_ds(40), 12, mesh=mesh8)


def test_an_unclosed_iterator_exits_quietly(tmp_path):
    """An iterator left with a live prefetch thread is cleaned up at interpreter exit without a traceback (its
    ``__del__`` used ``contextlib``, which is gone by then)."""
    import subprocess
    import sys

    script = (
        "import numpy as np\n"
        "from corrjax.data import ArrayDataset, BatchIterator, TaskSpec\n"
        "ds = ArrayDataset({'x': np.zeros((20, 1), np.float32), 'y': np.zeros(20)}, [TaskSpec('y', 'regression', 1)])\n"
        "it = BatchIterator(ds, 8, num_epochs=1, prefetch=2)\n"
        "try:\n"
        "    while True: next(it)\n"
        "except StopIteration:\n"
        "    pass\n"
        "it.set_state({'epoch': 0, 'step': 1})\n"
        "next(it)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Exception ignored" not in out.stderr, out.stderr[-2000:]


def test_epoch_order_is_the_documented_permutation_and_changes_every_epoch():
    """Epoch ``e`` visits ``default_rng([seed, e]).permutation(n)``: a fresh order every epoch, not one reused."""
    n, seed = 23, 3
    orders = [epoch_order(n, seed, e) for e in range(3)]
    for e, order in enumerate(orders):
        np.testing.assert_array_equal(order, np.random.default_rng([seed, e]).permutation(n))
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
    np.testing.assert_array_equal(epoch_order(n, seed, 1, shuffle=False), np.arange(n))
    it = BatchIterator(make_ds(n), n, seed=seed, num_epochs=3, prefetch=0)
    for e, batch in enumerate(it):
        np.testing.assert_array_equal(batch["y"], orders[e])


def test_resume_at_an_epoch_boundary():
    """The position after an epoch's last batch is ``{"epoch": e, "step": steps_per_epoch}`` (a run checkpointed
    at a multiple of the epoch length); a fresh iterator set there goes on with epoch ``e + 1``."""
    ds = make_ds(23)
    it = BatchIterator(ds, 4, seed=3, prefetch=2)
    take(it, 5)  # exactly one epoch (5 steps)
    state = it.get_state()
    assert state == {"epoch": 0, "step": 5}
    ref = take(it, 3)
    it.close()
    fresh = BatchIterator(ds, 4, seed=3, prefetch=0)
    fresh.set_state(state)
    for a in ref:
        b = next(fresh)
        np.testing.assert_array_equal(a["y"], b["y"])
    assert fresh.get_state() == {"epoch": 1, "step": 3}
    np.testing.assert_array_equal(ref[0]["y"], epoch_order(23, 3, 1)[:4])
    with pytest.raises(ValueError, match="out of range"):
        fresh.set_state({"epoch": 0, "step": 6})


def test_process_shards_with_padding_partition_the_global_batch_and_mask():
    """Without drop_remainder, each process's rows and padding mask are its block of the global batch's: the
    mask marks the padded rows of the global batch, whichever process holds them."""
    ds = make_ds(30)  # 4 steps of 8: the last holds 6 examples and 2 padded rows (both on the last process)
    whole = take(BatchIterator(ds, 8, seed=1, prefetch=0, drop_remainder=False), 8)
    parts = [
        take(BatchIterator(ds, 8, seed=1, prefetch=0, drop_remainder=False, process_index=p, process_count=4), 8)
        for p in range(4)
    ]
    for s in range(8):
        for k in ("y", "mask"):
            np.testing.assert_array_equal(np.concatenate([parts[p][s][k] for p in range(4)]), whole[s][k])
    np.testing.assert_array_equal(whole[3]["mask"], [True] * 6 + [False] * 2)
    np.testing.assert_array_equal(whole[3]["y"][:6], epoch_order(30, 1, 0)[24:])
    np.testing.assert_array_equal(whole[3]["y"][6:], whole[3]["y"][:2])  # padded by repeating the batch's examples
    np.testing.assert_array_equal(parts[3][3]["mask"], [False, False])
    assert all(parts[p][3]["mask"].all() for p in range(3))
