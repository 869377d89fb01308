"""Benchmark the edge exports of a student: file size, single-request latency, agreement.

    python -m simulations.export_bench --data-path ../shared/data/ml-100k/u.data

    python -m simulations.export_bench --run outputs/<run> --grid   # a run's student, compressed

Takes the student of a finished run (--run: student.pt and the run's data settings), or loads
one with --state, or builds one of the fedkd default size and trains it centrally for
--train-steps Adam steps on the edge users' training prefixes (a stand-in for a federated
student); exports it as TorchScript, ONNX fp32 (plain and compact) and ONNX int8
(fedkd.export) and measures, for each format and for the eager PyTorch model (the reference
row):

* size: bytes of the file a device downloads (for PyTorch: the torch.save'd state dict);
* p50 / p99 latency of ``Recommender.recommend(history, k)`` for one user (batch 1, the
  whole history excluded from the result), over --requests requests after --warmup;
* agreement of the top-k on the test histories of the edge users with the eager model's:
  "exact" = the same ids in the same order; "up to ties" = at every rank the eager model
  scores the exported item within --tol of its own item there (ties broken differently
  count as equal, anything else not); overlap@k = shared ids / k; HR@k of the exported
  top-k against the held-out test item (history masked except the target, as
  fedkd.metrics does).

With --grid it also compresses the student every way ``fedkd export`` can (precision x
pruning x recovery, simulations/export_grid.py), measures each file and plots test NDCG@k
against file size (--plot).

Prints markdown tables and writes them, with the command line and the machine, into the
'<!-- export-bench -->' block of --out (prose around the block survives a rerun).
Latencies depend on the machine and its load: compare rows of one run, not across runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fedkd.config import ExperimentConfig
from fedkd.export import Recommender, export_onnx, export_torchscript
from fedkd.metrics import evaluate_ranking
from fedkd.models import ModelConfig, build_model, num_parameters
from fedkd.population import population
from fedkd.samples import eval_set, train_samples
from fedkd.train import TrainConfig, train_central, train_step
from simulations import ROOT
from simulations.docsplice import splice

SECTION = "export-bench"  # the generated block of the page (simulations/docsplice.py)

FORMATS = (("TorchScript", "student.pt", {}), ("ONNX fp32, plain export", "student.plain.onnx", {"compact": False}),
           ("ONNX fp32", "student.onnx", {}), ("ONNX int8", "student.int8.onnx", {"int8": True}))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = ExperimentConfig()
    p = argparse.ArgumentParser(prog="python -m simulations.export_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data (as in fedkd run)")
    g.add_argument("--data-path", default="", help="Interaction file, e.g. ../shared/data/ml-100k/u.data; "
                                                   "empty = fedkd's synthetic data.")
    g.add_argument("--data-format", default=d.data_format, help="auto | ml-100k | ml-csv | csv | tsv | parquet.")
    g.add_argument("--seed", type=int, default=d.seed, help="Seed of the data split, the init and the training.")
    g.add_argument("--max-len", type=int, default=d.max_len, help="History window of the model and the exports.")
    g = p.add_argument_group("student")
    g.add_argument("--student-kind", default=d.student_kind, help="sasrec | meanpool.")
    g.add_argument("--student-dim", type=int, default=d.student_dim, help="Student width.")
    g.add_argument("--student-blocks", type=int, default=d.student_blocks, help="Transformer blocks (sasrec).")
    g.add_argument("--student-heads", type=int, default=d.student_heads, help="Attention heads (sasrec).")
    g.add_argument("--train-steps", type=int, default=300,
                   help="Central Adam steps before exporting (0 = the freshly initialised student).")
    g.add_argument("--train-epochs", type=int, default=0,
                   help="Instead of --train-steps: fedkd.train.train_central for up to this many epochs, early "
                        "stopping (patience 3) on the edge users' validation items (0 = use --train-steps).")
    g.add_argument("--train-lr", type=float, default=1e-3, help="Adam learning rate of those steps.")
    g.add_argument("--batch-size", type=int, default=128, help="Training prefixes per step.")
    g.add_argument("--state", type=Path, default=None,
                   help="Load a student instead: a torch.save'd state dict (then --model-config is needed; "
                        "the --student-* and --train-* options are ignored).")
    g.add_argument("--model-config", type=Path, default=None,
                   help="JSON of the loaded student's ModelConfig (kind, num_items, dim, blocks, heads, "
                        "max_len[, dropout]).")
    g.add_argument("--run", type=Path, default=None,
                   help="Use the student of this results folder (student.pt, student.json) and its config.json's "
                        "data settings (--data-path overrides the file's path); the --student-*, --train-*, "
                        "--seed and --max-len options are then ignored.")
    g = p.add_argument_group("measurement")
    g.add_argument("--k", type=int, default=10, help="Items per recommendation (top-k).")
    g.add_argument("--requests", type=int, default=500, help="Timed single-user requests per format.")
    g.add_argument("--warmup", type=int, default=50, help="Untimed requests before timing each format.")
    g.add_argument("--threads", type=int, default=1,
                   help="Intra-op threads of torch and onnxruntime (1 = a phone-like single core).")
    g.add_argument("--tol", type=float, default=1e-5, help="Score tolerance of 'equal up to ties'.")
    g.add_argument("--eval-users", type=int, default=0,
                   help="Test histories used for agreement (0 = every edge user).")
    g = p.add_argument_group("compression grid (simulations/export_grid.py)")
    g.add_argument("--grid", action="store_true",
                   help="Also measure precision x pruning x recovery (file size, latency, overlap@k and test "
                        "NDCG@k of each file) and plot NDCG against size.")
    g.add_argument("--precisions", default="fp32,fp16,bf16,int8", help="Precisions of the grid.")
    g.add_argument("--prune-kinds", default="weights,rows,dims", help="Pruning kinds of the grid.")
    g.add_argument("--sparsities", default="0,0.5,0.75,0.9", help="Sparsities of the grid (0 = unpruned).")
    g.add_argument("--recover-steps", type=int, default=300, help="Recovery steps of the 'on' rows (0 = no such rows).")
    g.add_argument("--recover-loss", default="kl", help="kl | mse | kl+mse.")
    g.add_argument("--recover-lr", type=float, default=1e-3, help="Adam learning rate of recovery.")
    g.add_argument("--grid-requests", type=int, default=200, help="Timed requests per grid file.")
    g.add_argument("--plot", default="docs/img/export_pareto.png",
                   help="Where the Pareto plot goes (relative to the repository root).")
    g = p.add_argument_group("output")
    g.add_argument("--export-dir", type=Path, default=None,
                   help="Keep the exported files (and sidecars) here; default: a temporary folder, removed.")
    g.add_argument("--section", default=SECTION,
                   help="Name of the generated block of --out (one page can hold several students' blocks).")
    g.add_argument("--out", default="docs/export_benchmark.md",
                   help="Markdown page whose '<!-- export-bench -->' block is rewritten (relative to the "
                        "repository root; prose around the block stays); '-' = print only.")
    return p.parse_args(argv)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def build_student(args: argparse.Namespace, cfg: ExperimentConfig, num_items: int, train, valid) -> tuple:
    """(eval-mode model, ModelConfig, how it was made)."""
    if args.state is not None:
        if args.model_config is None:
            raise SystemExit("--state needs --model-config (the student's ModelConfig as JSON)")
        raw = json.loads(args.model_config.read_text())
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        mcfg = ModelConfig(**{k: v for k, v in raw.items() if k in names})
        if mcfg.num_items != num_items:
            raise SystemExit(f"the loaded student has {mcfg.num_items} items, the data {num_items}")
        model = build_model(mcfg, seed=None)
        model.load_state_dict(torch.load(args.state, map_location="cpu", weights_only=True))
        return model.eval(), mcfg, f"loaded from {args.state}"
    mcfg = cfg.student_model(num_items)
    model = build_model(mcfg, seed=cfg.seed)
    hist, target = train
    if args.train_epochs > 0:
        res = train_central(model, train, valid, TrainConfig(epochs=args.train_epochs, batch_size=args.batch_size,
                                                             lr=args.train_lr, patience=3, seed=cfg.seed))
        return model.eval(), mcfg, (f"trained centrally with fedkd.train.train_central on the edge users' training "
                                    f"prefixes (Adam lr {args.train_lr}, batch {args.batch_size}, dropout "
                                    f"{mcfg.dropout}), best of {res.epochs_run} epochs by validation NDCG@10: "
                                    f"epoch {res.best_epoch}, {res.best_valid_ndcg:.4f}")
    if args.train_steps > 0:
        torch.manual_seed(cfg.seed)
        opt = torch.optim.Adam(model.parameters(), lr=args.train_lr)
        rng = np.random.default_rng(cfg.seed)
        for _ in range(args.train_steps):
            idx = rng.integers(0, len(target), size=min(args.batch_size, len(target)))
            train_step(model, opt, torch.from_numpy(hist[idx]), torch.from_numpy(target[idx]))
    how = (f"trained centrally for {args.train_steps} Adam steps (lr {args.train_lr}, batch {args.batch_size})"
           if args.train_steps > 0 else "freshly initialised (untrained)")
    return model.eval(), mcfg, how


def reference_scores(model: torch.nn.Module, histories: np.ndarray, seen: list[np.ndarray]) -> np.ndarray:
    """(U, N + 1) eager scores, with the masked items and the padding column at -inf."""
    with torch.inference_mode():
        scores = model(torch.from_numpy(histories)).numpy().copy()
    for i, s in enumerate(seen):
        scores[i, s] = -np.inf
    scores[:, 0] = -np.inf
    return scores


def agreement(ref_ids: np.ndarray, ref_scores: np.ndarray, ids: np.ndarray, tol: float) -> dict[str, float]:
    rows = np.arange(len(ids))[:, None]
    exact = (ids == ref_ids).all(1)
    got, want = ref_scores[rows, ids], ref_scores[rows, ref_ids]  # eager scores of both lists, (U, k)
    ties = (np.isfinite(got) & (np.abs(got - want) <= tol)).all(1)
    overlap = np.mean([len(set(a) & set(b)) for a, b in zip(ids.tolist(), ref_ids.tolist())]) / ids.shape[1]
    return {"exact": float(exact.mean()), "ties": float(ties.mean()), "overlap": float(overlap)}


def latency(rec: Recommender, histories: list[np.ndarray], k: int, requests: int, warmup: int) -> tuple[float, float]:
    """p50, p99 in milliseconds of single-user ``recommend`` calls."""
    lists = [h.tolist() for h in histories]
    for i in range(warmup):
        rec.recommend(lists[i % len(lists)], k)
    times = np.empty(requests)
    for i in range(requests):
        h = lists[i % len(lists)]
        t0 = time.perf_counter_ns()
        rec.recommend(h, k)
        times[i] = time.perf_counter_ns() - t0
    return float(np.percentile(times, 50) / 1e6), float(np.percentile(times, 99) / 1e6)


def run_student(args: argparse.Namespace) -> tuple:
    """(eval-mode student, its ModelConfig, the run's ExperimentConfig, how it was made) of --run."""
    from simulations.export_cmd import load_run

    model, mcfg, exp = load_run(args.run)
    if exp is None:
        raise SystemExit(f"--run {args.run}: no config.json, so the data of the run is unknown")
    exp = exp.replace(progress=False, **({"data_path": args.data_path} if args.data_path else {}))
    summary = json.loads((args.run / "summary.json").read_text()) if (args.run / "summary.json").is_file() else {}
    how = (f"the federated student of `{args.run}` (protocol {exp.protocol}, {exp.num_rounds} rounds of "
           f"{exp.clients_per_round or 'all'} clients; the run's own test NDCG@10 "
           f"{summary.get('test_ndcg@10', float('nan')):.4f})")
    return model, mcfg, exp, how


def run(args: argparse.Namespace, argv: list[str]) -> str:
    torch.set_num_threads(args.threads)
    if args.run is not None:
        run_model = run_student(args)
        cfg = run_model[2]
    else:
        run_model = None
        cfg = ExperimentConfig().replace(data_path=args.data_path, data_format=args.data_format, seed=args.seed,
                                         max_len=args.max_len, student_kind=args.student_kind,
                                         student_dim=args.student_dim, student_blocks=args.student_blocks,
                                         student_heads=args.student_heads, progress=False)
    t_start = time.perf_counter()
    pop = population(cfg)
    seqs, n_items = pop.dataset.sequences, pop.dataset.num_items
    users = np.sort(np.concatenate(pop.clients))  # the edge users, as the federated students see them
    train = train_samples([seqs[u][:-2] for u in users], cfg.max_len)
    ev = eval_set(seqs, users, "test", cfg.max_len)
    if args.eval_users:
        ev = dataclasses.replace(ev, histories=ev.histories[: args.eval_users], targets=ev.targets[: args.eval_users],
                                 seen=ev.seen[: args.eval_users], users=ev.users[: args.eval_users])
    if run_model is not None:
        model, mcfg, _, how = run_model
    else:
        model, mcfg, how = build_student(args, cfg, n_items, train, eval_set(seqs, users, "valid", cfg.max_len))
    k = args.k
    seen = [s[s != t] for s, t in zip(ev.seen, ev.targets)]  # as fedkd.metrics: the target stays rankable
    ref_scores = reference_scores(model, ev.histories, seen)
    metrics_hr = evaluate_ranking(model, ev, k=k).hr

    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.export_dir or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        state_path = out_dir / "student.state.pt"
        torch.save(model.state_dict(), state_path)
        rows = []
        recs = [("PyTorch eager (reference)", state_path, Recommender.from_module(model, threads=args.threads))]
        for name, fname, kw in FORMATS:
            path = out_dir / fname
            (export_torchscript if fname.endswith(".pt") else export_onnx)(model, path, max_len=cfg.max_len, **kw)
            recs.append((name, path, Recommender(path, threads=args.threads)))
        ref_ids = None
        for name, path, rec in recs:
            ids, _ = rec.topk(ev.histories, k, seen)
            if ref_ids is None:
                ref_ids = ids
            agree = agreement(ref_ids, ref_scores, ids, args.tol)
            hr = float((ids == ev.targets[:, None]).any(1).mean())
            p50, p99 = latency(rec, list(ev.seen), k, args.requests, args.warmup)
            rows.append((name, path.name, path.stat().st_size, p50, p99, agree, hr))
        plain_size = next(r[2] for r in rows if r[1] == "student.plain.onnx")
        grid_lines = grid_section(args, model, cfg, ev, seen, out_dir, plain_size) if args.grid else []

    base = rows[0][2]
    table = [f"| format | file | size (bytes) | size vs state dict | p50 ms | p99 ms | top-{k} exact | "
             f"top-{k} up to ties | overlap@{k} | HR@{k} |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, fname, size, p50, p99, a, hr in rows:
        table.append(f"| {name} | `{fname}` | {size:,} | {size / base:.0%} | {p50:.3f} | {p99:.3f} | "
                     f"{a['exact']:.4f} | {a['ties']:.4f} | {a['overlap']:.4f} | {hr:.4f} |")
    import onnxruntime

    load = os.getloadavg()
    lines = [
        "Produced by (from the repository root):", "",
        "```", "python -m simulations.export_bench " + " ".join(shlex.quote(a) for a in argv), "```", "",
        f"- machine: {cpu_model()}, {os.cpu_count()} logical CPUs; load average {load[0]:.2f} at the end "
        f"(other jobs were running: latencies are indicative, compare rows, not runs)",
        f"- threads: {args.threads} (torch.set_num_threads and onnxruntime intra_op_num_threads)",
        f"- software: Python {platform.python_version()}, torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}",
        f"- data: {pop.dataset.source}: {n_items} items; test histories of {len(ev.targets)} edge users",
        f"- student: {mcfg.kind}, dim {mcfg.dim}, blocks {mcfg.blocks}, heads {mcfg.heads}, max_len "
        f"{cfg.max_len}, {num_parameters(model):,} parameters; {how}",
        f"- fedkd.metrics HR@{k} of the eager student on these users: {metrics_hr:.4f} (the PyTorch row's "
        f"HR@{k} must match it)",
        f"- latency: `Recommender.recommend(history, k={k})` for one user (batch 1, the whole history "
        f"excluded), {args.requests} requests after {args.warmup} warm-up, input checks and padding included",
        f"- agreement: top-{k} on all {len(ev.targets)} test histories vs the eager model; 'up to ties': at "
        f"every rank the eager scores of both items differ by at most {args.tol:g}",
        f"- wall time of the benchmark: {time.perf_counter() - t_start:.0f} s", "",
        *table, "",
        "Notes:", "",
        f"- every exported file returns the top-{k} ids and scores itself: the items to exclude are a graph "
        "input, masked before TopK (why: the docstring of `fedkd/export.py`); the device runs no sort;",
        "- the state dict is the raw fp32 weights, shown as the size reference: it cannot run without "
        "fedkd's model code; the TorchScript and ONNX files also carry the graph;",
        "- int8: the item table (most of the student) is stored once as int8 with one fp16 scale per item and "
        "dequantised in the graph; the transformer's weights go through onnxruntime's `quantize_dynamic`;",
        "- 'plain export' is the ONNX file as the exporter writes it; the other ONNX files store zeros as bit "
        "masks and use short value names (`fedkd/onnx_storage.py`), which is lossless;",
        "- p99 reflects the machine's load (see above) more than the formats.", "", *grid_lines]
    return "\n".join(lines)


def doc_dir(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    return ROOT if args.out == "-" else (out if out.is_absolute() else ROOT / out).parent


def grid_section(args: argparse.Namespace, model, cfg: ExperimentConfig, ev, seen, out_dir: Path,
                 plain_size: int) -> list[str]:
    """The compression grid's markdown (and its plot)."""
    from fedkd.recover import RecoveryConfig, server_histories
    from simulations import export_grid

    k = args.k
    recovery = RecoveryConfig(steps=args.recover_steps, lr=args.recover_lr, loss=args.recover_loss,
                              temperature=cfg.kd_temperature, seed=cfg.seed)
    specs = export_grid.grid_specs(args.precisions.split(","), args.prune_kinds.split(","),
                                   [float(x) for x in args.sparsities.split(",")], recovery)
    data = server_histories(cfg)
    t0 = time.perf_counter()
    base, rows = export_grid.run_grid(model, specs, data, ev=ev, seen=seen, out_dir=out_dir / "grid", k=k,
                                      threads=args.threads, requests=args.grid_requests, warmup=args.warmup,
                                      latency=latency, log=lambda m: print(m, file=sys.stderr))
    plot_path = Path(args.plot) if Path(args.plot).is_absolute() else ROOT / args.plot
    export_grid.plot(base, rows, plot_path, plain_size=plain_size, k=k,
                     title=f"Compressed students: test NDCG@{k} vs file size ({len(ev.targets)} edge users)")
    small = [r for r in rows if r.size <= 0.25 * plain_size]
    small_c = [r for r in rows if r.size <= 0.25 * base.size]
    lines = [
        "## Compression: precision x pruning x recovery", "",
        f"Every file below is `fedkd export RUN --precision P --prune S --prune-kind KIND "
        f"[--recover-steps {args.recover_steps}]` of the student above, measured as a device would run it "
        f"(the file, through `Recommender`, {args.threads} thread(s), {args.grid_requests} requests after "
        f"{args.warmup} warm-up). Wall time of the grid: {time.perf_counter() - t0:.0f} s.", "",
        f"- recovery: {args.recover_steps} Adam steps (lr {args.recover_lr:g}, batch {recovery.batch_size}, loss "
        f"{args.recover_loss}, T = {recovery.temperature:g}) towards the full student's predictions, on "
        f"**the proxy set and the cloud users' histories only** ({data.proxy_rows} proxy rows, "
        f"{data.cloud_users} cloud users, {len(data.histories):,} distinct histories; no edge user's history), "
        "quantisation-aware for int8 and precision-aware for fp16/bf16 (`fedkd/recover.py`);",
        "- pruning: `weights` = smallest-magnitude entries of every matrix; `rows` = item rows of smallest "
        "norm (a pruned item is ranked after every kept item); `dims` = item-table columns of smallest "
        "norm (`fedkd/prune.py`); the file stores the kept values and a bit mask;",
        "- fp16/bf16: 16-bit weights cast to fp32 in the graph (computed in fp32); int8: int8 item table with "
        "an fp16 scale per item, the transformer through onnxruntime's dynamic quantisation;",
        f"- 'vs fp32' compares with the compact fp32 file ({base.size:,} B, first row), 'vs plain fp32' with "
        f"the exporter's plain file ({plain_size:,} B); overlap@{k}: shared ids with the fp32 file's top-{k}; "
        f"NDCG@{k}: the file's top-{k} on the test item of each of the {len(ev.targets)} edge users "
        "(their history masked but the target); Pareto: no other file is both smaller and better.", "",
        *export_grid.table(base, rows, plain_size=plain_size, k=k), "",
        f"![test NDCG@{k} against file size]({os.path.relpath(plot_path, doc_dir(args))})",
        "", "### The goal: at most 25% of the fp32 file, at least 98% of its test NDCG@10", ""]
    for label, group, ref in (("the plain fp32 file", small, plain_size),
                              ("the compact fp32 file", small_c, base.size)):
        if not group:
            lines.append(f"- within 25% of {label} ({ref:,} B): no file of the grid.")
            continue
        best = max(group, key=lambda r: r.ndcg)
        se = export_grid.paired_se(best.per_user, base.per_user)
        met = best.ndcg >= 0.98 * base.ndcg
        lines.append(f"- within 25% of {label} ({0.25 * ref:,.0f} B): best is **{best.name}**, {best.size:,} B "
                     f"({best.size / ref:.0%}), NDCG@{k} {best.ndcg:.4f} = {best.ndcg / base.ndcg:.1%} of fp32 "
                     f"(paired standard error of the difference {se:.4f}): goal **{'met' if met else 'not met'}**.")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    text = run(args, argv)
    print(text)
    if args.out != "-":
        out = Path(args.out)
        out = out if out.is_absolute() else ROOT / out
        out.parent.mkdir(parents=True, exist_ok=True)
        splice(out, args.section, text, heading="# Export benchmark")
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
