"""Inputs you can trust (issue 17): every bad input is refused, or repaired out loud, before any
engine starts: the exact message, exit code 2 (0 where the input is accepted), and nothing written
or moved in the output folder. Each case is a row of the table in docs/reliability.md, which is
printed, with each case's time to fail as a user sees it (a fresh process), by::

    python tests/test_inputs.py --table
"""

from __future__ import annotations

import io
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
OUT = ["--output-dir", "{dir}/out", "--cache-dir", "{dir}/cache"]


def _log(rows) -> bytes:
    return ("user,item,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows)).encode()


# 10 users x 8 of 26 items, one a second: enough for a default run's cloud, proxy set and kd-top-k
BASE = [(u, (3 * u + i) % 26 + 1, 1_000_000 + 100 * u + i) for u in range(1, 11) for i in range(1, 9)]


def _parquet(frame: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    frame.to_parquet(buf)
    return buf.getvalue()


@dataclass(frozen=True)
class Case:
    name: str  # what a user tried: the table's first column
    argv: tuple[str, ...]  # after `fedkd`; {dir} is the test's folder
    message: str  # the exact last line of stderr (exit 2), or the line of stdout that shows the repair (exit 0)
    code: int = 2
    files: dict[str, bytes | Callable[[], bytes]] = field(default_factory=dict)


CASES = [
    Case("every row twice (double-logged events)", ("data", "{dir}/log.csv"),
         "exact duplicates   80 found, 80 dropped (--data-duplicates drop: dropped)", 0,
         {"log.csv": _log([r for r in BASE for _ in (0, 1)])}),
    Case("exact duplicates with --data-duplicates error",
         ("run", "--data-path", "{dir}/log.csv", "--data-duplicates", "error", *OUT),
         "fedkd: error: {dir}/log.csv: line 3 repeats line 2 exactly (user 1, item 5, timestamp 1000101); 80 row(s) "
         "are exact duplicates. Set --data-duplicates drop (the default) to drop them or keep to keep them",
         files={"log.csv": _log([r for r in BASE for _ in (0, 1)])}),
    Case("a negative timestamp", ("run", "--data-path", "{dir}/log.csv", *OUT),
         "fedkd: error: {dir}/log.csv: line 4: column 'timestamp' has negative value -7 (timestamps are seconds "
         "since 1970-01-01 UTC and must be >= 0); 1 row(s) have one",
         files={"log.csv": _log([*BASE[:2], (1, 9, -7), *BASE[2:]])}),
    Case("a date before 1970", ("run", "--data-path", "{dir}/log.csv", *OUT),
         "fedkd: error: {dir}/log.csv: line 2: column 'timestamp' has negative value -86400 (timestamps are "
         "seconds since 1970-01-01 UTC and must be >= 0); 1 row(s) have one",
         files={"log.csv": b"user,item,timestamp\n1,2,1969-12-31\n1,3,1970-01-02\n"}),
    Case("a non-finite timestamp", ("run", "--data-path", "{dir}/log.csv", *OUT),
         "fedkd: error: {dir}/log.csv: line 3: column 'timestamp' has non-finite value 'inf'",
         files={"log.csv": b"user,item,timestamp\n1,2,100\n1,3,inf\n"}),
    Case("a binary file named .csv", ("run", "--data-path", "{dir}/log.csv", *OUT),
         "fedkd: error: {dir}/log.csv: line 2: NUL byte at offset 6: this is a binary file, not CSV/TSV text (for "
         "parquet, name it .parquet or set --data-format parquet)",
         files={"log.csv": b"\x89PNG\r\n\x00\x00\x00\rIHDR" + bytes(range(256))}),
    Case("a UTF-16 file (a spreadsheet's 'Unicode text')", ("run", "--data-path", "{dir}/log.tsv", *OUT),
         "fedkd: error: {dir}/log.tsv: the file is UTF-16 text (byte-order mark ff fe); save it as UTF-8",
         files={"log.tsv": "user\titem\ttimestamp\n1\t2\t3\n".encode("utf-16")}),
    Case("Latin-1 text", ("run", "--data-path", "{dir}/log.csv", *OUT),
         "fedkd: error: {dir}/log.csv: line 3: byte 0xe9 at offset 29 is not UTF-8: interaction files are UTF-8 "
         "CSV/TSV text or parquet",
         files={"log.csv": "user,item,timestamp\n1,2,3\n1,3\u00e9,4\n".encode("latin-1")}),
    Case("a byte-order mark (UTF-8 with BOM)", ("data", "{dir}/log.csv"),
         "users              10 (0 below --data-min-interactions 3)", 0,
         {"log.csv": b"\xef\xbb\xbf" + _log(BASE)}),
    Case("an id beyond 64 bits", ("run", "--data-path", "{dir}/log.csv", *OUT),
         "fedkd: error: {dir}/log.csv: line 2: column 'user' has value '99999999999999999999' outside the int64 range",
         files={"log.csv": b"user,item,timestamp\n99999999999999999999,2,3\n"}),
    Case("huge ids within 64 bits", ("data", "{dir}/log.csv"),
         "items              26", 0,
         {"log.csv": _log([(u + 2**62, i + 2**62, t) for u, i, t in BASE])}),
    Case("a float id", ("run", "--data-path", "{dir}/log.csv", *OUT),
         "fedkd: error: {dir}/log.csv: line 3: column 'item' has value '2.0', expected an integer",
         files={"log.csv": b"user,item,timestamp\n1,2,3\n1,2.0,4\n"}),
    Case("a one-row file", ("run", "--data-path", "{dir}/log.csv", *OUT),
         "fedkd: error: {dir}/log.csv: user 1 has 1 interaction(s) (first at line 2), but at least 3 are needed for "
         "leave-one-out; 1 user(s) are this short. Set --data-drop-short-users to drop them instead",
         files={"log.csv": b"user,item,timestamp\n1,2,3\n"}),
    Case("a one-row file with --data-drop-short-users",
         ("run", "--data-path", "{dir}/log.csv", "--data-drop-short-users", *OUT),
         "fedkd: error: {dir}/log.csv: no user has at least 3 interactions; nothing left",
         files={"log.csv": b"user,item,timestamp\n1,2,3\n"}),
    Case("a user whose rows all share one timestamp", ("data", "{dir}/log.csv"),
         "interactions       80 (0 repeat an item the user already had; 7 share the user's previous timestamp, "
         "kept in file order)", 0,
         {"log.csv": _log([(u, i, 5 if u == 1 else t) for u, i, t in BASE])}),
    Case("parquet with string ids", ("run", "--data-path", "{dir}/log.parquet", *OUT),
         "fedkd: error: {dir}/log.parquet: row 2: column 'user' has value 'u2', expected an integer",
         files={"log.parquet": lambda: _parquet(pd.DataFrame({"user": ["1", "u2"], "item": [1, 2],
                                                              "timestamp": [1, 2]}))}),
    Case("parquet with fractional float timestamps", ("run", "--data-path", "{dir}/log.parquet", *OUT),
         "fedkd: error: {dir}/log.parquet: row 2: column 'timestamp' has non-integer value 2.5",
         files={"log.parquet": lambda: _parquet(pd.DataFrame({"user": [1, 1], "item": [1, 2],
                                                              "timestamp": [1.0, 2.5]}))}),
    Case("a headerless 3-column TSV", ("run", "--data-path", "{dir}/log.tsv", *OUT),
         "fedkd: error: {dir}/log.tsv: line 1 ('1', '10', '100') holds values, not column names: tsv files need a "
         "header line naming their columns. Add one (e.g. user<TAB>item<TAB>timestamp) and, if your names "
         "differ, map them with --data-columns; a headerless tab-separated user, item, rating, timestamp file "
         "(the MovieLens u.data layout) loads with --data-format ml-100k",
         files={"log.tsv": b"1\t10\t100\n1\t11\t200\n"}),
    Case("other column names, and an empty one", ("run", "--data-path", "{dir}/log.csv", *OUT),
         "fedkd: error: {dir}/log.csv: missing required column(s) 'user', 'timestamp'; the header (line 1) has "
         "'uid', 'item', '', 'ts'. Name the file's columns with --data-columns, e.g. --data-columns "
         "\"user=COL,item=COL,timestamp=COL\"",
         files={"log.csv": b"uid,item,,ts\n1,2,x,3\n"}),
    Case("--data-columns on a u.data file", ("run", "--data-path", "{dir}/u.data", "--data-columns", "user=uid", *OUT),
         "fedkd: error: {dir}/u.data: --data-columns does not apply to ml-100k files (user, item, rating, timestamp "
         "by position, no header); use --data-format csv or tsv for a file whose header names its columns",
         files={"u.data": b"1\t2\t3\t4\n"}),
    Case("a file whose format cannot be told", ("run", "--data-path", "{dir}/log.json", *OUT),
         "fedkd: error: {dir}/log.json: cannot infer the format from the file name; set --data-format (one of "
         "ml-100k, ml-csv, csv, tsv, parquet)",
         files={"log.json": b"{}"}),
    Case("too few users for a cloud with training histories", ("run", "--data-path", "{dir}/log.csv", *OUT),
         "fedkd: error: Config key 'cloud-fraction' has invalid value 0.2: allowed a share that gives the cloud "
         "training histories (its 1 cloud users have no training prefix (a user needs at least 4 interactions: "
         "leave-one-out holds out two); the teacher trains on them and the proxy set is drawn from them); raise "
         "cloud-fraction, or set kd-weight 0 for a run without a teacher.",
         files={"log.csv": _log([(u, i, i) for u in range(5) for i in range(1, 4)])}),
    Case("a config file with a syntax error", ("run", "--config", "{dir}/x.toml", *OUT),
         "fedkd: error: {dir}/x.toml: line 2, column 8: not valid TOML: Invalid value",
         files={"x.toml": b"num-rounds = 3\nseed = \n"}),
    Case("a config file with a bad value", ("run", "--config", "{dir}/x.toml", *OUT),
         "fedkd: error: {dir}/x.toml: line 3: Config key 'quant-bits' has invalid value 7: allowed 2, 4, 8 or 32.",
         files={"x.toml": b"# my experiment\nnum-rounds = 3\nquant-bits = 7\n"}),
    Case("a config file with a list value", ("run", "--config", "{dir}/x.toml", *OUT),
         "fedkd: error: {dir}/x.toml: line 1: Config key 'student-widths' must be a single value, got [4, 8, 16] "
         "(write a list as one comma-separated string, e.g. '4,8,16').",
         files={"x.toml": b"student-widths = [4, 8, 16]\n"}),
    Case("--num-round 3 (an abbreviation)", ("run", "--num-round", "3", *OUT),
         "fedkd run: error: unrecognized option --num-round (options are never abbreviated); did you mean "
         "--num-rounds?"),
    Case("--num-rouns 3 (a typo)", ("run", "--num-rouns", "3", *OUT),
         "fedkd run: error: unrecognized option --num-rouns; did you mean --num-rounds?"),
    Case("--clients-per-round beyond the fleet",
         ("run", "--synthetic-users", "50", "--clients-per-round", "100000", *OUT),
         "fedkd: error: Config key 'clients-per-round' has invalid value 100000: allowed 0 (every client) or 1..40 "
         "(this fleet has 40 clients)."),
    Case("a malicious client id beyond the fleet", ("run", "--synthetic-users", "50", "--fault-malicious", "99", *OUT),
         "fedkd: error: Config key 'fault-malicious' has invalid value '99': allowed partition ids in 0..39 (this "
         "fleet has 40 clients)."),
    Case("--resume without a checkpoint", ("run", "--resume", *OUT),
         "fedkd: error: cannot resume: no checkpoint {dir}/out/default/checkpoint.pt (the run did not finish a "
         "round, or output-dir/experiment-name point elsewhere)"),
]


def _prepare(case: Case, d: Path) -> list[str]:
    for name, content in case.files.items():
        (d / name).write_bytes(content() if callable(content) else content)
    previous = d / "out" / "default"  # a results folder a careless run would move aside
    previous.mkdir(parents=True)
    (previous / "summary.json").write_text("{}")
    return [a.replace("{dir}", str(d)) for a in case.argv]


def _untouched(d: Path) -> bool:
    out = d / "out"
    return ([p.name for p in out.iterdir()] == ["default"] and [p.name for p in (out / "default").iterdir()]
            == ["summary.json"] and (out / "default" / "summary.json").read_text() == "{}"
            and not (d / "cache").exists())


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, capsys, monkeypatch) -> None:
    from simulations import cli, runner

    real = runner.check_run_config

    def checks_only(run_config):  # a case that passed every check would start an engine: fail instead
        real(run_config)
        raise AssertionError("the checks passed")

    monkeypatch.setattr(runner, "check_run_config", checks_only)
    argv = _prepare(case, tmp_path)
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    got = capsys.readouterr()
    expected = case.message.replace("{dir}", str(tmp_path))
    assert code == case.code, got.err
    if case.code == 0:
        assert expected in got.out.splitlines()
    else:
        assert got.err.strip().splitlines()[-1] == expected
        if expected.startswith("fedkd run: error"):  # argparse: the subcommand's usage, not fedkd's
            assert got.err.startswith("usage: fedkd run ")
    assert _untouched(tmp_path)


# A bad value as `flwr run . --run-config` passes it (TOML-typed) and as `fedkd run --KEY VALUE` types it.
SERVER_CASES = [("tier-steps", "4,x", "4,x"), ("kd-weight", -1, "-1"), ("fault-malicious", "3,x", "3,x"),
                ("clients-per-round", 100000, "100000")]


@pytest.mark.parametrize("key, run_config_value, argv_value", SERVER_CASES, ids=[c[0] for c in SERVER_CASES])
def test_the_serverapp_refuses_a_bad_value_with_the_message_of_fedkd_run(key, run_config_value, argv_value,
                                                                         tmp_path: Path, capsys) -> None:
    """`flwr run .` fails before round 1 with `fedkd run`'s message: the ServerApp's main, given the run
    config Flower fuses from pyproject.toml and the overrides, stops in the validation entry point that
    `fedkd run` calls too (fedkd.checks.check_run_config), before it writes anything."""
    from flwr.app import Context, RecordDict
    from flwr.common.config import get_fused_config_from_dir

    from server import server_app
    from simulations import cli

    out = {"output-dir": str(tmp_path / "out"), "cache-dir": str(tmp_path / "cache")}
    assert cli.main(["run", f"--{key}", argv_value, "--synthetic-users", "50", "--output-dir", out["output-dir"],
                     "--cache-dir", out["cache-dir"]]) == 2
    said = capsys.readouterr().err.strip().splitlines()[-1]
    run_config = get_fused_config_from_dir(ROOT, {key: run_config_value, "synthetic-users": 50, **out})
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    with pytest.raises(ValueError) as err:
        server_app.main(None, context)  # no Grid: it must not get that far
    assert said == f"fedkd: error: {err.value}"
    assert f"Config key '{key}' has invalid value" in said
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


DATA_CASES = [c for c in CASES if c.argv[0] == "run" and "--data-path" in c.argv]


@pytest.mark.parametrize("case", DATA_CASES, ids=[c.name for c in DATA_CASES])
def test_fedkd_data_refuses_a_file_with_the_message_a_run_gives(case: Case, tmp_path: Path, capsys) -> None:
    from simulations import cli

    argv = _prepare(case, tmp_path)
    rest = [a for a in argv[1:] if a not in (OUT[0], OUT[2]) and not a.startswith(str(tmp_path / "out"))
            and not a.startswith(str(tmp_path / "cache"))]
    at = rest.index("--data-path")
    code = cli.main(["data", rest[at + 1], *rest[:at], *rest[at + 2:]])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == case.message.replace("{dir}", str(tmp_path))
    assert _untouched(tmp_path)


ML100K = ROOT.parent / "shared" / "data" / "ml-100k" / "u.data"


@pytest.mark.skipif(not ML100K.is_file(), reason="MovieLens-100K not present")
def test_fedkd_data_summarises_movielens_without_importing_torch() -> None:
    code = ("import sys; from simulations import cli; assert cli.main(['data', sys.argv[1]]) == 0; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, str(ML100K)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "users              943 (0 below --data-min-interactions 3)" in lines
    assert "exact duplicates   0 found, 0 dropped (--data-duplicates drop: dropped)" in lines
    assert "edge users         754 in 754 clients (--users-per-client 1)" in lines
    assert "proxy set          2048 rows (--proxy-size 2048)" in lines
    assert seconds < 30, seconds  # about 1.5 s; the bound only catches a hang, timing under load varies


def test_the_reliability_doc_lists_every_case() -> None:
    doc = (ROOT / "docs" / "reliability.md").read_text()
    for case in CASES:
        assert f"| {case.name} |" in doc, case.name
        assert _shown(case.message) in doc, case.name


def _shown(message: str) -> str:
    return message.replace("{dir}", "DIR").replace("|", "\\|")


def table() -> str:
    """The markdown table of docs/reliability.md: each case run as a user runs it, timed."""
    import tempfile
    rows = ["| input | command | message (exact) | exit | time to fail | nothing written or moved |",
            "|---|---|---|---|---|---|"]
    for case in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            argv = _prepare(case, d)
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "simulations.cli", *argv], cwd=ROOT, capture_output=True,
                                  text=True, timeout=300)
            seconds = time.perf_counter() - t0
            expected = case.message.replace("{dir}", str(d))
            lines = (proc.stdout if case.code == 0 else proc.stderr).strip().splitlines()
            ok = proc.returncode == case.code and (expected in lines if case.code == 0 else lines[-1] == expected)
            if not ok:
                raise SystemExit(f"{case.name}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
            command = "fedkd " + " ".join(a.replace(str(d), "DIR") for a in case.argv if a not in OUT[1::2]
                                          and a not in OUT[0::2]).replace("{dir}", "DIR")
            rows.append(f"| {case.name} | `{command}` | {_shown(case.message)} | {proc.returncode} | "
                        f"{seconds:.1f} s | {'yes' if _untouched(d) else 'NO'} |")
    return "\n".join(rows)


if __name__ == "__main__":
    if sys.argv[1:] != ["--table"]:
        raise SystemExit(__doc__)
    print(table())
