"""FastConformer against NeMo 3.0.0's outputs and float64 references. Run: python -m pytest -q tests/test_fastconformer.py"""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import max_valid_diff
from speechllm.convert import NemoArchive
from speechllm.fastconformer import (
    ConformerConvolution,
    DwStridingSubsampling,
    FastConformer,
    FastConformerConfig,
    RelPositionMultiHeadAttention,
    make_pad_mask,
    rel_positions,
    rel_shift,
    subsampled_lengths,
)

TOL = 1e-4  # max abs difference on valid frames, as the issue asks


@pytest.fixture(scope="module")
def nemo_encoder(fixtures):
    archive = NemoArchive(fixtures / "asr_ctc.nemo")
    enc = FastConformer(FastConformerConfig.from_nemo(archive.config["encoder"])).eval()
    sd = {k.removeprefix("encoder."): v for k, v in archive.state_dict().items() if k.startswith("encoder.")}
    enc.load_state_dict(sd, strict=True)
    return enc



@pytest.mark.parametrize("run", ["batch", "single0", "single1"])
def test_encoder_matches_nemo_layer_by_layer(nemo_encoder, asr_ref, run):
    hidden = []  # every layer's input, recorded by the speaker kernels' hook point; then the output

    def record(i, x, lengths):
        hidden.append(x)
        return x

    with torch.no_grad():
        x, lengths = nemo_encoder(asr_ref[f"{run}.features"], asr_ref[f"{run}.features_length"], layer_hook=record)
    hidden.append(x)  # the test encoder has no out_proj: the last layer's output
    assert not hasattr(nemo_encoder, "out_proj") and len(hidden) == 3
    assert lengths.tolist() == asr_ref[f"{run}.encoded_length"].tolist()
    # The fixture's `pre_encode` is the subsampling module's output, taken before the xscale multiply
    # (it is exactly 1/sqrt(d_model) = 1/8 of what enters layer 0).
    assert max_valid_diff(hidden[0], asr_ref[f"{run}.pre_encode"] * math.sqrt(64), lengths) < TOL
    assert max_valid_diff(hidden[1], asr_ref[f"{run}.encoder_layer0"], lengths) < TOL
    assert max_valid_diff(hidden[2], asr_ref[f"{run}.encoder_layer1"], lengths) < TOL
    assert max_valid_diff(x, asr_ref[f"{run}.encoder_output"].transpose(1, 2), lengths) < TOL


def test_padded_batch_equals_each_clip_alone(nemo_encoder, asr_ref):
    feats, lens = asr_ref["batch.features"], asr_ref["batch.features_length"]
    with torch.no_grad():
        xb, lb = nemo_encoder(feats, lens)
        for i in range(2):
            n = int(lens[i])
            xs, ls = nemo_encoder(feats[i:i + 1, :, :n], lens[i:i + 1])
            assert int(ls) == int(lb[i])
            assert (xs[0] - xb[i, : int(ls)]).abs().max() < 1e-5
        # Garbage in the padding must not reach the valid frames either.
        noisy = feats.clone()
        noisy[1, :, int(lens[1]):] = 1e3 * torch.randn_like(noisy[1, :, int(lens[1]):])
        xn, _ = nemo_encoder(noisy, lens)
    assert max_valid_diff(xn, xb, lb) < 1e-5


def test_length_formula_matches_real_convolutions():
    cfg = FastConformerConfig(feat_in=16, d_model=8, n_heads=2, n_layers=0, subsampling_conv_channels=2)
    sub = DwStridingSubsampling(cfg)
    torch.set_num_threads(1)  # 6000 tiny convolutions: a second thread only waits (2x slower on 2 cores)
    with torch.no_grad():
        for t in range(1, 2001):
            y = sub.conv(torch.zeros(1, 1, t, 16))  # the convolutions alone, no length bookkeeping
            want = subsampled_lengths(torch.tensor([t]), 8).item()
            assert y.shape[2] == want == math.ceil(t / 8), t


