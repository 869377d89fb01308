"""Interaction-file loaders and the in-memory :class:`Dataset`.

Every experiment starts from a user-supplied file, so loading is strict: a
malformed file must fail here with a message that points at the exact line,
not later as a shape error deep inside training.  The loaders therefore read
all fields as text first and only then convert, which keeps the offending
value verbatim for the error message.

Line numbers are those an editor shows (1-based, header counted).  They are
exact unless a quoted CSV field spans several lines, which interaction files
do not need.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import hashlib
import io
import logging
import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "CANONICAL_COLUMNS",
    "DUPLICATE_POLICIES",
    "DataError",
    "DataStats",
    "Dataset",
    "FORMATS",
    "build_dataset",
    "describe_row",
    "load_interactions",
    "resolve_format",
]

#: Columns of the frame returned by :func:`load_interactions`, in this order.
CANONICAL_COLUMNS: tuple[str, ...] = ("user", "item", "timestamp")

#: Accepted values of ``fmt``.
FORMATS: tuple[str, ...] = ("auto", "ml-100k", "ml-csv", "csv", "tsv", "parquet")

_ML100K_FIELDS = ("user", "item", "rating", "timestamp")
_ML_CSV_COLUMNS = {"user": "userId", "item": "movieId", "timestamp": "timestamp"}
_DEFAULT_SEP = {"ml-100k": "\t", "ml-csv": ",", "csv": ",", "tsv": "\t"}
_SUFFIX_FORMAT = {".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".parquet": "parquet"}
_INT_PATTERN = r"[+-]?[0-9]+"  # ASCII only: \d would admit other scripts' digits
_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
_EPOCH = pd.Timestamp(0, tz="UTC")

# DataFrame.attrs keys through which build_dataset can cite file lines.
_ATTR_SOURCE = "fedkd_source"
_ATTR_UNIT = "fedkd_position_unit"  # "line" (text files) or "row" (parquet)
_ATTR_OFFSET = "fedkd_first_position"  # position of the row with index label 0
_ATTR_SKIPPED = "fedkd_skipped_lines"  # sorted blank lines that produced no row

#: Accepted values of ``duplicates`` in :func:`build_dataset` (the data-duplicates option).
DUPLICATE_POLICIES: tuple[str, ...] = ("drop", "keep", "error")

log = logging.getLogger("fedkd.data")


class DataError(ValueError):
    """Raised for a malformed interaction file; the message names the file, the row and the problem."""


# --------------------------------------------------------------------------- loading


def load_interactions(
    path: str | os.PathLike,
    *,
    fmt: str = "auto",
    columns: Mapping[str, str] | None = None,
    sep: str | None = None,
) -> pd.DataFrame:
    """Read an implicit-feedback interaction file into a canonical frame.

    Parameters
    ----------
    path
        The interaction file.
    fmt
        ``"auto"`` | ``"ml-100k"`` | ``"ml-csv"`` | ``"csv"`` | ``"tsv"`` |
        ``"parquet"``.  ``auto`` maps a file named ``u.data`` to ``ml-100k``
        and ``ratings.csv`` to ``ml-csv``, and otherwise goes by suffix
        (``.csv``, ``.tsv``, ``.txt`` = tab separated, ``.parquet``), because
        the MovieLens names are what users most often point at.
    columns
        Canonical name -> column name in the file, e.g. ``{"user": "uid"}``;
        unnamed canonical columns keep the format's default.  Not allowed for
        ``ml-100k``, whose layout is positional.
    sep
        Field separator overriding the format's default (not for parquet).

    Returns
    -------
    pandas.DataFrame
        Exactly the int64 columns ``user``, ``item``, ``timestamp`` in file
        order with a RangeIndex.  Ratings are dropped because the models learn
        from implicit feedback.  Timestamps may be integers or ISO-8601 dates
        (converted to integer seconds since the epoch, UTC; naive dates count
        as UTC).  ``attrs`` remembers the source and line numbering so that
        :func:`build_dataset` can cite lines.

    Raises
    ------
    DataError
        Missing or empty file, missing column, wrong field count in
        ``u.data``, or a user/item id that is not an integer or a timestamp
        that is neither integer nor ISO date.  The message starts with the
        path and names the first bad line, the column and the value.  String
        ids are rejected on purpose: the error path stays simple and ids
        never need a second mapping.
    ValueError
        Invalid arguments (unknown ``fmt``, bad ``columns`` keys, ``sep`` for
        parquet, ``columns`` for ml-100k).
    """
    src = os.fspath(path)
    file = Path(src)
    if fmt not in FORMATS:
        raise ValueError(f"unknown fmt {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not file.exists():
        raise DataError(f"{src}: file not found")
    if not file.is_file():
        raise DataError(f"{src}: not a regular file")
    kind = _resolve_format(file, fmt)
    mapping = _column_mapping(kind, columns, src)
    if sep is not None and kind == "parquet":
        raise ValueError("sep does not apply to parquet files")
    if kind != "parquet":
        _sniff_text(file, src)

    if kind == "ml-100k":
        raw, positions = _read_ml100k(file, src, sep if sep is not None else "\t")
        unit = "line"
    elif kind == "parquet":
        raw, positions = _read_parquet(file, src)
        unit = "row"
    else:
        raw, positions = _read_delimited(file, src, sep if sep is not None else _DEFAULT_SEP[kind])
        unit = "line"

    if len(raw) == 0:
        raise DataError(f"{src}: no interactions (the file has no data rows)")
    missing = [
        repr(mapping[c]) if mapping[c] == c else f"{mapping[c]!r} ({c})"
        for c in CANONICAL_COLUMNS
        if mapping[c] not in raw.columns
    ]
    if missing:
        raise DataError(_missing_columns_message(file, src, kind, raw, missing, sep))

    converted = _convert_columns(raw, mapping, positions, src=src, unit=unit)
    negative = np.flatnonzero(converted["timestamp"] < 0)
    if len(negative):
        row = int(negative[0])
        label = mapping["timestamp"] if mapping["timestamp"] == "timestamp" else f"{mapping['timestamp']} (timestamp)"
        raise DataError(
            f"{src}: {unit} {positions[row]}: column {label!r} has negative value "
            f"{int(converted['timestamp'][row])} (timestamps are seconds since 1970-01-01 UTC and must be >= 0); "
            f"{len(negative)} row(s) have one"
        )
    frame = pd.DataFrame(converted, columns=list(CANONICAL_COLUMNS))
    frame.attrs.update(_position_attrs(positions, src=src, unit=unit))
    return frame


def resolve_format(path: str | os.PathLike, fmt: str = "auto") -> str:
    """The format :func:`load_interactions` reads ``path`` as (``fmt`` itself unless ``auto``)."""
    return _resolve_format(Path(path), fmt)


def _resolve_format(file: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name = file.name.lower()
    if name == "u.data":
        return "ml-100k"
    if name == "ratings.csv":
        return "ml-csv"
    kind = _SUFFIX_FORMAT.get(file.suffix.lower())
    if kind is None:
        raise DataError(
            f"{file}: cannot infer the format from the file name; "
            f"set --data-format (one of {', '.join(FORMATS[1:])})"
        )
    return kind


def _column_mapping(kind: str, columns: Mapping[str, str] | None, src: str = "<data>") -> dict[str, str]:
    if kind == "ml-100k":
        if columns:
            raise DataError(f"{src}: --data-columns does not apply to ml-100k files (user, item, rating, "
                            "timestamp by position, no header); use --data-format csv or tsv for a file "
                            "whose header names its columns")
        return {c: c for c in CANONICAL_COLUMNS}
    mapping = dict(_ML_CSV_COLUMNS) if kind == "ml-csv" else {c: c for c in CANONICAL_COLUMNS}
    for key, value in (columns or {}).items():
        if key not in CANONICAL_COLUMNS:
            raise ValueError(
                f"unknown canonical column {key!r} in columns; expected {', '.join(CANONICAL_COLUMNS)}"
            )
        if not isinstance(value, str) or not value:
            raise ValueError(f"columns[{key!r}] must be a non-empty column name, got {value!r}")
        mapping[key] = value
    return mapping


def _read_text(file: Path, src: str) -> str:
    data = file.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a byte-order mark is an encoding detail, not data
    except UnicodeDecodeError as err:
        raise DataError(_not_utf8(src, data, err)) from err


_SNIFF_BYTES = 1 << 16


def _sniff_text(file: Path, src: str) -> None:
    """Refuse binary and non-UTF-8 files by their first 64 KiB, naming the line.

    pandas would report a binary file as a tokenising error ("Expected 1 fields in line 3")
    and silently drop NUL bytes, so text formats are checked here first."""
    with file.open("rb") as handle:
        head = handle.read(_SNIFF_BYTES)
    for bom, name in ((b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16")):
        if head.startswith(bom):
            raise DataError(f"{src}: the file is {name} text (byte-order mark {bom.hex(' ')}); save it as UTF-8")
    nul = head.find(b"\x00")
    if nul >= 0:
        line = head.count(b"\n", 0, nul) + 1
        raise DataError(f"{src}: line {line}: NUL byte at offset {nul}: this is a "
                        "binary file, not CSV/TSV text (for parquet, name it .parquet or set --data-format parquet)")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < _SNIFF_BYTES)
    except UnicodeDecodeError as err:
        raise DataError(_not_utf8(src, head, err)) from err


def _not_utf8(src: str, data: bytes, err: UnicodeDecodeError) -> str:
    line = data.count(b"\n", 0, err.start) + 1
    return (f"{src}: line {line}: byte 0x{data[err.start]:02x} at offset {err.start} is not UTF-8: interaction "
            "files are UTF-8 CSV/TSV text or parquet")


def _read_ml100k(file: Path, src: str, sep: str) -> tuple[pd.DataFrame, np.ndarray]:
    """Check field counts by hand (pandas silently pads short lines), then parse with pandas."""
    text = _read_text(file, src)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline does not start a line
    wanted = len(_ML100K_FIELDS) - 1
    separators = [line.count(sep) for line in lines]
    blank = np.fromiter((not line.strip() for line in lines), dtype=bool, count=len(lines))
    wrong = np.flatnonzero((np.asarray(separators, dtype=np.int64) != wanted) & ~blank)
    if len(wrong):
        number = int(wrong[0])
        raise DataError(
            f"{src}: line {number + 1}: expected {len(_ML100K_FIELDS)} fields "
            f"({' '.join(_ML100K_FIELDS)}) separated by {sep!r}, found {separators[number] + 1}"
        )
    kept = "\n".join(line for line, empty in zip(lines, blank) if not empty) if blank.any() else text
    if not kept.strip():
        return pd.DataFrame(columns=list(_ML100K_FIELDS), dtype=str), np.zeros(0, np.int64)
    raw = pd.read_csv(
        io.StringIO(kept),
        sep=sep,
        header=None,
        names=list(_ML100K_FIELDS),
        dtype=str,
        keep_default_na=False,
        quoting=csv.QUOTE_NONE,  # a stray quote must not swallow the following lines
        skip_blank_lines=False,
        engine="c" if len(sep) == 1 else "python",
    )
    return raw, np.flatnonzero(~blank).astype(np.int64) + 1


def _read_delimited(file: Path, src: str, sep: str) -> tuple[pd.DataFrame, np.ndarray]:
    try:
        with warnings.catch_warnings():
            # pandas only warns when every row has more fields than the header
            warnings.simplefilter("error", pd.errors.ParserWarning)
            raw = pd.read_csv(
                file,
                sep=sep,
                dtype=str,
                keep_default_na=False,  # keep "" and "NA" verbatim for the message
                skip_blank_lines=False,  # blank lines are dropped below, keeping line numbers right
                index_col=False,  # never turn a surplus first field into the index
                encoding="utf-8",
            )
    except pd.errors.ParserWarning as err:
        raise DataError(f"{src}: {_first_long_line(file, sep)}has more fields than the header") from err
    except pd.errors.EmptyDataError as err:
        raise DataError(f"{src}: file is empty") from err
    except pd.errors.ParserError as err:
        raise DataError(f"{src}: cannot parse: {err}".rstrip()) from err
    except UnicodeDecodeError as err:  # past the sniffed head: find the exact place
        data = file.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exact:
            raise DataError(_not_utf8(src, data, exact)) from err
        raise DataError(f"{src}: not UTF-8 text ({err})") from err
    raw.columns = [str(c).strip() for c in raw.columns]
    lines = np.arange(2, len(raw) + 2, dtype=np.int64)  # line 1 is the header
    if len(raw):
        blank = np.logical_and.reduce([raw[c].str.strip().eq("").to_numpy() for c in raw.columns])
        if blank.any():
            raw = raw.loc[~blank].reset_index(drop=True)
            lines = lines[~blank]
    return raw, lines


def _header_fields(file: Path, sep: str) -> list[str]:
    """The header line's fields as written (pandas renames empty ones 'Unnamed: N')."""
    with file.open(encoding="utf-8-sig", newline="") as handle:
        first = handle.readline().rstrip("\r\n")
    if len(sep) == 1:
        return next(csv.reader([first], delimiter=sep), [])
    return first.split(sep)


