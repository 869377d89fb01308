"""Run a grid of experiments over seeds, resumably, and report mean ± sd per config.

    fedkd sweep simulations/sweeps/example-kd-weight.toml
    fedkd sweep SPEC.toml --dry-run            # list the runs and which are finished
    fedkd sweep SPEC.toml --seeds 0 1 --set num-rounds=5 --jobs 2

Spec file (TOML)::

    name = "protocols"                  # folder: <output-dir>/sweeps/<name> (default: the spec's file name)
    seeds = [0, 1, 2]                   # every config runs once per seed (--seeds replaces this)
    config-files = ["../ml100k.toml"]   # optional override files, applied first; relative to the spec
    metrics = ["test_ndcg@10", "test_hr@10", "train_bytes_total"]   # summary.json keys the report
                                        # tabulates (dots reach nested keys); default: test NDCG@10, HR@10
    [base]                              # optional overrides shared by every run
    num-rounds = 10
    [configs.fedkd]                     # optional named configs, kept in this order
    kd-weight = 1.0
    [configs.fedavg]
    kd-weight = 0.0
    [grid]                              # optional: every combination of these lists, for every config
    kd-temperature = [1.0, 2.0]

Configs are the named configs (one called "base" without any) times the grid points; a grid
point appends ``-<key>=<value>`` to the config's name. Each config runs at each seed as
``<config>-s<seed>`` in ``<sweep folder>/runs/``. Later settings win: config files, [base],
the named config, the grid point, then the sweep's own (seed, experiment-name, output-dir,
progress = false), then ``--set KEY=VALUE``. The output root is ``--output-dir``, else an
``output-dir`` of the config files or [base], else ``outputs``. Relative paths in settings
are taken from the current folder, as in ``fedkd run``.

Every run's settings are checked before anything runs. A run whose summary.json exists and
whose config.json matches its settings is skipped, so rerunning an interrupted or extended
sweep runs only what is missing. A run interrupted after a round holds a checkpoint: if the
checkpoint's settings are the run's, the run continues after it (``fedkd run --resume``, which
ends exactly as an uninterrupted run), so a stopped sweep loses at most a round of each run in
flight. A run whose settings changed is run again (its old folder is moved aside, never
deleted). Failed runs go to failures.jsonl and the others go on.
At the end the report (``fedkd report``) is written for the runs that finished.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from tqdm import tqdm

from fedkd.config import ExperimentConfig, Scalar
from fedkd.results import JsonLines, write_json
from simulations import ROOT
from simulations.options import RawHelpFormatter
from simulations.report import DEFAULT_METRICS, lookup, run_status, write_report
from simulations.runner import overrides_toml, resolve_overrides
from simulations.runs import load_run

SWEEP_KEYS = ("seed", "experiment-name", "output-dir")  # set by the sweep for each run
RESUME = "to resume after round"  # the status of an interrupted run that continues from its checkpoint
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]")


class SpecError(ValueError):
    """A spec that cannot run; raised before anything is written."""


@dataclass(frozen=True)
class Run:
    name: str
    config: str
    seed: int
    overrides: dict[str, Scalar]  # what its TOML file holds (paths absolute)
    resolved: dict[str, Scalar]  # the full config its config.json must show to count as finished
    root: Path  # the sweep's runs folder

    @property
    def dir(self) -> Path:
        return self.root / self.name

    @property
    def toml(self) -> Path:
        return self.root / f"{self.name}.toml"

    @property
    def log(self) -> Path:
        return self.root / f"{self.name}.log"

    def status(self) -> str:
        """finished, stale, to run, or "to resume after round N"."""
        status = run_status(load_run(self.dir), self.resolved)
        if status == "to run" and (last := self.checkpointed_round()) is not None:
            return f"{RESUME} {last}"
        return status

    def checkpointed_round(self) -> int | None:
        """The last round of this run's checkpoint when the checkpoint holds exactly these
        settings (the check `fedkd run --resume` makes), else None: a run of the converged
        settings takes an hour and a session may end in the middle of it."""
        from fedkd import checkpoint  # torch: not for commands that only plan or read (`fedkd data`)

        if not (self.dir / checkpoint.NAME).is_file():
            return None
        try:
            return int(checkpoint.load(self.dir, self.resolved)["round"])
        except Exception:  # unreadable, another version or other settings: start the run afresh
            return None


@dataclass(frozen=True)
class Sweep:
    name: str
    dir: Path
    seeds: list[int]
    metrics: list[str]
    configs: dict[str, dict[str, Scalar]]  # config name -> its overrides, before the per-run ones
    runs: list[Run]

    def to_json(self) -> dict:
        return {"name": self.name, "seeds": self.seeds, "metrics": self.metrics, "configs": self.configs,
                "runs": [{"name": r.name, "config": r.config, "seed": r.seed, "resolved": r.resolved}
                         for r in self.runs]}

    def merged_json(self, previous: Mapping | None) -> dict:
        """This plan plus the runs an earlier invocation planned and this one does not (other
        seeds or configs): ``--seeds 3`` or ``--configs a`` extends a sweep's report instead
        of hiding what already ran. A run planned again takes its new settings."""
        out = self.to_json()
        if not previous or previous.get("name") != self.name:
            return out
        mine = {r["name"] for r in out["runs"]}
        kept = [r for r in previous.get("runs", []) if r.get("name") not in mine]
        out["runs"] = kept + out["runs"]
        out["seeds"] = sorted({*previous.get("seeds", []), *self.seeds})
        out["configs"] = {**previous.get("configs", {}), **self.configs}
        return out


# --- planning ---------------------------------------------------------------------------
def load_spec(path: Path) -> dict:
    """The spec's TOML with its shape checked, so a typo fails here and not after hours of runs."""
    try:
        spec = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SpecError(f"{path}: cannot read the sweep spec: {exc}") from None
    unknown = [k for k in spec if k not in _SPEC_CHECKS]
    if unknown:
        raise SpecError(f"{path}: unknown spec key(s) {', '.join(map(repr, unknown))}; "
                        f"allowed: {', '.join(_SPEC_CHECKS)}")
    for key, value in spec.items():
        _SPEC_CHECKS[key](path, key, value)
    return spec


