"""Nested width tiers: one definition of the nesting, exact round trips, HeteroFL averaging."""

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedkd import nested
from fedkd.aggregate import apply_update, weighted_mean
from fedkd.codec import layout_of
from fedkd.local import get_state, set_state
from fedkd.metrics import evaluate_ranking
from fedkd.models import CausalSelfAttention, ModelConfig, build_model
from fedkd.train import train_step

N, L, D = 12, 6, 16
CFGS = {
    "sasrec-1b-1h": ModelConfig(kind="sasrec", num_items=N, dim=D, blocks=1, heads=1, max_len=L),
    "sasrec-2b-2h": ModelConfig(kind="sasrec", num_items=N, dim=D, blocks=2, heads=2, max_len=L),
    "sasrec-1b-4h": ModelConfig(kind="sasrec", num_items=N, dim=D, blocks=1, heads=4, max_len=L),
    "meanpool": ModelConfig(kind="meanpool", num_items=N, dim=D, max_len=L),
}
WIDTHS = (4, 8, 16)


def _random_state(layout, seed):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in layout.items()}


def _full_state(cfg, seed=0):
    return _random_state(layout_of(get_state(build_model(cfg, seed=0))), seed)


@pytest.mark.parametrize("name", CFGS)
@pytest.mark.parametrize("width", WIDTHS)
def test_slice_of_embed_is_the_sub_state_exactly(name, width):
    cfg = CFGS[name]
    sub_model_layout = layout_of(get_state(build_model(nested.sub_config(cfg, width))))
    assert nested.sub_layout(cfg, width) == sub_model_layout
    sub = _random_state(sub_model_layout, seed=width)
    arrays, masks = nested.embed(sub, cfg, width)
    assert layout_of(arrays) == layout_of(get_state(build_model(cfg)))
    back = nested.slice_state(arrays, cfg, width)
    assert list(back) == list(sub)
    for k in sub:
        assert back[k].dtype == np.float32 and np.array_equal(back[k], sub[k]), k
        assert masks[k].sum() == sub[k].size, k  # the slice is one-to-one on what it covers
        assert np.count_nonzero(arrays[k]) == np.count_nonzero(sub[k]), k  # zeros outside


@pytest.mark.parametrize("name", CFGS)
def test_embed_of_slice_keeps_covered_entries_and_zeros_the_rest(name):
    cfg = CFGS[name]
    full = _full_state(cfg)
    prev = None
    for width in WIDTHS:
        arrays, masks = nested.embed(nested.slice_state(full, cfg, width), cfg, width)
        assert all(np.array_equal(masks[k], m) for k, m in nested.coverage(cfg, width).items())
        for k in full:
            assert np.array_equal(arrays[k][masks[k]], full[k][masks[k]]), k
            assert not arrays[k][~masks[k]].any(), k
            if prev is not None:  # nested: width 4 ⊂ width 8 ⊂ width 16
                assert not (prev[k] & ~masks[k]).any(), k
                assert masks[k].sum() >= prev[k].sum()
        prev = masks
    assert all(m.all() for m in prev.values())  # full width covers everything


def test_masks_grow_strictly_where_the_width_axes_are():
    cfg = CFGS["sasrec-2b-2h"]
    m4, m8 = nested.coverage(cfg, 4), nested.coverage(cfg, 8)
    assert m4["item_emb.weight"].sum() == (N + 1) * 4 and m8["item_emb.weight"].sum() == (N + 1) * 8
    assert m4["blocks.1.attn.qkv.weight"].sum() == 3 * 4 * 4
    assert m8["blocks.0.ffn.0.weight"].sum() == 64


