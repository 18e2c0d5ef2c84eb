"""The small process tests/score/test_faults.py kills: journal one model's scores, then finalise;
or pack a scored store.

    python tests/fault_child.py CANDIDATES.h5 MODEL CHUNK_ROWS [SEED]
    python tests/fault_child.py --pack CANDIDATES.h5 OUT.h5

It does what the scorer's driver does after the compute (no model, no Dask, so it starts
in a fraction of a second): start or resume the journal of ``MODEL`` with the same
manifest checks as a run, record every missing chunk (deterministic stand-in results),
then :func:`stampbatch.score.run.finish_journals` — commit the model's scores file in the
candidate file's scores folder, remove the journal, add the model to the folder's index
(and, for a file without the ``/scores`` link, give it the link by copy-and-swap). The
candidate file's stamps are never written. ``--pack`` runs :func:`stampbatch.store.pack`.

With ``FAULT_CHILD_MARKER=1`` it prints ``started`` once its imports are done, just before
the work, so that a parent timing a random kill can aim it at the work, not at start-up.
With ``FAULT_CHILD_MARKER=wait`` it prints ``started`` and then waits for a line on stdin
before the work: the parent attaches ``strace -p`` meanwhile, so that the imports (thousands
of system calls) do not run under ptrace, and releases it once the attach is in place.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from stampbatch import __version__, fileio, store
from stampbatch.score.journal import IDENTITY_KEYS, JOURNAL_FORMAT, SETTING_KEYS, ChunkResult, Journal
from stampbatch.score.run import finish_journals

STARTED = "2026-01-01T00:00:00Z"      # fixed, so every run commits identical attributes


def stand_in(start: int, stop: int, seed: int = 7) -> ChunkResult:
    """What a model would give rows [start, stop): the same numbers for the same seed."""
    rng = np.random.default_rng([seed, start])
    p = rng.random(stop - start).astype(np.float32)
    rows = np.flatnonzero(p > 0.8)
    maps = rng.random((len(rows), 21, 21)).astype(np.float32)
    return ChunkResult(p, (rows + start).astype(np.int64), maps)


def manifest(target: Path, model: str, n: int, chunk_rows: int, seed: int) -> dict:
    identity = {**fileio.file_identity(target), "stamps": store.stamps_fingerprint(target)}
    return {"format": JOURNAL_FORMAT, "model": model, "model_sha256": f"{seed:02d}" * 32,
            "model_file": "/models/stand-in.keras", "architecture": "vgg6", "backend": "onnx",
            "source": str(target.resolve()), "source_identity": identity, "n_stamps": n,
            "stamp_shape": [21, 21], "chunk_rows": chunk_rows, "occlusion": "above:0.8",
            "occlusion_patch": 5, "started_at": STARTED, "stampbatch_version": __version__}


def run(target: Path, model: str, chunk_rows: int, seed: int = 7) -> None:
    n = store.open_store(target).n_stamps
    journal = Journal(target, model)
    wanted = manifest(target, model, n, chunk_rows, seed)
    if journal.difference(wanted, IDENTITY_KEYS + SETTING_KEYS) is not None:
        journal.remove()
    journal.start(wanted)
    journal.drop_unreadable(lambda _message: None)
    done = journal.finished_chunks()
    for lo in range(0, n, chunk_rows):
        hi = min(lo + chunk_rows, n)
        if done.get(lo) != hi:
            journal.record(lo, hi, stand_in(lo, hi, seed))
    finish_journals(target)


if __name__ == "__main__":
    marker = os.environ.get("FAULT_CHILD_MARKER")
    if marker in ("1", "wait"):
        print("started", flush=True)
    if marker == "wait":             # until the parent's strace is attached: one read(0, ...)
        if not os.read(0, 64).endswith(b"\n"):
            sys.exit("fault_child: stdin closed before the parent released the work")
    if sys.argv[1] == "--pack":
        store.pack(Path(sys.argv[2]), Path(sys.argv[3]), overwrite=True)
    else:
        run(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), *map(int, sys.argv[4:5]))