def _expect(path: Path, key: str, value: object, kind: object) -> None:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SpecError(f"{path}: '{key}' must be {_KIND_NAMES[kind]}, got {value!r}")


def _expect_list(path: Path, key: str, value: object, kind: object) -> None:
    if not isinstance(value, list) or not value:
        raise SpecError(f"{path}: '{key}' must be a non-empty list, got {value!r}")
    for v in value:
        _expect(path, f"{key}[]", v, kind)


def _expect_table(path: Path, key: str, value: object) -> None:
    _expect(path, key, value, dict)
    for k, v in value.items():
        _expect(path, f"{key}.{k}", v, Scalar)


def _expect_tables(path: Path, key: str, value: object) -> None:
    _expect(path, key, value, dict)
    for name, table in value.items():
        _expect_table(path, f"{key}.{name}", table)


def _expect_lists(path: Path, key: str, value: object) -> None:
    _expect(path, key, value, dict)
    for name, values in value.items():
        _expect_list(path, f"{key}.{name}", values, Scalar)


_KIND_NAMES = {str: "a string", int: "an integer", dict: "a table", Scalar: "a single value (no table or list)"}
_SPEC_CHECKS = {"name": partial(_expect, kind=str), "seeds": partial(_expect_list, kind=int),
                "config-files": partial(_expect_list, kind=str), "metrics": partial(_expect_list, kind=str),
                "base": _expect_table, "configs": _expect_tables, "grid": _expect_lists}


def plan(spec_path: Path, *, seeds: Sequence[int] | None = None, output_dir: Path | None = None,
         sets: Mapping[str, Scalar] | None = None, cwd: Path | None = None,
         only: Sequence[str] | None = None) -> Sweep:
    """Every run of a spec (or of the configs named in ``only``), each checked as
    ExperimentConfig; nothing is written."""
    spec = load_spec(spec_path)
    cwd = cwd or Path.cwd()
    sets = dict(sets or {})
    _refuse_sweep_keys("--set", sets, SWEEP_KEYS)
    _refuse_sweep_keys("[base]", spec.get("base", {}), ("seed", "experiment-name"))
    files = _read_config_files(spec_path, spec.get("config-files", []))
    shared = {**files, **spec.get("base", {})}
    name = _safe(spec.get("name") or spec_path.stem)
    root = Path(str(shared.pop("output-dir", "outputs")))  # runs get their own output-dir below
    sweep_dir = (cwd / (output_dir or root)).resolve() / "sweeps" / name
    seeds = list(seeds if seeds is not None else spec.get("seeds", []))
    _check_seeds(spec_path, seeds)
    configs = expand_configs(spec, shared)
    if only:
        unknown = [c for c in only if c not in configs]
        if unknown:
            raise SpecError(f"--configs: {', '.join(unknown)} not in {spec_path}; its configs are "
                            f"{', '.join(configs)}")
        configs = {c: o for c, o in configs.items() if c in set(only)}
    # seeds outermost: the first runs to finish already compare every config
    runs = [_run(cfg, overrides, seed, sweep_dir / "runs", sets, cwd)
            for seed in seeds for cfg, overrides in configs.items()]
    return Sweep(name, sweep_dir, seeds, list(spec.get("metrics", DEFAULT_METRICS)),
                 {c: {**o, **sets} for c, o in configs.items()}, runs)