def test_masking_between_convs_gives_valid_lengths_and_zero_padding():
    cfg = FastConformerConfig(feat_in=16, d_model=8, n_heads=2, n_layers=0, subsampling_conv_channels=4)
    sub = DwStridingSubsampling(cfg)
    lens = torch.tensor([37, 20, 9, 1])
    x = torch.randn(4, 16, 37)
    with torch.no_grad():
        y, out_lens = sub(x, lens)
        assert out_lens.tolist() == [5, 3, 2, 1]
        for i, n in enumerate(lens.tolist()):
            alone, _ = sub(x[i:i + 1, :, :n], lens[i:i + 1])
            assert (alone[0] - y[i, : out_lens[i]]).abs().max() < 1e-5


def test_rel_shift_selects_relative_positions():
    t = 7
    bd = torch.randn(2, 3, t, 2 * t - 1)
    got = rel_shift(bd)
    i, j = torch.meshgrid(torch.arange(t), torch.arange(t), indexing="ij")
    want = bd[:, :, i, t - 1 - i + j]
    assert torch.equal(got, want)


def test_rel_positions_table():
    pe = rel_positions(5, 8, dtype=torch.float64)[0]
    # Row r holds position p = 4 - r; columns alternate sin/cos of p * 10000^(-2i/d).
    for r, p in enumerate(range(4, -5, -1)):
        for i in range(4):
            w = 10000 ** (-2 * i / 8)
            assert abs(pe[r, 2 * i].item() - math.sin(p * w)) < 1e-6
            assert abs(pe[r, 2 * i + 1].item() - math.cos(p * w)) < 1e-6


def reference_rel_attention(m, x, pos_emb, pad_mask):
    """NeMo's manual path in float64: pad/reshape rel_shift, one division of (ac + bd),
    -10000 fill, softmax, then masked probabilities set to zero."""
    b, t, d = x.shape
    h, dk = m.h, m.d_k
    q = F.linear(x, m.linear_q.weight, m.linear_q.bias).view(b, t, h, dk)
    k = F.linear(x, m.linear_k.weight, m.linear_k.bias).view(b, t, h, dk).transpose(1, 2)
    v = F.linear(x, m.linear_v.weight, m.linear_v.bias).view(b, t, h, dk).transpose(1, 2)
    p = F.linear(pos_emb, m.linear_pos.weight).view(1, -1, h, dk).transpose(1, 2)
    ac = (q + m.pos_bias_u).transpose(1, 2) @ k.transpose(-2, -1)
    bd = (q + m.pos_bias_v).transpose(1, 2) @ p.transpose(-2, -1)  # (B, H, T, 2T-1)
    bd = F.pad(bd, (1, 0)).view(b, h, 2 * t, t)[:, :, 1:].reshape(b, h, t, 2 * t - 1)[..., :t]
    scores = (ac + bd) / math.sqrt(dk)
    mask = (pad_mask[:, None, :] | pad_mask[:, :, None])[:, None]
    attn = torch.softmax(scores.masked_fill(mask, -10000.0), -1).masked_fill(mask, 0.0)
    ctx = (attn @ v).transpose(1, 2).reshape(b, t, d)
    return F.linear(ctx, m.linear_out.weight, m.linear_out.bias)


def test_sdpa_attention_equals_nemo_manual_path():
    cfg = FastConformerConfig(d_model=32, n_heads=4, n_layers=1, dropout_att=0.0)
    m = RelPositionMultiHeadAttention(cfg).double().eval()
    with torch.no_grad():
        m.pos_bias_u.normal_()
        m.pos_bias_v.normal_()
    x = torch.randn(3, 11, 32, dtype=torch.float64)
    lens = torch.tensor([11, 6, 1])
    pad = make_pad_mask(lens, 11)
    pos = rel_positions(11, 32, dtype=torch.float64)
    with torch.no_grad():
        got = m(x, pos, pad[:, None, :] | pad[:, :, None])
        want = reference_rel_attention(m, x, pos, pad)
    # Everywhere, padded query rows included (both give linear_out's bias there).
    assert (got - want).abs().max() < 1e-10


