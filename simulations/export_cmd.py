"""``fedkd export RUN_DIR``: the student a run chose, as a file a device runs without fedkd.

The run's ``student.pt`` + ``student.json`` (written by the server for protocols with a
global student) become an ONNX or TorchScript file with its sidecar; a device then needs
only onnxruntime (or torch) and :class:`fedkd.export.Recommender`.

Compression (ONNX only; docs/export_benchmark.md measures every combination):

    fedkd export RUN --prune 0.75 --prune-kind rows --precision int8 --recover-steps 300

prunes the student (fedkd.prune), fine-tunes the pruned copy towards the full student on the
server's data only: the proxy set and the cloud users' histories, rebuilt from the run's
config.json as the server builds them (fedkd.recover), then stores it at the precision asked
(fedkd.onnx_storage). The sidecar's "compression" records the sparsity achieved, the
precision, the recovery steps and loss, and the data used (proxy+cloud, no edge history).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from simulations.options import RawHelpFormatter

FORMATS = {"onnx": ".onnx", "onnx-int8": ".int8.onnx", "torchscript": ".pt"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="Export a run's chosen student to ONNX / TorchScript for devices.",
                       description=__doc__, formatter_class=RawHelpFormatter)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="A results folder with student.pt and student.json.")
    p.add_argument("--format", choices=sorted(FORMATS), default="onnx",
                   help="onnx, onnx-int8 (= onnx with --precision int8) or torchscript (fp32, uncompressed) "
                        "(default: onnx).")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16", "int8"], default=None,
                   help="How the ONNX file stores the weights (default: fp32, int8 for onnx-int8). fp16/bf16: "
                        "16-bit weights computed in fp32; int8: int8 weights, activations quantised on the fly.")
    p.add_argument("--prune", type=float, default=0.0, metavar="SPARSITY",
                   help="Fraction to prune, in [0, 1) (default: 0 = none).")
    p.add_argument("--prune-kind", choices=["weights", "rows", "dims"], default="weights",
                   help="weights: smallest-magnitude entries of every matrix; rows: item rows of smallest norm "
                        "(pruned items are ranked last); dims: item-table columns of smallest norm "
                        "(default: weights).")
    p.add_argument("--recover-steps", type=int, default=0, metavar="N",
                   help="Adam steps distilling the full student into the compressed one on proxy+cloud data "
                        "(default: 0 = no recovery).")
    p.add_argument("--recover-loss", choices=["kl", "mse", "kl+mse"], default="kl",
                   help="KL at --temperature, logit MSE, or both (default: kl).")
    p.add_argument("--recover-lr", type=float, default=1e-3, help="Adam learning rate of recovery (default: 0.001).")
    p.add_argument("--temperature", type=float, default=None,
                   help="KL temperature (default: the run's kd-temperature).")
    p.add_argument("--data-path", default=None,
                   help="The run's interaction file, if it moved since the run (recovery rebuilds the cloud "
                        "users' histories from it).")
    p.add_argument("--out", type=Path, default=None,
                   help="Output file (default: RUN_DIR/export/student[.<kind><percent>][.<precision>].onnx).")


def load_run(run_dir: Path):
    """(eval-mode full student, its ModelConfig, the run's ExperimentConfig or None)."""
    import torch

    from fedkd.config import ExperimentConfig
    from fedkd.models import ModelConfig, build_model

    state_path, cfg_path = run_dir / "student.pt", run_dir / "student.json"
    if not state_path.is_file() or not cfg_path.is_file():
        raise ValueError(f"{run_dir} has no student.pt / student.json: only runs with a global student "
                         "(protocol params or proxy) that finished save one")
    raw = json.loads(cfg_path.read_text())
    mcfg = ModelConfig(**{f.name: raw[f.name] for f in dataclasses.fields(ModelConfig) if f.name in raw})
    model = build_model(mcfg, seed=None)
    model.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=True))
    exp = None
    if (run_dir / "config.json").is_file():
        flat = json.loads((run_dir / "config.json").read_text())["config"]
        known = set(ExperimentConfig.keys())  # a run from another fedkd version may know other keys
        exp = ExperimentConfig.from_flat({k: v for k, v in flat.items() if k in known})
    return model.eval(), mcfg, exp


def default_name(precision: str, kind: str, sparsity: float) -> str:
    prune = f".{kind}{round(sparsity * 100)}" if sparsity > 0 else ""
    prec = f".{precision}" if precision != "fp32" else ""
    return f"student{prune}{prec}.onnx"


def main(args: argparse.Namespace) -> int:
    from fedkd.compress import CompressionSpec, compress
    from fedkd.export import export_onnx, export_torchscript, sha256_file
    from fedkd.recover import RecoveryConfig, server_histories

    precision = args.precision or ("int8" if args.format == "onnx-int8" else "fp32")
    if args.format == "onnx-int8" and precision != "int8":
        raise ValueError(f"--format onnx-int8 contradicts --precision {precision}")
    compressing = precision != "fp32" or args.prune > 0 or args.recover_steps > 0
    if args.format == "torchscript" and compressing:
        raise ValueError("--precision, --prune and --recover-steps need an ONNX file: TorchScript files store "
                         "dense float32 tensors, so they would not get smaller (use --format onnx)")
    model, _, exp = load_run(args.run_dir)
    if args.format == "torchscript":
        out = args.out or args.run_dir / "export" / "student.pt"
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = export_torchscript(model, out)
    else:
        temperature = args.temperature or (exp.kd_temperature if exp is not None else 2.0)
        spec = CompressionSpec(prune_kind=args.prune_kind, sparsity=args.prune, precision=precision,
                               recovery=RecoveryConfig(steps=args.recover_steps, lr=args.recover_lr,
                                                       temperature=temperature, loss=args.recover_loss,
                                                       seed=exp.seed if exp is not None else 0))
        data = None
        if args.recover_steps > 0:
            if exp is None:
                raise ValueError(f"{args.run_dir} has no config.json: recovery cannot rebuild the server's data")
            data = server_histories(exp.replace(data_path=args.data_path) if args.data_path else exp)
        compressed, record = compress(model, spec, data=data)
        record["source"] = {"run": str(args.run_dir), "student_sha256": sha256_file(args.run_dir / "student.pt")}
        out = args.out or args.run_dir / "export" / default_name(precision, args.prune_kind, args.prune)
        meta = export_onnx(compressed, out, precision=precision, extra={"compression": record})
        _print_record(record)
    print(f"wrote {out} ({out.stat().st_size:,} bytes) and its sidecar; sha256 {meta.get('sha256', '?')[:16]}")
    return 0


def _print_record(record: dict) -> None:
    if record["prune"]:
        p = record["prune"]
        print(f"pruned {p['kind']}: {p['pruned']:,} of {p['total']:,} ({p['achieved']:.1%}, "
              f"asked {p['requested']:.1%})")
    r = record["recovery"]
    if r:
        print(f"recovered {r['steps']} steps ({r['loss']}, T={r['temperature']:g}, {r['precision_aware']}-aware) on "
              f"{r['histories']:,} proxy+cloud histories ({r['cloud_users']} cloud users, no edge data): held-out "
              f"divergence {r['holdout_divergence_before']:.4f} -> {r['holdout_divergence_after']:.4f}")