def _read_config_files(spec_path: Path, files: Sequence[str]) -> dict[str, Scalar]:
    from simulations.cli import load_overrides  # the CLI imports this module: import at call time

    out: dict[str, Scalar] = {}
    for f in files:
        path = (spec_path.parent / f).resolve()
        if not path.is_file():
            raise SpecError(f"config file {path} (config-files, relative to the spec) does not exist")
        try:
            out.update(load_overrides([path]))
        except ValueError as exc:
            raise SpecError(f"config file {path}: {exc}") from None
    return out


def _refuse_sweep_keys(where: str, overrides: Mapping[str, Scalar], keys: Sequence[str]) -> None:
    for key in keys:
        if key in overrides:
            hint = {"seed": "use seeds = [...] or --seeds", "output-dir": "use --output-dir or [base]",
                    "experiment-name": "runs are named <config>-s<seed>"}[key]
            raise SpecError(f"{where}: '{key}' is set by the sweep for each run ({hint})")


def _check_seeds(spec_path: Path, seeds: list[int]) -> None:
    if not seeds:
        raise SpecError(f"{spec_path}: no seeds: give seeds = [...] in the spec or --seeds")
    if len(set(seeds)) != len(seeds):
        raise SpecError(f"{spec_path}: repeated seeds {seeds}")


def expand_configs(spec: Mapping, shared: Mapping[str, Scalar]) -> dict[str, dict[str, Scalar]]:
    """Named configs × grid points, each merged over ``shared``; keys are the configs' names.

    Not checked here: a config may only become valid with the sweep's and --set's settings.
    """
    named = spec.get("configs") or {"base": {}}
    grid = spec.get("grid", {})
    out: dict[str, dict[str, Scalar]] = {}
    for cfg_name, table in named.items():
        _refuse_sweep_keys(f"[configs.{cfg_name}]", table, SWEEP_KEYS)
        for point in itertools.product(*grid.values()):
            values = dict(zip(grid, point))
            _refuse_sweep_keys("[grid]", values, SWEEP_KEYS)
            name = _safe("".join([cfg_name, *(f"-{k}={_label(v)}" for k, v in values.items())]))
            if name in out:
                raise SpecError(f"config names collide: two configs are named '{name}'")
            out[name] = {**shared, **table, **values}
    return out


def _run(config: str, overrides: Mapping[str, Scalar], seed: int, root: Path,
         sets: Mapping[str, Scalar], cwd: Path) -> Run:
    name = f"{config}-s{seed}"
    ov = {**overrides, "seed": seed, "experiment-name": name, "output-dir": str(root), "progress": False,
          **sets}
    try:
        resolved = resolve_overrides(ov, base=cwd)  # the same absolute paths the run will record
        full = ExperimentConfig.from_flat(resolved).to_flat()
    except ValueError as exc:
        raise SpecError(f"config '{config}', run '{name}': {exc}") from None
    return Run(name, config, seed, resolved, full, root)


def _label(v: Scalar) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    return f"{v:g}" if isinstance(v, float) else str(v)


def _safe(name: str) -> str:
    """A folder name on any file system: other characters become '_'."""
    return _UNSAFE.sub("_", name).strip(".") or "_"


