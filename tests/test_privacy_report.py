"""The privacy report: epsilon per configuration (off / inf / finite), the DP mode, the two
attacks, runs borrowed from another sweep, the table and the plot."""

import json

import numpy as np
import pytest

import fedkd.plots
from simulations.privacy_report import main, table


def _run(folder, name, summary, config=None):
    d = folder / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"config": config or {}}))
    (d / "metrics.csv").write_text("round,val_ndcg,cum_bytes\n1,0.1,100\n")
    (d / "summary.json").write_text(json.dumps(summary))


def _cells(text: str, config: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {config} |"))
    return [c.strip() for c in line.strip("|").split(" | ")]


def _recon(precision: float, observed: str = "client-update") -> dict:
    return {"reconstruction_attack": {"precision@k": precision, "recall@k": precision,
                                      "popularity_precision@k": 0.3, "random_precision@k": 0.06,
                                      "observed": observed, "units": 10}}


def test_table_and_plot_from_a_folder_of_runs(tmp_path):
    """The old privacy sweep (central DP only, no reconstruction attack) still makes its table."""
    base = {"test_hr@10": 0.2, "mia_auc": 0.55}
    off, central = {"dp-mode": "off"}, {"dp-mode": "central"}
    _run(tmp_path, "no-dp-s0", {**base, "test_ndcg@10": 0.30}, off)
    _run(tmp_path, "eps-inf-s0", {**base, "test_ndcg@10": 0.25, "dp_epsilon": "inf",
                                  "privacy": {"noise_multiplier": 0.0}}, central)
    for seed, ndcg in ((0, 0.10), (1, 0.12)):
        _run(tmp_path, f"eps-4-s{seed}", {**base, "test_ndcg@10": ndcg, "dp_epsilon": 3.99,
                                          "privacy": {"noise_multiplier": 1.45}}, central)
    text, points = table(tmp_path)
    rows = {p["config"]: p for p in points}
    assert rows["no-dp"]["epsilon"] is None and rows["eps-inf"]["epsilon"] == float("inf")
    assert rows["eps-4"]["epsilon"] == 3.99 and rows["eps-4"]["ndcg"].mean == 0.11
    assert rows["eps-4"]["recon"] is None  # no run measured it
    assert "| eps-4 | central | 2/2 | 3.99 | 1.4500" in text and "| no-dp | off | 1/2 | off (no DP)" in text
    assert _cells(text, "eps-4")[-2:] == ["n/a", "n/a"]
    doc = tmp_path / "doc.md"
    doc.write_text("before\n<!-- privacy -->\nold\n<!-- /privacy -->\nafter\n")
    assert main([str(tmp_path), "--out", str(doc), "--img", str(tmp_path / "img" / "p.png")]) == 0
    assert (tmp_path / "img" / "p.png").is_file()
    new = doc.read_text()
    assert "old" not in new and "| eps-inf |" in new and "](img/p.png)" in new and new.endswith("after\n")


def test_a_config_without_dp_mode_in_its_config_takes_the_accountants(tmp_path):
    _run(tmp_path, "eps-4-s0", {"test_ndcg@10": 0.1, "test_hr@10": 0.2, "mia_auc": 0.5, "dp_epsilon": 4.0,
                                "privacy": {"mode": "local", "noise_multiplier": 1.0}})
    _run(tmp_path, "plain-s0", {"test_ndcg@10": 0.1, "test_hr@10": 0.2, "mia_auc": 0.5})
    text, _ = table(tmp_path)
    assert _cells(text, "eps-4")[1] == "local" and _cells(text, "plain")[1] == "off"


@pytest.fixture
def fleet(tmp_path):
    """A private-fleet-like sweep (central and distributed DP at epsilon ~4, secure aggregation
    alone) and a convergence sweep whose fedkd-c20 is the "no protection" reference."""
    conv = tmp_path / "convergence"
    planned = []
    for seed, ndcg, prec in ((0, 0.30, 0.97), (1, 0.32, 0.95)):
        for config in ("fedkd-c20", "fedavg-c20"):
            _run(conv / "runs", f"{config}-s{seed}", {"test_ndcg@10": ndcg, "test_hr@10": 0.5, "mia_auc": 0.54,
                                                      **_recon(prec)}, {"dp-mode": "off", "seed": seed})
            planned.append({"name": f"{config}-s{seed}", "config": config, "seed": seed})
    (conv / "sweep.json").write_text(json.dumps({"name": "convergence", "runs": planned}))

    fleet = tmp_path / "private-fleet"
    made = {}
    for seed in (0, 1):
        made[("central-eps4", seed)] = s = {
            "test_ndcg@10": 0.20 + 0.01 * seed, "test_hr@10": 0.4, "mia_auc": 0.52, **_recon(0.60 + 0.1 * seed),
            "dp_epsilon": 3.9 + 0.2 * seed, "privacy": {"mode": "central", "noise_multiplier": 1.2}}
        _run(fleet, f"central-eps4-s{seed}", s, {"dp-mode": "central", "secure-aggregation": False, "seed": seed})
        made[("distributed-eps4", seed)] = s = {
            "test_ndcg@10": 0.18 + 0.01 * seed, "test_hr@10": 0.4, "mia_auc": 0.51,
            **_recon(0.20 + 0.05 * seed, "round-sum"), "dp_epsilon": 4.0,
            "privacy": {"mode": "distributed", "noise_multiplier": 1.3}}
        _run(fleet, f"distributed-eps4-s{seed}", s,
             {"dp-mode": "distributed", "secure-aggregation": True, "seed": seed})
        made[("secagg", seed)] = s = {"test_ndcg@10": 0.31, "test_hr@10": 0.5, "mia_auc": 0.53,
                                      **_recon(0.40 + 0.02 * seed, "round-sum")}
        _run(fleet, f"secagg-s{seed}", s, {"dp-mode": "off", "secure-aggregation": True, "seed": seed})
    return fleet, conv, made


def test_rows_of_a_mixed_sweep_show_mode_epsilon_and_reconstruction(fleet):
    folder, conv, made = fleet
    text, points = table(folder, [f"{conv}:fedkd-c20=no-protection"])
    configs = [line.split(" | ")[0][2:] for line in text.splitlines()[2:]]
    assert configs == ["no-protection", "central-eps4", "distributed-eps4", "secagg"]  # fedavg-c20 not borrowed

    ref = _cells(text, "no-protection")
    assert ref[1:4] == ["off", "2/2", "off (no DP)"]
    assert ref[-2] == f"{np.mean([0.97, 0.95]):.4f} ± {np.std([0.97, 0.95], ddof=1):.4f}"  # 0.9600 ± 0.0141
    assert ref[-1] == "0.300 / 0.060"  # the attack's baselines: popularity / chance

    for config, mode, eps in (("central-eps4", "central", "4"), ("distributed-eps4", "distributed + SecAgg", "4"),
                              ("secagg", "off + SecAgg", "off (no DP)")):
        row = _cells(text, config)
        assert row[1:4] == [mode, "2/2", eps], row
        prec = [made[(config, s)]["reconstruction_attack"]["precision@k"] for s in (0, 1)]
        assert row[-2] == f"{np.mean(prec):.4f} ± {np.std(prec, ddof=1):.4f}", row
        assert row[-3] == f"{made[(config, 0)]['mia_auc']:.4f} ± 0.0000"

    by = {p["config"]: p for p in points}
    assert by["central-eps4"]["epsilon"] == pytest.approx(4.0) and by["central-eps4"]["mode"] == "central"
    assert by["distributed-eps4"]["secagg"] and by["no-protection"]["epsilon"] is None
    # plotted between the baselines: 0 = chance (0.06), 1 = popularity (0.3), 2 = perfect
    assert by["secagg"]["recon"].mean == pytest.approx(1 + (0.41 - 0.3) / 0.7)
    assert by["no-protection"]["recon"].std == pytest.approx(np.std([0.97, 0.95], ddof=1) / 0.7)
    assert by["distributed-eps4"]["recon"].mean == pytest.approx((0.225 - 0.06) / 0.24)  # below popularity


def test_the_plot_has_a_series_per_mode_and_references_as_lines(fleet, tmp_path, monkeypatch):
    folder, conv, _ = fleet
    seen = {}
    save = fedkd.plots.save_figure

    def spy(fig, path, **kw):
        seen["panels"] = [(ax.get_ylabel(), ax.get_legend_handles_labels()[1]) for ax in fig.axes]
        seen["ticks"] = [t.get_text() for t in fig.axes[0].get_xticklabels()]
        return save(fig, path, **kw)

    monkeypatch.setattr(fedkd.plots, "save_figure", spy)
    _run(folder, "local-eps8-s0", {"test_ndcg@10": 0.1, "test_hr@10": 0.2, "mia_auc": 0.5, **_recon(0.06),
                                   "dp_epsilon": 3.7, "privacy": {"mode": "local", "noise_multiplier": 7.0}},
         {"dp-mode": "local", "seed": 0})
    doc = tmp_path / "privacy.md"
    doc.write_text("# Privacy\n\n<!-- privacy -->\n<!-- /privacy -->\n")
    img = tmp_path / "img" / "private_fleet.png"
    assert main([str(folder), "--include", f"{conv}:fedkd-c20=no-protection", "--out", str(doc),
                 "--img", str(img)]) == 0
    assert img.is_file() and img.stat().st_size > 0
    assert [label for label, _ in seen["panels"]] == ["test NDCG@10 (full ranking)",
                                                      "membership-inference AUC (loss threshold)",
                                                      "history reconstruction, precision@|H| placed\n"
                                                      "between its baselines (linear in each stretch)"]
    for _, legend in seen["panels"]:
        assert sorted(legend) == ["central DP", "distributed DP", "local DP", "no-protection", "secagg"]
    assert seen["ticks"] == ["3.9"]  # local 3.7, central and distributed 4.0: one tick, their geometric mean
    new = doc.read_text()
    assert f"--include {conv}:fedkd-c20=no-protection --out {doc} --img {img}" in new
    assert "| no-protection | off | 2/2 |" in new and "](img/private_fleet.png)" in new


def test_a_section_fills_its_own_block_and_leaves_the_other_sweeps_table(fleet, tmp_path):
    folder, conv, _ = fleet
    doc = tmp_path / "privacy.md"
    doc.write_text("<!-- privacy -->\nold sweep's table\n<!-- /privacy -->\n\n"
                   "<!-- private-fleet -->\n(not run yet)\n<!-- /private-fleet -->\n")
    assert main([str(folder), "--include", f"{conv}:fedkd-c20=no-protection", "--out", str(doc),
                 "--section", "private-fleet", "--img", str(tmp_path / "p.png")]) == 0
    new = doc.read_text()
    assert "old sweep's table" in new and "(not run yet)" not in new
    assert "--section private-fleet" in new and new.index("| no-protection |") > new.index("<!-- private-fleet -->")


@pytest.mark.parametrize("spec, message", [
    ("no-colon", "expected SWEEP_FOLDER:CONFIG=NAME"),
    ("{conv}:fedkd-c20", "expected SWEEP_FOLDER:CONFIG=NAME"),
    ("{conv}:nope=no-protection", "has no runs of config 'nope'"),
    ("{conv}-missing:fedkd-c20=no-protection", "cannot read the sweep in"),
])
def test_a_bad_include_exits_with_a_clear_message(fleet, tmp_path, capsys, spec, message):
    folder, conv, _ = fleet
    img = tmp_path / "p.png"
    with pytest.raises(SystemExit, match=message) as exc:
        main([str(folder), "--include", spec.format(conv=conv), "--img", str(img)])
    assert "--include" in str(exc.value)
    assert not img.exists()  # nothing half-written


def test_the_teacher_and_popularity_are_what_a_private_student_must_beat(fleet):
    """Each run's summary carries the frozen teacher's and popularity's test NDCG@10 on its edge
    users; the report states their mean under the table and draws them on the NDCG panel only."""
    folder, conv, _ = fleet
    for i, run in enumerate(sorted(folder.glob("*-s*/summary.json"))):
        summary = json.loads(run.read_text())
        summary["references"] = {"teacher": {"test_ndcg": 0.05 + 0.01 * (i % 2)},
                                 "popularity": {"test_ndcg": 0.04}}
        run.write_text(json.dumps(summary))
    text, points = table(folder, [f"{conv}:fedkd-c20=no-protection"])
    assert text.rstrip().endswith("(mean over the 6 finished runs' summaries): teacher (no device data) "
                                  "0.0550, popularity 0.0400.")
    refs = {p["config"]: p for p in points if p["mode"] == "-"}
    assert refs["teacher (no device data)"]["ndcg"].mean == pytest.approx(0.055)
    assert refs["popularity"]["auc"] is None and refs["popularity"]["recon"] is None


def _per_user(run_dir, ndcg):
    (run_dir / "test_per_client.csv").write_text("partition_id,tier,width,count,hr_sum,ndcg_sum\n" + "".join(
        f"{user},0,16,1,0.0,{value}\n" for user, value in enumerate(ndcg)))


def test_differences_are_paired_per_user_within_the_seeds_both_configs_finished(fleet):
    """Each guarantee against no protection, and distributed and local DP against the central DP
    config of the nearest reported epsilon (within 10%); pairing per user removes the spread
    between users (0.1 to 0.5 here) that an unpaired comparison would carry, and a seed one
    config lacks is not paired."""
    folder, conv, _ = fleet
    users = np.linspace(0.1, 0.5, 40)
    jitter = np.where(np.arange(40) % 2, 0.02, -0.02)
    for seed in (0, 1):
        _per_user(conv / "runs" / f"fedkd-c20-s{seed}", users)
        _per_user(folder / f"central-eps4-s{seed}", users - 0.1 + jitter)
        _per_user(folder / f"secagg-s{seed}", users)
    _per_user(folder / "distributed-eps4-s0", users - 0.13)  # seed 1 has no per-user file
    for name, eps in (("local-eps8", 3.7), ("local-eps4", 1.9)):  # local DP lands below its target
        _run(folder, f"{name}-s0", {"test_ndcg@10": 0.1, "test_hr@10": 0.2, "mia_auc": 0.5, "dp_epsilon": eps,
                                    "privacy": {"mode": "local", "noise_multiplier": 7.0}},
             {"dp-mode": "local", "seed": 0})
        _per_user(folder / f"{name}-s0", users - 0.2)
    text, _ = table(folder, [f"{conv}:fedkd-c20=no-protection"])
    rows = {cells[0]: cells[1:] for line in text.splitlines() if " − " in line
            for cells in [[c.strip() for c in line.strip("|").split(" | ")]]}
    assert set(rows) == {"central-eps4 − no-protection", "distributed-eps4 − no-protection",
                         "secagg − no-protection", "local-eps8 − no-protection", "local-eps4 − no-protection",
                         "distributed-eps4 − central-eps4", "local-eps8 − central-eps4"}  # 1.9: no central near
    eps, seeds, diff, interval = rows["central-eps4 − no-protection"]
    lo, hi = (float(x) for x in interval.strip("[]").split(", "))
    assert (eps, seeds, diff) == ("4", "0, 1", "-0.1000") and lo < -0.1 < hi and hi - lo < 0.02
    assert rows["secagg − no-protection"] == ["off", "0, 1", "+0.0000", "[+0.0000, +0.0000]"]
    assert rows["distributed-eps4 − no-protection"][:3] == ["4", "0", "-0.1300"]
    assert rows["distributed-eps4 − central-eps4"][:3] == ["4 vs 4", "0", "-0.0300"]
    assert rows["local-eps8 − central-eps4"][:3] == ["3.7 vs 4", "0", "-0.1000"]
