"""Edge exports (fedkd.export): the exported top-k is the PyTorch model's top-k, masking and
padding behave like the model, int8 stays close to fp32, and a device refuses the wrong file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from fedkd.export import Recommender, export_onnx, export_torchscript, read_sidecar, sidecar_path  # noqa: E402
from fedkd.local import get_state  # noqa: E402
from fedkd.models import ModelConfig, build_model  # noqa: E402

N, L, K, TOL = 500, 20, 10, 1e-5
KINDS = ["sasrec", "meanpool"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Per kind: (model, {fmt: path}) with fmt in pt | onnx | int8."""
    out = {}
    for kind in KINDS:
        cfg = ModelConfig(kind=kind, num_items=N, dim=16, blocks=1, heads=1, max_len=L, dropout=0.2)
        model = build_model(cfg, seed=3)
        with torch.no_grad():  # spread the scores like a trained model's (init logits are all near 0)
            model.item_emb.weight.mul_(3.0)
        model.eval()
        d = tmp_path_factory.mktemp(kind)
        export_torchscript(model, d / "m.pt", max_len=L)
        export_onnx(model, d / "m.onnx", max_len=L)
        export_onnx(model, d / "m.int8.onnx", max_len=L, int8=True)
        out[kind] = (model, {"pt": d / "m.pt", "onnx": d / "m.onnx", "int8": d / "m.int8.onnx"})
    return out


