"""The privacy report: epsilon per configuration (off / inf / finite), the table and the plot."""

import json

from simulations.privacy_report import main, table


def _run(folder, name, summary):
    d = folder / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"config": {}}))
    (d / "summary.json").write_text(json.dumps(summary))


def test_table_and_plot_from_a_folder_of_runs(tmp_path):
    base = {"test_hr@10": 0.2, "mia_auc": 0.55}
    _run(tmp_path, "no-dp-s0", {**base, "test_ndcg@10": 0.30})
    _run(tmp_path, "eps-inf-s0", {**base, "test_ndcg@10": 0.25, "dp_epsilon": "inf",
                                  "privacy": {"noise_multiplier": 0.0}})
    for seed, ndcg in ((0, 0.10), (1, 0.12)):
        _run(tmp_path, f"eps-4-s{seed}", {**base, "test_ndcg@10": ndcg, "dp_epsilon": 3.99,
                                          "privacy": {"noise_multiplier": 1.45}})
    text, points = table(tmp_path)
    rows = {p["config"]: p for p in points}
    assert rows["no-dp"]["epsilon"] is None and rows["eps-inf"]["epsilon"] == float("inf")
    assert rows["eps-4"]["epsilon"] == 3.99 and rows["eps-4"]["ndcg"].mean == 0.11
    assert "| eps-4 | 2/2 | 3.99 | 1.4500" in text and "| no-dp | 1/2 | off (no DP)" in text
    doc = tmp_path / "doc.md"
    doc.write_text("before\n<!-- privacy -->\nold\n<!-- /privacy -->\nafter\n")
    assert main([str(tmp_path), "--out", str(doc), "--img", str(tmp_path / "img" / "p.png")]) == 0
    assert (tmp_path / "img" / "p.png").is_file()
    new = doc.read_text()
    assert "old" not in new and "| eps-inf |" in new and "](img/p.png)" in new and new.endswith("after\n")
