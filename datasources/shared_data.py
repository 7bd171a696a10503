"""Locating and reading the real datasets in the shared data directory (DESIGN §4).

The datasets (MovieLens ml-latest-small, the Open Bandit Dataset small sample) live outside the
project and are never copied into it. They are found at `$CASCADE_SHARED_DATA` when that variable
is set, else at `<repo root>/../shared/data`.

It also holds the CSV helpers both converters share: `read_csv` reads strictly (a missing file or
column is an `InputError` naming it; a row with the wrong number of fields goes to the `RejectLog`),
and `reject_rows` diverts the rows that failed validation, with their reason and raw fields.
"""
import csv
import os
from typing import Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from cascade_ranking.datasources.example_io import InputError, RejectLog

ENV_VAR = "CASCADE_SHARED_DATA"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINE_COLUMN = "_line"  # added by read_csv: the 1-based line of the row in its file (header = 1)


def shared_data_path(name: str = "") -> str:
    """Where the shared data directory (or its dataset `name`) is expected, whether or not it exists."""
    root = os.environ.get(ENV_VAR) or os.path.join(REPO_ROOT, os.pardir, "shared", "data")
    return os.path.normpath(os.path.join(root, name))


def shared_data_dir(name: str = "") -> Optional[str]:
    """The shared data directory (or its dataset `name`), or None when it is absent."""
    path = shared_data_path(name)
    return path if os.path.isdir(path) else None


def read_csv(path: str, required: Sequence[str], rejects: RejectLog, label: str) -> Tuple[pd.DataFrame, int]:
    """Reads a CSV file as strings; returns (rows with the right field count, data rows read).

    The frame holds every column of the header as str, plus `LINE_COLUMN`. Blank lines are not rows.
    """
    if not os.path.isfile(path):
        raise InputError(f"{label}: file not found: {path}")
    rows, lines, n_read = [], [], 0
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise InputError(f"{label}: empty file, no header: {path}")
        for column in required:
            if column not in header:
                raise InputError(f"{label}: missing column '{column}' in {path}")
        for fields in reader:
            if not fields:
                continue
            n_read += 1
            if len(fields) != len(header):
                rejects.reject(f"{label}: wrong number of fields", {"line": reader.line_num, "fields": fields})
                continue
            rows.append(fields)
            lines.append(reader.line_num)
    frame = pd.DataFrame(rows, columns=header, dtype=object) if rows else pd.DataFrame(columns=header, dtype=object)
    frame[LINE_COLUMN] = pd.Series(lines, dtype="int64", index=frame.index)
    return frame, n_read


def integer_values(values: pd.Series) -> np.ndarray:
    """The values as floats where they are integers, NaN where not (non-numeric or fractional)."""
    x = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
    with np.errstate(invalid="ignore"):
        return np.where(np.isfinite(x) & (x == np.floor(x)), x, np.nan)


def reject_rows(frame: pd.DataFrame, reasons: np.ndarray, rejects: RejectLog, label: str) -> np.ndarray:
    """Diverts the rows of a `read_csv` frame whose reason is non-empty; returns the mask of kept rows."""
    columns = [c for c in frame.columns if c != LINE_COLUMN]
    for i in np.flatnonzero(reasons != ""):
        record = {"line": int(frame[LINE_COLUMN].iat[i])}
        record.update({c: frame[c].iat[i] for c in columns})
        rejects.reject(f"{label}: {reasons[i]}", record)
    return reasons == ""