def test_head_wise_indices_by_hand():
    cfg = ModelConfig(num_items=3, dim=8, heads=2, max_len=4)  # Dh = 4; width 4 keeps 2 dims per head
    idx = nested.index_map(cfg, 4)
    q, k, v = [0, 1, 4, 5], [8, 9, 12, 13], [16, 17, 20, 21]
    assert idx["blocks.0.attn.qkv.weight"][0].tolist() == q + k + v
    assert idx["blocks.0.attn.qkv.weight"][1].tolist() == [0, 1, 2, 3]
    assert idx["blocks.0.attn.qkv.bias"][0].tolist() == q + k + v
    assert idx["blocks.0.attn.proj.weight"][0].tolist() == [0, 1, 2, 3]  # output rows: residual
    assert idx["blocks.0.attn.proj.weight"][1].tolist() == [0, 1, 4, 5]  # input cols: head-major
    assert idx["item_emb.weight"][0].tolist() == list(range(4))  # all N + 1 rows
    with pytest.raises(ValueError):  # nobody may edit the one definition
        idx["blocks.0.attn.qkv.bias"][0][0] = 7


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_narrow_attention_is_the_wide_one_restricted_to_its_sub_heads(heads):
    """The narrow heads are sub-heads of the wide ones: wide attention whose weights are the
    embedded narrow ones (q rescaled for 1/sqrt(head_dim)) maps zero-padded inputs to the
    narrow output, zero-padded. A contiguous (non head-wise) cut fails this for heads > 1."""
    wide_cfg = ModelConfig(num_items=3, dim=16, heads=heads, max_len=5, dropout=0.0)
    width = 8
    narrow = CausalSelfAttention(nested.sub_config(wide_cfg, width)).eval()
    wide = CausalSelfAttention(wide_cfg).eval()
    idx = nested.index_map(wide_cfg, width)  # the SASRec names of these weights: blocks.0.attn.*
    full = {}
    for k, v in narrow.state_dict().items():
        full[k] = np.zeros(tuple(wide.state_dict()[k].shape), np.float32)
        full[k][np.ix_(*idx[f"blocks.0.attn.{k}"])] = v.numpy()
    rescale = math.sqrt((16 // heads) / (width // heads))
    full["qkv.weight"][:16] *= rescale
    full["qkv.bias"][:16] *= rescale
    wide.load_state_dict({k: torch.from_numpy(v) for k, v in full.items()})
    x = torch.randn(3, 5, width)
    mask = torch.zeros(3, 1, 5, 5).masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), -1e9)
    with torch.no_grad():
        y_narrow = narrow(x, mask)
        y_wide = wide(torch.cat([x, torch.zeros(3, 5, 16 - width)], -1), mask)
    torch.testing.assert_close(y_wide[..., :width], y_narrow, rtol=1e-5, atol=1e-5)
    assert not y_wide[..., width:].any()


@pytest.mark.parametrize("name", CFGS)
@pytest.mark.parametrize("width", WIDTHS)
def test_sliced_state_loads_strictly_into_the_narrow_model_and_runs(name, width):
    cfg = CFGS[name]
    full = _full_state(cfg)
    model = nested.build_sub_model(cfg, width, full_state=full)
    assert model.cfg == dataclasses.replace(cfg, dim=width)
    loaded = get_state(model)
    assert all(np.array_equal(loaded[k], v) for k, v in nested.slice_state(full, cfg, width).items())
    hist = torch.from_numpy(np.random.default_rng(0).integers(0, N + 1, (5, L)))
    hist[0] = 0  # an all-padding history too
    with torch.no_grad():
        logits = model(hist)
    assert logits.shape == (5, N + 1) and torch.isfinite(logits).all()
    fresh = nested.build_sub_model(cfg, width, seed=3)  # unloaded: a fresh narrow student
    assert layout_of(get_state(fresh)) == nested.sub_layout(cfg, width)


@pytest.mark.parametrize("name", CFGS)
def test_full_width_is_the_identity(name):
    cfg = CFGS[name]
    full = _full_state(cfg)
    same = nested.slice_state(full, cfg, D)
    assert list(same) == list(full) and all(np.array_equal(same[k], full[k]) for k in full)
    arrays, masks = nested.embed(full, cfg, D)
    assert all(np.array_equal(arrays[k], full[k]) and masks[k].all() for k in full)
    assert nested.sub_config(cfg, D) == cfg


@pytest.mark.parametrize("width", [0, -4, 17, 6, 4.0, True])
def test_bad_widths_are_refused(width):
    with pytest.raises(ValueError, match="width"):
        nested.index_map(CFGS["sasrec-1b-4h"], width)  # 6 is not a multiple of 4 heads


def test_meanpool_needs_no_head_divisibility():
    cfg = CFGS["meanpool"]
    assert nested.sub_layout(cfg, 5)["proj.weight"] == (5, 5)


