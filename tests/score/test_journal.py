"""The scoring journal: manifest first, removed first, damaged chunks found and dropped."""

from __future__ import annotations

import numpy as np

from stampbatch.score.journal import ChunkResult, Journal, journal_root


def _result(start: int, stop: int) -> ChunkResult:
    p = np.linspace(0, 1, stop - start, dtype=np.float32)
    rows = np.array([start], dtype=np.int64)
    return ChunkResult(p, rows, np.ones((1, 21, 21), np.float32))


def test_chunks_count_only_under_a_manifest_and_removal_takes_it_first(tmp_path):
    target = tmp_path / "cand.h5"
    journal = Journal(target, "m")
    assert journal.root == journal_root(target) and journal.finished_chunks() == {}
    # chunks without a manifest (what a kill during an old rmtree could leave) are garbage
    journal.dir.mkdir(parents=True)
    np.savez(journal.dir / "chunk-000000000000-000000000010.npz", probability=np.ones(10))
    assert journal.manifest() is None and journal.finished_chunks() == {}
    journal.start({"format": 2, "n_stamps": 20})
    assert journal.finished_chunks() == {}                  # wiped when the journal started
    journal.record(0, 10, _result(0, 10))
    journal.record(10, 20, _result(10, 20))
    assert journal.finished_chunks() == {0: 10, 10: 20}
    journal.start({"format": 2, "n_stamps": 20})            # the same run: kept
    assert journal.finished_chunks() == {0: 10, 10: 20}
    journal.remove()
    assert not journal.root.exists() and list(tmp_path.iterdir()) == []


def test_a_truncated_chunk_is_reported_in_one_line_and_dropped(tmp_path):
    journal = Journal(tmp_path / "cand.h5", "m")
    journal.start({"format": 2})
    for lo in (0, 10, 20):
        journal.record(lo, lo + 10, _result(lo, lo + 10))
    chunk = journal.dir / "chunk-000000000010-000000000020.npz"
    chunk.write_bytes(chunk.read_bytes()[:100])              # truncated
    wrong = journal.dir / "chunk-000000000020-000000000030.npz"
    np.savez(wrong, probability=np.ones(3), rows=np.zeros(0), maps=np.zeros((0, 21, 21)))
    messages: list[str] = []
    assert journal.drop_unreadable(messages.append) == [10, 20]
    assert journal.finished_chunks() == {0: 10}
    assert len(messages) == 2 and all("\n" not in m for m in messages)
    assert "unreadable journal chunk" in messages[0] and "recomputing" in messages[0]
    assert "does not hold rows 20..30" in messages[1]
    np.testing.assert_array_equal(journal.load(0, 10).probability, _result(0, 10).probability)
