"""Per-stamp metadata for ingested stamps: a CSV table (``ingest --meta``) and extra .npz keys.

Real stamps carry their groups (image type, survey, field, SNR …) into ``/meta/<column>``
so that ``stampbatch evaluate --by COLUMN`` can split the numbers by them. A table has a
header row of column names and then one row per stamp, in the order the store holds them
(the ``--sources`` stamps, then the ``--noise`` stamps; or the ``--candidates``). A column
whose first non-empty value is a number is numeric (int64, or float64 when a value has a
fraction or a cell is empty, which becomes NaN); any other column holds short strings.
Every problem is one line naming the file, the column and the row (data rows count from 1).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from stampbatch import store
from stampbatch.errors import MetaError
from stampbatch.fileio import one_line

MAX_STRING_BYTES = 64  # a group label, not free text: longer cells are a wrong column
RESERVED = ("source_row", store.META_KIND)  # ingest writes these itself
NUMERIC_COLUMNS = (store.META_SNR, store.META_TRUE_LABEL)  # store refuses them as text
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")


def _fail(path: Path | str, problem: str) -> MetaError:
    return MetaError(f"{path}: {problem}")


def check_column(path: Path | str, name: str, values: np.ndarray, n: int) -> np.ndarray:
    """A metadata column ready for the store: 1-D of length ``n``, numbers or short UTF-8
    strings (returned as fixed-width bytes, one width for the whole column)."""
    if not _NAME.fullmatch(name):
        raise _fail(path, f"column name '{name}' is not usable (letters, digits, _ . -; "
                          f"starting with a letter or _; at most 64 characters)")
    if name in RESERVED:
        raise _fail(path, f"column '{name}' is written by ingest itself; rename it")
    arr = np.asarray(values)
    if arr.ndim != 1 or len(arr) != n:
        raise _fail(path, f"column '{name}' has shape {arr.shape}, expected ({n},): one value "
                          f"per stamp")
    if arr.dtype.kind == "U":
        arr = np.char.encode(arr, "utf-8")
    if arr.dtype.kind == "S":
        if name in NUMERIC_COLUMNS:
            raise _fail(path, f"column '{name}' must hold numbers, found text")
        too_long = np.char.str_len(arr) > MAX_STRING_BYTES
        if too_long.any():
            row = int(np.flatnonzero(too_long)[0]) + 1
            raise _fail(path, f"column '{name}' row {row}: text longer than {MAX_STRING_BYTES} "
                              f"bytes (metadata holds short labels)")
        return arr
    if arr.dtype.kind not in "fiub":
        raise _fail(path, f"column '{name}' has dtype {arr.dtype}; use numbers or short strings")
    return arr


def _parse_column(path: Path, name: str, cells: list[str]) -> np.ndarray:
    """Text cells → int64, float64 (empty → NaN) or str, typed by the first non-empty cell."""
    col = np.array(cells, dtype=str)
    empty = col == ""
    filled = np.flatnonzero(~empty)
    if len(filled) == 0 or not _is_number(col[filled[0]]):
        return col
    values = np.full(len(col), np.nan)
    try:
        values[filled] = col[filled].astype(np.float64)
    except ValueError:
        bad = next(int(i) for i in filled if not _is_number(col[i]))
        raise _fail(path, f"column '{name}' row {bad + 1}: '{col[bad]}' is not a number "
                          f"(the column's first value is)") from None
    if not empty.any() and np.all(np.isfinite(values)) and np.all(values == np.round(values)):
        try:
            return col.astype(np.int64)
        except (ValueError, OverflowError):
            pass
    return values


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_table(path: Path | str, n: int) -> dict[str, np.ndarray]:
    """Columns of a CSV table with a header and ``n`` data rows, checked for the store."""
    path = Path(path)
    if not path.is_file():
        raise _fail(path, "no such file" if not path.exists() else "is not a file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = [[cell.strip() for cell in row] for row in csv.reader(fh)]
    except UnicodeDecodeError as exc:
        raise _fail(path, f"is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except (OSError, csv.Error) as exc:
        raise _fail(path, f"cannot read the table ({one_line(exc)})") from None
    while rows and not any(rows[-1]):
        rows.pop()  # trailing blank lines
    if not rows:
        raise _fail(path, "is empty; expected a header row of column names")
    header, data = rows[0], rows[1:]
    for i, name in enumerate(header):
        if not name:
            raise _fail(path, f"header column {i + 1} has no name")
        if header.index(name) != i:
            raise _fail(path, f"column '{name}' appears twice in the header")
    if len(data) != n:
        raise _fail(path, f"has {len(data)} data rows, expected {n}: one per stamp, in the "
                          f"order the store holds them")
    for r, row in enumerate(data, start=1):
        if len(row) != len(header):
            raise _fail(path, f"row {r} has {len(row)} cells, the header has {len(header)}")
    return {name: check_column(path, name, _parse_column(path, name, [row[j] for row in data]), n)
            for j, name in enumerate(header)}


def concatenate(parts: list[tuple[Path, Mapping[str, np.ndarray]]]) -> dict[str, np.ndarray]:
    """Join the columns of consecutive inputs (sources then noise): same names, same kind."""
    if not parts:
        return {}
    (first, names), rest = parts[0], parts[1:]
    out = {k: [v] for k, v in names.items()}
    for path, cols in rest:
        if set(cols) != set(names):
            raise _fail(path, f"has metadata keys {sorted(cols)}, but {first} has "
                              f"{sorted(names)}; both inputs need the same ones")
        for k, v in cols.items():
            if (v.dtype.kind == "S") != (out[k][0].dtype.kind == "S"):
                raise _fail(path, f"key '{k}' holds {'text' if v.dtype.kind == 'S' else 'numbers'}"
                                  f" but in {first} it does not")
            out[k].append(v)
    return {k: np.concatenate(v) for k, v in out.items()}


def merge(table: Mapping[str, np.ndarray], table_path: Path | None,
          extras: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The table's columns and the .npz keys together; a name in both is refused."""
    clash = sorted(set(table) & set(extras))
    if clash:
        raise _fail(table_path or "--meta", f"column(s) {clash} are also keys of the input "
                                            f".npz; keep one")
    return {**extras, **table}