def test_wrong_shapes_and_keys_are_refused():
    cfg = CFGS["sasrec-1b-1h"]
    full = _full_state(cfg)
    with pytest.raises(ValueError, match="full shape"):
        nested.slice_state(nested.slice_state(full, cfg, 8), cfg, 4)  # a narrow state is not a full one
    with pytest.raises(ValueError, match="expects shape"):
        nested.embed(nested.slice_state(full, cfg, 8), cfg, 4)
    with pytest.raises(ValueError, match="missing"):
        nested.slice_state({k: v for k, v in full.items() if k != "ln_f.bias"}, cfg, 8)


def test_nested_mean_by_hand_two_tiers():
    cfg = ModelConfig(kind="meanpool", num_items=2, dim=8, max_len=4)
    rng = np.random.default_rng(0)
    ua = {k: rng.normal(size=s).astype(np.float32) for k, s in nested.sub_layout(cfg, 4).items()}
    ub = {k: rng.normal(size=s).astype(np.float32) for k, s in nested.sub_layout(cfg, 8).items()}
    out = nested.nested_mean([(4, ua), (8, ub)], [1.0, 3.0], cfg)
    emb, pw, pb = out["item_emb.weight"], out["proj.weight"], out["proj.bias"]
    for r in range(3):
        for c in range(8):
            want = (ua["item_emb.weight"][r, c] + 3 * ub["item_emb.weight"][r, c]) / 4 if c < 4 \
                else ub["item_emb.weight"][r, c]
            assert emb[r, c] == pytest.approx(want, rel=1e-6, abs=1e-7)
    for i in range(8):
        want = (ua["proj.bias"][i] + 3 * ub["proj.bias"][i]) / 4 if i < 4 else ub["proj.bias"][i]
        assert pb[i] == pytest.approx(want, rel=1e-6, abs=1e-7)
        for j in range(8):
            want = (ua["proj.weight"][i, j] + 3 * ub["proj.weight"][i, j]) / 4 if i < 4 and j < 4 \
                else ub["proj.weight"][i, j]
            assert pw[i, j] == pytest.approx(want, rel=1e-6, abs=1e-7)
    assert all(v.dtype == np.float32 for v in out.values())


def test_nested_mean_leaves_uncovered_entries_at_zero():
    cfg = ModelConfig(kind="meanpool", num_items=2, dim=16, max_len=4)
    ua = {k: np.ones(s, np.float32) for k, s in nested.sub_layout(cfg, 4).items()}
    ub = {k: np.full(s, 5.0, np.float32) for k, s in nested.sub_layout(cfg, 8).items()}
    out = nested.nested_mean([(8, ub), (4, ua)], [3.0, 1.0], cfg)
    w = out["proj.weight"]
    assert np.all(w[:4, :4] == 4.0) and np.all(w[:8, 4:8] == 5.0) and np.all(w[4:8, :8] == 5.0)
    assert not w[8:].any() and not w[:, 8:].any()
    assert np.all(out["item_emb.weight"][:, :4] == 4.0) and not out["item_emb.weight"][:, 8:].any()
    # a ring whose covering clients all weigh 0 gets no update either
    out0 = nested.nested_mean([(8, ub), (4, ua)], [0.0, 1.0], cfg)
    assert np.all(out0["proj.bias"][:4] == 1.0) and not out0["proj.bias"][4:].any()


@pytest.mark.parametrize("name", CFGS)
def test_nested_mean_at_full_width_is_weighted_mean_exactly(name):
    cfg = CFGS[name]
    layout = layout_of(get_state(build_model(cfg)))
    ups = [_random_state(layout, seed) for seed in range(5)]
    weights = [3.0, 1.0, 7.0, 0.5, 2.0]
    got = nested.nested_mean([(D, u) for u in ups], weights, cfg)
    want = weighted_mean(ups, weights)
    assert list(got) == list(want)
    assert all(got[k].dtype == np.float32 and np.array_equal(got[k], want[k]) for k in want)


def test_nested_mean_does_not_depend_on_client_order():
    cfg = CFGS["sasrec-2b-2h"]
    clients = [(w, _random_state(nested.sub_layout(cfg, w), seed)) for seed, w in enumerate([4, 16, 8, 4, 8, 16])]
    weights = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    a = nested.nested_mean(clients, weights, cfg)
    perm = [5, 2, 0, 4, 1, 3]
    b = nested.nested_mean([clients[i] for i in perm], [weights[i] for i in perm], cfg)
    for k in a:  # float64 accumulation: at most float32 rounding apart
        np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_nested_mean_refuses_bad_input():
    cfg = CFGS["meanpool"]
    u = _random_state(nested.sub_layout(cfg, 8), 0)
    with pytest.raises(ValueError):
        nested.nested_mean([], [], cfg)
    with pytest.raises(ValueError, match="weights"):
        nested.nested_mean([(8, u)], [1.0, 2.0], cfg)
    with pytest.raises(ValueError, match="weights"):
        nested.nested_mean([(8, u)], [-1.0], cfg)
    with pytest.raises(ValueError, match="expects shape"):
        nested.nested_mean([(4, u)], [1.0], cfg)