def _missing_columns_message(file: Path, src: str, kind: str, raw: pd.DataFrame, missing: list[str],
                             sep: str | None) -> str:
    if kind == "parquet":
        shown = ", ".join(repr(str(c)) for c in raw.columns)
        where = "the file has columns"
    else:
        sep = sep if sep is not None else _DEFAULT_SEP[kind]
        header = _header_fields(file, sep)
        shown = ", ".join(repr(h) for h in header)
        if header and all(_NUMBER.fullmatch(h.strip()) for h in header):
            gap = "<TAB>" if sep == "\t" else sep
            return (f"{src}: line 1 ({shown}) holds values, not column names: {kind} files need a header "
                    f"line naming their columns. Add one (e.g. user{gap}item{gap}timestamp) and, if your names "
                    f"differ, map them with --data-columns; a headerless tab-separated user, item, rating, "
                    f"timestamp file (the MovieLens u.data layout) loads with --data-format ml-100k")
        where = "the header (line 1) has"
    return (f"{src}: missing required column(s) {', '.join(missing)}; {where} {shown}. Name the file's "
            f"columns with --data-columns, e.g. --data-columns \"user=COL,item=COL,timestamp=COL\"")


def _first_long_line(file: Path, sep: str) -> str:
    """Locate the first row longer than the header, as "line N: " (empty if not found)."""
    if len(sep) != 1:
        return ""
    with file.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter=sep)
        width = len(next(reader, []))
        for row in reader:
            if len(row) > width:
                return f"line {reader.line_num}: "
    return ""


