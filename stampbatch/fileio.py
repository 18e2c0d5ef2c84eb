"""Durable file operations shared by every module that writes: one home for each mechanism.

* :func:`atomic_path` / :func:`write_atomic` / :func:`write_json_atomic`: a file appears
  under its real name only complete — written under a temporary name in the same directory,
  fsynced, renamed, and the directory fsynced so the rename itself survives a power cut.
  Temporary files honour the umask (``mkstemp`` alone would make them 0600).
* :func:`fsync_file`, :func:`fsync_dir`, :func:`remove_tree` (rename away, then delete: a
  directory is either fully there under its name or gone).
* :func:`sha256_file`, :func:`utc_now` (one timestamp format), :func:`one_line`,
  :func:`jsonable`, :func:`cores`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from stampbatch.errors import FileError, Locked

TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
COMPACT_TIMESTAMP = "%Y%m%dT%H%M%SZ"  # the same instant inside a name (launch ids)


def _file_error(path: Path, problem: str) -> Exception:
    return FileError(f"{path}: {problem}")


def cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a Slurm allocation)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def utc_now(fmt: str = TIMESTAMP_FORMAT) -> str:
    """The current UTC time as ``YYYY-MM-DDTHH:MM:SSZ`` (the one format the project writes;
    :data:`COMPACT_TIMESTAMP` where it becomes part of a name)."""
    return _dt.datetime.now(_dt.UTC).strftime(fmt)


def one_line(exc: BaseException | str, limit: int | None = 300) -> str:
    """An exception (or text) squeezed to one line of at most ``limit`` characters (None:
    no limit)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


def telling_line(exc: BaseException | str, limit: int | None = 300) -> str:
    """The most telling line of a multi-line message (the last one that mentions an error,
    else the last line), as :func:`one_line` — for a tool's stderr or a job's exception."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if "error" in ln.lower()] or lines
    return one_line(useful[-1], limit) if useful else type(exc).__name__


def jsonable(obj: Any) -> Any:
    """Plain JSON types from dataclasses, mappings, sequences, numpy values and paths.

    NaN and infinities become null (JSON has no spelling for them).
    """
    import math

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):     # numpy arrays and scalars
        return jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def sha256_file(path: Path | str) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_file(path: Path | str) -> None:
    """Flush a file's data and metadata to the disk."""
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: Path | str) -> None:
    """Flush a directory (its entries: creations, renames, removals) to the disk."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def shared_mode() -> int:
    """File mode from the umask (``mkstemp``'s 0600 would hide shared data from the group)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: Path | str, *, overwrite: bool = False, suffix: str = ".h5",
                fail: Callable[[Path, str], Exception] = _file_error) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The destination directory must exist and be writable; an existing destination is
    refused unless ``overwrite``. On success the file and then its directory are fsynced;
    on any exception the temporary file is removed and the destination is left exactly as
    it was. ``fail(path, problem)`` builds the exception for a refused destination.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_symlink() and not path.exists():
        raise fail(path, f"is a dangling symlink (to {os.readlink(path)}); remove it or choose "
                         f"another name")
    if path.exists() and not overwrite:
        raise fail(path, "already exists (pass --overwrite to replace it)")
    if path.is_dir():
        raise fail(path, "is a directory")
    if not parent.is_dir():
        raise fail(path, f"directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise fail(path, f"directory {parent} is not writable")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial" + suffix,
                                    dir=parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, shared_mode())
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def remove_partials(path: Path | str, *, suffix: str = ".h5") -> None:
    """Delete what killed writers left under :func:`atomic_path`'s temporary names for
    ``path`` (the destination itself is never touched)."""
    path = Path(path)
    for leftover in path.parent.glob(f".{path.name}.*.partial{suffix}"):
        with contextlib.suppress(OSError):
            leftover.unlink()


def write_atomic(path: Path | str, write: Callable[[BinaryIO], Any], *,
                 fail: Callable[[Path, str], Exception] = _file_error) -> Path:
    """Call ``write(fh)`` on a temporary file beside ``path``, then make it ``path`` durably."""
    path = Path(path)
    with atomic_path(path, overwrite=True, suffix=path.suffix, fail=fail) as tmp, \
            open(tmp, "wb") as fh:
        write(fh)
    return path


def write_bytes_atomic(path: Path | str, data: bytes) -> Path:
    """Replace ``path`` by ``data``, atomically and durably."""
    return write_atomic(path, lambda fh: fh.write(data))


def write_json_atomic(path: Path | str, data: Any) -> Path:
    """Replace ``path`` by ``data`` as indented, key-sorted JSON, atomically and durably."""
    text = json.dumps(jsonable(data), indent=1, sort_keys=True, allow_nan=False) + "\n"
    return write_bytes_atomic(path, text.encode())