def test_distillation_trains_every_tier_and_aggregates_into_the_global_student():
    cfg = dataclasses.replace(CFGS["sasrec-2b-2h"], dropout=0.0)
    glob = get_state(build_model(cfg, seed=0))
    rng = np.random.default_rng(0)
    hist = torch.from_numpy(rng.integers(1, N + 1, (8, L)))
    target = torch.from_numpy(rng.integers(1, N + 1, 8))
    kd = (hist, torch.from_numpy(rng.integers(1, N + 1, (8, 3))), torch.full((8, 3), 0.2))
    updates = []
    for width in WIDTHS:
        model = nested.build_sub_model(cfg, width, full_state=glob)
        before = get_state(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = train_step(model, opt, hist, target, kd=kd, kd_weight=1.0, temperature=2.0)
        assert math.isfinite(loss)
        after = get_state(model)
        assert any(not np.array_equal(before[k], after[k]) for k in after)
        updates.append((width, {k: after[k] - before[k] for k in after}))
    new = apply_update(glob, nested.nested_mean(updates, [1.0, 1.0, 1.0], cfg), 1.0)
    assert layout_of(new) == layout_of(glob)
    changed = {k for k in glob if not np.array_equal(new[k], glob[k])}
    assert "blocks.1.attn.qkv.weight" in changed and "ln_f.weight" in changed
    # apply only the width-4 client's update: nothing outside its coverage may move
    only4 = apply_update(glob, nested.nested_mean(updates[:1], [1.0], cfg), 1.0)
    cov = nested.coverage(cfg, 4)
    assert all(np.array_equal(only4[k][~cov[k]], glob[k][~cov[k]]) for k in glob)


@dataclass(frozen=True)
class _Ev:
    histories: np.ndarray
    targets: np.ndarray
    seen: tuple
    users: np.ndarray


def _successor_task(users=120, length=6, n=30, max_len=6):
    """Item i is followed by i + 1 (mod n); last item held out."""
    starts = np.random.default_rng(0).integers(0, n, users)
    seqs = [(s + np.arange(length)) % n + 1 for s in starts]

    def pad(seq):
        out = np.zeros(max_len, np.int64)
        out[max_len - len(seq):] = seq[-max_len:]
        return out

    hists = [pad(s[:t]) for s in seqs for t in range(1, length - 1)]
    targets = [s[t] for s in seqs for t in range(1, length - 1)]
    ev = _Ev(np.stack([pad(s[:-1]) for s in seqs]), np.array([s[-1] for s in seqs]),
             tuple(s[:-1] for s in seqs), np.arange(users))
    return (torch.from_numpy(np.stack(hists)), torch.tensor(targets)), ev


def test_slices_of_a_trained_student_rank_sanely():
    n = 30
    (hist, target), ev = _successor_task(n=n)
    cfg = ModelConfig(num_items=n, dim=16, blocks=1, heads=2, max_len=6, dropout=0.0)
    model = build_model(cfg, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for step in range(60):
        idx = torch.randint(0, len(target), (64,))
        opt.zero_grad()
        F.cross_entropy(model(hist[idx]), target[idx]).backward()
        opt.step()
    full_state = get_state(model)
    full = evaluate_ranking(model, ev).ndcg
    assert full > 0.5  # the task is learnable in this budget
    for width in (8, 4):
        narrow = nested.build_sub_model(cfg, width, full_state=full_state)
        res = evaluate_ranking(narrow, ev)
        untrained = evaluate_ranking(build_model(nested.sub_config(cfg, width), seed=1), ev).ndcg
        assert res.n == len(ev.targets) and np.isfinite(res.per_user_ndcg).all()
        assert untrained < res.ndcg < full, (width, untrained, res.ndcg, full)
    set_state(model, full_state)  # the global model is untouched by slicing
    assert evaluate_ranking(model, ev).ndcg == full