def histories(n: int, width: int, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """(n, width) left-padded histories of random lengths, and each row's seen items (the row's
    items plus some older ones that fell out of the window)."""
    rng = np.random.default_rng(seed)
    hist = rng.integers(1, N + 1, size=(n, width))
    lengths = rng.integers(1, width + 1, size=n)  # an empty history ties every item (scores 0 at init)
    hist[np.arange(width)[None, :] < (width - lengths)[:, None]] = 0
    seen = [np.concatenate([h[h > 0], rng.integers(1, N + 1, size=rng.integers(0, 30))]) for h in hist]
    return hist, seen


def reference(model, hist: np.ndarray, seen: list[np.ndarray] | None) -> np.ndarray:
    """(B, N + 1) PyTorch scores with the seen items and the padding column at -inf."""
    with torch.no_grad():
        scores = model(torch.from_numpy(hist)).numpy().astype(np.float64)
    for i, s in enumerate(seen or []):
        scores[i, s] = -np.inf
    scores[:, 0] = -np.inf
    return scores


def ref_topk(scores: np.ndarray, k: int = K) -> np.ndarray:
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def assert_topk_matches(scores: np.ndarray, ids: np.ndarray, got_scores: np.ndarray) -> int:
    """Exported top-k == PyTorch top-k, except where PyTorch's scores tie within TOL; returns the
    number of rows that differ (only by such ties)."""
    want = ref_topk(scores, ids.shape[1])
    rows = np.arange(len(ids))[:, None]
    want_scores = scores[rows, want]
    np.testing.assert_allclose(got_scores, want_scores, atol=TOL, rtol=0)  # the graph's own scores
    differ = ids != want
    if differ.any():
        # at every differing position the PyTorch model scores the exported item like its own
        gap = np.abs(scores[rows, ids] - want_scores)[differ]
        assert np.isfinite(gap).all() and gap.max() <= TOL, f"non-tied difference: gap {gap.max()}"
    return int(differ.any(1).sum())


# --- fidelity ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["pt", "onnx"])
@pytest.mark.parametrize("kind", KINDS)
def test_fp32_exports_reproduce_pytorch_topk(exported, kind, fmt):
    model, paths = exported[kind]
    rec = Recommender(paths[fmt])
    hist, seen = histories(300, L, seed=1)
    ids, got = rec.topk(hist, K, seen)
    assert ids.shape == (300, K) and ids.dtype == np.int64
    differing = assert_topk_matches(reference(model, hist, seen), ids, got)
    assert differing <= 3  # ties within 1e-5 are rare with spread scores


def test_tie_check_catches_a_wrong_list(exported):
    """The tolerance check above is not vacuous: swapping two untied items fails it."""
    model, paths = exported["sasrec"]
    hist, seen = histories(20, L, seed=2)
    scores = reference(model, hist, seen)
    ids = ref_topk(scores)
    got = scores[np.arange(20)[:, None], ids].astype(np.float32)
    bad = ids.copy()
    bad[:, [0, 1]] = bad[:, [1, 0]]
    with pytest.raises(AssertionError):
        assert_topk_matches(scores, bad, got)


@pytest.mark.parametrize("kind", KINDS)
def test_int8_overlaps_fp32_and_is_smaller(exported, kind):
    _, paths = exported[kind]
    fp32, int8 = Recommender(paths["onnx"]), Recommender(paths["int8"])
    assert int8.meta["precision"] == "int8" and fp32.meta["precision"] == "fp32"
    hist, seen = histories(300, L, seed=3)
    a, b = fp32.recommend_batch(hist, K, seen), int8.recommend_batch(hist, K, seen)
    overlap = np.mean([len(set(x) & set(y)) for x, y in zip(a.tolist(), b.tolist())]) / K
    # measured 0.98-0.99 for both kinds (a random top-10 of 500 items overlaps ~0.02)
    assert overlap >= 0.9, overlap
    assert (a[:, 0] == b[:, 0]).mean() >= 0.8  # the first item is nearly always kept
    assert paths["int8"].stat().st_size < 0.9 * paths["onnx"].stat().st_size


def test_state_dict_export_equals_module_export(exported, tmp_path):
    model, paths = exported["sasrec"]
    export_onnx(get_state(model), tmp_path / "s.onnx", config=model.cfg)
    hist, seen = histories(50, L, seed=4)
    np.testing.assert_array_equal(Recommender(tmp_path / "s.onnx").recommend_batch(hist, K, seen),
                                  Recommender(paths["onnx"]).recommend_batch(hist, K, seen))


# --- masking and padding ----------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["pt", "onnx", "int8"])
def test_seen_items_are_never_recommended(exported, fmt):
    model, paths = exported["sasrec"]
    rec = Recommender(paths[fmt])
    rng = np.random.default_rng(5)
    history = rng.choice(np.arange(1, N + 1), size=3 * L, replace=False).tolist()  # longer than the window
    out = rec.recommend(history, k=K)
    assert len(out) == K and not set(out) & set(history)  # old items outside the window too
    # exclude_seen=False: the unmasked top-k of the window
    hist_row = np.array(history[-L:])[None, :]
    plain = rec.recommend(history, k=K, exclude_seen=False)
    if fmt != "int8":
        assert plain == ref_topk(reference(model, hist_row, None))[0].tolist()
    # explicit seen lists on a batch: exactly those items disappear, the rest moves up
    top = rec.recommend_batch(hist_row, K)[0]
    masked = rec.recommend_batch(hist_row, K, seen=[top[:3]])[0]
    assert not set(masked) & set(top[:3].tolist())
    assert masked[:K - 3].tolist() == top[3:].tolist()


def test_all_items_seen_leaves_nothing(exported):
    _, paths = exported["meanpool"]
    rec = Recommender(paths["onnx"])
    everything = list(range(1, N + 1))
    assert rec.recommend(everything, k=K) == []
    left = rec.recommend(everything[:-2], k=K)
    assert sorted(left) == [N - 1, N]
    batch = rec.recommend_batch(np.array([[1, 2]]), k=3, seen=[np.arange(1, N - 1)])[0]
    assert sorted(batch.tolist()) == [0, N - 1, N] and batch[-1] == 0  # 0 = no item left


@pytest.mark.parametrize("fmt", ["pt", "onnx"])
@pytest.mark.parametrize("kind", KINDS)
def test_long_and_short_histories_behave_like_the_model(exported, kind, fmt):
    model, paths = exported[kind]
    rec = Recommender(paths[fmt])
    long_hist, _ = histories(40, 3 * L, seed=6)  # the model itself keeps the last L columns
    ids, got = rec.topk(long_hist, K)
    assert_topk_matches(reference(model, long_hist, None), ids, got)
    short, _ = histories(40, 5, seed=7)  # left-padded to L by the recommender; the model takes (B, 5) as is
    ids, got = rec.topk(short, K)
    assert_topk_matches(reference(model, short, None), ids, got)
    # single history: a list longer than the window == its last L items
    h = long_hist[0][long_hist[0] > 0].tolist() + list(range(1, 2 * L))
    assert rec.recommend(h, exclude_seen=False) == rec.recommend(h[-L:], exclude_seen=False)
    assert len(rec.recommend([], k=K)) == K  # cold start: nothing to exclude, still K items


# --- input errors -----------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["pt", "onnx"])
def test_unknown_item_ids_raise(exported, fmt):
    rec = Recommender(exported["sasrec"][1][fmt])
    for bad in ([N + 1], [0], [-3], [1, 2, N + 7]):
        with pytest.raises(ValueError, match="unknown item id"):
            rec.recommend(bad)
    with pytest.raises(ValueError, match="unknown item id"):
        rec.recommend_batch(np.array([[0, 1, N + 1]]))
    with pytest.raises(ValueError, match="unknown item id"):
        rec.recommend_batch(np.array([[0, 1, 2]]), seen=[[N + 1]])
    with pytest.raises(ValueError, match="integer"):
        rec.recommend([1.5, 2.0])
    for k in (0, N + 1):
        with pytest.raises(ValueError, match="k must be"):
            rec.recommend([1, 2], k=k)


# --- file integrity ---------------------------------------------------------------------

def copy_export(src: Path, dst_dir: Path) -> Path:
    dst = dst_dir / src.name
    shutil.copy(src, dst)
    shutil.copy(sidecar_path(src), sidecar_path(dst))
    return dst


@pytest.mark.parametrize("fmt", ["pt", "onnx"])
def test_sidecar_refuses_tampered_file(exported, tmp_path, fmt):
    path = copy_export(exported["sasrec"][1][fmt], tmp_path)
    Recommender(path)  # the untouched copy loads
    meta = read_sidecar(path)
    assert meta["sha256"] and meta["num_items"] == N and meta["max_len"] == L and meta["dim"] == 16
    assert meta["size_bytes"] == path.stat().st_size and meta["created"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        Recommender(path)


def test_sidecar_refuses_swapped_model_and_wrong_shapes(exported, tmp_path):
    a = copy_export(exported["sasrec"][1]["onnx"], tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    b = copy_export(exported["meanpool"][1]["onnx"], other)
    shutil.copy(b, a)  # another model's file under this sidecar
    with pytest.raises(ValueError, match="sha256"):
        Recommender(a)
    # a sidecar whose sha256 is right but whose shapes are not
    meta = json.loads(sidecar_path(b).read_text())
    sidecar_path(b).write_text(json.dumps({**meta, "num_items": N - 1}))
    with pytest.raises(ValueError, match="num_items"):
        Recommender(b)


def test_probe_catches_a_graph_with_another_item_table(exported, tmp_path):
    """Metadata that lies consistently (file and sidecar) is still caught by the probe."""
    model, _ = exported["meanpool"]
    lie = ModelConfig(kind="meanpool", num_items=N - 1, dim=16, max_len=L)
    export_onnx(model, tmp_path / "lie.onnx", config=lie)
    with pytest.raises(ValueError, match="mismatched item table"):
        Recommender(tmp_path / "lie.onnx")


def test_empty_missing_and_misnamed_files(exported, tmp_path):
    path = copy_export(exported["sasrec"][1]["onnx"], tmp_path)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        Recommender(path)
    with pytest.raises(ValueError, match="no such"):
        Recommender(tmp_path / "absent.onnx")
    lone = tmp_path / "lone.onnx"
    shutil.copy(exported["sasrec"][1]["onnx"], lone)
    with pytest.raises(ValueError, match="sidecar"):
        Recommender(lone)
    with pytest.raises(ValueError, match="format"):
        Recommender(copy_export(exported["sasrec"][1]["pt"], tmp_path).rename(tmp_path / "m.bin"))


def test_onnx_serving_imports_no_torch_and_no_flower(exported):
    path = exported["sasrec"][1]["onnx"]
    code = ("import sys; from fedkd.export import Recommender; "
            f"r = Recommender({str(path)!r}); out = r.recommend([1, 2, 3], k=5); assert len(out) == 5, out; "
            "bad = [m for m in ('torch', 'flwr', 'fedkd.train', 'fedkd.models') if m in sys.modules]; "
            "assert not bad, bad")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