def remove_tree(path: Path | str) -> None:
    """Delete a directory so that no kill leaves part of it under its name.

    The directory is renamed to a hidden unique name first (one atomic step, made durable),
    then deleted; a kill during the deletion leaves only the hidden leftover, which a later
    call of :func:`sweep_removed` beside it clears.
    """
    path = Path(path)
    if not path.exists():
        return
    doomed = path.with_name(f".{path.name}.removing-{uuid.uuid4().hex[:8]}")
    os.replace(path, doomed)
    fsync_dir(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def sweep_removed(directory: Path | str) -> None:
    """Finish the deletions under ``directory`` that a kill interrupted."""
    for leftover in Path(directory).glob(".*.removing-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def file_identity(path: Path | str) -> dict[str, int]:
    """Which file this is and which version of it: device, inode, size, mtime (ns)."""
    st = os.stat(path)
    return {"device": int(st.st_dev), "inode": int(st.st_ino), "size": int(st.st_size),
            "mtime_ns": int(st.st_mtime_ns)}


class FileLock:
    """The one lock of stampbatch: an exclusive ``flock`` on ``<resolved target><suffix>``.

    Every lock of the package is one of these: a scores target's (``plan``, ``store``,
    ``kbmod``: ``<file>.stampbatch.lock``), a run directory's (``rundir``), a runs
    directory's launch manifest (``job_status``), a partial download (``download``: the
    ``.part`` itself, ``suffix=""``). Keyed on the resolved path, so a symlink and the real
    file share one lock; our own lock, so it holds whatever ``HDF5_USE_FILE_LOCKING`` says.
    The descriptor is opened ``O_CLOEXEC`` (a program we exec never inherits it) and the
    kernel drops the lock when the holder dies, SIGKILL included.

    * ``blocking``: wait for the holder instead of refusing at once;
    * ``record``: write ``text`` (default: the pid) into the lock file, for the process
      refused to name the holder; off where the file's content is not ours to change;
    * ``remove``: unlink the lock file on release (a retry on acquire covers the race
      with a holder removing it); off for lock files that stay;
    * ``busy(holder)`` / ``failed(exc)``: the error :meth:`acquire` raises when another
      process holds the lock (default :class:`~stampbatch.errors.Locked` with what the
      holder recorded, ``unknown_holder`` when nothing) or the lock file cannot be opened
      (default: the OSError itself).

    Use it as a context manager, or ``lock = FileLock(...).acquire()`` ... ``lock.release()``.
    """

    def __init__(self, target: Path | str, suffix: str = "", *, blocking: bool = False,
                 record: bool = True, text: str | None = None, remove: bool = True,
                 unknown_holder: str = "?",
                 busy: Callable[[str], Exception] | None = None,
                 failed: Callable[[OSError], Exception] | None = None) -> None:
        self.target = Path(target)
        self.path = Path(os.path.realpath(self.target) + suffix)
        self.blocking, self.record, self.text, self.remove = blocking, record, text, remove
        self.unknown_holder = unknown_holder
        self._busy, self._failed = busy, failed
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> FileLock:
        """Take the lock (waiting for it when ``blocking``) and return this lock."""
        import fcntl

        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                if self._failed is None:
                    raise
                raise self._failed(exc) from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if self.blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    holder = os.pread(fd, 256, 0).decode(errors="replace").strip() if self.record else ""
                finally:
                    os.close(fd)
                raise self._refused(holder) from None
            except BaseException:
                os.close(fd)
                raise
            # The holder before us may have unlinked the file after we opened it: retry.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                if self.record:
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, (self.text or f"{os.getpid()}\n").encode(), 0)
                self._fd = fd
                return self
            os.close(fd)
        raise self._refused("")

    def _refused(self, holder: str) -> Exception:
        holder = holder or self.unknown_holder
        return Locked(holder) if self._busy is None else self._busy(holder)

    def release(self) -> None:
        if self._fd is not None:
            if self.remove:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def writers_by_file() -> dict[tuple[int, int], int]:
    """(device, inode) → pid of another process holding that file open for writing.

    Read from Linux ``/proc`` (empty elsewhere) once for many files: links and symlinks of
    a file count too, and it works whatever HDF5's file locking is set to.
    """
    me, found = os.getpid(), {}
    for entry in os.scandir("/proc") if os.path.isdir("/proc") else ():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        with contextlib.suppress(OSError):
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                with contextlib.suppress(OSError, ValueError):
                    fst = os.stat(fd.path)
                    if _fd_flags(f"/proc/{entry.name}/fdinfo/{fd.name}") & (os.O_WRONLY | os.O_RDWR):
                        found.setdefault((fst.st_dev, fst.st_ino), int(entry.name))
    return found


def _fd_flags(fdinfo: str) -> int:
    with open(fdinfo) as fh:
        for line in fh:
            if line.startswith("flags:"):
                return int(line.split()[1], 8)
    return 0
