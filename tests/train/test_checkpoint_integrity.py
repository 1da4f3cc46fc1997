"""Verified restore (corrjax.train.checkpoint): each kind of damage to the newest checkpoint is reported with its
path and reason and the newest valid one is used; data positions that do not belong to their checkpoint are errors
naming the file; the loop resumes past a damaged checkpoint to the uninterrupted run's exact results."""

from __future__ import annotations

import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from corrjax.train import checkpoint, loop

TINY = ["trainer=tiny", "logger=minimal", "data.num_examples=256"]
SPE = 4  # batches per epoch of the fake data stream below


def fingerprint(seed: int = 0) -> dict:
    return checkpoint.data_fingerprint(
        {"_target_": "corrjax.data.synthetic", "data_dir": "/x"},
        num_examples=64,
        seed=seed,
        batch_size=16,
        steps_per_epoch=SPE,
    )


def position(step: int) -> dict:
    return {"epoch": step // SPE, "step": step % SPE}


def state_at(step: int) -> dict:
    return {"w": jnp.arange(2000.0).reshape(20, 100) + step, "step": jnp.int32(step)}


@pytest.fixture
def three(tmp_path):
    """Checkpoints at steps 2, 4 and 6 under tmp_path/checkpoints."""
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints", keep=5, async_save=False, fingerprint=fingerprint())
    for s in (2, 4, 6):
        ckpt.save(s, state_at(s), position(s), force=True)
    ckpt.close()
    return tmp_path / "checkpoints"


def reopen(directory, seed: int = 0) -> checkpoint.Checkpointer:
    return checkpoint.Checkpointer(directory, keep=5, async_save=False, fingerprint=fingerprint(seed))


def abstract() -> dict:
    return checkpoint.abstract_like(state_at(0))


def _largest_array_file(step_dir):
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    return max(files, key=lambda p: p.stat().st_size)


def truncate_array(step_dir):
    big = _largest_array_file(step_dir)
    os.truncate(big, big.stat().st_size // 2)


def empty_folder(step_dir):
    shutil.rmtree(step_dir)
    step_dir.mkdir()


# Orbax leaves an unawaited read coroutine behind when an array file fails to read (GeneratorExit at collection).
_ORBAX_ABORTED_READ = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


DAMAGE = {
    "truncated array file": (truncate_array, "does not restore"),
    "emptied data position": (lambda d: (d / "data" / "metadata").write_text(""), "data/metadata is not valid JSON"),
    "emptied state metadata": (lambda d: (d / "state" / "_METADATA").write_text(""), "state/_METADATA is not valid"),
    "emptied orbax metadata": (lambda d: (d / "_CHECKPOINT_METADATA").write_text("{"), "_CHECKPOINT_METADATA is not"),
    "empty step folder": (empty_folder, "empty step folder"),
    "missing item": (lambda d: shutil.rmtree(d / "state"), "missing item state/"),
}


@_ORBAX_ABORTED_READ
@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_latest_falls_back_to_the_newest_valid(three, kind, caplog):
    damage, reason = DAMAGE[kind]
    damage(three / "6")
    ckpt = reopen(three)
    with caplog.at_level(logging.WARNING, logger="corrjax.train.checkpoint"):
        restored = ckpt.restore_latest(abstract())
    assert restored.step == 4 and restored.data_state == position(4)
    np.testing.assert_array_equal(restored.state["w"], state_at(4)["w"])
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert str(three / "6") in warning and reason in warning
    # Moved out of Orbax's sight with its reason, so the run can save step 6 again and Orbax keeps counting right.
    assert not (three / "6").exists() and (three.parent / "checkpoints_damaged" / "6").is_dir()
    assert reason in (three.parent / "checkpoints_damaged" / "6.reason.txt").read_text()
    assert ckpt.latest_step() == 4
    ckpt.save(6, state_at(6), position(6), force=True)
    assert ckpt.restore_latest(abstract()).step == 6
    ckpt.close()


@_ORBAX_ABORTED_READ
def test_two_damaged_then_none_valid(three):
    truncate_array(three / "6")
    (three / "4" / "data" / "metadata").write_text("")
    ckpt = reopen(three)
    assert ckpt.restore_latest(abstract()).step == 2
    ckpt.close()
    empty_folder(three / "2")
    ckpt = reopen(three)
    with pytest.raises(checkpoint.CheckpointError) as e:
        ckpt.restore_latest(abstract())
    assert f"{three / '2'}: empty step folder" in str(e.value)
    assert (three / "2").exists()  # nothing is moved when nothing restores (the config may be what changed)
    ckpt.close()


def test_no_checkpoint_and_orbax_tmp_folders(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path / "c", async_save=False)
    assert ckpt.restore_latest(abstract()) is None
    ckpt.close()
    # What a kill during a save leaves: Orbax's temporary folder, never a candidate, deleted before the manager starts
    # (not in Orbax's background thread, which a manager closed without saving left running: it raced the next
    # manager's cleanup over the same folder, FileNotFoundError in rmtree)
    tmp = tmp_path / "c" / "8.orbax-checkpoint-tmp-123"
    tmp.mkdir()
    (tmp / "junk").write_text("x")
    ckpt = checkpoint.Checkpointer(tmp_path / "c", async_save=False)
    assert not tmp.exists()
    assert ckpt.step_dirs() == [] and ckpt.restore_latest(abstract()) is None
    ckpt.save(2, state_at(2), position(2), force=True)
    assert ckpt.step_dirs() == [2]
    ckpt.close()
    # a later start keeps the finished checkpoint and drops only the new leftover
    (tmp_path / "c" / "4.orbax-checkpoint-tmp-9").mkdir()
    ckpt = checkpoint.Checkpointer(tmp_path / "c", async_save=False)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["2"]
    assert ckpt.restore_latest(abstract()).step == 2
    ckpt.close()


def test_data_position_of_another_step_is_an_error(three):
    """A valid-looking position file that is not its checkpoint's (copied from step 4 into step 6) used to resume
    silently on different batches."""
    shutil.copy(three / "4" / "data" / "metadata", three / "6" / "data" / "metadata")
    ckpt = reopen(three)
    with pytest.raises(checkpoint.DataPositionError) as e:
        ckpt.restore_latest(abstract())
    assert str(three / "6" / "data" / "metadata") in str(e.value) and "step 4" in str(e.value)
    ckpt.close()


def test_edited_position_is_an_error(three):
    file = three / "6" / "data" / "metadata"
    data = json.loads(file.read_text())
    data["position"] = {"epoch": 0, "step": 3}
    file.write_text(json.dumps(data))
    ckpt = reopen(three)
    with pytest.raises(checkpoint.DataPositionError, match="3 batches into the stream"):
        ckpt.restore_latest(abstract())
    ckpt.close()


def test_position_of_another_data_stream_is_an_error(three):
    ckpt = reopen(three, seed=1)
    with pytest.raises(checkpoint.DataPositionError) as e:
        ckpt.restore_latest(abstract())
    assert "seed: 0 in the checkpoint, 1 now" in str(e.value) and str(three / "6") in str(e.value)
    ckpt.close()


def test_fingerprint_with_nan_matches_itself(tmp_path):
    fp = checkpoint.data_fingerprint(
        {"noise_std": float("nan")}, num_examples=64, seed=0, batch_size=16, steps_per_epoch=SPE
    )
    ckpt = checkpoint.Checkpointer(tmp_path, async_save=False, fingerprint=fp)
    ckpt.save(2, state_at(2), position(2), force=True)
    assert ckpt.restore_latest(abstract()).step == 2
    ckpt.close()


def test_positions_written_before_fingerprints_still_restore(three):
    (three / "6" / "data" / "metadata").write_text(json.dumps(position(6)))
    ckpt = reopen(three)
    assert ckpt.restore_latest(abstract()).data_state == position(6)
    ckpt.close()


@_ORBAX_ABORTED_READ
@pytest.mark.slow
def test_loop_resumes_past_a_damaged_checkpoint_exactly(compose_fn, tmp_path):
    """A finished run whose newest checkpoint is truncated: resume restores step 4 (the newest valid), trains 5-6
    again and ends with the uninterrupted run's records and summary, bit for bit; a resume with another seed is
    refused, naming the data-position file."""
    over = [*TINY, "trainer.max_steps=6", "trainer.eval_every=3", "trainer.checkpoint_every=2", "parallel.data=1"]
    full = loop.run(compose_fn(over), run_dir=tmp_path)
    records = (tmp_path / "metrics.jsonl").read_text().splitlines()
    with pytest.raises(checkpoint.DataPositionError, match=r"checkpoints/6/data/metadata.*seed: 0 in the"):
        loop.run(compose_fn([*over, "trainer.resume=true", "seed=1"]), run_dir=tmp_path)
    truncate_array(tmp_path / "checkpoints" / "6")
    resumed = loop.run(compose_fn([*over, "trainer.resume=true"]), run_dir=tmp_path)
    assert (tmp_path / "checkpoints_damaged" / "6").is_dir() and (tmp_path / "checkpoints" / "6").is_dir()
    drop = ("train/examples_per_s",)
    again = (tmp_path / "metrics.jsonl").read_text().splitlines()
    strip = [{k: v for k, v in json.loads(r).items() if k not in drop} for r in records]
    assert [{k: v for k, v in json.loads(r).items() if k not in drop} for r in again] == strip
    for k in full:
        if k.startswith(("eval/", "train/")) and k not in drop:
            np.testing.assert_array_equal(full[k], resumed[k], err_msg=k)
    assert jax.tree.leaves(full["eval/shared_cka_steps"]) == [3, 6] == resumed["eval/shared_cka_steps"]
