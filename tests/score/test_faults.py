"""Fault injection: SIGKILL the scorer's write path, and pack, at every file-changing syscall.

``strace -e inject=SYSCALL:signal=KILL:when=K`` kills the process exactly at the K-th call
of SYSCALL (the call itself does not happen). K is swept over every such call of a whole
journal-and-finalise pass (tests/fault_child.py: record the chunks, commit the scores file,
remove the journal, update the index, and — for a file made elsewhere — the one
copy-and-swap that gives it its /scores link) and of a whole ``store.pack``, for every
syscall that changes a file (``openat`` only where it opens for writing). Random-time kills
are added on top, aimed after the child says it has started its work. After each kill: the
candidate file opens, its /stamps and the other model's scores are byte-identical, and a
rerun ends bit-identical to an uninterrupted run, with no journal or temporary file left;
for pack, the original and its scores folder are byte-identical and the output is absent
or complete and equal. The figures of the last run are printed and recorded in
RELIABILITY.md.

strace attaches after the imports (``_Traced``): the child prints ``started`` and waits,
``strace -p PID -f`` attaches with the same ``-e trace/inject`` (K counted from the attach,
in the probe that lists the calls as in every kill), and the child is released once strace
says it is attached and every thread's TracerPid is strace. Python's start-up and imports
(thousands of syscalls, most of a child's) thus run without a ptrace stop at each syscall
(``--seccomp-bpf`` would avoid those stops, but strace 6.1 cannot inject a signal with it).
A second probe traces a whole run from its exec, as before: the attached run's calls must be
its last ones, same order and phases; the few file-changing calls before them (start-up: the
/dev/null that Python's platform module opens for ``uname -p``) are swept as before, with
strace starting the child. The sweep is thus the same set of kill points as before.

These tests are slow (45-105 s a case on a loaded 2-core machine, 19-63 CPU-s, 170 for the
four): each kill is a fresh Python process (about 0.4 CPU-s, mostly imports) and a check with
a rerun, and the proof needs every call, not a sample. The kills run in parallel processes; every check and rerun runs
in the one thread that also starts them, because a fork while this process holds an HDF5
file open hands its file lock to the child until that execs (RELIABILITY.md, "the foreign
failure").
"""

from __future__ import annotations

import collections
import hashlib
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


def _child(work: Path, kind: str, *, marker: str = "0",
           prefix: list[str] | None = None) -> subprocess.Popen:
    """The killed process on the copy ``work`` of the case: score 'new' or pack, run by the
    command ``prefix`` (strace) if given. ``marker`` is tests/fault_child.py's
    FAULT_CHILD_MARKER: "1" prints ``started`` after the imports, "wait" also waits there for
    a line on stdin."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", FAULT_CHILD_MARKER=marker,
               OPENBLAS_NUM_THREADS="1",        # numpy's idle BLAS thread: one fewer to attach
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    args = ["--pack", str(work / "cand.h5"), str(work / PACKED)] if kind == "pack" else \
        [str(work / "cand.h5"), "new", str(ROWS), str(SEED)]
    err = open(work.parent / "stderr.txt", "wb")           # noqa: SIM115 - closed by the caller
    proc = subprocess.Popen([*(prefix or []), sys.executable, CHILD, *args], env=env,
                            stdin=subprocess.PIPE if marker == "wait" else subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL if marker == "0" else subprocess.PIPE,
                            stderr=err)
    err.close()
    return proc


class _Traced:
    """A child with strace attached after its imports, before its work: the child prints
    ``started`` and waits; ``strace -p PID -f OPTIONS`` attaches (K counts from there, so the
    probe and every kill count from the same point); once strace says the process is attached
    (printed after PTRACE_SEIZE and PTRACE_INTERRUPT of every thread: no later syscall can
    pass untraced) and /proc says every thread's tracer is that strace, the child is released.
    Python's start-up and imports, most of a child's syscalls, thus run without ptrace's stop
    at every syscall (strace 6.1 cannot inject a signal with --seccomp-bpf). ``step`` moves it
    on without blocking; ``fds`` are what it waits for."""

    def __init__(self, work: Path, kind: str, options: list[str]):
        self.work, self.options = work, options
        self.child = _child(work, kind, marker="wait")
        self.strace: subprocess.Popen | None = None
        self.released = False

    def _stderr(self) -> str:
        return (self.work.parent / "stderr.txt").read_text()[-1500:]

    def fds(self) -> list:
        return [self.child.stdout if self.strace is None or self.released
                else self.strace.stderr]

    def step(self) -> bool:
        """Advance if what it waits for is there; True once the child and strace have ended."""
        if not select.select(self.fds(), [], [], 0)[0]:
            return False
        pid = self.child.pid
        if self.strace is None:
            assert self.child.stdout.readline() == b"started\n", self._stderr()
            self.strace = subprocess.Popen(
                [STRACE, "-p", str(pid), "-f", "--quiet=exit,personality", *self.options],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            return False
        if not self.released:
            said = self.strace.stderr.readline()
            assert re.fullmatch(rb"(?:.*/)?strace: Process %d attached( with \d+ threads)?\n" % pid,
                                said), said
            tracers = {}
            for task in Path(f"/proc/{pid}/task").iterdir():
                status = (task / "status").read_text()
                tracers[task.name] = int(re.search(r"^TracerPid:\s*(\d+)", status, re.M)[1])
            assert set(tracers.values()) == {self.strace.pid}, tracers
            self.child.stdin.write(b"go\n")
            self.child.stdin.close()
            self.released = True
            return False
        assert self.child.stdout.read() == b""         # EOF: the child has ended
        self.child.wait()
        self.child.stdout.close()
        _, said = self.strace.communicate(timeout=60)
        assert self.strace.returncode == 0 and said == b"", said
        return True


def _traced_run(work: Path, kind: str, options: list[str]) -> subprocess.Popen:
    """Run a ``_Traced`` child to its end; the child's Popen."""
    traced = _Traced(work, kind, options)
    deadline = time.monotonic() + 120
    while not traced.step():
        assert time.monotonic() < deadline, "the traced child did not end in 120 s"
        select.select(traced.fds(), [], [], 0.5)
    return traced.child


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


