"""The communication report on a hand-made sweep folder: bytes to target, ratios, the doc section."""

import json
from types import SimpleNamespace

import pytest

from simulations import communication_report as cr
from simulations.docsplice import markers, splice


def _run(root, name, vals, bytes_per_round, *, test, extra=None):
    d = root / "runs" / name
    d.mkdir(parents=True)
    cols = ["round", "cum_bytes", "val_ndcg", "bytes_down_soft_labels", "bytes_down_proxy_inputs"]
    lines = [",".join(cols)]
    for i, v in enumerate(vals, 1):
        lines.append(f"{i},{i * bytes_per_round},{v},{(extra or {}).get('sl', 0)},0")
    (d / "metrics.csv").write_text("\n".join(lines) + "\n")
    (d / "summary.json").write_text(json.dumps({"test_ndcg@10": test, "train_bytes_per_round": bytes_per_round,
                                                "bytes_up_total": bytes_per_round, "rounds": len(vals)}))
    cfg = {"kd-weight": 1.0, "soft-label-format": "topk", "kd-top-k": 20, "soft-label-bits": 8, "kd-cache": False,
           "quant-bits": 8, "update-density": 1.0, "error-feedback": False, "down-bits": 0}
    (d / "config.json").write_text(json.dumps({"config": cfg}))


def test_bytes_to_target_table_and_doc_section(tmp_path):
    _run(tmp_path, "fedavg-32-s0", ["", 0.10, "", 0.20], 1_000_000, test=0.2)
    _run(tmp_path, "fedkd-8-s0", [0.15, 0.21, 0.25, 0.26], 100_000, test=0.26, extra={"sl": 500})
    _run(tmp_path, "fedkd-8-naive-s0", [0.1, 0.1, 0.1, 0.1], 100_000, test=0.25, extra={"sl": 50_000})
    (tmp_path / "sweep.json").write_text(json.dumps({  # configs sorted by name; runs as last planned
        "configs": {"fedavg-32": {}, "fedkd-8": {}, "fedkd-8-naive": {}}, "seeds": [0, 1],
        "runs": [{"config": "fedkd-8", "seed": 1}, {"config": "fedavg-32", "seed": 0},
                 {"config": "fedkd-8-naive", "seed": 0}, {"config": "fedkd-8", "seed": 0}]}))
    runs = cr.load(tmp_path)
    assert list(runs) == ["fedavg-32", "fedkd-8-naive", "fedkd-8"]  # the spec's order
    assert cr.final_val(runs["fedavg-32"][0].rows) == 0.20
    assert cr.bytes_to_target(runs["fedkd-8"][0].rows, 0.20) == 200_000  # round 2 of fedkd-8
    assert cr.bytes_to_target(runs["fedkd-8-naive"][0].rows, 0.20) is None
    text = cr.tables(runs)
    assert "| fedavg-32 |" in text and "| 4,000,000" not in text
    assert "| 0.2 | 5.0% |" in text  # 0.2 MB, 5% of FedAvg-32's 4 MB
    assert "| never | – |" in text
    assert "| 100x |" in text and "+4.0%" in text  # naive 50 kB vs 0.5 kB soft labels; 0.26 vs 0.25
    doc = tmp_path / "doc.md"
    start, end = markers(cr.SECTION)
    doc.write_text(f"intro\n{start}\nold\n{end}\noutro\n")
    assert cr.main([str(tmp_path), "--doc", str(doc), "--plot", str(tmp_path / "p.png")]) == 0
    body = doc.read_text()
    assert body.startswith("intro\n") and body.endswith("outro\n") and "old" not in body
    assert (tmp_path / "p.png").is_file() and "p.png" in body


def test_a_doc_without_the_section_is_refused(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("no markers\n")
    with pytest.raises(ValueError, match="section"):
        splice(doc, cr.SECTION, "x")


def test_comparisons_pair_seeds():
    """A config with seeds 0-1 against a reference with seed 0 alone compares seed 0 only."""
    def run(test):
        return SimpleNamespace(summary={"test_ndcg@10": test}, rows=[{"val_ndcg": test}])

    base = {0: run(0.10)}
    assert cr._paired({0: run(0.11), 1: run(0.50)}, base, cr._test) == "+10.0% (seed 0)"
    both = cr._paired({0: run(0.11), 1: run(0.18)}, {0: run(0.10), 1: run(0.20)}, cr._val)
    assert both == "-3.3% (+10, -10)"  # pooled 0.29 / 0.30, and each seed's own ratio
    assert cr._paired({1: run(0.2)}, base, cr._test) == "–"
