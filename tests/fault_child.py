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

    python tests/fault_child.py --serve

imports once, then forks a child per request (see ``serve``), each waiting to be released
before its work: the parent attaches ``strace -p`` to it meanwhile, so that no child runs
Python's start-up and imports (thousands of system calls), let alone under ptrace.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import traceback
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


def work(argv: list[str]) -> None:
    """The work the arguments ask for: pack, or journal and finalise one model's scores."""
    if argv[0] == "--pack":
        store.pack(Path(argv[1]), Path(argv[2]), overwrite=True)
    else:
        run(Path(argv[0]), argv[1], int(argv[2]), *map(int, argv[3:4]))


def _forked(argv: list[str], stderr: str, release: int) -> None:
    """In a child forked by ``serve``: wait for the release, do the work, end (never returns)."""
    code = 0
    try:
        err = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        null = os.open(os.devnull, os.O_RDWR)
        for fd, to in ((null, 0), (null, 1), (err, 2)):
            os.dup2(fd, to)
        if not os.read(release, 64):    # the zygote ended before releasing it: no work
            code = 1
            return
        work(argv)
    except BaseException:               # the traceback goes to the child's stderr file
        traceback.print_exc()
        code = 1
    finally:
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    """``--serve``: import once, then fork one child per request, each released on request.

    One JSON line on stdin per request: ``["run", STDERR_FILE, *ARGS]`` forks a child that
    sends its stdin and stdout to /dev/null and its stderr to STDERR_FILE, then waits to be
    released; ``started PID`` is printed. ``["go", PID]`` releases it: it does what ``ARGS``
    ask (as this script's command line would), then ends. ``["kill", PID]`` sends it SIGKILL
    if it has not been reaped yet. ``ended PID CODE`` is printed once it has ended (CODE as
    subprocess gives it: -9 for SIGKILL). EOF: the children not yet released end without
    their work; wait for all, end. The children need no imports (about 0.4 CPU-s each), and
    a parent can attach strace to one before releasing it."""
    os.set_blocking(0, False)
    pending: bytes | None = b""            # None once stdin is closed
    releases: dict[int, int] = {}          # pid: the write end of its release pipe
    pidfds: dict[int, int] = {}            # pidfd: pid
    while pending is not None or pidfds:
        for fd in select.select([*pidfds, *([0] if pending is not None else [])], [], [])[0]:
            if fd in pidfds:
                pid = pidfds.pop(fd)
                os.close(fd)
                status = os.waitpid(pid, 0)[1]
                code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
                print(f"ended {pid} {code}", flush=True)
                continue
            data = os.read(0, 65536)
            if not data:                   # the parent is gone or done: unreleased runs end
                pending = None
                for w in releases.values():
                    os.close(w)
                releases.clear()
                continue
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = json.loads(line)
                if request[0] == "go":
                    os.write(releases[request[1]], b"go\n")
                    os.close(releases.pop(request[1]))
                    continue
                if request[0] == "kill":       # only a child not reaped yet: its pid is ours
                    if request[1] in pidfds.values():
                        os.kill(request[1], signal.SIGKILL)
                    continue
                r, w = os.pipe()
                pid = os.fork()
                if pid == 0:
                    for other in [w, *releases.values(), *pidfds]:
                        os.close(other)
                    _forked(request[2:], request[1], r)
                os.close(r)
                releases[pid] = w
                pidfds[os.pidfd_open(pid)] = pid
                print(f"started {pid}", flush=True)


if __name__ == "__main__":
    serve() if sys.argv[1] == "--serve" else work(sys.argv[1:])
