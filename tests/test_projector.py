"""Projectors: lengths, padding invariance, causality. Run: python -m pytest -q tests/test_projector.py"""
import math

import pytest
import torch

from speechllm.projector import KINDS, ProjectorConfig, build_projector

ADAPTER = dict(feat_in=16, n_layers=1, d_model=16, n_heads=2, subsampling_factor=1, subsampling_conv_channels=0,
               dropout=0.0, dropout_pre_encoder=0.0, dropout_att=0.0)


def make(kind, **kw):
    cfg = ProjectorConfig(kind=kind, in_dim=16, out_dim=24, n_layers=2, n_heads=4, hidden=32, ffn_dim=48,
                          dropout=0.0, adapter=ADAPTER if kind == "salm" else None, **kw)
    p = build_projector(cfg).eval()
    p.init_weights()
    return p


@pytest.mark.parametrize("kind,factor", [("conv_transformer", 2), ("salm", 1), ("causal_transformer", 2)])
def test_lengths_and_padding_invariance(kind, factor):
    p = make(kind)
    lens = torch.tensor([13, 8, 1])
    x = torch.randn(3, 13, 16)
    x[1, 8:] = 1e3  # garbage in the padding must not matter
    x[2, 1:] = -1e3
    with torch.no_grad():
        y, out = p(x, lens)
        assert out.tolist() == [math.ceil(n / factor) for n in lens.tolist()]
        assert y.shape == (3, math.ceil(13 / factor), 24)
        for i, n in enumerate(lens.tolist()):
            alone, _ = p(x[i:i + 1, :n], lens[i:i + 1])
            torch.testing.assert_close(alone[0], y[i, : out[i]], atol=1e-5, rtol=1e-5)


def test_conv_length_formula_matches_the_conv():
    p = make("conv_transformer")
    for t in range(1, 60):
        y = p.conv(torch.zeros(1, 16, t))
        assert y.shape[-1] == p.output_lengths(torch.tensor([t])).item() == math.ceil(t / 2)


def test_causal_projector_never_looks_ahead():
    p = make("causal_transformer")
    x = torch.randn(1, 12, 16)
    with torch.no_grad():
        y, _ = p(x, torch.tensor([12]))
        x2 = x.clone()
        x2[:, 8:] = torch.randn(1, 4, 16)  # frames 8.. feed LLM positions 4.. (stride 2)
        y2, _ = p(x2, torch.tensor([12]))
    assert torch.equal(y[:, :4], y2[:, :4]) and not torch.allclose(y[:, 4:], y2[:, 4:])


@pytest.mark.parametrize("kind", KINDS)
def test_init_weights_follow_their_docstrings(kind):
    """N(0, 0.02) weights, the residual outputs scaled by 1/sqrt(2 n_layers) (GPT-2), zero biases,
    unit norms; salm: only `proj` is new (the adapter keeps PyTorch's default init, as NeMo's)."""
    sd = make(kind).state_dict()
    residual = 0.02 / math.sqrt(2 * 2)  # n_layers = 2
    stds = {"conv_transformer": {"conv.weight": 0.02, "layers.0.qkv.weight": 0.02, "layers.1.fc1.weight": 0.02,
                                 "layers.0.out.weight": residual, "layers.1.fc2.weight": residual},
            "salm": {"proj.weight": 0.02},
            "causal_transformer": {"in_proj.weight": 0.02, "layers.0.q_proj.weight": 0.02, "layers.1.gate_proj.weight": 0.02,
                                   "layers.1.o_proj.weight": residual, "layers.0.down_proj.weight": residual,
                                   "out_proj.weight": 0.02}}[kind]
    for name, std in stds.items():
        w = sd[name]
        assert abs(w.std().item() / std - 1) < 0.15 and abs(w.mean().item()) < 5 * std / math.sqrt(w.numel()), name
    own = [k for k in sd if not k.startswith("modality_adapter.")]  # salm's adapter is not re-initialised
    assert all(sd[k].abs().sum() == 0 for k in own if k.endswith("bias"))
    norms = [k for k in own if "norm" in k and k.endswith("weight")]
    assert (kind == "salm" or norms) and all(torch.equal(sd[k], torch.ones_like(sd[k])) for k in norms)


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="kind"):
        ProjectorConfig(kind="mlp")
    with pytest.raises(ValueError, match="adapter"):
        ProjectorConfig(kind="salm")
    with pytest.raises(ValueError, match="n_heads"):
        ProjectorConfig(out_dim=30, n_heads=4)
    with pytest.raises(ValueError, match="nonsense"):
        ProjectorConfig.from_dict({"nonsense": 1})