def parse_set(text: str) -> tuple[str, Scalar]:
    """``KEY=VALUE`` with VALUE read as TOML (0.5, true, "x"), or as plain text when it is not TOML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    if not isinstance(value, Scalar):
        raise argparse.ArgumentTypeError(f"{key}: expected a single value, got {raw!r}")
    return key.strip(), value


# --- running ----------------------------------------------------------------------------
Execute = Callable[[Run], int]


def describe(sweep: Sweep) -> tuple[dict[str, str], str]:
    """Each run's status, and the one-line count printed when a sweep starts."""
    status = {r.name: r.status() for r in sweep.runs}
    finished = sum(s == "finished" for s in status.values())
    stale = sum(s == "stale" for s in status.values())
    resumed = sum(s.startswith(RESUME) for s in status.values())
    line = f"{len(status)} runs: {finished} finished, {len(status) - finished} to run"
    notes = ([f"{stale} stale: settings changed since they ran"] if stale else []) + \
        ([f"{resumed} to resume from their checkpoints"] if resumed else [])
    if notes:
        line += f" ({'; '.join(notes)})"
    return status, line


def run_sweep(sweep: Sweep, execute: Execute, *, jobs: int = 1,
              stop: Callable[[], None] | None = None) -> list[str]:
    """Run what is not finished; return the names of the runs that failed.

    ``execute`` runs one run and returns its exit code (tests pass a fake). On Ctrl-C,
    ``stop`` is called to end the runs in flight, and KeyboardInterrupt goes on up.
    """
    status, line = describe(sweep)
    print(f"sweep {sweep.name}: {line}", flush=True)
    todo = [r for r in sweep.runs if status[r.name] != "finished"]
    sweep.dir.joinpath("runs").mkdir(parents=True, exist_ok=True)
    old = sweep.dir / "sweep.json"
    write_json(old, sweep.merged_json(json.loads(old.read_text()) if old.is_file() else None))
    for run in todo:
        run.toml.write_text(overrides_toml(run.overrides))
    failures: list[str] = []
    metric = sweep.metrics[0]
    # no bar when stderr is not a terminal: its \r redraws would split the lines below in a log
    with tqdm(total=len(todo), unit="run", desc=sweep.name, disable=not todo or not sys.stderr.isatty()) as bar:
        took: list[float] = []

        def done(run: Run, rc: int, seconds: float) -> None:
            bar.update()
            took.append(seconds)
            where = _progress(len(took), len(todo), took, jobs)
            if rc == 0 and load_run(run.dir).finished:
                tqdm.write(f"[sweep] {run.name}: {seconds:.0f}s, {metric} = {_metric(run, metric)} ({where})")
            else:
                failures.append(run.name)
                _record_failure(sweep, run, rc)
                tqdm.write(f"[sweep] {run.name}: FAILED (exit {rc}) after {seconds:.0f}s; log: {run.log} ({where})")
        _execute_all(todo, execute, jobs, done, stop)
    return failures


def _execute_all(todo: list[Run], execute: Execute, jobs: int,
                 done: Callable[[Run, int, float], None], stop: Callable[[], None] | None) -> None:
    def timed(run: Run) -> tuple[int, float]:
        t0 = time.monotonic()
        return execute(run), time.monotonic() - t0

    pool = ThreadPoolExecutor(max_workers=jobs) if jobs > 1 else None
    try:
        if pool is None:
            for run in todo:
                done(run, *timed(run))
        else:
            futures = {pool.submit(timed, run): run for run in todo}
            for fut in as_completed(futures):
                done(futures[fut], *fut.result())
    except KeyboardInterrupt:
        if stop:
            stop()
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _progress(done: int, total: int, took: Sequence[float], jobs: int) -> str:
    """``3/9 runs, about 4.2 h left``: a sweep at converged settings runs for hours, and its log
    (no progress bar without a terminal) is where one looks; the estimate is the mean run so far."""
    left = (total - done) * (sum(took) / len(took)) / max(jobs, 1)
    if done == total:
        return f"{done}/{total} runs"
    return f"{done}/{total} runs, about " + (f"{left / 3600:.1f} h" if left >= 5400 else f"{left / 60:.0f} min") + " left"


def _metric(run: Run, metric: str) -> str:
    value = lookup(load_run(run.dir).summary, metric)
    return "n/a" if value is None else f"{value:.4g}"


def _record_failure(sweep: Sweep, run: Run, rc: int) -> None:
    tail = run.log.read_text(errors="replace").splitlines()[-20:] if run.log.is_file() else []
    JsonLines(sweep.dir / "failures.jsonl").append(
        {"run": run.name, "returncode": rc, "log": str(run.log), "log_tail": tail,
         "time": time.strftime("%Y-%m-%dT%H:%M:%S")})


