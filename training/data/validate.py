"""Read raw tables and check them against the data contract, naming file, column and line.

A user's data is the most common thing to be wrong, and "KeyError: 'item_id'" three frames deep
tells them nothing. Every check here raises `DataValidationError` whose message says which file,
which column and which line (1-based, as an editor shows it, header included) is at fault, so the
CLI can print it as a single line.
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from karma.errors import DataValidationError
from training.data.schema import Catalog, Interactions


def read_delimited(path: Path, *, sep: str, header: bool = True, names: Sequence[str] | None = None) -> pd.DataFrame:
    """Read a CSV/TSV as strings (no NA guessing, no quoting) or raise a one-line error."""
    source = str(path)
    if not path.exists():
        raise DataValidationError(source, "file not found")
    if not path.is_file():
        raise DataValidationError(source, "not a regular file")
    if path.stat().st_size == 0:
        raise DataValidationError(source, "file is empty")
    try:
        with warnings.catch_warnings():
            # A row longer than the header only *warns* (and loses data); make it an error.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            frame = pd.read_csv(
                path,
                sep=sep,
                header=0 if header else None,
                names=list(names) if names is not None else None,
                index_col=False,
                dtype=str,
                keep_default_na=False,
                quoting=csv.QUOTE_NONE,
                engine="c",
            )
    except pd.errors.EmptyDataError:
        raise DataValidationError(source, "file has no header or rows") from None
    except pd.errors.ParserError as exc:
        raise DataValidationError(
            source, f"malformed {'TSV' if sep == chr(9) else 'CSV'}: {_parser_detail(exc)}"
        ) from None
    except pd.errors.ParserWarning:
        kind = "TSV" if sep == "\t" else "CSV"
        raise DataValidationError(source, f"malformed {kind}: {_first_long_row(path, sep, header, names)}") from None
    except UnicodeDecodeError as exc:
        raise DataValidationError(source, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if header:
        _check_header(frame, source)
    if frame.empty:
        raise DataValidationError(source, "file has a header but no rows")
    return frame


def _first_long_row(path: Path, sep: str, header: bool, names: Sequence[str] | None) -> str:
    """Find the first row with more fields than the header (only runs on the error path)."""
    with path.open(encoding="utf-8", errors="replace") as handle:
        expected = len(names) if names is not None else None
        for number, line in enumerate(handle, start=1):
            fields = line.rstrip("\r\n").count(sep) + 1
            if expected is None:
                expected = fields
            elif fields > expected:
                return f"Expected {expected} fields in line {number}, saw {fields}"
    return "a row has more fields than the header"


def _parser_detail(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return text.replace("Error tokenizing data. C error: ", "")


def _check_header(frame: pd.DataFrame, source: str) -> None:
    seen: set[str] = set()
    for name in frame.columns:
        if str(name).startswith("Unnamed:") or not str(name).strip():
            raise DataValidationError(source, "header has an empty column name", line=1)
        if name in seen:
            raise DataValidationError(source, f"header repeats column '{name}'", line=1)
        seen.add(name)


def data_line(row: int, header: bool = True) -> int:
    """Editor line number of 0-based data row `row`."""
    return row + (2 if header else 1)


def require_columns(frame: pd.DataFrame, required: Iterable[str], source: str) -> None:
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataValidationError(source, f"missing required column(s) {missing}; found {list(frame.columns)}", line=1)


def require_non_empty(frame: pd.DataFrame, column: str, source: str, header: bool = True) -> None:
    """Every row needs a value in `column` (an empty user or item id cannot be attributed)."""
    empty = np.flatnonzero(frame[column].isna().to_numpy() | (frame[column].str.strip() == "").to_numpy())
    if len(empty):
        raise DataValidationError(
            source,
            f"empty value ({len(empty)} row(s) in all)",
            column=column,
            line=data_line(int(empty[0]), header),
        )


def require_unique(frame: pd.DataFrame, column: str, source: str, header: bool = True) -> None:
    dup = frame[column].duplicated(keep="first").to_numpy()
    if dup.any():
        row = int(np.flatnonzero(dup)[0])
        value = frame[column].iloc[row]
        first = int(np.flatnonzero((frame[column] == value).to_numpy())[0])
        raise DataValidationError(
            source,
            f"duplicate id {value!r} (first on line {data_line(first, header)}; {int(dup.sum())} duplicate(s) in all)",
            column=column,
            line=data_line(row, header),
        )


def parse_timestamps(values: pd.Series, source: str, column: str, header: bool = True) -> np.ndarray:
    """Epoch seconds (int or float) or ISO-8601 datetimes -> int64 epoch seconds."""
    text = values.str.strip()
    numeric = pd.to_numeric(text, errors="coerce")
    bad = numeric.isna().to_numpy()
    seconds = np.zeros(len(values), dtype=np.int64)
    seconds[~bad] = np.floor(numeric.to_numpy()[~bad]).astype(np.int64)
    if bad.any():
        parsed = pd.to_datetime(text[bad], errors="coerce", utc=True, format="ISO8601")
        still_bad = parsed.isna().to_numpy()
        if still_bad.any():
            row = int(np.flatnonzero(bad)[np.flatnonzero(still_bad)[0]])
            raise DataValidationError(
                source,
                f"unparsable timestamp {values.iloc[row]!r} (want epoch seconds or ISO-8601; "
                f"{int(still_bad.sum())} bad row(s) in all)",
                column=column,
                line=data_line(row, header),
            )
        epoch = pd.Timestamp("1970-01-01", tz="UTC")
        seconds[bad] = ((parsed - epoch) // pd.Timedelta(seconds=1)).to_numpy(dtype=np.int64)
    return seconds


def build_catalog(frame: pd.DataFrame, text_fields: Sequence[str], source: str, header: bool = True) -> Catalog:
    """Validated catalog from a raw string table with an `item_id` column."""
    require_columns(frame, ["item_id", *text_fields], source)
    require_non_empty(frame, "item_id", source, header)
    require_unique(frame, "item_id", source, header)
    items = frame[["item_id", *text_fields]].reset_index(drop=True)
    return Catalog(items=items, text_fields=tuple(text_fields))


def build_interactions(
    frame: pd.DataFrame,
    catalog: Catalog,
    source: str,
    header: bool = True,
    query_column: str | None = None,
    timestamps: np.ndarray | None = None,
) -> Interactions:
    """Validated interactions (file order kept) from a raw table with user_id, item_id, [timestamp].

    `timestamps` (int64 seconds, row-aligned) skips re-parsing when the caller already parsed them.
    """
    require_columns(frame, ["user_id", "item_id"], source)
    require_non_empty(frame, "user_id", source, header)
    require_non_empty(frame, "item_id", source, header)
    item_idx = pd.Index(catalog.items["item_id"]).get_indexer(frame["item_id"])
    unknown = np.flatnonzero(item_idx < 0)
    if len(unknown):
        row = int(unknown[0])
        raise DataValidationError(
            source,
            f"item {frame['item_id'].iloc[row]!r} is not in the catalog ({len(unknown)} event(s) on unknown items)",
            column="item_id",
            line=data_line(row, header),
        )
    if timestamps is not None:
        timestamp = np.asarray(timestamps, dtype=np.int64)
    elif "timestamp" in frame.columns:
        timestamp = parse_timestamps(frame["timestamp"], source, "timestamp", header)
    else:  # no clock: file order is the only order, which the splitter keeps on ties
        timestamp = np.zeros(len(frame), dtype=np.int64)
    codes, uniques = pd.factorize(frame["user_id"], sort=False)
    query = None
    if query_column and query_column in frame.columns:
        query = frame[query_column].where(frame[query_column] != "", None).to_numpy(dtype=object)
    return Interactions(
        user_ids=np.asarray(uniques, dtype=object),
        user_idx=codes.astype(np.int32),
        item_idx=item_idx.astype(np.int32),
        timestamp=timestamp,
        query=query,
    )