def _read_parquet(file: Path, src: str) -> tuple[pd.DataFrame, np.ndarray]:
    try:
        raw = pd.read_parquet(file)
    except Exception as err:  # pyarrow raises several unrelated types for bad files
        raise DataError(f"{src}: cannot read parquet file: {err}") from err
    raw = raw.reset_index(drop=True)
    raw.columns = [str(c) for c in raw.columns]
    return raw, np.arange(1, len(raw) + 1, dtype=np.int64)


def _convert_columns(
    raw: pd.DataFrame, mapping: Mapping[str, str], positions: np.ndarray, *, src: str, unit: str
) -> dict[str, np.ndarray]:
    """Convert all canonical columns, reporting the first bad row in file order."""
    out: dict[str, np.ndarray] = {}
    first_bad: tuple[int, str, str] | None = None  # (row, column label, problem)
    for canonical in CANONICAL_COLUMNS:
        name = mapping[canonical]
        values, bad_row, problem = _to_int64(raw[name], allow_dates=canonical == "timestamp")
        out[canonical] = values
        if bad_row is not None and (first_bad is None or bad_row < first_bad[0]):
            label = name if name == canonical else f"{name} ({canonical})"
            first_bad = (bad_row, label, problem)
    if first_bad is not None:
        row, label, problem = first_bad
        raise DataError(f"{src}: {unit} {positions[row]}: column {label!r} {problem}")
    return out


