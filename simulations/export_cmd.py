"""``fedkd export RUN_DIR``: the student a run chose, as a file a device runs without fedkd.

The run's ``student.pt`` + ``student.json`` (written by the server for protocols with a
global student) become an ONNX, int8 ONNX or TorchScript file with its sidecar; a device
then needs only onnxruntime (or torch) and :class:`fedkd.export.Recommender`.
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
                   help="onnx (fp32), onnx-int8 (about 2/3 of the size; top-10 overlap ~0.99, "
                        "docs/export_benchmark.md) or torchscript (default: onnx).")
    p.add_argument("--out", type=Path, default=None,
                   help="Output file (default: RUN_DIR/export/student<suffix of the format>).")


def main(args: argparse.Namespace) -> int:
    import torch

    from fedkd.export import export_onnx, export_torchscript
    from fedkd.models import ModelConfig, build_model

    state_path, cfg_path = args.run_dir / "student.pt", args.run_dir / "student.json"
    if not state_path.is_file() or not cfg_path.is_file():
        raise ValueError(f"{args.run_dir} has no student.pt / student.json: only runs with a global student "
                         "(protocol params or proxy) that finished save one")
    raw = json.loads(cfg_path.read_text())
    cfg = ModelConfig(**{f.name: raw[f.name] for f in dataclasses.fields(ModelConfig) if f.name in raw})
    model = build_model(cfg, seed=None)
    model.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=True))
    model.eval()
    out = args.out or args.run_dir / "export" / f"student{FORMATS[args.format]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.format == "torchscript":
        meta = export_torchscript(model, out)
    else:
        meta = export_onnx(model, out, int8=args.format == "onnx-int8")
    print(f"wrote {out} ({out.stat().st_size:,} bytes) and its sidecar; sha256 {meta.get('sha256', '?')[:16]}")
    return 0
