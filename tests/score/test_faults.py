"""Fault injection: SIGKILL the scorer's write path, and pack, at every file-changing syscall.

``strace -e inject=SYSCALL:signal=KILL:when=K`` kills the process exactly at the K-th call
of SYSCALL (the call itself does not happen). K is swept over every such call of a whole
journal-and-finalise pass (tests/fault_child.py: record the chunks, commit the scores file,
remove the journal, update the index, and — for a file made elsewhere — the one
copy-and-swap that gives it its /scores link) and of a whole ``store.pack``, for every
syscall that changes a file (``openat`` only where it opens for writing). Random-time kills
are added on top, sent a random time after the child is released to its work. After each
kill: the candidate file opens, its /stamps and the other model's scores are byte-identical,
and a rerun ends bit-identical to an uninterrupted run, with no journal or temporary file
left; for pack, the original and its scores folder are byte-identical and the output is
absent or complete and equal. The figures of the last run are printed and recorded in
RELIABILITY.md.

The killed processes skip Python's start-up (``_Zygote``): ``fault_child.py --serve``
imports once and forks each run, which waits; ``strace -p PID -f`` attaches to it with the
``-e trace/inject`` of the kill (K counted from the attach, in the probe that lists the
calls as in every kill), and the run is released once strace says it is attached and every
thread's TracerPid is strace. Before, each kill was a fresh Python under strace from its
exec: its imports (thousands of syscalls) ran with a ptrace stop at each (``--seccomp-bpf``
would avoid the stops, but strace 6.1 cannot inject a signal with it), about 0.5-1 CPU-s a
kill. A second probe still traces a fresh Python's whole run from its exec: the forked run's
calls must be its last ones, in the same order and phases (the work does the same syscalls
either way), and the file-changing calls before them (start-up: the /dev/null that Python's
platform module opens for ``uname -p``) are swept as before, with strace starting a fresh
Python. The sweep is the same set of kill points as before: the counts are unchanged.

These tests are slow (5-35 s a case on a loaded 2-core machine, 5-31 CPU-s, 66-76 for the
four; 205-218 before the zygote): each kill is a check with a rerun in this process, and the
proof needs every call, not a sample. The kills run in parallel processes; every check and
rerun runs in the one thread that also starts them, because a fork while this process holds
an HDF5 file open hands its file lock to the child until that execs (RELIABILITY.md, "the
foreign failure"); the zygote that forks the runs never opens an HDF5 file.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import random
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import IN_CI, REPO

from stampbatch import fileio, store

sys.path.insert(0, str(Path(__file__).parent.parent))
import fault_child  # noqa: E402

pytestmark = pytest.mark.slow

STRACE = shutil.which("strace")
CHILD = str(Path(__file__).parent.with_name("fault_child.py"))
SYSCALLS = ("pwrite64", "write", "sendfile", "copy_file_range", "openat", "rename", "renameat",
            "renameat2", "fsync", "fdatasync", "ftruncate", "unlink", "unlinkat", "mkdir", "rmdir",
            "chmod", "fchmod", "fchmodat", "chown", "fchown", "lchown", "fchownat", "utimensat",
            "setxattr", "lsetxattr", "fsetxattr")   # the last ones: the copy-and-swap keeps
#                                                    owner, timestamps and xattrs
WRITE_OPEN = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC")   # an openat that can change a file
N, ROWS = 600, 128
SEED = 7                     # the stand-in model of the killed runs ('new' was seed 4 before)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _make_case(root: Path, kind: str) -> Path:
    """A candidate file already scored by model 'old' (and for "rescore" and "pack" by 'new'
    too); made by stampbatch or, for "foreign", by another program with older /scores groups."""
    root.mkdir()
    path = root / "cand.h5"
    stamps = np.random.default_rng(1).normal(size=(N, 21, 21)).astype(np.float32)
    if kind != "foreign":
        store.create_store(path, stamps, chunk_rows=ROWS)
        fault_child.run(path, "old", ROWS, seed=3)
        if kind in ("rescore", "pack"):
            fault_child.run(path, "new", ROWS, seed=4)
        return path
    with h5py.File(path, "w") as h5:          # another program's file, with older scores
        h5.create_dataset("stamps", data=stamps, chunks=(ROWS, 21, 21))
        h5.attrs["stampbatch_schema"] = 1
        h5.attrs["stamp_shape"] = np.array([21, 21])
        old = h5.create_group("scores/old")
        old["probability"] = np.linspace(0, 1, N, dtype=np.float32)
        old["occlusion_index"] = np.array([3, 9], dtype=np.int64)
        old["occlusion"] = np.ones((2, 21, 21), np.float32)
        old.attrs["complete"] = True
        old.attrs["model_sha256"] = "cd" * 32
    return path


def _state(path: Path) -> dict:
    """What must survive any kill: the stamps' bytes and the other model's scores."""
    with h5py.File(path, "r") as h5:
        stamps = hashlib.sha256(h5["stamps"][:].tobytes()).hexdigest()
    old = store.read_scores(path, "old")
    return {"stamps": stamps, "old": (old.probability.tobytes(), old.occlusion_index.tobytes(),
                                      old.occlusion.tobytes(), sorted(old.attrs.items()))}


def _result(path: Path) -> tuple:
    s = store.read_scores(path, "new")
    return (s.probability.tobytes(), s.occlusion_index.tobytes(), s.occlusion.tobytes(),
            sorted(s.attrs.items()), _sha(store.scores_file(path, "new")))


def _files(work: Path) -> dict[str, str]:
    """The bytes of every file of the pack case but the output and its temporary files."""
    return {str(p.relative_to(work)): _sha(p) for p in sorted(work.rglob("*"))
            if p.is_file() and PACKED not in p.name}


PACKED = "cand.packed.h5"


def _env() -> dict:
    return dict(os.environ, PYTHONDONTWRITEBYTECODE="1",
                OPENBLAS_NUM_THREADS="1",       # numpy's idle BLAS thread: nothing to attach
                PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


def _args(work: Path, kind: str) -> list[str]:
    return ["--pack", str(work / "cand.h5"), str(work / PACKED)] if kind == "pack" else \
        [str(work / "cand.h5"), "new", str(ROWS), str(SEED)]


def _child(work: Path, kind: str, strace: list[str]) -> subprocess.Popen:
    """A fresh Python process that strace (the command ``strace``) starts and traces from
    its exec on the copy ``work`` of the case: score 'new' or pack."""
    err = open(work.parent / "stderr.txt", "wb")           # noqa: SIM115 - closed here
    proc = subprocess.Popen([*strace, sys.executable, CHILD, *_args(work, kind)], env=_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    err.close()
    return proc


class _Forked:
    """One run forked by the ``_Zygote`` on the copy ``work``, strace attached before its
    work; ``returncode`` as subprocess gives it once it has ended, None before."""

    def __init__(self, work: Path, options: list[str] | None):
        self.work, self.options = work, options
        self.begun = self.ended = 0.0           # when it was released, when it was reaped
        self.pid = 0
        self.strace: subprocess.Popen | None = None
        self.released = False
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode


class _Zygote:
    """tests/fault_child.py --serve, which imports once and forks a run per request: the runs
    strace kills need no imports of their own. For each: the zygote forks the child, which
    waits; ``strace -p PID -f OPTIONS`` attaches (K counts from there, in the probe that lists
    the calls as in every kill); once strace says the process is attached (printed after
    PTRACE_SEIZE and PTRACE_INTERRUPT of every thread: no later syscall passes untraced) and
    every thread's TracerPid is that strace, the child is released to do its work. ``poll``
    moves every run on without blocking longer than ``timeout``."""

    def __init__(self, tmp: Path):
        self.stderr = tmp / "zygote-stderr.txt"
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, CHILD, "--serve"], env=_env(),
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=err)
        self.said, self.waiting, self.runs = b"", [], {}

    def _send(self, *request) -> None:
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        self.proc.stdin.flush()

    def start(self, work: Path, kind: str, options: list[str] | None) -> _Forked:
        """A run; strace ``options`` None: no strace, released at once."""
        run = _Forked(work, options)
        self._send("run", str(work.parent / "stderr.txt"), *_args(work, kind))
        self.waiting.append(run)
        return run

    def poll(self, timeout: float) -> None:
        attaching = {r.strace.stderr: r for r in self.runs.values()
                     if r.strace is not None and not r.released}
        for fd in select.select([self.proc.stdout, *attaching], [], [], timeout)[0]:
            if fd in attaching:
                self._release(attaching[fd])
                continue
            data = os.read(self.proc.stdout.fileno(), 65536)
            assert data, f"the zygote ended: {self.stderr.read_text()[-1500:]}"
            self.said += data
            while b"\n" in self.said:
                line, self.said = self.said.split(b"\n", 1)
                word, pid, *code = line.decode().split()
                if word == "started":
                    run = self.waiting.pop(0)
                    run.pid = int(pid)
                    self.runs[run.pid] = run
                    if run.options is None:
                        self._send("go", run.pid)
                        run.released, run.begun = True, time.monotonic()
                        continue
                    run.strace = subprocess.Popen(
                        [STRACE, "-p", pid, "-f", "--quiet=exit,personality", *run.options],
                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE)
                else:
                    run = self.runs.pop(int(pid))
                    assert word == "ended" and run.released, line
                    run.ended = time.monotonic()
                    if run.strace is not None:
                        _, said = run.strace.communicate(timeout=60)
                        assert run.strace.returncode == 0 and said == b"", said
                    run.returncode = int(code[0])

    def _release(self, run: _Forked) -> None:
        said = run.strace.stderr.readline()
        assert re.fullmatch(rb"(?:.*/)?strace: Process %d attached( with \d+ threads)?\n"
                            % run.pid, said), said
        tracers = {}
        for task in Path(f"/proc/{run.pid}/task").iterdir():
            status = (task / "status").read_text()
            tracers[task.name] = int(re.search(r"^TracerPid:\s*(\d+)", status, re.M)[1])
        assert set(tracers.values()) == {run.strace.pid}, tracers
        self._send("go", run.pid)
        run.released = True

    def wait(self, run: _Forked, released: bool = False) -> _Forked:
        """Until ``run`` has ended (or only been released)."""
        deadline = time.monotonic() + 120
        while not run.released if released else run.returncode is None:
            assert time.monotonic() < deadline, "the forked run did not end in 120 s"
            self.poll(0.5)
        return run

    def kill(self, run: _Forked) -> None:
        self._send("kill", run.pid)

    def close(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(timeout=60) == 0, self.stderr.read_text()[-1500:]
        self.proc.stdout.close()


def _phase(line: str) -> str:
    """Which phase a traced call belongs to, from the paths strace -y prints."""
    for needle, phase in ((PACKED, "pack output"), (".stampbatch-journal", "journal"),
                          ("index.h5", "index"), (".stampbatch.lock", "lock"),
                          ("cand.h5.scores", "commit"), (".cand.h5.", "convert (copy-and-swap)")):
        if needle in line:
            return phase
    return "other"


def _parse(trace: Path, main: str) -> tuple[list[tuple[str, int, str]], dict]:
    """(syscall, K, phase) of every file-changing call of process ``main`` in an strace -f -y
    log, and the count of every traced syscall (``openat`` counted whole, swept only where it
    opens for writing). strace counts K per process: only the child's own calls are counted
    and swept (the `uname -p` that Python's platform module runs at start-up writes to a pipe)."""
    counts: collections.Counter = collections.Counter({name: 0 for name in SYSCALLS})
    calls = []
    for line in trace.read_text().splitlines():
        pid, rest = line.split(None, 1) if " " in line else ("", "")
        name = rest.split("(", 1)[0]
        if name in SYSCALLS and pid == main:
            counts[name] += 1
            if name != "openat" or any(flag in line for flag in WRITE_OPEN):
                calls.append((name, counts[name], _phase(line)))
    return calls, dict(counts)


def _calls(case: Path, kind: str, tmp: Path,
           zygote: _Zygote) -> tuple[list[tuple[str, int, str, bool]], dict]:
    """(syscall, K, phase, attached) of every file-changing call of an uninterrupted run, and
    the count of every traced syscall in it. Two probes: a fresh Python's whole run traced
    from its exec (as every kill was before), and a run forked by the ``zygote``, traced from
    the attach. The forked run's calls must be the whole run's last calls, in the same order
    and phases: the work is the same. The whole run's calls before them (start-up: the
    /dev/null that Python's platform module opens for `uname -p`) are swept as before, strace
    starting a fresh Python (attached False, K from the exec); the work's in forked runs with
    strace attached (attached True, K from the attach)."""
    work = tmp / "probe" / "work"
    every = ["-e", "trace=" + ",".join(SYSCALLS)]
    shutil.copytree(case.parent, work)
    trace = tmp / "trace.txt"
    proc = _child(work, kind, [STRACE, "-f", "-qq", "-y", "-o", str(trace), *every])
    assert proc.wait(timeout=120) == 0, (work.parent / "stderr.txt").read_text()[-2000:]
    whole, counts = _parse(trace, trace.read_text().split(None, 1)[0])
    shutil.rmtree(work.parent)
    shutil.copytree(case.parent, work)
    proc = zygote.wait(zygote.start(work, kind, ["-y", "-o", str(trace), *every]))
    assert proc.returncode == 0, (work.parent / "stderr.txt").read_text()[-2000:]
    attached, after = _parse(trace, str(proc.pid))
    shutil.rmtree(work.parent)
    before = {name: counts[name] - after[name] for name in SYSCALLS}
    assert min(before.values()) >= 0, (counts, after)
    startup = [(name, k, phase, False) for name, k, phase in whole if k <= before[name]]
    assert [(name, k - before[name], phase) for name, k, phase in whole
            if k > before[name]] == attached, "forked run's calls != whole run's last"
    return startup + [(name, k, phase, True) for name, k, phase in attached], counts


def _check_after_kill(work: Path, kind: str, before: dict, reference, previous) -> None:
    path = work / "cand.h5"
    assert _state(path) == before                 # opens; stamps, other scores intact
    if kind == "pack":                                  # the original, byte for byte; the
        assert _files(work) == previous                 # output absent or whole
        assert not (work / PACKED).exists() or _sha(work / PACKED) == reference
        store.pack(path, work / PACKED, overwrite=True)  # the rerun
        assert _sha(work / PACKED) == reference
        assert _files(work) == previous
    else:
        if previous is not None:                        # rescoring: old scores or new, whole
            assert _result(path) in (previous, reference)
        fault_child.run(path, "new", ROWS, SEED)        # the rerun
        assert _result(path) == reference               # bit-identical
        assert _state(path) == before
    leftovers = [p.name for p in work.rglob("*") if p.name.startswith(".")
                 or p.name.endswith((".stampbatch-journal", ".stampbatch.lock"))]
    assert leftovers == [], leftovers


def _reference(work: Path, kind: str) -> tuple:
    """(the uninterrupted result, what a kill may also leave) on the copy ``work``."""
    if kind == "pack":
        files = _files(work)
        return _sha(store.pack(work / "cand.h5", work / PACKED).path), files
    previous = _result(work / "cand.h5") if kind == "rescore" else None
    fault_child.run(work / "cand.h5", "new", ROWS, SEED)
    assert _result(work / "cand.h5") != previous
    return _result(work / "cand.h5"), previous


@pytest.mark.kill
@pytest.mark.parametrize("kind", ["new", "foreign", "rescore", "pack"])
def test_sigkill_at_every_write_leaves_the_file_whole_and_the_rerun_identical(tmp_path, kind):
    """new: a second model on a stampbatch store; foreign: a first model on another program's
    file with older /scores groups (the one copy-and-swap); rescore: replacing a model's
    committed scores with new ones; pack: packing a store scored by two models."""
    if STRACE is None:  # in CI a missing strace fails (make test installs it); elsewhere skip
        message = "strace is not installed (make test installs it)"
        pytest.fail(message) if IN_CI else pytest.skip(message)
    case = _make_case(tmp_path / "case", kind)
    before = _state(case)
    # a few places to kill in at once (the scores record the source's path: one reference each)
    refs = {}
    for i in range(max(1, min(4, fileio.cores()))):
        work = tmp_path / f"slot{i}" / "work"
        shutil.copytree(case.parent, work)
        refs[work] = _reference(work, kind)
        shutil.rmtree(work)
    zygote = _Zygote(tmp_path)
    calls, counts = _calls(case, kind, tmp_path, zygote)
    # Recording the journal (same stamps, same chunks, before the lock of the finalisation is
    # taken and the scores folder touched) is the same code on the same bytes in the three
    # scoring cases: swept in "new" only, which keeps the four cases' time near the three of
    # before. The journal's removal after the commit is swept in every case.
    first_lock = next((i for i, c in enumerate(calls) if c[2] == "lock"), 0)
    shared = [c for c in calls[:first_lock] if c[2] == "journal"] \
        if kind in ("foreign", "rescore") else []
    calls = [c for c in calls if c not in shared]
    least = 25                                  # a pack is one file: fewer calls than scoring
    assert len(calls) >= least
    kills: collections.Counter = collections.Counter()
    missed = 0
    t0 = time.monotonic()

    def check(work: Path, proc: subprocess.Popen, where: str) -> None:
        try:
            assert proc.returncode in (-9, 137, 0), (work.parent / "stderr.txt").read_text()[-1500:]
            _check_after_kill(work, kind, before, *refs[work])
        except Exception as exc:  # name the kill point: the harness must say where it broke
            raise AssertionError(f"after SIGKILL at {where} (exit {proc.returncode}): "
                                 f"{exc}") from exc
        shutil.rmtree(work)

    # Every check and rerun runs here, in the thread that starts the children, never while a
    # child is being forked (see the module's docstring); the children run meanwhile.
    free, running, todo = list(refs), {}, list(enumerate(calls))
    outcomes: list[int] = [0] * len(calls)
    while todo or running:
        while free and todo:
            i, (name, k, _, attach) = todo.pop(0)
            work = free.pop()
            shutil.copytree(case.parent, work)
            kill = ["-o", "/dev/null", "-e", f"trace={name}",
                    "-e", f"inject={name}:signal=KILL:when={k}"]
            running[work] = (i, f"{name} call {k}" + (" after the imports" if attach else ""),
                             zygote.start(work, kind, kill) if attach
                             else _child(work, kind, [STRACE, "-f", "-qq", *kill]))
        zygote.poll(0.005)
        done = [w for w, (_, _, proc) in running.items() if proc.poll() is not None]
        for work in done:
            i, where, proc = running.pop(work)
            check(work, proc, where)
            outcomes[i] = proc.returncode
            free.append(work)
    missed_at = []
    for (name, k, phase, _), code in zip(calls, outcomes):
        if code == 0:                 # the run ended before its K-th call: none expected
            missed += 1
            missed_at.append(f"{name} {k}")
        else:
            kills[phase] += 1
    work = free[0]
    # Random-time kills on top: anywhere in the work, including between syscalls, sent
    # (by the zygote, to a child it has not reaped) a random time after the release. Each
    # must land: a run that ends before its kill (a loaded machine runs faster or slower than
    # the probe) is checked, then tried again with the window shrunk to that run's length.
    rng = random.Random(12)

    def timed(after: float | None) -> _Forked:
        shutil.copytree(case.parent, work)
        run = zygote.wait(zygote.start(work, kind, None), released=True)
        if after is not None:
            time.sleep(after)
            zygote.kill(run)
        return zygote.wait(run)

    first = timed(None)
    assert first.returncode == 0, (work.parent / "stderr.txt").read_text()[-1500:]
    span = first.ended - first.begun
    shutil.rmtree(work)
    early = 0
    while kills["random time"] < 12:
        assert early < 24, f"{early} random-time kills came after the run ended (span {span:.3f} s)"
        run = timed(rng.uniform(0.0, 1.0) * span)
        check_at = f"random time {kills['random time'] + early}"
        if run.returncode == -9:
            kills["random time"] += 1
        else:                         # finished before the kill came: checked, aimed again
            early += 1
            span = min(span, run.ended - run.begun)
        check(work, run, check_at)
    zygote.close()
    total = sum(kills.values())
    print(f"\nkills ({kind}): {total} in {time.monotonic() - t0:.0f} s ({missed} syscall counts "
          f"past the run's end, {early} random-time retries, work span {span:.3f} s): "
          + ", ".join(f"{k} {v}" for k, v in sorted(kills.items()))
          + "\ncalls traced: " + ", ".join(f"{k} {v}" for k, v in counts.items())
          + f"; openat swept: {sum(1 for c in calls if c[0] == 'openat')}; swept with strace "
          + f"from the exec (start-up): {sum(1 for c in calls if not c[3])}; journal calls left "
          + f"to 'new': {len(shared)}; past the end: "
          + ", ".join(missed_at))
    assert total >= least + 10
    # K counted per process, the sequence of calls is the same in every run: each kill lands
    assert missed == 0, f"kills that never came (the run ended first): {missed_at}"
