"""Loaders, validation messages, Dataset building and the synthetic generator."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedkd.data import DataError, Dataset, build_dataset, load_interactions
from fedkd.synthetic import generate_synthetic

ML100K = Path(
    os.environ.get(
        "FEDKD_ML100K",
        Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ml-100k" / "u.data",
    )
)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def frame(user: list[int], item: list[int], timestamp: list[int]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user": np.asarray(user, dtype=np.int64),
            "item": np.asarray(item, dtype=np.int64),
            "timestamp": np.asarray(timestamp, dtype=np.int64),
        }
    )


# ----------------------------------------------------------------------------- loaders


def test_u_data_loads_in_file_order_without_ratings(tmp_path: Path) -> None:
    path = write(tmp_path / "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n22\t377\t1\t878887116\n")
    got = load_interactions(path)
    pd.testing.assert_frame_equal(
        got, frame([196, 186, 22], [242, 302, 377], [881250949, 891717742, 878887116])
    )
    assert isinstance(got.index, pd.RangeIndex)


def test_ratings_csv_uses_movielens_header(tmp_path: Path) -> None:
    path = write(
        tmp_path / "ratings.csv",
        "userId,movieId,rating,timestamp\n1,31,2.5,1260759144\n1,1029,3.0,1260759179\n7,5,4.0,12\n",
    )
    pd.testing.assert_frame_equal(
        load_interactions(path), frame([1, 1, 7], [31, 1029, 5], [1260759144, 1260759179, 12])
    )


def test_generic_csv_with_column_mapping_ignores_other_columns(tmp_path: Path) -> None:
    path = write(tmp_path / "log.csv", "ts,sku,uid,score\n300,-4,10,x\n100,900,11,y\n")
    got = load_interactions(path, columns={"user": "uid", "item": "sku", "timestamp": "ts"})
    pd.testing.assert_frame_equal(got, frame([10, 11], [-4, 900], [300, 100]))


@pytest.mark.parametrize("name", ["log.tsv", "log.txt"])
def test_tab_separated_by_suffix(tmp_path: Path, name: str) -> None:
    path = write(tmp_path / name, "user\titem\ttimestamp\n5\t6\t7\n8\t9\t10\n")
    pd.testing.assert_frame_equal(load_interactions(path), frame([5, 8], [6, 9], [7, 10]))


def test_explicit_format_and_separator(tmp_path: Path) -> None:
    path = write(tmp_path / "log.dat", "user;item;timestamp\n1;2;3\n")
    pd.testing.assert_frame_equal(load_interactions(path, fmt="csv", sep=";"), frame([1], [2], [3]))


def test_parquet_with_mapping(tmp_path: Path) -> None:
    path = tmp_path / "log.parquet"
    pd.DataFrame({"u": [3, 1], "i": [7, 8], "t": [50, 40], "rating": [1.0, 2.0]}).to_parquet(path)
    got = load_interactions(path, columns={"user": "u", "item": "i", "timestamp": "t"})
    pd.testing.assert_frame_equal(got, frame([3, 1], [7, 8], [50, 40]))


def test_iso_date_timestamps_become_epoch_seconds(tmp_path: Path) -> None:
    # 2021-01-01T00:00:00Z is 1609459200 s; naive dates count as UTC.
    path = write(
        tmp_path / "log.csv",
        "user,item,timestamp\n"
        "1,10,2021-01-01\n"
        "1,11,2021-01-01T00:00:10Z\n"
        "1,12,2021-01-01T01:00:05+01:00\n"
        "2,13,1609459200\n",
    )
    got = load_interactions(path)
    assert got["timestamp"].tolist() == [1609459200, 1609459210, 1609459205, 1609459200]
    assert got["timestamp"].dtype == np.int64


def test_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = write(tmp_path / "log.csv", "user,item,timestamp\n1,2,3\n\n4,5,6\n")
    pd.testing.assert_frame_equal(load_interactions(path), frame([1, 4], [2, 5], [3, 6]))


# ----------------------------------------------------------------------------- loader errors


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.csv"
    with pytest.raises(DataError, match="not found") as info:
        load_interactions(path)
    assert str(info.value).startswith(str(path))


@pytest.mark.parametrize(
    ("name", "text"),
    [("u.data", ""), ("log.csv", ""), ("log.csv", "user,item,timestamp\n"), ("u.data", "\n\n")],
)
def test_empty_file(tmp_path: Path, name: str, text: str) -> None:
    path = write(tmp_path / name, text)
    with pytest.raises(DataError, match="empty|no interactions") as info:
        load_interactions(path)
    assert str(info.value).startswith(str(path))


def test_missing_column_lists_missing_and_present(tmp_path: Path) -> None:
    path = write(tmp_path / "log.csv", "uid,product,when\n1,2,3\n")
    with pytest.raises(DataError) as info:
        load_interactions(path, columns={"user": "uid"})
    message = str(info.value)
    assert message.startswith(str(path))
    assert "'item'" in message and "'timestamp'" in message and "'uid'" not in message.split(";")[0]
    assert "the header (line 1) has 'uid', 'product', 'when'" in message
    assert "--data-columns" in message  # the option that fixes it, as the command line spells it


@pytest.mark.parametrize(
    ("text", "line", "column", "detail"),
    [
        ("user,item,timestamp\n1,10,100\n2,20,200\n3,abc,300\n", 4, "'item'", "'abc'"),
        ("user,item,timestamp\n1,10,100\n\n\n3,1.5,300\n", 5, "'item'", "'1.5'"),
        ("user,item,timestamp\n1,10,100\nx7,20,200\n", 3, "'user'", "'x7'"),
        ("user,item,timestamp\n1,10,100\n2,,200\n", 3, "'item'", "empty"),
        ("user,item,timestamp\n1,10,100\n2,20,yesterday\n", 3, "'timestamp'", "'yesterday'"),
        # two bad rows: the earlier one (a bad timestamp) is reported, not the first column
        ("user,item,timestamp\n1,10,100\n2,20,soon\n3,zz,300\n", 3, "'timestamp'", "'soon'"),
    ],
)
def test_bad_value_names_line_column_and_value(
    tmp_path: Path, text: str, line: int, column: str, detail: str
) -> None:
    path = write(tmp_path / "log.csv", text)
    with pytest.raises(DataError) as info:
        load_interactions(path)
    message = str(info.value)
    assert message.startswith(f"{path}: line {line}:")
    assert column in message and detail in message


def test_bad_value_with_mapping_names_file_column(tmp_path: Path) -> None:
    path = write(tmp_path / "log.csv", "uid,sku,ts\n1,2,3\n4,NA,6\n")
    with pytest.raises(DataError) as info:
        load_interactions(path, columns={"user": "uid", "item": "sku", "timestamp": "ts"})
    assert str(info.value).startswith(f"{path}: line 3: column 'sku (item)'")
    assert "'NA'" in str(info.value)


def test_u_data_wrong_field_count(tmp_path: Path) -> None:
    path = write(tmp_path / "u.data", "1\t10\t5\t100\n2\t20\t3\t200\n3\t30\t300\n")
    with pytest.raises(DataError) as info:
        load_interactions(path)
    assert str(info.value).startswith(f"{path}: line 3:")
    assert "found 3" in str(info.value)


@pytest.mark.parametrize(
    ("text", "line"),
    [("user,item,timestamp\n1,2,3\n4,5,6,7\n", 3), ("user,item,timestamp\n1,2,3,4\n", 2)],
)
def test_csv_row_longer_than_header(tmp_path: Path, text: str, line: int) -> None:
    # the second case would otherwise make pandas use the first field as the index
    path = write(tmp_path / "log.csv", text)
    with pytest.raises(DataError, match=f"line {line}\\b") as info:
        load_interactions(path)
    assert str(info.value).startswith(str(path))


def test_u_data_bad_value_has_no_header_offset(tmp_path: Path) -> None:
    path = write(tmp_path / "u.data", "1\t10\t5\t100\nbob\t20\t3\t200\n")
    with pytest.raises(DataError, match=r"line 2: column 'user'.*'bob'") as info:
        load_interactions(path)
    assert str(info.value).startswith(str(path))


def test_parquet_string_id_names_row(tmp_path: Path) -> None:
    path = tmp_path / "log.parquet"
    pd.DataFrame({"user": ["1", "2", "a"], "item": [1, 2, 3], "timestamp": [1, 2, 3]}).to_parquet(path)
    with pytest.raises(DataError, match=r"row 3: column 'user'.*'a'"):
        load_interactions(path)


def test_unknown_suffix_and_bad_arguments(tmp_path: Path) -> None:
    path = write(tmp_path / "log.json", "{}")
    with pytest.raises(DataError, match="set --data-format"):
        load_interactions(path)
    with pytest.raises(ValueError, match="unknown fmt"):
        load_interactions(path, fmt="json")
    with pytest.raises(ValueError, match="canonical column"):
        load_interactions(path, fmt="csv", columns={"rating": "r"})


# ----------------------------------------------------------------------------- build_dataset


def test_build_dataset_sorts_by_time_with_ties_in_file_order() -> None:
    # user 5: t=3 -> 20, then the t=5 tie in file order (30 before 10), then t=9 -> 40
    df = frame([5, 5, 5, 5], [30, 10, 20, 40], [5, 5, 3, 9])
    ds = build_dataset(df)
    assert ds.item_ids.tolist() == [10, 20, 30, 40]
    assert [s.tolist() for s in ds.sequences] == [[2, 3, 1, 4]]


def test_build_dataset_remaps_users_and_items() -> None:
    df = frame(
        [70, 3, 70, 3, 70, 3],
        [100, 5, 42, 100, 5, 7],
        [1, 1, 2, 2, 3, 3],
    )
    ds = build_dataset(df, source="mem")
    assert ds.user_ids.tolist() == [3, 70]
    assert ds.item_ids.tolist() == [5, 7, 42, 100]
    assert ds.num_items == 4 and ds.num_users == 2 and ds.num_interactions == 6
    # user 3: 5, 100, 7 -> 1, 4, 2; user 70: 100, 42, 5 -> 4, 3, 1
    assert [s.tolist() for s in ds.sequences] == [[1, 4, 2], [4, 3, 1]]
    assert all(s.dtype == np.int64 for s in ds.sequences)
    assert not ds.sequences[0].flags.writeable
    assert ds.source == "mem"


SHORT_CSV = "user,item,timestamp\n1,1,1\n1,2,2\n9,5,1\n1,3,3\n4,7,1\n9,6,2\n4,8,2\n"


def test_short_user_error_names_user_count_line_and_option(tmp_path: Path) -> None:
    path = write(tmp_path / "log.csv", SHORT_CSV)
    with pytest.raises(DataError) as info:
        build_dataset(load_interactions(path))
    message = str(info.value)
    # users 9 and 4 are short; 9's first interaction comes first in the file (line 4)
    assert message.startswith(str(path))
    assert "user 9 has 2 interaction" in message
    assert "line 4" in message
    assert "2 user(s)" in message
    assert "data-drop-short-users" in message


def test_short_user_error_without_file_cites_row() -> None:
    df = frame([1, 1, 1, 2], [1, 2, 3, 4], [1, 2, 3, 4])
    with pytest.raises(DataError, match=r"^src: user 2 has 1 interaction.*row 4"):
        build_dataset(df, source="src")


def test_drop_short_users_remaps_remaining_items(tmp_path: Path) -> None:
    ds = build_dataset(load_interactions(write(tmp_path / "log.csv", SHORT_CSV)), drop_short_users=True)
    assert ds.user_ids.tolist() == [1]
    assert ds.item_ids.tolist() == [1, 2, 3]  # items 5..8 of the dropped users are gone
    assert [s.tolist() for s in ds.sequences] == [[1, 2, 3]]


def test_min_interactions_validation() -> None:
    df = frame([1, 1, 1], [1, 2, 3], [1, 2, 3])
    with pytest.raises(ValueError, match=">= 3"):
        build_dataset(df, min_interactions=2)
    with pytest.raises(DataError, match="user 1 has 3"):
        build_dataset(df, min_interactions=4)


def test_fingerprint_tracks_content_only() -> None:
    df = frame([1, 1, 1, 2, 2, 2], [1, 2, 3, 3, 2, 1], [1, 2, 3, 1, 2, 3])
    first = build_dataset(df, source="a")
    again = build_dataset(df.copy(), source="b")
    assert len(first.fingerprint()) == 64
    assert first.fingerprint() == again.fingerprint()
    changed = df.copy()
    changed.loc[4, "item"] = 1  # one interaction differs
    assert build_dataset(changed).fingerprint() != first.fingerprint()
    # same flat items, different split between users
    ids = np.arange(2)
    a = Dataset(6, (np.array([1, 2, 3]), np.array([4, 5, 6])), ids, np.arange(6), "x")
    b = Dataset(6, (np.array([1, 2, 3, 4]), np.array([5, 6])), ids, np.arange(6), "x")
    assert a.fingerprint() != b.fingerprint()


@pytest.mark.skipif(not ML100K.is_file(), reason=f"MovieLens-100K not found at {ML100K}")
def test_real_movielens_100k() -> None:
    ds = build_dataset(load_interactions(ML100K), source=str(ML100K))
    assert (ds.num_users, ds.num_items, ds.num_interactions) == (943, 1682, 100000)
    assert ds.user_ids.tolist() == list(range(1, 944))


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_well_formed() -> None:
    df = generate_synthetic(num_users=50, num_items=60, mean_length=10, num_clusters=4, seed=3)
    pd.testing.assert_frame_equal(
        df, generate_synthetic(num_users=50, num_items=60, mean_length=10, num_clusters=4, seed=3)
    )
    other = generate_synthetic(num_users=50, num_items=60, mean_length=10, num_clusters=4, seed=4)
    assert not df.equals(other)
    assert list(df.columns) == ["user", "item", "timestamp"]
    assert all(df[c].dtype == np.int64 for c in df.columns)
    counts = df.groupby("user").size()
    assert counts.index.tolist() == list(range(1, 51))
    assert counts.min() >= 5 and counts.nunique() > 1
    assert df["item"].between(1, 60).all()
    # each user's timestamps strictly increase, so chronology is unambiguous
    assert (df.groupby("user")["timestamp"].diff().dropna() > 0).all()


def test_synthetic_is_fast() -> None:
    start = time.perf_counter()
    df = generate_synthetic(num_users=1000, mean_length=50)
    assert time.perf_counter() - start < 1.0
    assert df["user"].nunique() == 1000


def test_synthetic_has_sequential_signal() -> None:
    ds = build_dataset(generate_synthetic(seed=0), source="synthetic")
    n = ds.num_items
    bigram = np.zeros((n + 1, n + 1))  # bigram[a, b]: how often b followed a in training
    popularity = np.zeros(n + 1)
    for seq in ds.sequences:
        train = seq[:-1]  # everything before the test item
        np.add.at(bigram, (train[:-1], train[1:]), 1)
        np.add.at(popularity, train, 1)
    popularity[0] = -np.inf  # never recommend padding
    top_popular = np.argsort(-popularity, kind="stable")[:10]
    pop_hits, bigram_hits = 0, 0
    for seq in ds.sequences:
        target, last = seq[-1], seq[-2]
        pop_hits += target in top_popular
        scores = bigram[last] + popularity / 1e9  # popularity only breaks ties
        bigram_hits += target in np.argsort(-scores, kind="stable")[:10]
    pop_hr, bigram_hr = pop_hits / ds.num_users, bigram_hits / ds.num_users
    assert bigram_hr > pop_hr + 0.3, (bigram_hr, pop_hr)


# ----------------------------------------------------------------------------- data policy (issue 17)


def test_exact_duplicates_are_dropped_by_default_and_counted(tmp_path: Path) -> None:
    text = "user,item,timestamp\n1,10,100\n1,11,200\n1,12,300\n1,12,300\n2,10,100\n2,11,150\n2,12,190\n1,10,400\n"
    df = load_interactions(write(tmp_path / "log.csv", text))
    ds = build_dataset(df)
    assert ds.duplicates_dropped == 1 and ds.stats.exact_duplicates == 1
    assert ds.num_interactions == 7
    assert ds.stats.repeated_items == 1  # user 1's item 10 again at t=400: a repeat, not a duplicate
    assert (ds.stats.first_timestamp, ds.stats.last_timestamp) == (100, 400)
    kept = build_dataset(df, duplicates="keep")
    assert kept.num_interactions == 8 and kept.duplicates_dropped == 0 and kept.stats.exact_duplicates == 1
    with pytest.raises(DataError) as info:
        build_dataset(df, duplicates="error")
    assert str(info.value) == (
        f"{tmp_path / 'log.csv'}: line 5 repeats line 4 exactly (user 1, item 12, timestamp 300); 1 row(s) are "
        "exact duplicates. Set --data-duplicates drop (the default) to drop them or keep to keep them")


def test_a_file_of_doubled_rows_gives_the_same_dataset_as_the_clean_file(tmp_path: Path) -> None:
    rows = [(u, i, 1000 + 10 * i) for u in range(4) for i in range(1, 6)]
    clean = write(tmp_path / "clean.csv", "user,item,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows))
    doubled = write(tmp_path / "doubled.csv",
                    "user,item,timestamp\n" + "".join(f"{u},{i},{t}\n" * 2 for u, i, t in rows))
    a, b = build_dataset(load_interactions(clean)), build_dataset(load_interactions(doubled))
    assert a.fingerprint() == b.fingerprint() and b.duplicates_dropped == len(rows)


def test_duplicates_that_leave_a_user_short_say_so() -> None:
    df = frame([1, 1, 1, 2, 2, 2], [5, 5, 6, 7, 8, 9], [1, 1, 2, 1, 2, 3])
    with pytest.raises(DataError, match=r"user 1 has 2 interaction\(s\) \(first at row 1\) after dropping 1 exact"):
        build_dataset(df)


def test_unknown_duplicate_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="duplicates must be one of drop, keep, error"):
        build_dataset(frame([1, 1, 1], [1, 2, 3], [1, 2, 3]), duplicates="merge")


def test_timestamp_ties_keep_file_order_and_are_counted() -> None:
    ds = build_dataset(frame([1, 1, 1], [30, 10, 20], [7, 7, 7]))
    assert [s.tolist() for s in ds.sequences] == [[3, 1, 2]] and ds.stats.timestamp_ties == 2


@pytest.mark.parametrize(("text", "message"), [
    ("user,item,timestamp\n1,10,100\n1,11,-5\n1,12,-6\n",
     "line 3: column 'timestamp' has negative value -5 (timestamps are seconds since 1970-01-01 UTC and must be "
     ">= 0); 2 row(s) have one"),
    ("user,item,timestamp\n1,10,100\n1,11,1969-12-31T23:59:59\n",
     "line 3: column 'timestamp' has negative value -1 (timestamps are seconds since 1970-01-01 UTC and must be "
     ">= 0); 1 row(s) have one"),
    ("user,item,timestamp\n1,10,100\n1,11,inf\n", "line 3: column 'timestamp' has non-finite value 'inf'"),
    ("user,item,timestamp\n1,10,100\n1,11,NaN\n", "line 3: column 'timestamp' has non-finite value 'NaN'"),
])
def test_negative_and_non_finite_timestamps_are_refused_with_file_and_line(tmp_path, text, message):
    path = write(tmp_path / "log.csv", text)
    with pytest.raises(DataError) as info:
        load_interactions(path)
    assert str(info.value) == f"{path}: {message}"


def test_non_finite_float_timestamp_in_parquet_names_the_row(tmp_path: Path) -> None:
    path = tmp_path / "log.parquet"
    pd.DataFrame({"user": [1, 1], "item": [2, 3], "timestamp": [1.0, float("inf")]}).to_parquet(path)
    with pytest.raises(DataError) as info:
        load_interactions(path)
    assert str(info.value) == f"{path}: row 2: column 'timestamp' has non-finite value inf"


def test_byte_order_mark_is_not_part_of_the_first_value(tmp_path: Path) -> None:
    u = tmp_path / "u.data"
    u.write_bytes(b"\xef\xbb\xbf196\t242\t3\t881250949\n186\t302\t3\t891717742\n")
    assert load_interactions(u)["user"].tolist() == [196, 186]
    c = tmp_path / "log.csv"
    c.write_bytes(b"\xef\xbb\xbfuser,item,timestamp\n1,2,3\n")
    assert load_interactions(c).columns.tolist() == ["user", "item", "timestamp"]


@pytest.mark.parametrize(("content", "message"), [
    (b"user,item,timestamp\n1,2,3\n\x89PNG\x00\x01",
     "line 3: NUL byte at offset 30: this is a binary file, not CSV/TSV text (for parquet, name it .parquet or set "
     "--data-format parquet)"),
    ("user,item,timestamp\n1,2,3\n1,2,3\u00e9\n".encode("latin-1"),
     "line 3: byte 0xe9 at offset 31 is not UTF-8: interaction files are UTF-8 CSV/TSV text or parquet"),
    ("user,item,timestamp\n1,2,3\n".encode("utf-16"),
     "the file is UTF-16 text (byte-order mark ff fe); save it as UTF-8"),
])
def test_binary_and_non_utf8_files_are_refused_before_parsing(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "log.csv"
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        load_interactions(path)
    assert str(info.value) == f"{path}: {message}"


def test_headerless_file_is_explained(tmp_path: Path) -> None:
    path = write(tmp_path / "log.tsv", "1\t10\t100\n1\t11\t200\n")
    with pytest.raises(DataError) as info:
        load_interactions(path)
    assert str(info.value) == (
        f"{path}: line 1 ('1', '10', '100') holds values, not column names: tsv files need a header line naming "
        "their columns. Add one (e.g. user<TAB>item<TAB>timestamp) and, if your names differ, map them with "
        "--data-columns; a headerless tab-separated user, item, rating, timestamp file (the MovieLens u.data "
        "layout) loads with --data-format ml-100k")


def test_missing_column_shows_the_header_as_written_not_pandas_names(tmp_path: Path) -> None:
    path = write(tmp_path / "log.csv", "uid,item,,ts\n1,2,x,3\n")
    with pytest.raises(DataError) as info:
        load_interactions(path)
    assert str(info.value) == (
        f"{path}: missing required column(s) 'user', 'timestamp'; the header (line 1) has 'uid', 'item', '', "
        "'ts'. Name the file's columns with --data-columns, e.g. --data-columns \"user=COL,item=COL,timestamp=COL\"")
    assert "Unnamed" not in str(info.value)


def test_data_columns_on_ml100k_names_the_option(tmp_path: Path) -> None:
    path = write(tmp_path / "u.data", "1\t2\t3\t4\n")
    with pytest.raises(DataError, match=r"--data-columns does not apply to ml-100k files"):
        load_interactions(path, columns={"user": "uid"})
