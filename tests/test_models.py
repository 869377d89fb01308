"""Contract of the recommenders: shapes, padding invariance, wire-stable float state."""

from __future__ import annotations

import pytest
import torch

from fedkd.models import MeanPool, ModelConfig, SASRec, build_model, num_parameters

N = 30
KINDS = ["sasrec", "meanpool"]


def cfg(kind: str, **kw) -> ModelConfig:
    return ModelConfig(**{"kind": kind, "num_items": N, "dim": 8, "blocks": 2, "heads": 2, "max_len": 12,
                          "dropout": 0.3, **kw})


HIST = torch.tensor([[0, 0, 0, 4, 9, 2, 7], [0, 0, 0, 0, 0, 0, 5], [1, 2, 3, 4, 5, 6, 7]])  # (3, 7)


@pytest.mark.parametrize("kind", KINDS)
def test_shape_and_padding_column_never_ranked(kind):
    model = build_model(cfg(kind)).eval()
    out = model(HIST)
    assert out.shape == (3, N + 1) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert (out[:, 0] < out[:, 1:].min(dim=1).values - 1e30).all()
    assert torch.softmax(out, dim=1)[:, 0].max() == 0.0


@pytest.mark.parametrize("kind", KINDS)
def test_left_padding_does_not_change_output(kind):
    model = build_model(cfg(kind)).eval()
    more = torch.cat([torch.zeros(3, 5, dtype=torch.long), HIST], dim=1)  # (3, 12) = max_len
    torch.testing.assert_close(model(more), model(HIST), rtol=0, atol=1e-5)
    # each row alone (no batch neighbours) gives the same row as in the batch
    torch.testing.assert_close(model(HIST[1:2, -1:]), model(HIST)[1:2], rtol=0, atol=1e-5)


def test_sasrec_uses_order_and_only_the_last_max_len_items():
    model = build_model(cfg("sasrec")).eval()
    swapped = HIST[:, [0, 1, 2, 3, 4, 6, 5]]
    assert not torch.allclose(model(swapped)[2], model(HIST)[2])
    longer = torch.cat([torch.full((3, 4), 11), HIST, HIST[:, -5:]], dim=1)  # (3, 16)
    torch.testing.assert_close(model(longer), model(longer[:, -12:]))


@pytest.mark.parametrize("kind", KINDS)
def test_all_padding_history_is_finite_in_train_and_eval(kind):
    model = build_model(cfg(kind))
    empty = torch.zeros(4, 12, dtype=torch.long)
    for mode in (True, False):
        out = model.train(mode)(empty)
        assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_is_float_only_and_seeded(kind):
    a, b, c = build_model(cfg(kind), seed=3), build_model(cfg(kind), seed=3), build_model(cfg(kind), seed=4)
    assert all(t.is_floating_point() for t in a.state_dict().values())
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.state_dict()["item_emb.weight"], c.state_dict()["item_emb.weight"])
    assert torch.count_nonzero(a.state_dict()["item_emb.weight"][0]) == 0  # padding row


def test_build_model_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model(cfg("sasrec"), seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_parameter_names_are_stable():  # they are the keys on the wire
    names = list(build_model(cfg("sasrec", blocks=1)).state_dict())
    assert names == ["item_emb.weight", "pos_emb.weight", "blocks.0.ln1.weight", "blocks.0.ln1.bias",
                     "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight",
                     "blocks.0.attn.proj.bias", "blocks.0.ln2.weight", "blocks.0.ln2.bias",
                     "blocks.0.ffn.0.weight", "blocks.0.ffn.0.bias", "blocks.0.ffn.2.weight",
                     "blocks.0.ffn.2.bias", "ln_f.weight", "ln_f.bias"]
    assert list(build_model(cfg("meanpool")).state_dict()) == ["item_emb.weight", "proj.weight", "proj.bias"]


def test_num_parameters_by_hand():
    # meanpool: (N+1)*D item table + D*D + D projection
    assert num_parameters(build_model(cfg("meanpool"))) == 31 * 8 + 8 * 8 + 8
    # sasrec, 1 block, D=8, max_len=12: items 248, positions 96, 3 LayerNorms 48,
    # qkv 8*24+24, proj 8*8+8, ffn 2*(8*8+8)
    assert num_parameters(build_model(cfg("sasrec", blocks=1))) == 248 + 96 + 48 + 216 + 72 + 144


def test_build_model_types():
    assert isinstance(build_model(cfg("sasrec")), SASRec)
    assert isinstance(build_model(cfg("meanpool")), MeanPool)


@pytest.mark.parametrize("bad", [dict(num_items=0), dict(dim=10, heads=3), dict(kind="gru"), dict(dropout=1.0),
                                 dict(max_len=0), dict(blocks=-1)])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        ModelConfig(**{"kind": "sasrec", "num_items": N, "dim": 8, "heads": 2, **bad})


def test_meanpool_ignores_heads():
    ModelConfig(kind="meanpool", num_items=5, dim=10, heads=3)
