"""The input pipeline of the loop: ``loader.*`` config keys, and evaluation through a persistent prefetching eval
iterator equal to a one-shot evaluation, evaluation after evaluation."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from corrjax.data import ArrayDataset, TaskSpec
from corrjax.train import config, evaluate, sharding

TASKS = (TaskSpec("c", "classification", 3), TaskSpec("r", "regression", 1))


def test_loader_keys_compose_and_bad_values_name_the_key(compose_fn):
    cfg = compose_fn(["loader.workers=3", "loader.prefetch=0"])
    assert (cfg.loader.workers, cfg.loader.prefetch) == (3, 0)
    default = compose_fn([])
    assert default.loader.workers is None and default.loader.prefetch == 2
    src = ArrayDataset({"x": np.zeros((4, 2), np.float32), "r": np.zeros(4, np.float32)}, [TASKS[1]])
    assert config.loader_options(default.loader, src) == {"workers": 0, "prefetch": 2}  # null: in-process on CPU
    assert config.loader_options(cfg.loader, src) == {"workers": 3, "prefetch": 0}
    for over, key in [("loader.workers=-1", "loader.workers"), ("loader.prefetch=-2", "loader.prefetch")]:
        with pytest.raises(ValueError, match=rf"`{key}`"):
            config.check_loader(compose_fn([over]).loader)


def test_persistent_eval_iterator_equals_one_shot_evaluation(mesh8):
    """Two evaluations from one eval iterator (batches prefetched by its thread between them) give the
    metrics of the one-shot, in-process evaluation; the iterator sits at an epoch boundary after each."""
    rng = np.random.default_rng(0)
    n = 21  # 3 batches of 8, the last padded
    data = ArrayDataset(
        {"x": rng.normal(size=(n, 4)).astype(np.float32), "c": rng.integers(0, 3, n), "r": rng.normal(size=n)},
        TASKS,
    )
    w = {"c": rng.normal(size=(4, 3)).astype(np.float32), "r": rng.normal(size=4).astype(np.float32)}
    eval_step = jax.jit(lambda st, b: {k: b["x"] @ v for k, v in st.items()})
    batch_sharding = sharding.batch_sharding(mesh8)
    want = evaluate.evaluate(eval_step, w, data, TASKS, batch_sharding, 8)
    w2 = {k: 2 * v for k, v in w.items()}
    want2 = evaluate.evaluate(eval_step, w2, data, TASKS, batch_sharding, 8)
    batches = evaluate.eval_batches(data, 5, batch_sharding, prefetch=2)  # 5 -> 8, a multiple of the 8 devices
    try:
        for params, ref in [(w, want), (w2, want2)]:
            got = evaluate.evaluate(eval_step, params, data, TASKS, batch_sharding, 5, batches=batches)
            assert batches.get_state()["step"] == batches.steps_per_epoch == 3
            assert set(got) == set(ref)
            for k in ref:
                np.testing.assert_allclose(got[k], ref[k], rtol=1e-6, err_msg=k)
        next(batches)  # mid-epoch: refused
        with pytest.raises(ValueError, match="start of an epoch"):
            evaluate.evaluate(eval_step, w, data, TASKS, batch_sharding, 5, batches=batches)
    finally:
        batches.close()
