"""Which candidate files a scoring run is given, and whether their targets can be written."""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Iterable
from pathlib import Path

from stampbatch.errors import UsageError


def expand_candidates(items: Iterable[str | Path]) -> list[Path]:
    """Paths from a list of files, globs and ``@list.txt`` files (one path per line, # comments).

    A glob that matches nothing and a list file that does not exist are kept as given, so
    the caller reports them as missing. Duplicates are dropped, order kept.
    """
    out: list[Path] = []
    for item in items:
        text = str(item)
        if text.startswith("@"):
            list_file = Path(text[1:])
            if not list_file.is_file():
                raise UsageError(f"{list_file}: no such list file (given as {text})")
            base = list_file.parent
            for line in list_file.read_text().splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    p = Path(line)
                    out.extend(expand_candidates([p if p.is_absolute() else base / p]))
        elif any(ch in text for ch in "*?[") and not Path(text).exists():
            matches = sorted(glob.glob(text))
            out.extend(Path(m) for m in matches) if matches else out.append(Path(text))
        else:
            out.append(Path(text))
    seen: set[str] = set()
    unique = []
    for p in out:
        key = os.path.realpath(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def read_only_reason(path: Path) -> str | None:
    """Why ``path`` must not be written, or None. Mode bits count even for root."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    if not st.st_mode & 0o222:
        return "is read-only (no write permission bits)"
    with contextlib.suppress(OSError):
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "is on a read-only file system"
    if not os.access(path, os.W_OK):
        return "is not writable by this user"
    return None


def dir_problem(directory: Path) -> str | None:
    try:
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            return f"directory {directory} is on a read-only file system"
    except OSError as exc:
        return f"directory {directory} is not usable ({exc.strerror})"
    if not os.access(directory, os.W_OK):
        return f"directory {directory} is not writable"
    return None


def chunk_rows(chunk_size: int, file_chunk_rows: int) -> int:
    """Rows per task: a multiple of the file's HDF5 chunk rows, close to ``chunk_size``."""
    file_chunk_rows = max(1, int(file_chunk_rows))
    return max(1, round(chunk_size / file_chunk_rows)) * file_chunk_rows
