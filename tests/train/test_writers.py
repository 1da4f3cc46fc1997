"""Metrics files that a kill cannot tear or mix (corrjax.train.writers): one write per record on an O_APPEND
descriptor, a torn last line dropped on resume, truncation and summaries replaced atomically."""

from __future__ import annotations

import json
import os

import pytest

from corrjax.train import writers


def test_each_record_is_one_append(tmp_path, monkeypatch):
    calls = []
    real = os.write
    monkeypatch.setattr(writers.os, "write", lambda fd, data: calls.append(bytes(data)) or real(fd, data))
    w = writers.MetricsWriter(tmp_path, tensorboard=False)
    w.write(1, {"train/loss": 1.5, "m": [[1.0, float("nan")]]})
    w.write(2, {"train/loss": 0.5})
    w.close()
    assert [json.loads(c)["step"] for c in calls] == [1, 2] and all(c.endswith(b"\n") for c in calls)
    assert writers.read_jsonl(tmp_path / "metrics.jsonl")[0]["m"] == [[1.0, None]]


def test_two_writers_append_whole_lines(tmp_path):
    a, b = writers.JsonlAppender(tmp_path / "m.jsonl"), writers.JsonlAppender(tmp_path / "m.jsonl")
    for i in range(50):
        (a if i % 2 else b).append({"step": i, "pad": "x" * 5000})
    a.close()
    b.close()
    assert [r["step"] for r in writers.read_jsonl(tmp_path / "m.jsonl")] == list(range(50))


def test_torn_last_line_is_dropped_on_resume(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n{"step": 3, "a": 3}\n{"step": 4, "a"')
    assert [r["step"] for r in writers.read_jsonl(path)] == [1, 2, 3]
    inode = path.stat().st_ino
    writers.truncate_jsonl(path, 2)
    assert path.read_text() == '{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n'
    assert path.stat().st_ino != inode  # replaced by a rename, not rewritten in place
    assert "torn last line" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary file left


def test_a_bad_line_before_the_last_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2"):
        writers.truncate_jsonl(path, 2)
    assert path.read_text() == '{"step": 1}\nnot json\n{"step": 3}\n'


def test_summary_and_snapshots(tmp_path):
    writers.write_summary(tmp_path, {"step": 3, "eval/loss": float("inf")})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"eval/loss": None, "step": 3}
    for s in (2, 4, 6):
        writers.save_snapshot(tmp_path / "rep", s, [float(s)])
    (tmp_path / "rep" / "8.npy.tmp").write_bytes(b"torn")
    writers.truncate_snapshots(tmp_path / "rep", 4)
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == ["2.npy", "4.npy"]


def test_closed_files_refuse_writes_and_close_syncs_once(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(writers.os, "fsync", lambda fd: synced.append(fd) or real(fd))
    jsonl, csv_ = writers.JsonlAppender(tmp_path / "m.jsonl"), writers.CsvWriter(tmp_path / "m.csv")
    jsonl.append({"step": 1})
    csv_.write_scalars(1, {"a": 1.0})
    csv_.write_scalars(2, {"a": 2.0, "b": 3})  # widens: the file is rewritten and reopened, still appendable
    for w in (jsonl, csv_):
        before = len(synced)
        w.close()
        assert len(synced) == before + 1  # the open descriptor is synced on close
        w.close()  # idempotent: nothing left to sync
        assert len(synced) == before + 1
    with pytest.raises(ValueError, match=r"m\.jsonl is closed"):
        jsonl.append({"step": 2})
    with pytest.raises(ValueError, match=r"m\.csv is closed"):
        csv_.write_scalars(3, {"c": 1.0})  # refused before widening: the file keeps its header
    assert (tmp_path / "m.csv").read_text().splitlines() == ["step,a,b", "1,1.0,", "2,2.0,3"]