def _calls(case: Path, kind: str, tmp: Path) -> tuple[list[tuple[str, int, str, bool]], dict]:
    """(syscall, K, phase, attached) of every file-changing call of an uninterrupted run, and
    the count of every traced syscall in it. Two probes: the whole run traced from its exec
    (as the sweep did before it attached after the imports), and a run traced from the attach
    after its imports (``_Traced``). The attached run's calls must be the last calls of the
    whole run, in the same order and phases: the work is the same. The whole run's calls
    before them (start-up: the /dev/null that Python's platform module opens for `uname -p`)
    are swept as before, strace starting the child (attached False, K from the exec); the
    work's with strace attached after the imports (attached True, K from the attach)."""
    work = tmp / "probe" / "work"
    every = ["-e", "trace=" + ",".join(SYSCALLS)]
    shutil.copytree(case.parent, work)
    trace = tmp / "trace.txt"
    proc = _child(work, kind, prefix=[STRACE, "-f", "-qq", "-y", "-o", str(trace), *every])
    assert proc.wait(timeout=120) == 0, (work.parent / "stderr.txt").read_text()[-2000:]
    whole, counts = _parse(trace, trace.read_text().split(None, 1)[0])
    shutil.rmtree(work.parent)
    shutil.copytree(case.parent, work)
    proc = _traced_run(work, kind, ["-y", "-o", str(trace), *every])
    assert proc.returncode == 0, (work.parent / "stderr.txt").read_text()[-2000:]
    attached, after = _parse(trace, str(proc.pid))
    shutil.rmtree(work.parent)
    before = {name: counts[name] - after[name] for name in SYSCALLS}
    assert min(before.values()) >= 0, (counts, after)
    startup = [(name, k, phase, False) for name, k, phase in whole if k <= before[name]]
    assert [(name, k - before[name], phase) for name, k, phase in whole
            if k > before[name]] == attached, "the attached run's calls are not the whole run's last"
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
    calls, counts = _calls(case, kind, tmp_path)
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
                             _Traced(work, kind, kill) if attach
                             else _child(work, kind, prefix=[STRACE, "-f", "-qq", *kill]))
        select.select([fd for _, _, t in running.values() if isinstance(t, _Traced)
                       for fd in t.fds()], [], [], 0.005)
        done = [w for w, (_, _, t) in running.items()
                if (t.step() if isinstance(t, _Traced) else t.poll() is not None)]
        for work in done:
            i, where, t = running.pop(work)
            proc = t.child if isinstance(t, _Traced) else t
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
    # Random-time kills on top: anywhere in the work, including between syscalls, aimed
    # after the child prints that its imports are done. Each must land: a run that ends
    # before its kill (a loaded machine runs faster or slower than the probe) is checked,
    # then tried again with the window shrunk to that run's length.
    rng = random.Random(12)

    def started(proc: subprocess.Popen) -> float:
        assert proc.stdout is not None and proc.stdout.readline() == b"started\n"
        return time.monotonic()

    shutil.copytree(case.parent, work)
    p = _child(work, kind, marker="1")
    begun = started(p)
    assert p.wait(timeout=120) == 0
    span = time.monotonic() - begun
    p.stdout.close()
    shutil.rmtree(work)
    early = 0
    while kills["random time"] < 12:
        assert early < 24, f"{early} random-time kills came after the run ended (span {span:.3f} s)"
        shutil.copytree(case.parent, work)
        proc = _child(work, kind, marker="1")
        begun = started(proc)
        time.sleep(rng.uniform(0.0, 1.0) * span)
        proc.kill()
        proc.wait()
        proc.stdout.close()
        check_at = f"random time {kills['random time'] + early}"
        if proc.returncode == -9:
            kills["random time"] += 1
        else:                         # finished before the kill came: checked, aimed again
            early += 1
            span = min(span, time.monotonic() - begun)
        check(work, proc, check_at)
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
