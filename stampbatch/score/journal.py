"""The scoring journal: finished chunks of one (target file, model), durable across any kill.

Layout, beside the resolved target: ``<target>.stampbatch-journal/<model>/`` holding
``manifest.json`` and one ``chunk-<start>-<stop>.npz`` per finished chunk of rows. Every
file is written under a temporary name, fsynced and renamed (:mod:`stampbatch.fileio`).

A journal can only be trusted for the run that made it, so:

* the manifest identifies that run: the input (device, inode, size, mtime and a digest of
  its stamps), the model's sha256, the backend and the options. It is the last step of
  starting a journal (after the directory is emptied and made durable) and comes before
  any chunk; a directory without a readable manifest is garbage: its chunks are never
  counted and it is wiped when a journal starts there;
* removal takes the manifest away first (renaming the whole directory away is one step),
  so a kill during a deletion can never leave chunks that look like a journal;
* a chunk that does not load (truncated, not an npz, wrong length) is reported in one line,
  deleted and recomputed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stampbatch import fileio
from stampbatch.errors import ScoreError

JOURNAL_SUFFIX = ".stampbatch-journal"
JOURNAL_FORMAT = 2
MANIFEST = "manifest.json"

# A difference in these means the journal belongs to another input, model or backend:
# its chunks are worthless and the run restarts from scratch.
IDENTITY_KEYS = ("format", "source_identity", "model_sha256", "backend", "precision",
                 "n_stamps", "stamp_shape")
# A difference in these is a change of settings: refused unless --force (the user may have
# mistyped, and the journal holds hours of work).
SETTING_KEYS = ("chunk_rows", "occlusion", "occlusion_patch")
# Keys added after journal format 2, with what a journal without them meant: one written
# before --precision existed was FP32 and resumes as such.
LATER_KEYS = {"precision": "fp32"}


@dataclass
class ChunkResult:
    """One model's scores of one chunk: P(source) for every row, maps for some rows."""

    probability: np.ndarray          # float32 (n,), NaN for unscorable stamps
    occlusion_rows: np.ndarray       # int64 (m,), absolute row numbers, increasing
    occlusion_maps: np.ndarray       # float32 (m, H, W)


def journal_root(target: Path | str) -> Path:
    """The directory of all journals of ``target`` (keyed on its resolved path)."""
    real = os.path.realpath(target)
    return Path(real + JOURNAL_SUFFIX)


def disk_error(exc: OSError, target: Path, what: str, journal: Path) -> ScoreError:
    """A write failure as one line that says what is kept and what to do."""
    import errno

    reason = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (
        exc.strerror or fileio.one_line(exc))
    return ScoreError(f"{target}: {reason} while writing {what}; finished chunks are kept in "
                      f"{journal} and the candidate stamps are untouched; fix it and rerun")


class Journal:
    """Durable record of the finished chunks of one (target file, model)."""

    def __init__(self, target: Path | str, model: str) -> None:
        self.target = Path(target)
        self.root = journal_root(target)
        self.dir = self.root / model

    @staticmethod
    def _name(start: int, stop: int) -> str:
        return f"chunk-{start:012d}-{stop:012d}.npz"

    def manifest(self) -> dict[str, Any] | None:
        """The manifest; None when there is none, {} when it is unreadable."""
        path = self.dir / MANIFEST
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def difference(self, manifest: dict[str, Any], keys: tuple[str, ...]) -> str | None:
        """The first of ``keys`` where the journal on disk differs from ``manifest``."""
        old = self.manifest()
        if old is None:
            return None
        old, manifest = {**LATER_KEYS, **old}, {**LATER_KEYS, **manifest}
        for key in keys:
            if old.get(key) != manifest.get(key):
                return f"{key} {_short(old.get(key))} (journal) vs {_short(manifest.get(key))} (now)"
        return None

    def start(self, manifest: dict[str, Any]) -> None:
        """Keep a journal with this manifest, or begin an empty one (manifest first)."""
        if self.manifest() and self.difference(manifest, IDENTITY_KEYS + SETTING_KEYS) is None:
            return
        try:
            if self.dir.exists():
                self.remove()
            self.dir.mkdir(parents=True, exist_ok=True)
            fileio.fsync_dir(self.root)
            fileio.fsync_dir(self.root.parent)
            fileio.write_json_atomic(self.dir / MANIFEST, manifest)
        except OSError as exc:
            raise disk_error(exc, self.target, "the journal manifest", self.dir) from exc

    def remove(self) -> None:
        """Delete the journal: the manifest goes first, then the directory, renamed away."""
        with contextlib.suppress(FileNotFoundError):
            (self.dir / MANIFEST).unlink()
            fileio.fsync_dir(self.dir)
        with contextlib.suppress(FileNotFoundError):
            fileio.remove_tree(self.dir)
        with contextlib.suppress(OSError):
            self.root.rmdir()

    def finished_chunks(self) -> dict[int, int]:
        """Chunks recorded so far, start → stop (none without a manifest)."""
        out: dict[int, int] = {}
        if not self.manifest():
            return out
        for p in self.dir.glob("chunk-*.npz"):
            with contextlib.suppress(ValueError):
                _, a, b = p.stem.split("-")
                out[int(a)] = int(b)
        return out

    def drop_unreadable(self, log: Callable[[str], None]) -> list[int]:
        """Load every recorded chunk; delete (and report in one line) those that do not load."""
        bad = []
        for lo, hi in sorted(self.finished_chunks().items()):
            try:
                self.load(lo, hi)
            except ScoreError as exc:
                log(f"{exc}; recomputing it")
                with contextlib.suppress(FileNotFoundError):
                    (self.dir / self._name(lo, hi)).unlink()
                bad.append(lo)
        if bad:
            fileio.fsync_dir(self.dir)
        return bad

    def record(self, start: int, stop: int, result: ChunkResult) -> None:
        """Durably record one finished chunk."""
        buffer = io.BytesIO()           # one write call, not one per zip member header
        np.savez(buffer, probability=result.probability, rows=result.occlusion_rows,
                 maps=result.occlusion_maps)
        try:
            fileio.write_bytes_atomic(self.dir / self._name(start, stop), buffer.getvalue())
        except OSError as exc:
            raise disk_error(exc, self.target, f"the journal chunk {start}..{stop}",
                             self.dir) from exc

    def load(self, start: int, stop: int) -> ChunkResult:
        """One recorded chunk, checked: rows in range, lengths consistent."""
        path = self.dir / self._name(start, stop)
        try:
            with np.load(path, allow_pickle=False) as z:
                res = ChunkResult(z["probability"], z["rows"], z["maps"])
        except Exception as exc:  # noqa: BLE001 - a damaged npz fails in many ways
            raise ScoreError(f"{path}: unreadable journal chunk ({fileio.one_line(exc, 120)})"
                             ) from exc
        rows = res.occlusion_rows
        if (res.probability.shape != (stop - start,) or rows.ndim != 1
                or len(rows) != len(res.occlusion_maps)
                or (len(rows) and (rows.min() < start or rows.max() >= stop))):
            raise ScoreError(f"{path}: journal chunk does not hold rows {start}..{stop}")
        return res


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
