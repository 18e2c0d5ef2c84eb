"""Bring stamps in: read .npy/.npz stamp arrays, ingest them into a store, download files.

Untrusted files are never executed: arrays are read with ``allow_pickle=False`` (a pickled
object array is refused before any of it is read), and downloads are moved into place only
once their sha256 matches the expected digest.

Memory stays bounded when ingesting: ``.npy`` inputs are memory-mapped and ``.npz`` members
are streamed from the zip archive, a block of stamps at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import time
import urllib.parse
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import requests
import urllib3

from stampbatch import store
from stampbatch.errors import StampbatchError, UsageError
from stampbatch.progress import Progress

try:  # advisory lock on the partial download; not available on Windows
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_BLOCK_BYTES = 16 << 20  # stamps read per ingest block: about 16 MiB of float32
_HTTP_CHUNK = 1 << 16
_MAX_BACKOFF = 60.0
_SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")
# Status codes worth another attempt: server-side failures, and the two 4xx that mean "later".
_RETRY_STATUS = frozenset({408, 429})


class FetchError(StampbatchError):
    """An input array, an ingest or a download failed; the message is one line naming the file."""


def _fail(path: Path | str, problem: str) -> FetchError:
    return FetchError(f"{path}: {problem}")


def _one_line(exc: BaseException | str, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- reading arrays


@dataclass
class _ArraySource:
    """A validated stamp array inside a .npy file or an .npz member, not yet read."""

    path: Path
    key: str | None  # member name for .npz, None for .npy
    dtype: np.dtype
    shape: tuple[int, ...]
    fortran_order: bool
    data_offset: int  # .npy only: where the raw data starts
    stamp_shape: tuple[int, int] = (0, 0)

    @property
    def n(self) -> int:
        return int(self.shape[0])

    @property
    def label(self) -> str:
        return f"{self.path}[{self.key}]" if self.key is not None else str(self.path)

    def blocks(self, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, float32 (n, H, W) stamps)`` blocks in row order, memory bounded."""
        if self.key is None:
            yield from self._npy_blocks(block_rows)
        else:
            yield from self._npz_blocks(block_rows)

    def _as_stamps(self, raw: np.ndarray) -> np.ndarray:
        h, w = self.stamp_shape
        # Always a copy: never a view of the memory map or of the zip member's bytes.
        return np.array(raw, dtype=np.float32, order="C").reshape(-1, h, w)

    def _npy_blocks(self, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        try:
            arr = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise _fail(self.path, f"unreadable .npy file ({_one_line(exc)})") from exc
        for lo in range(0, self.n, block_rows):
            yield lo, self._as_stamps(arr[lo:lo + block_rows])

    def _npz_blocks(self, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        try:
            with zipfile.ZipFile(self.path) as zf, zf.open(f"{self.key}.npy") as fp:
                _read_npy_header(fp, self.label)
                if self.fortran_order:
                    # Column-major data cannot be streamed by rows: read the member whole.
                    count = math.prod(self.shape)
                    raw = _read_exact(fp, count * self.dtype.itemsize, self.label)
                    arr = np.frombuffer(raw, dtype=self.dtype).reshape(self.shape, order="F")
                    for lo in range(0, self.n, block_rows):
                        yield lo, self._as_stamps(arr[lo:lo + block_rows])
                    return
                row_values = math.prod(self.shape[1:])
                row_bytes = row_values * self.dtype.itemsize
                for lo in range(0, self.n, block_rows):
                    rows = min(block_rows, self.n - lo)
                    raw = _read_exact(fp, rows * row_bytes, self.label)
                    yield lo, self._as_stamps(np.frombuffer(raw, dtype=self.dtype))
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise _fail(self.label, f"corrupt .npz member ({_one_line(exc)})") from exc


def _read_exact(fp: IO[bytes], nbytes: int, label: str) -> bytes:
    data = fp.read(nbytes)
    if len(data) != nbytes:
        raise _fail(label, f"truncated array data (expected {nbytes} more bytes, got {len(data)})")
    return data


def _read_npy_header(fp: IO[bytes], label: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Read the .npy magic and header without touching the data (never unpickles)."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fp)
        if version == (1, 0):
            shape, fortran_order, dtype = fmt.read_array_header_1_0(fp)
        elif version in ((2, 0), (3, 0)):
            # 3.0 only differs in the text encoding of structured field names.
            shape, fortran_order, dtype = fmt.read_array_header_2_0(fp)
        else:  # pragma: no cover - read_magic accepts only the versions above today
            raise ValueError(f"unsupported .npy format version {version}")
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise _fail(label, f"not a readable .npy array ({_one_line(exc)})") from exc
    return tuple(int(s) for s in shape), bool(fortran_order), np.dtype(dtype)


def _check_array(src: _ArraySource, stamp_shape: tuple[int, int] | None) -> _ArraySource:
    """Validate dtype and shape from the header; fill in the stamp shape."""
    label, dtype, shape = src.label, src.dtype, src.shape
    if dtype.hasobject:
        raise _fail(label, "holds Python objects (pickle); refusing to load it")
    if dtype.kind not in "fiu" or dtype.fields is not None:
        raise _fail(label, f"has non-numeric dtype {dtype}; stamps must be integers or floats")
    if len(shape) not in (2, 3):
        raise _fail(label, f"has shape {shape}, expected (N, H*W) or (N, H, W) stamps")
    if math.prod(shape) == 0:
        raise _fail(label, f"is empty (shape {shape}); no stamps to read")
    if len(shape) == 3:
        found = (shape[1], shape[2])
        if stamp_shape is not None and found != tuple(stamp_shape):
            raise _fail(label, f"stamps are {found[0]}x{found[1]}, expected "
                               f"{stamp_shape[0]}x{stamp_shape[1]}")
    else:
        length = shape[1]
        if stamp_shape is not None:
            if length != stamp_shape[0] * stamp_shape[1]:
                raise _fail(label, f"rows of {length} values cannot be {stamp_shape[0]}x"
                                   f"{stamp_shape[1]} stamps ({stamp_shape[0] * stamp_shape[1]} "
                                   f"values)")
            found = (int(stamp_shape[0]), int(stamp_shape[1]))
        else:
            side = math.isqrt(length)
            if side * side != length:
                raise _fail(label, f"rows of {length} values are not square stamps "
                                   f"(expected H*H values, e.g. 441 for 21x21)")
            found = (side, side)
    src.stamp_shape = found
    return src


def _open_npy(path: Path, stamp_shape: tuple[int, int] | None) -> _ArraySource:
    with open(path, "rb") as fp:
        shape, fortran_order, dtype = _read_npy_header(fp, str(path))
        offset = fp.tell()
    src = _check_array(_ArraySource(path, None, dtype, shape, fortran_order, offset), stamp_shape)
    expected = math.prod(shape) * dtype.itemsize
    found = path.stat().st_size - offset
    if found < expected:
        raise _fail(path, f"truncated .npy file ({found:,} of {expected:,} bytes of stamp data)")
    return src


def _open_npz(path: Path, key: str | None, stamp_shape: tuple[int, int] | None) -> _ArraySource:
    try:
        with zipfile.ZipFile(path) as zf:
            members = [n for n in zf.namelist() if n.endswith(".npy")]
            names = [n[: -len(".npy")] for n in members]
            if not names:
                raise _fail(path, "holds no arrays (an .npz with no .npy members)")
            if key is None:
                if len(names) > 1:
                    raise _fail(path, f"holds {len(names)} arrays ({', '.join(names)}); "
                                      f"choose one with --key")
                key = names[0]
            elif key not in names:
                raise _fail(path, f"has no array '{key}' (it has: {', '.join(names)})")
            label = f"{path}[{key}]"
            with zf.open(f"{key}.npy") as fp:
                shape, fortran_order, dtype = _read_npy_header(fp, label)
    except zipfile.BadZipFile as exc:
        raise _fail(path, f"not a readable .npz archive, truncated or corrupt "
                          f"({_one_line(exc)})") from exc
    return _check_array(_ArraySource(path, key, dtype, shape, fortran_order, 0), stamp_shape)


def _open_array(path: Path | str, key: str | None = None,
                stamp_shape: tuple[int, int] | None = None) -> _ArraySource:
    """Validate a .npy/.npz stamp array from its header alone (nothing big is read)."""
    path = Path(path)
    if not path.exists():
        raise _fail(path, "no such file")
    if path.is_dir():
        raise _fail(path, "is a directory, not a .npy/.npz file")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(len(_NPY_MAGIC))
    except OSError as exc:
        raise _fail(path, f"cannot read ({_one_line(exc.strerror or exc)})") from exc
    if magic.startswith(_NPY_MAGIC):
        return _open_npy(path, stamp_shape)
    if magic[:4] in _ZIP_MAGICS:
        return _open_npz(path, key, stamp_shape)
    raise _fail(path, "not a numpy file (expected .npy or .npz stamp arrays)")


def load_stamp_array(path: Path | str, *, key: str | None = None,
                     stamp_shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a whole .npy/.npz stamp array as float32 (N, H, W).

    (N, H*W) rows of a square stamp become (N, H, H) (or ``stamp_shape`` when given);
    (N, H, W) is kept. An .npz needs ``key`` when it holds several arrays. Pickled object
    arrays, empty, truncated and non-numeric arrays are refused with a :class:`FetchError`.
    """
    src = _open_array(path, key, stamp_shape)
    (_, stamps), = src.blocks(src.n)
    return stamps


# --------------------------------------------------------------------------- ingest


def _block_rows(chunk_rows: int, stamp_shape: tuple[int, int]) -> int:
    """Rows per read: a multiple of the HDF5 chunk, about ``_BLOCK_BYTES`` of float32."""
    per_stamp = 4 * stamp_shape[0] * stamp_shape[1]
    return chunk_rows * max(1, _BLOCK_BYTES // (per_stamp * chunk_rows))


def ingest(
    out: Path | str,
    *,
    sources: Path | str | None = None,
    noise: Path | str | None = None,
    candidates: Path | str | None = None,
    key: str | None = None,
    chunk_rows: int = store.DEFAULT_CHUNK_ROWS,
    compression: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> store.StoreInfo:
    """Convert stamp arrays into an HDF5 store, atomically.

    Labelled: ``sources`` (stamps with a source at the centre, label 1) then ``noise``
    (label 0), with metadata ``kind`` ("source"/"noise") and ``source_row`` (row within its
    input file). Unlabelled: ``candidates``, with ``source_row``. ``key`` names the array
    inside any .npz input (.npy inputs ignore it). Every input is validated before anything is written, and nothing
    appears at ``out`` unless the whole store was written.
    """
    out = Path(out)
    if chunk_rows < 1:
        raise UsageError(f"ingest: chunk_rows must be a positive integer, got {chunk_rows}")
    if candidates is not None and (sources is not None or noise is not None):
        raise UsageError("ingest: candidates cannot be combined with sources/noise")
    if candidates is None and (sources is None or noise is None):
        raise UsageError("ingest: give sources and noise (a labelled store) or candidates")

    inputs: list[tuple[_ArraySource, str | None]] = []
    if candidates is not None:
        inputs.append((_open_array(candidates, key), None))
    else:
        src = _open_array(sources, key)
        try:
            nse = _open_array(noise, key, src.stamp_shape)
        except FetchError:
            # Say which shapes disagree when the noise array is fine on its own.
            alone = _open_array(noise, key)
            h, w = alone.stamp_shape
            raise _fail(alone.label, f"stamps are {h}x{w} but {src.label} holds "
                                     f"{src.stamp_shape[0]}x{src.stamp_shape[1]} stamps") from None
        inputs += [(src, "source"), (nse, "noise")]
    for src, _ in inputs:
        with contextlib.suppress(OSError):
            if out.exists() and out.samefile(src.path):
                raise _fail(out, f"is also the input {src.path}; choose another output name")

    total = sum(src.n for src, _ in inputs)
    stamp_shape = inputs[0][0].stamp_shape
    labelled = candidates is None
    chunk_rows = min(int(chunk_rows), total)
    attrs: dict[str, Any] = {"created_by": "stampbatch ingest"}
    for src, kind in inputs:
        attrs[f"ingested_{kind or 'candidates'}"] = str(Path(src.path).resolve()) + (
            f"[{src.key}]" if src.key is not None else "")
    block_rows = _block_rows(chunk_rows, stamp_shape)
    with Progress(total, f"ingest {out.name}", "stamps", enabled=progress) as bar, \
            store.StoreWriter(out, labelled=labelled, stamp_shape=stamp_shape,
                              chunk_rows=chunk_rows, compression=compression, overwrite=overwrite,
                              attrs=attrs) as writer:
        for src, kind in inputs:
            for start, stamps in src.blocks(block_rows):
                n = len(stamps)
                meta: dict[str, np.ndarray] = {
                    "source_row": np.arange(start, start + n, dtype=np.int64)}
                labels = None
                if labelled:
                    meta["kind"] = np.full(n, kind, dtype="S6")
                    labels = np.full(n, 1 if kind == "source" else 0, dtype=np.int8)
                writer.append(stamps, labels, meta)
                bar.update(n)
    return store.open_store(out)


# --------------------------------------------------------------------------- download


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class _Retry(Exception):
    """One attempt failed in a way that another attempt may fix."""


_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RE = re.compile(r"bytes\s+\*/(\d+)")


def _describe_network_error(exc: BaseException) -> str:
    if isinstance(exc, (requests.Timeout, urllib3.exceptions.TimeoutError)):
        return "timed out"
    text = _one_line(exc, limit=1000)
    errno_text = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if errno_text:
        return errno_text.group(1).strip()
    return _one_line(exc)


def _attempt(session: requests.Session, url: str, part_fh: IO[bytes], offset: int,
             timeout: float, bar: Progress) -> int | None:
    """Fetch bytes from ``offset`` into the partial file; return the total size if known.

    Raises :class:`_Retry` for failures another attempt may fix, :class:`FetchError` for
    those it will not. Returns ``None`` for the total when the server did not say.
    """
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = session.get(url, headers=headers, stream=True, timeout=(timeout, timeout))
    except requests.exceptions.InvalidURL as exc:
        raise UsageError(f"{url}: invalid URL ({_one_line(exc)})") from exc
    except (requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema) as exc:
        raise UsageError(f"{url}: not an http(s) URL") from exc
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise _Retry(_describe_network_error(exc)) from exc
    with resp:
        code = resp.status_code
        if code == 416:
            match = _UNSATISFIED_RE.search(resp.headers.get("Content-Range", ""))
            size = int(match.group(1)) if match else None
            if size is not None and size == offset:
                return size  # the partial file already holds every byte
            part_fh.truncate(0)
            part_fh.seek(0)
            raise _Retry(f"HTTP 416 for bytes {offset}- (server has {size} bytes); restarting")
        if code >= 500 or code in _RETRY_STATUS:
            raise _Retry(f"HTTP {code} {resp.reason}")
        if code >= 400:
            raise FetchError(f"{url}: HTTP {code} {resp.reason}")
        if code not in (200, 206):
            raise FetchError(f"{url}: unexpected HTTP {code} {resp.reason}")
        length = resp.headers.get("Content-Length")
        body_bytes = int(length) if length and length.isdigit() else None
        if code == 206:
            match = _CONTENT_RANGE_RE.search(resp.headers.get("Content-Range", ""))
            if match is None:
                raise FetchError(f"{url}: HTTP 206 without a usable Content-Range header")
            start = int(match.group(1))
            total = int(match.group(3)) if match.group(3) != "*" else None
            if start > offset:
                part_fh.truncate(0)
                part_fh.seek(0)
                raise _Retry(f"server resumed at byte {start}, not {offset}; restarting")
            pos = start
        else:  # 200: the whole file (a server that ignores Range starts from byte 0 again)
            pos = 0
            total = body_bytes
        part_fh.truncate(pos)
        part_fh.seek(pos)
        bar.total = total
        bar.done = pos
        expected_end = total if total is not None else (
            pos + body_bytes if body_bytes is not None else None)
        try:
            for data in _body_chunks(resp):
                part_fh.write(data)
                pos += len(data)
                bar.update(len(data))
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            part_fh.flush()
            raise _Retry(f"connection dropped at byte {pos:,}"
                         + (f" of {expected_end:,}" if expected_end else "")
                         + f" ({_describe_network_error(exc)})") from exc
        part_fh.flush()
        if expected_end is not None and pos != expected_end:
            raise _Retry(f"connection dropped at byte {pos:,} of {expected_end:,}")
        return total if total is not None else pos


def _body_chunks(resp: requests.Response) -> Iterator[bytes]:
    """The body bytes as sent (no content decoding: Range offsets count these bytes).

    ``read1`` hands over whatever has arrived, so bytes received before a stall are saved
    before the read timeout fires and are not fetched again.
    """
    read1 = getattr(resp.raw, "read1", None)
    if read1 is None:  # urllib3 < 2.3
        yield from resp.raw.stream(_HTTP_CHUNK, decode_content=False)
        return
    while data := read1(_HTTP_CHUNK, decode_content=False):
        yield data


@contextlib.contextmanager
def _locked_partial(part: Path) -> Iterator[IO[bytes]]:
    """Open (creating if needed) the partial download, locked against a second downloader."""
    try:
        fh = open(part, "r+b") if part.exists() else open(part, "w+b")
    except OSError as exc:
        raise _fail(part, f"cannot open the partial download ({_one_line(exc)})") from exc
    if fcntl is not None:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise _fail(part, "another download into this file is running") from None
    try:
        fh.seek(0, os.SEEK_END)
        yield fh
    except BaseException:
        # An empty partial is of no use to a later resume: do not leave it lying around.
        with contextlib.suppress(OSError):
            if part.exists() and os.fstat(fh.fileno()).st_size == 0:
                part.unlink()
        raise
    finally:
        fh.close()


def download(
    url: str,
    dest: Path | str,
    sha256: str,
    *,
    retries: int = 5,
    timeout: float = 30.0,
    overwrite: bool = False,
    progress: bool = True,
    backoff: float = 0.5,
    session: requests.Session | None = None,
) -> Path:
    """Download ``url`` to ``dest``, resumable, and verified by its sha256.

    Bytes stream into ``<dest>.part``; an interrupted transfer (this run or an earlier one)
    resumes with an HTTP Range request, and a server that ignores Range restarts from byte 0.
    Connection errors, timeouts (``timeout`` seconds without data) and 5xx answers are retried
    ``retries`` times with exponential backoff; other 4xx answers fail at once. The file is
    renamed onto ``dest`` only when its sha256 matches; on a mismatch it is deleted. An
    existing ``dest`` with the right digest is returned without downloading.
    """
    dest = Path(dest)
    if not isinstance(sha256, str) or not _SHA256_RE.fullmatch(sha256.strip()):
        raise UsageError(f"--sha256 must be 64 hexadecimal digits, got {str(sha256)[:80]!r}")
    expected = sha256.strip().lower()
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise UsageError(f"{url}: not an http(s) URL")
    if retries < 0:
        raise UsageError(f"--retries must be 0 or more, got {retries}")
    if not timeout > 0:
        raise UsageError(f"--timeout must be positive, got {timeout}")

    parent = dest.parent if str(dest.parent) else Path(".")
    if dest.is_dir():
        raise _fail(dest, "is a directory")
    if dest.exists():
        actual = _sha256_file(dest)
        if actual == expected:
            return dest
        if not overwrite:
            raise _fail(dest, f"already exists with sha256 {actual}, not {expected} "
                              f"(pass --overwrite to replace it)")
    if not parent.is_dir():
        raise _fail(dest, f"directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise _fail(dest, f"directory {parent} is not writable")

    part = dest.with_name(dest.name + ".part")
    own_session = session is None
    session = session or requests.Session()
    try:
        with _locked_partial(part) as fh:
            resumed_stale = fh.tell() > 0
            while True:
                _transfer(session, url, fh, retries=retries, timeout=timeout, backoff=backoff,
                          progress=progress, label=f"fetch {dest.name}")
                actual = _sha256_file(part)
                if actual == expected:
                    break
                if resumed_stale:
                    # The partial left by an earlier run may belong to another file: start over.
                    resumed_stale = False
                    fh.truncate(0)
                    fh.seek(0)
                    continue
                part.unlink(missing_ok=True)
                raise FetchError(f"{url}: sha256 mismatch: expected {expected}, got {actual}; "
                                 f"the download was discarded")
            os.fsync(fh.fileno())
            os.replace(part, dest)
    finally:
        if own_session:
            session.close()
    with contextlib.suppress(OSError):
        fd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return dest


def _transfer(session: requests.Session, url: str, fh: IO[bytes], *, retries: int,
              timeout: float, backoff: float, progress: bool, label: str) -> None:
    """Bring the partial file to the complete download, retrying with backoff."""
    failures = 0
    with Progress(None, label, "MiB", enabled=progress, scale=float(1 << 20)) as bar:
        while True:
            offset = fh.seek(0, os.SEEK_END)
            try:
                _attempt(session, url, fh, offset, timeout, bar)
                return
            except _Retry as exc:
                made_progress = fh.seek(0, os.SEEK_END) > offset
                failures = 0 if made_progress else failures + 1
                if failures > retries:
                    raise FetchError(f"{url}: gave up after {retries + 1} attempts without "
                                     f"progress ({exc})") from exc
                time.sleep(min(backoff * 2 ** max(failures - 1, 0), _MAX_BACKOFF))
