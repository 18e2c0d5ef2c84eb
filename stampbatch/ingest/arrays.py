"""Bring stamps in: read .npy/.npz stamp arrays and ingest them into a store.

Untrusted files are never executed: arrays are read with ``allow_pickle=False`` (a pickled
object array is refused before any of it is read). Downloads (``stampbatch fetch``) live in
:mod:`stampbatch.ingest.download`; ``fetch.download`` still finds them.

Memory stays bounded when ingesting: ``.npy`` inputs are memory-mapped and ``.npz`` members
are streamed from the zip archive, a block of stamps at a time.
"""

from __future__ import annotations

import contextlib
import math
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from stampbatch import store
from stampbatch.errors import FetchError, UsageError
from stampbatch.fileio import one_line
from stampbatch.ingest import tables as ingest_meta
from stampbatch.progress import Progress

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_BLOCK_BYTES = 16 << 20  # stamps read per ingest block: about 16 MiB of float32
MIN_STAMP_SIDE = 5  # smaller "stamps" are a mis-shaped array (an (N, 1) column is not 1x1 stamps)
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _fail(path: Path | str, problem: str) -> FetchError:
    return FetchError(f"{path}: {problem}")


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

    def _as_stamps(self, raw: np.ndarray, start: int) -> np.ndarray:
        h, w = self.stamp_shape
        if raw.dtype.kind == "f" and raw.dtype.itemsize > 4:
            # float64 beyond float32's range would silently become +-Inf stamps.
            with np.errstate(invalid="ignore"):
                too_big = np.abs(raw) > _FLOAT32_MAX
            if too_big.any():
                row = start + int(np.flatnonzero(too_big.reshape(len(raw), -1).any(axis=1))[0])
                raise _fail(self.label, f"row {row} holds values beyond the float32 range "
                                        f"(|x| > {_FLOAT32_MAX:.3g}); stamps are stored as float32")
        # Always a copy: never a view of the memory map or of the zip member's bytes.
        return np.array(raw, dtype=np.float32, order="C").reshape(-1, h, w)

    def _npy_blocks(self, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        try:
            arr = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise _fail(self.path, f"unreadable .npy file ({one_line(exc)})") from exc
        for lo in range(0, self.n, block_rows):
            yield lo, self._as_stamps(arr[lo:lo + block_rows], lo)

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
                        yield lo, self._as_stamps(arr[lo:lo + block_rows], lo)
                    return
                row_values = math.prod(self.shape[1:])
                row_bytes = row_values * self.dtype.itemsize
                for lo in range(0, self.n, block_rows):
                    rows = min(block_rows, self.n - lo)
                    raw = _read_exact(fp, rows * row_bytes, self.label)
                    yield lo, self._as_stamps(np.frombuffer(raw, dtype=self.dtype).reshape(rows, -1),
                                              lo)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise _fail(self.label, f"corrupt .npz member ({one_line(exc)})") from exc


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
        raise _fail(label, f"not a readable .npy array ({one_line(exc)})") from exc
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
    if stamp_shape is None and min(found) < MIN_STAMP_SIDE:
        raise _fail(label, f"has shape {shape}: stamps of {found[0]}x{found[1]} pixels are too small "
                           f"(at least {MIN_STAMP_SIDE}x{MIN_STAMP_SIDE}); expected (N, H*W) or "
                           f"(N, H, W) stamps")
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


def _only_stamp_member(zf: zipfile.ZipFile, path: Path, names: list[str]) -> str:
    """The one 2-D/3-D member among several (the rest are per-stamp metadata), or a refusal."""
    stamp_like = []
    for name in names:
        with zf.open(f"{name}.npy") as fp:
            if len(_read_npy_header(fp, f"{path}[{name}]")[0]) in (2, 3):
                stamp_like.append(name)
    if len(stamp_like) != 1:
        raise _fail(path, f"holds {len(names)} arrays ({', '.join(names)}); choose one with --key")
    return stamp_like[0]


def _open_npz(path: Path, key: str | None, stamp_shape: tuple[int, int] | None) -> _ArraySource:
    try:
        with zipfile.ZipFile(path) as zf:
            members = [n for n in zf.namelist() if n.endswith(".npy")]
            names = [n[: -len(".npy")] for n in members]
            if not names:
                raise _fail(path, "holds no arrays (an .npz with no .npy members)")
            if key is None:
                key = names[0] if len(names) == 1 else _only_stamp_member(zf, path, names)
            elif key not in names:
                raise _fail(path, f"has no array '{key}' (it has: {', '.join(names)})")
            label = f"{path}[{key}]"
            with zf.open(f"{key}.npy") as fp:
                shape, fortran_order, dtype = _read_npy_header(fp, label)
    except zipfile.BadZipFile as exc:
        raise _fail(path, f"not a readable .npz archive, truncated or corrupt "
                          f"({one_line(exc)})") from exc
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
        raise _fail(path, f"cannot read ({one_line(exc.strerror or exc)})") from exc
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


def _npz_extras(src: _ArraySource) -> dict[str, np.ndarray]:
    """The other 1-D members of the stamps' .npz, one value per stamp: metadata columns.

    Members of other shapes (a scalar such as the pixel scale) are not per-stamp: left out.
    """
    if src.key is None:
        return {}
    out: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(src.path) as zf:
            for member in zf.namelist():
                name = member[: -len(".npy")]
                if not member.endswith(".npy") or name == src.key:
                    continue
                label = f"{src.path}[{name}]"
                with zf.open(member) as fp:
                    shape, fortran_order, dtype = _read_npy_header(fp, label)
                    if len(shape) != 1:
                        continue
                    if dtype.hasobject:
                        raise _fail(label, "holds Python objects (pickle); refusing to load it")
                    if shape[0] != src.n:
                        raise _fail(label, f"has {shape[0]} values but {src.label} holds "
                                           f"{src.n} stamps; a 1-D key is one value per stamp")
                    raw = _read_exact(fp, shape[0] * dtype.itemsize, label)
                out[name] = ingest_meta.check_column(
                    src.path, name, np.frombuffer(raw, dtype=dtype).copy(), src.n)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise _fail(src.path, f"corrupt .npz member ({one_line(exc)})") from exc
    return out


# --------------------------------------------------------------------------- ingest


def _block_rows(chunk_rows: int, stamp_shape: tuple[int, int]) -> int:
    """Rows per read: a multiple of the HDF5 chunk, about ``_BLOCK_BYTES`` of float32."""
    per_stamp = 4 * stamp_shape[0] * stamp_shape[1]
    return chunk_rows * max(1, _BLOCK_BYTES // (per_stamp * chunk_rows))


def _open_labelled(sources: Path, noise: Path, key: str | None
                   ) -> list[tuple[_ArraySource, str | None]]:
    """Validate the two arrays of a labelled store: distinct files, same stamp shape."""
    src = _open_array(sources, key)
    with contextlib.suppress(OSError):
        if noise.exists() and noise.samefile(src.path):
            raise _fail(noise, "is given as both --sources and --noise; every stamp would be "
                               "stored twice with opposite labels")
    try:
        nse = _open_array(noise, key, src.stamp_shape)
    except FetchError:
        # Say which shapes disagree when the noise array is fine on its own.
        alone = _open_array(noise, key)
        h, w = alone.stamp_shape
        raise _fail(alone.label, f"stamps are {h}x{w} but {src.label} holds "
                                 f"{src.stamp_shape[0]}x{src.stamp_shape[1]} stamps") from None
    return [(src, "source"), (nse, "noise")]


def ingest(
    out: Path | str,
    *,
    sources: Path | str | None = None,
    noise: Path | str | None = None,
    candidates: Path | str | None = None,
    key: str | None = None,
    meta: Path | str | None = None,
    chunk_rows: int = store.DEFAULT_CHUNK_ROWS,
    compression: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> store.StoreInfo:
    """Convert stamp arrays into an HDF5 store, atomically.

    Labelled: ``sources`` (stamps with a source at the centre, label 1) then ``noise``
    (label 0), with metadata ``kind`` ("source"/"noise") and ``source_row`` (row within its
    input file). Unlabelled: ``candidates``, with ``source_row``. ``key`` names the array
    inside any .npz input (.npy inputs ignore it); the .npz's other 1-D keys of one value per
    stamp become metadata columns too, and so do the columns of the CSV table ``meta`` (one
    row per stamp in store order, see :mod:`stampbatch.ingest.tables`). Every input is
    validated before anything is written, and nothing appears at ``out`` unless the whole
    store was written.
    """
    out = Path(out)
    if chunk_rows < 1:
        raise UsageError(f"ingest: chunk_rows must be a positive integer, got {chunk_rows}")
    inputs = _ingest_inputs(out, sources, noise, candidates, key)
    total = sum(src.n for src, _ in inputs)
    columns = ingest_meta.merge(
        ingest_meta.read_table(meta, total) if meta is not None else {},
        Path(meta) if meta is not None else None,
        ingest_meta.concatenate([(src.path, _npz_extras(src)) for src, _ in inputs]))
    attrs: dict[str, Any] = {"created_by": "stampbatch ingest"}
    for src, kind in inputs:
        attrs[f"ingested_{kind or 'candidates'}"] = str(Path(src.path).resolve()) + (
            f"[{src.key}]" if src.key is not None else "")
    if meta is not None:
        attrs["ingested_meta"] = str(Path(meta).resolve())
    stamp_shape = inputs[0][0].stamp_shape
    chunk_rows = min(int(chunk_rows), total)
    with Progress(total, f"ingest {out.name}", "stamps", enabled=progress) as bar, \
            store.StoreWriter(out, labelled=candidates is None, stamp_shape=stamp_shape,
                              chunk_rows=chunk_rows, compression=compression, overwrite=overwrite,
                              attrs=attrs) as writer:
        _write_inputs(writer, inputs, columns, _block_rows(chunk_rows, stamp_shape), bar)
    return store.open_store(out)


def _ingest_inputs(out: Path, sources: Path | str | None, noise: Path | str | None,
                   candidates: Path | str | None, key: str | None
                   ) -> list[tuple[_ArraySource, str | None]]:
    """The validated inputs of an ingest with their kind ("source", "noise"; None for
    candidates), none of them the output file."""
    if candidates is not None and (sources is not None or noise is not None):
        raise UsageError("ingest: candidates cannot be combined with sources/noise")
    inputs: list[tuple[_ArraySource, str | None]]
    if candidates is not None:
        inputs = [(_open_array(candidates, key), None)]
    elif sources is None or noise is None:
        raise UsageError("ingest: give sources and noise (a labelled store) or candidates")
    else:
        inputs = _open_labelled(Path(sources), Path(noise), key)
    for src, _ in inputs:
        with contextlib.suppress(OSError):
            if out.exists() and out.samefile(src.path):
                raise _fail(out, f"is also the input {src.path}; choose another output name")
    return inputs


def _write_inputs(writer: store.StoreWriter, inputs: list[tuple[_ArraySource, str | None]],
                  columns: dict[str, np.ndarray], block_rows: int, bar: Progress) -> None:
    """Append every input a block at a time, with labels, kind, source_row and the block's
    slice of the metadata ``columns`` (which run over all inputs in order)."""
    offset = 0
    for src, kind in inputs:
        for start, stamps in src.blocks(block_rows):
            n = len(stamps)
            row_meta = {name: col[offset + start:offset + start + n]
                        for name, col in columns.items()}
            row_meta["source_row"] = np.arange(start, start + n, dtype=np.int64)
            labels = None
            if kind is not None:
                row_meta[store.META_KIND] = np.full(n, kind, dtype="S6")
                labels = np.full(n, 1 if kind == "source" else 0, dtype=np.int8)
            writer.append(stamps, labels, row_meta)
            bar.update(n)
        offset += src.n


def __getattr__(name: str) -> Any:
    """``fetch.download`` and ``fetch.fetch_url`` live in :mod:`stampbatch.ingest.download`."""
    if name in ("download", "fetch_url", "Fetched"):
        from stampbatch.ingest import download as _download

        return getattr(_download, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