def test_from_nemo_refuses_unsupported_variants(fixtures):
    enc = dict(NemoArchive(fixtures / "asr_ctc.nemo").config["encoder"])
    for key, value in [("self_attention_model", "abs_pos"), ("att_context_size", [70, 13]),
                       ("causal_downsampling", True), ("subsampling", "striding"),
                       ("conv_context_size", "causal"), ("conv_norm_type", "group_norm")]:
        with pytest.raises(ValueError, match=key):
            FastConformerConfig.from_nemo({**enc, key: value})


def test_linear_pre_encode_and_layer_norm_variant_run():
    # SALM's modality adapter: subsampling_factor 1 makes pre_encode a Linear.
    cfg = FastConformerConfig(feat_in=12, d_model=16, n_heads=2, n_layers=1, subsampling_factor=1,
                              conv_norm_type="layer_norm", xscaling=False)
    enc = FastConformer(cfg).eval()
    assert isinstance(enc.pre_encode, torch.nn.Linear)
    feats = torch.randn(2, 12, 9)
    with torch.no_grad():
        x, lens = enc(feats, torch.tensor([9, 4]))
        alone, _ = enc(feats[1:, :, :4], torch.tensor([4]))
    assert x.shape == (2, 9, 16) and lens.tolist() == [9, 4]
    assert (x[1, :4] - alone[0]).abs().max() < 1e-5  # the per-frame LayerNorm lets no padding in


def reference_conv_module(m, x, pad_mask):
    """NeMo's ConformerConvolution with conv_norm_type layer_norm, in float64 and channels-first as
    NeMo computes it: pointwise conv, GLU over the channels, padding zeroed, depthwise conv,
    LayerNorm over each frame's channels (biased variance), SiLU, pointwise conv."""
    d, k = x.shape[-1], m.depthwise_conv.kernel_size[0]
    h = F.conv1d(x.transpose(1, 2), m.pointwise_conv1.weight, m.pointwise_conv1.bias)  # (B, 2D, T)
    h = h[:, :d] * torch.sigmoid(h[:, d:])
    h = h.masked_fill(pad_mask[:, None, :], 0.0)
    h = F.conv1d(h, m.depthwise_conv.weight, m.depthwise_conv.bias, padding=(k - 1) // 2, groups=d)
    mean = h.mean(1, keepdim=True)
    var = (h - mean).pow(2).mean(1, keepdim=True)
    norm = m.batch_norm
    h = (h - mean) / torch.sqrt(var + norm.eps) * norm.weight[:, None] + norm.bias[:, None]
    h = h * torch.sigmoid(h)
    return F.conv1d(h, m.pointwise_conv2.weight, m.pointwise_conv2.bias).transpose(1, 2)  # (B, T, D)


def test_layer_norm_conv_module_equals_a_float64_recomputation():
    cfg = FastConformerConfig(d_model=16, n_heads=2, n_layers=1, conv_kernel_size=5, conv_norm_type="layer_norm")
    m = ConformerConvolution(cfg).double().eval()
    assert isinstance(m.batch_norm, torch.nn.LayerNorm)  # NeMo's attribute name, whatever the norm
    with torch.no_grad():  # not the identity, so a wrong axis or order shows
        m.batch_norm.weight.normal_(1.0, 0.5)
        m.batch_norm.bias.normal_(0.0, 0.5)
    x = torch.randn(3, 11, 16, dtype=torch.float64)
    pad = make_pad_mask(torch.tensor([11, 6, 1]), 11)
    with torch.no_grad():
        got, want = m(x, pad), reference_conv_module(m, x, pad)
    assert (got - want).abs().max() < 1e-10
