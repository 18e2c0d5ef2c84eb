"""Durable file operations: atomic writes, removal, locks keyed on the real file, writers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from stampbatch import fileio


def test_atomic_write_replaces_whole_files_and_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "a.json"
    fileio.write_json_atomic(path, {"b": np.float32(1.5), "a": [np.int64(2)], "n": float("nan")})
    assert json.loads(path.read_text()) == {"a": [2], "b": 1.5, "n": None}

    def boom(fh):
        fh.write(b"partial")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        fileio.write_atomic(path, boom)
    assert json.loads(path.read_text())["b"] == 1.5          # the old file, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    with pytest.raises(fileio.FileError, match="already exists"):
        with fileio.atomic_path(path):
            pass
    assert fileio.sha256_file(path) == __import__("hashlib").sha256(path.read_bytes()).hexdigest()
    assert fileio.utc_now().endswith("Z") and len(fileio.utc_now()) == 20
    assert fileio.one_line(ValueError("a\n  b\n")) == "a b" and fileio.cores() >= 1


def test_remove_tree_renames_away_first(tmp_path):
    d = tmp_path / "j"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "x").write_text("1")
    fileio.remove_tree(d)
    assert list(tmp_path.iterdir()) == []
    # what a kill during the deletion leaves: only a hidden leftover, swept later
    (tmp_path / ".j.removing-1234").mkdir()
    fileio.sweep_removed(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_symlink_and_the_real_file_share_one_lock(tmp_path):
    real = tmp_path / "cand.h5"
    real.write_bytes(b"x")
    (tmp_path / "alias.h5").symlink_to(real)
    first = fileio.FileLock(tmp_path / "alias.h5", ".lock")
    first.acquire()
    try:
        code = ("import sys\nfrom stampbatch import fileio\n"
                f"lock = fileio.FileLock({str(real)!r}, '.lock')\n"
                "try:\n    lock.acquire()\nexcept fileio.Locked as e:\n"
                "    print(e.holder); sys.exit(3)\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.returncode == 3 and out.stdout.strip() == str(os.getpid()), out.stderr
    finally:
        first.release()
    assert not (tmp_path / "cand.h5.lock").exists()


def test_a_blocking_lock_waits_for_its_holder_until_sigkill_frees_it(tmp_path):
    """A blocking lock (the launch manifest's) waits while another process holds it, and the
    kernel frees a flock when its holder is killed: the waiter gets it then, and records itself."""
    import signal
    import threading

    target = tmp_path / "runs" / ".launches.json.lock"
    target.parent.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom stampbatch import fileio\n"
         f"fileio.FileLock({str(target)!r}).acquire()\nprint('locked', flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(fileio.Locked) as refused:
            fileio.FileLock(target).acquire()
        assert refused.value.holder == str(holder.pid)
        waiter = fileio.FileLock(target, blocking=True)
        done = threading.Thread(target=waiter.acquire, daemon=True)
        done.start()
        time.sleep(0.5)
        assert done.is_alive() and not waiter.held  # still waiting for the holder
        os.kill(holder.pid, signal.SIGKILL)
        done.join(10)
        assert waiter.held and target.read_text() == f"{os.getpid()}\n"
    finally:
        holder.kill()
        holder.wait()
    waiter.release()
    assert not target.exists()


def test_lock_refusals_become_the_callers_errors_and_kept_files_keep_their_bytes(tmp_path):
    data = tmp_path / "x.bin.part"
    data.write_bytes(b"downloaded so far")
    with fileio.FileLock(data, record=False, remove=False) as lock:
        assert lock.held and os.get_inheritable(lock._fd) is False
        with pytest.raises(ValueError, match=r"x\.bin\.part: busy \(holder '\?'\)"):
            fileio.FileLock(data, record=False,
                            busy=lambda holder: ValueError(f"{data.name}: busy (holder {holder!r})")).acquire()
    assert data.read_bytes() == b"downloaded so far"  # nothing written into it, and it stays
    assert fileio.FileLock(data, record=False, remove=False).acquire().held
    missing = tmp_path / "no such dir" / "t.h5"
    with pytest.raises(RuntimeError, match=r"no such dir/t\.h5\.lock: No such file") as err:
        fileio.FileLock(missing, ".lock",
                        failed=lambda exc: RuntimeError(f"{exc.filename}: {exc.strerror}")).acquire()
    assert isinstance(err.value.__cause__, FileNotFoundError)


def test_fileio_is_the_only_module_that_takes_a_flock():
    """One lock class for the whole package: no other module calls flock/lockf itself."""
    import stampbatch

    package, home = Path(stampbatch.__file__).resolve().parent, Path(fileio.__file__).resolve()
    found = [f"{p.relative_to(package)}: {line.strip()}" for p in sorted(package.rglob("*.py"))
             if p != home
             for line in p.read_text(encoding="utf-8").splitlines()
             if "fcntl" in line or "flock(" in line or "lockf(" in line]
    assert found == []


def test_writers_are_found_by_inode_whatever_hdf5_locking_says(tmp_path):
    path = tmp_path / "cand.h5"
    path.write_bytes(b"x")
    holder = subprocess.Popen([sys.executable, "-c", f"f = open({str(path)!r}, 'r+b')\n"
                               "import sys; print('open', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, HDF5_USE_FILE_LOCKING="FALSE"))
    try:
        assert holder.stdout.readline().strip() == "open"
        st = os.stat(path)
        assert fileio.writers_by_file().get((st.st_dev, st.st_ino)) == holder.pid
    finally:
        holder.communicate("")
    deadline = time.monotonic() + 5
    while (st.st_dev, st.st_ino) in fileio.writers_by_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (st.st_dev, st.st_ino) not in fileio.writers_by_file()


def test_telling_line_and_compact_timestamp():
    assert fileio.telling_line("sbatch: queued\nsbatch: error: no partition\n  ") == (
        "sbatch: error: no partition")
    assert fileio.telling_line("first\nlast") == "last"
    assert fileio.one_line("x" * 400, limit=None) == "x" * 400
    compact = fileio.utc_now(fileio.COMPACT_TIMESTAMP)
    assert len(compact) == 16 and compact[8] == "T" and compact.endswith("Z")