class SubprocessExecutor:
    """Each run as ``fedkd run`` in a child process, the way a user would start it.

    A child per run lets Ray start and stop cleanly each time; its own session lets a
    Ctrl-C of the sweep end the child together with the Ray workers it started.
    """

    def __init__(self, num_cpus: int) -> None:
        self.num_cpus = num_cpus
        self._procs: set[subprocess.Popen] = set()
        self._lock = threading.Lock()

    def command(self, run: Run) -> list[str]:
        resume = run.status().startswith(RESUME)
        return [sys.executable, "-m", "simulations.cli", "run", "--config", str(run.toml),
                "--num-cpus", str(self.num_cpus), *(["--resume"] if resume else [])]

    def __call__(self, run: Run) -> int:
        cmd = self.command(run)
        with run.log.open("a" if "--resume" in cmd else "w") as log:  # a resume keeps the first part's log
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            with self._lock:
                self._procs.add(proc)
            try:
                return proc.wait()
            except BaseException:  # Ctrl-C while this thread waits: its run must not outlive the sweep
                _end([proc])
                raise
            finally:
                with self._lock:
                    self._procs.discard(proc)

    def stop(self) -> None:
        """End the runs that other threads are waiting on."""
        with self._lock:
            procs = list(self._procs)
        _end(procs)


def _end(procs: Sequence[subprocess.Popen], grace_s: float = 5.0) -> None:
    """SIGINT to each run's process group, then SIGKILL to what is left (Ray workers may outlive their driver)."""
    for p in procs:
        _signal_group(p, signal.SIGINT)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        _signal_group(p, signal.SIGKILL)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """A `kill` of the sweep stops its runs as Ctrl-C does, instead of orphaning them."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- command line -----------------------------------------------------------------------
def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="Run a grid of configs over seeds (resumable), then report.",
                       description=__doc__, formatter_class=RawHelpFormatter)
    p.add_argument("spec", type=Path, metavar="SPEC.toml", help="The sweep spec (format above).")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="Seeds to run (replaces the spec's).")
    p.add_argument("--output-dir", type=Path, default=None,
                   help="Output root; the sweep goes to <output-dir>/sweeps/<name> (default: outputs).")
    p.add_argument("--set", dest="sets", type=parse_set, action="append", default=[], metavar="KEY=VALUE",
                   help="Override a setting of every run, after everything in the spec; may repeat.")
    p.add_argument("--jobs", type=int, default=1,
                   help="Runs at a time; each gets --num-cpus max(1, CPUs // jobs) (default: 1).")
    p.add_argument("--configs", nargs="+", default=None, metavar="NAME",
                   help="Run only these configs of the spec (full names, grid suffix included), e.g. to "
                        "add seeds to the configs that need them; the report still covers every "
                        "finished run in the sweep's folder.")
    p.add_argument("--dry-run", action="store_true", help="List the runs and their status; run nothing.")


def main(args: argparse.Namespace, command: str) -> int:
    if args.jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
    sweep = plan(args.spec, seeds=args.seeds, output_dir=args.output_dir, sets=dict(args.sets),
                 only=args.configs)
    if args.dry_run:
        status, line = describe(sweep)
        print(f"sweep {sweep.name} ({sweep.dir}): {line}")
        for r in sweep.runs:
            print(f"  {r.name:<40} {status[r.name]}")
        return 0
    executor = SubprocessExecutor(num_cpus=max(1, (os.cpu_count() or 1) // args.jobs))
    try:
        with _sigterm_as_interrupt():
            failures = run_sweep(sweep, executor, jobs=args.jobs, stop=executor.stop)
    except KeyboardInterrupt:
        print(f"\nsweep {sweep.name}: interrupted; runs in flight were stopped. "
              "Rerun the same command to resume (finished runs are kept).", file=sys.stderr)
        return 130
    report = write_report(sweep.dir, command=command)[0]
    print(f"report: {report}")
    if failures:
        print(f"sweep {sweep.name}: {len(failures)} run(s) failed: {', '.join(failures)} "
              f"(logs in {sweep.dir / 'runs'}, details in {sweep.dir / 'failures.jsonl'})", file=sys.stderr)
        return 1
    return 0