def _to_int64(series: pd.Series, *, allow_dates: bool) -> tuple[np.ndarray, int | None, str]:
    """Return (values, first bad row or None, problem text for that row)."""
    kind = series.dtype.kind
    if kind in "iu":
        return series.to_numpy(dtype=np.int64), None, ""
    if kind == "M" and allow_dates:
        stamps = pd.to_datetime(series, utc=True)
        bad = stamps.isna().to_numpy()
        if bad.any():
            return np.zeros(0, np.int64), int(bad.argmax()), "is empty"
        return ((stamps - _EPOCH) // pd.Timedelta(seconds=1)).to_numpy(dtype=np.int64), None, ""
    if kind == "f":
        floats = series.to_numpy(dtype=np.float64)
        empty = np.isnan(floats)
        fractional = ~empty & ((floats != np.floor(floats)) | ~np.isfinite(floats))
        bad = empty | fractional
        if bad.any():
            row = int(bad.argmax())
            value = float(floats[row])  # a Python float: numpy 2 would print np.float64(...)
            problem = ("is empty" if empty[row] else f"has non-finite value {value!r}"
                       if not math.isfinite(value) else f"has non-integer value {value!r}")
            return np.zeros(0, np.int64), row, problem
        return floats.astype(np.int64), None, ""
    return _text_to_int64(series, allow_dates=allow_dates)


def _text_to_int64(series: pd.Series, *, allow_dates: bool) -> tuple[np.ndarray, int | None, str]:
    original = series.where(series.notna(), "").astype(str)
    text = original.str.strip()
    is_int = text.str.fullmatch(_INT_PATTERN).to_numpy(dtype=bool)
    values = np.zeros(len(text), dtype=np.int64)
    bad = ~is_int
    if allow_dates and bad.any():
        candidates = np.flatnonzero(bad & text.ne("").to_numpy(dtype=bool))
        stamps = pd.to_datetime(text.iloc[candidates], format="ISO8601", utc=True, errors="coerce")
        parsed = stamps.notna().to_numpy(dtype=bool)
        seconds = (stamps[parsed] - _EPOCH) // pd.Timedelta(seconds=1)
        values[candidates[parsed]] = seconds.to_numpy(dtype=np.int64)
        bad[candidates[parsed]] = False
    try:
        values[is_int] = text[is_int].astype(np.int64).to_numpy()
    except (OverflowError, ValueError):
        out_of_range = np.zeros(len(text), dtype=bool)
        for row in np.flatnonzero(is_int):  # slow path, only reached on error
            out_of_range[row] = not -(2**63) <= int(text.iat[row]) < 2**63
        if not out_of_range.any():
            raise
        bad |= out_of_range
    if not bad.any():
        return values, None, ""
    row = int(bad.argmax())
    value = original.iat[row]
    if not value.strip():
        return values, row, "is empty"
    if is_int[row]:
        return values, row, f"has value {value!r} outside the int64 range"
    if value.strip().lower().lstrip("+-") in {"nan", "inf", "infinity"}:
        return values, row, f"has non-finite value {value!r}"
    expected = "an integer or ISO-8601 date" if allow_dates else "an integer"
    return values, row, f"has value {value!r}, expected {expected}"


def _position_attrs(positions: np.ndarray, *, src: str, unit: str) -> dict[str, object]:
    """Describe row -> line numbering compactly (an offset plus skipped blank lines)."""
    first = int(positions[0]) if len(positions) else (2 if unit == "line" else 1)
    expected = first + np.arange(len(positions))
    skipped: list[int] = []
    if len(positions) and not np.array_equal(positions, expected):
        gaps = np.diff(positions) - 1  # blank lines between consecutive rows
        for idx in np.flatnonzero(gaps):
            skipped.extend(range(int(positions[idx]) + 1, int(positions[idx + 1])))
    return {
        _ATTR_SOURCE: src,
        _ATTR_UNIT: unit,
        _ATTR_OFFSET: first,
        _ATTR_SKIPPED: tuple(skipped),
    }


def describe_row(df: pd.DataFrame, position: int) -> str:
    """Say where the row at ``position`` (0-based, positional) of ``df`` sits in its file.

    Frames from :func:`load_interactions` know their line numbering, so the
    answer is ``"line N"`` as an editor shows it (``"row N"`` for parquet).
    The index label is used rather than the position so that a frame that
    was only filtered still cites the right line; frames without that
    information fall back to the 1-based row number.
    """
    label = df.index[position]
    index = int(label) if isinstance(label, (int, np.integer)) else int(position)
    unit = df.attrs.get(_ATTR_UNIT)
    if unit is None:
        return f"row {index + 1}"
    number = int(df.attrs.get(_ATTR_OFFSET, 1)) + index
    for blank in df.attrs.get(_ATTR_SKIPPED, ()):  # ascending, so each shift is final
        if blank <= number:
            number += 1
    return f"{unit} {number}"


# --------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class DataStats:
    """What loading did to the rows of a file: counted so a run can say so (log, summary.json).

    Every count is of rows (interactions) unless it says users."""

    rows: int = 0  # data rows read
    exact_duplicates: int = 0  # rows repeating an earlier row's user, item and timestamp
    duplicates_dropped: int = 0  # of those, dropped (data-duplicates = drop)
    short_users: int = 0  # users below data-min-interactions
    short_rows_dropped: int = 0  # rows of short users dropped (data-drop-short-users)
    repeated_items: int = 0  # kept rows whose item the user already had (a re-watch, a re-purchase)
    timestamp_ties: int = 0  # kept rows with the same timestamp as the user's previous one (file order kept)
    first_timestamp: int | None = None  # of the kept rows, seconds since 1970-01-01 UTC
    last_timestamp: int | None = None

    def as_dict(self) -> dict[str, int | None]:
        return dataclasses.asdict(self)

    def describe(self, source: str = "data") -> str:
        """One log line: what was read and what was dropped."""
        dropped = []
        if self.duplicates_dropped:
            dropped.append(f"{self.duplicates_dropped} exact duplicate row(s) dropped")
        elif self.exact_duplicates:
            dropped.append(f"{self.exact_duplicates} exact duplicate row(s) kept")
        if self.short_rows_dropped:
            dropped.append(f"{self.short_users} short user(s) dropped ({self.short_rows_dropped} rows)")
        return f"{source}: {self.rows} rows read" + ("; " + ", ".join(dropped) if dropped else "")


@dataclass(frozen=True)
class Dataset:
    """Per-user chronological item sequences with dense internal ids.

    Internal ids exist so that embedding tables can be indexed directly: item
    0 is reserved for padding, real items are ``1..num_items``; users are
    ``0..num_users-1``.  The original ids are kept to translate results back.
    Arrays are read-only because every split and client shares them.
    ``stats`` counts what loading found and dropped (duplicates, short users).
    """

    num_items: int  # N; internal item ids are 1..N, 0 is padding
    sequences: tuple[np.ndarray, ...]  # per internal user u: (len_u,) int64 items 1..N, chronological
    user_ids: np.ndarray  # (num_users,) original id of internal user u, ascending
    item_ids: np.ndarray  # (N,) original id of internal item i is item_ids[i - 1], ascending
    source: str  # file path or "synthetic(...)", for messages
    stats: DataStats = DataStats()  # what build_dataset found and dropped; not part of the fingerprint

    @property
    def duplicates_dropped(self) -> int:
        """Exact duplicate rows (same user, item, timestamp) dropped while loading."""
        return self.stats.duplicates_dropped

    def __post_init__(self) -> None:
        if len(self.user_ids) != len(self.sequences):
            raise ValueError(
                f"{len(self.user_ids)} user ids for {len(self.sequences)} sequences"
            )
        if len(self.item_ids) != self.num_items:
            raise ValueError(f"{len(self.item_ids)} item ids for num_items={self.num_items}")

    @property
    def num_users(self) -> int:
        return len(self.sequences)

    @property
    def num_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    def fingerprint(self) -> str:
        """Hash the content that training depends on, so runs can be keyed by data.

        Only ``num_items`` and the sequences enter (not ``source`` or the
        original ids): the same interactions loaded from a copied file must
        share cached results.  Explicit little-endian bytes keep the hash
        stable across processes and platforms.
        """
        lengths = np.fromiter((len(s) for s in self.sequences), dtype="<i8", count=self.num_users)
        items = (
            np.concatenate(self.sequences).astype("<i8", copy=False)
            if self.sequences
            else np.zeros(0, dtype="<i8")
        )
        digest = hashlib.sha256(b"fedkd.Dataset.v1")
        digest.update(np.asarray([self.num_items, self.num_users], dtype="<i8").tobytes())
        digest.update(lengths.tobytes())
        digest.update(items.tobytes())
        return digest.hexdigest()


def build_dataset(
    df: pd.DataFrame,
    *,
    min_interactions: int = 3,
    drop_short_users: bool = False,
    duplicates: str = "drop",
    source: str = "<data>",
) -> Dataset:
    """Group interactions into per-user chronological sequences.

    Parameters
    ----------
    df
        Frame with integer columns ``user``, ``item``, ``timestamp`` in file
        order (as from :func:`load_interactions`).
    min_interactions
        Minimum sequence length; at least 3 because leave-one-out holds out
        two items and needs one left to train on.
    drop_short_users
        Drop users below the minimum instead of failing.  Off by default so
        that data silently disappearing is an explicit choice.
    duplicates
        Exact duplicate rows (same user, item and timestamp, e.g. a double-logged
        event): ``"drop"`` keeps the first and counts the rest, ``"keep"`` keeps
        them all, ``"error"`` refuses the frame naming the first repeated line.
        Dropped by default because a kept duplicate of a user's last event
        becomes an unmasked copy of the test target one position earlier.
    source
        Name used in messages; when left at ``"<data>"`` the path recorded
        by :func:`load_interactions` is used.

    Returns
    -------
    Dataset
        Items are remapped to ``1..N`` in ascending original-id order over
        the interactions that remain (after dropping), so ``N`` counts only
        items someone actually interacted with.  Ties in timestamp keep file
        order (stable sort), which is the only order information left.

    Raises
    ------
    DataError
        A user below the minimum (naming the user, its count, where its first
        interaction is, and the ``--data-drop-short-users`` option), an exact
        duplicate with ``duplicates="error"``, missing or non-integer
        columns, or no interactions at all.
    ValueError
        ``min_interactions < 3``.
    """
    if isinstance(min_interactions, bool) or not isinstance(min_interactions, (int, np.integer)):
        raise ValueError(f"min_interactions must be an int, got {min_interactions!r}")
    if duplicates not in DUPLICATE_POLICIES:
        raise ValueError(f"duplicates must be one of {', '.join(DUPLICATE_POLICIES)}, got {duplicates!r}")
    if min_interactions < 3:
        raise ValueError(
            f"min_interactions must be >= 3 (leave-one-out holds out two items), got {min_interactions}"
        )
    if source == "<data>":
        source = str(df.attrs.get(_ATTR_SOURCE, source))
    missing = [c for c in CANONICAL_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(
            f"{source}: missing column(s) {', '.join(missing)}; "
            f"columns present: {', '.join(map(str, df.columns))}"
        )
    for column in CANONICAL_COLUMNS:
        if df[column].dtype.kind not in "iu":
            raise DataError(f"{source}: column {column!r} must hold integers, found {df[column].dtype}")
    if len(df) == 0:
        raise DataError(f"{source}: no interactions")

    users = df["user"].to_numpy(dtype=np.int64)  # (n,)
    items = df["item"].to_numpy(dtype=np.int64)  # (n,)
    stamps = df["timestamp"].to_numpy(dtype=np.int64)  # (n,)
    rows = np.arange(len(df))  # file position, the final tie-breaker
    repeats = _exact_duplicates(users, items, stamps)  # (d,) positions repeating an earlier row
    if len(repeats) and duplicates == "error":
        first, original = repeats[0]
        raise DataError(
            f"{source}: {describe_row(df, int(first))} repeats {describe_row(df, int(original))} exactly "
            f"(user {users[first]}, item {items[first]}, timestamp {stamps[first]}); {len(repeats)} row(s) "
            f"are exact duplicates. Set --data-duplicates drop (the default) to drop them or keep to keep them"
        )
    if len(repeats) and duplicates == "drop":
        rows = np.delete(rows, repeats[:, 0])  # (n - d,) positions kept, still in file order
    dropped = len(repeats) if duplicates == "drop" else 0
    order = rows[np.lexsort((rows, stamps[rows], users[rows]))]  # by user, then time, then file order
    user_sorted = users[order]
    user_ids, starts, counts = np.unique(user_sorted, return_index=True, return_counts=True)

    short = counts < min_interactions
    short_rows = 0
    if short.any():
        if not drop_short_users:
            first_rows = np.minimum.reduceat(order, starts)  # (num_users,) first file row per user
            culprit = np.flatnonzero(short)[np.argmin(first_rows[short])]
            where = describe_row(df, int(first_rows[culprit]))
            after = f" after dropping {dropped} exact duplicate row(s)" if dropped else ""
            raise DataError(
                f"{source}: user {user_ids[culprit]} has {counts[culprit]} interaction(s) "
                f"(first at {where}){after}, but at least {min_interactions} are needed for "
                f"leave-one-out; {int(short.sum())} user(s) are this short. "
                f"Set --data-drop-short-users to drop them instead"
            )
        keep = np.repeat(~short, counts)  # (n,) over the sorted order
        if not keep.any():
            raise DataError(
                f"{source}: no user has at least {min_interactions} interactions; nothing left"
            )
        short_rows = int((~keep).sum())
        order = order[keep]
        user_ids, counts = user_ids[~short], counts[~short]

    item_sorted = items[order]  # (m,) chronological within each user
    stamp_sorted = stamps[order]  # (m,)
    same_user = users[order]  # (m,)
    stats = DataStats(
        rows=len(df), exact_duplicates=len(repeats), duplicates_dropped=dropped, short_users=int(short.sum()),
        short_rows_dropped=short_rows, repeated_items=_repeated_items(same_user, item_sorted),
        timestamp_ties=int(((same_user[1:] == same_user[:-1]) & (stamp_sorted[1:] == stamp_sorted[:-1])).sum()),
        first_timestamp=int(stamp_sorted.min()), last_timestamp=int(stamp_sorted.max()))
    if dropped or short_rows:
        log.info("%s", stats.describe(source))
    item_ids = np.unique(item_sorted)  # (N,)
    internal = np.searchsorted(item_ids, item_sorted).astype(np.int64) + 1  # (m,) in 1..N
    for array in (internal, user_ids, item_ids):
        array.flags.writeable = False
    boundaries = np.cumsum(counts)[:-1]
    return Dataset(
        num_items=len(item_ids),
        sequences=tuple(np.split(internal, boundaries)),
        user_ids=user_ids,
        item_ids=item_ids,
        source=source,
        stats=stats,
    )


def _exact_duplicates(users: np.ndarray, items: np.ndarray, stamps: np.ndarray) -> np.ndarray:
    """(d, 2) int64: each row that repeats an earlier one exactly, with that earlier row's
    position (the first of its group), ordered by the repeating row's file position."""
    rows = np.arange(len(users))
    order = np.lexsort((rows, stamps, items, users))  # equal triples adjacent, earliest first
    u, i, t = users[order], items[order], stamps[order]
    same = np.zeros(len(order), dtype=bool)
    same[1:] = (u[1:] == u[:-1]) & (i[1:] == i[:-1]) & (t[1:] == t[:-1])
    if not same.any():
        return np.zeros((0, 2), dtype=np.int64)
    group_start = np.maximum.accumulate(np.where(same, 0, np.arange(len(order))))  # index of each group's first
    pairs = np.stack([order[same], order[group_start[same]]], axis=1)
    return pairs[np.argsort(pairs[:, 0], kind="stable")]


def _repeated_items(users_sorted: np.ndarray, items: np.ndarray) -> int:
    """Rows whose (user, item) pair occurred before (users_sorted groups each user's rows)."""
    if len(items) < 2:
        return 0
    order = np.lexsort((items, users_sorted))
    u, i = users_sorted[order], items[order]
    return int(((u[1:] == u[:-1]) & (i[1:] == i[:-1])).sum())
