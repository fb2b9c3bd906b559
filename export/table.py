"""The user's data files: a CSV with a header row, or a .npy array, read into named float columns.

Every value of the columns used must be a finite number: a non-numeric cell, an empty cell or
NaN is refused with one line naming the column and the line (or row) where it is. Columns listed in `text_columns`
(a classifier's label and sequence id) are kept as strings. Parquet would need pyarrow, which
lstmserve does not depend on: such files are refused with a hint to convert them.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lstmserve.export.errors import ExportError

SUFFIXES = (".csv", ".npy")


@dataclass(frozen=True)
class Table:
    """Named columns of one data file.

    Args:
        names: the numeric columns' names (as asked for, else in file order).
        values: float64 [rows, len(names)].
        text: the `text_columns` asked for, as strings per row.
        source: the file, for messages and the report.
    """

    names: tuple[str, ...]
    values: np.ndarray
    text: dict[str, list[str]] = field(default_factory=dict)
    source: str = ""

    def column(self, name: str) -> np.ndarray:
        """One numeric column's values."""
        return self.values[:, self.names.index(name)]


def read_table(path: Path, columns: Sequence[str] | None = None, text_columns: Sequence[str] = ()) -> Table:
    """Reads the `columns` (None: every column but the text ones) of a .csv (header row required) or .npy
    (2-D, or 1-D as one column; columns named 0, 1, ...) file; ExportError naming what is wrong."""
    if not path.is_file():
        raise ExportError(f"--data {str(path)!r} does not exist or is not a file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        raise ExportError(
            f"--data {str(path)!r}: Parquet needs pyarrow, which lstmserve does not depend on; "
            "convert it to CSV or .npy (for example with pandas: df.to_csv(...))"
        )
    if suffix == ".npy":
        if text_columns:
            raise ExportError(f"--data {str(path)!r}: a .npy file has no text columns; use a CSV with labels")
        return _read_npy(path, columns)
    if suffix != ".csv":
        raise ExportError(f"--data {str(path)!r}: expected a .csv or .npy file")
    return _read_csv(path, columns, text_columns)


def _unknown(path: Path, columns: Sequence[str], header: Sequence[str]) -> None:
    missing = [name for name in columns if name not in header]
    if missing:
        raise ExportError(f"--data {str(path)!r} has no column {missing[0]!r} (columns: {', '.join(header)})")


def _read_npy(path: Path, columns: Sequence[str] | None) -> Table:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ExportError(f"--data {str(path)!r} is not a readable .npy array: {exc}") from exc
    if array.ndim == 1:
        array = array[:, np.newaxis]
    if array.ndim != 2 or not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise ExportError(f"--data {str(path)!r} holds a {array.dtype} array of shape {list(array.shape)}; expected numbers [rows, columns]")
    header = [str(i) for i in range(array.shape[1])]
    names = list(columns) if columns is not None else header
    _unknown(path, names, header)
    values = array[:, [int(name) for name in names]].astype(np.float64)
    bad = np.argwhere(~np.isfinite(values))
    if len(bad):
        row, column = (int(x) for x in bad[0])
        raise ExportError(
            f"--data {str(path)!r}: column {names[column]} has a non-finite value ({values[row, column]}) in row {row}"
        )
    return Table(tuple(names), values, {}, str(path))


def _read_csv(path: Path, columns: Sequence[str] | None, text_columns: Sequence[str]) -> Table:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ExportError(f"--data {str(path)!r} is not a readable UTF-8 CSV file: {exc}") from exc
    rows = [row for row in rows if row]  # blank lines
    if len(rows) < 2:
        raise ExportError(f"--data {str(path)!r} needs a header row and at least one row of values")
    header = [name.strip() for name in rows[0]]
    if len(set(header)) != len(header) or any(not name for name in header):
        raise ExportError(f"--data {str(path)!r}: the header row must name every column once, got {header}")
    _unknown(path, text_columns, header)
    names = list(columns) if columns is not None else [name for name in header if name not in text_columns]
    _unknown(path, names, header)
    numeric = [header.index(name) for name in names]
    values = np.empty((len(rows) - 1, len(numeric)), dtype=np.float64)
    text: dict[str, list[str]] = {name: [] for name in text_columns}
    for line_index, row in enumerate(rows[1:]):
        line = line_index + 2  # 1-based, after the header
        if len(row) != len(header):
            raise ExportError(f"--data {str(path)!r}: line {line} has {len(row)} values, the header names {len(header)}")
        for name in text_columns:
            text[name].append(row[header.index(name)].strip())
        for out, column in enumerate(numeric):
            values[line_index, out] = _number(row[column], header[column], line, path)
    return Table(tuple(names), values, text, str(path))


def _number(cell: str, column: str, line: int, path: Path) -> float:
    text = cell.strip()
    try:
        value = float(text)
    except ValueError:
        if not text:
            raise ExportError(f"--data {str(path)!r}: column {column!r} has an empty value on line {line}") from None
        raise ExportError(
            f"--data {str(path)!r}: column {column!r} has a non-numeric value {text!r} on line {line} "
            "(select numeric columns with --columns)"
        ) from None
    if not math.isfinite(value):
        raise ExportError(f"--data {str(path)!r}: column {column!r} has a non-finite value {text!r} on line {line}")
    return value
