"""FastConformer encoder, numerically matching NeMo 3.0.0's `ConformerEncoder` (offline, full context).

    features (B, n_mels, T_mel) --pre_encode--> (B, T, D) * sqrt(D) --layers--> (B, T, D)

- `pre_encode`: "dw_striding" subsampling, log2(factor) stride-2 stages (one full 3x3 conv, then
  depthwise + pointwise pairs), with the time axis re-masked before every module as NeMo >= 2.5
  does, so padding never leaks into valid frames. A factor of 1 makes it a plain Linear (SALM's
  modality adapter).
- Transformer-XL relative attention with per-layer `pos_bias_u/v`; the position term enters
  `scaled_dot_product_attention` as an additive bias, which is exact up to float rounding.
- Macaron feed-forwards with half steps, a GLU/depthwise/BatchNorm/SiLU convolution module, and a
  final LayerNorm per layer.

Module attribute names are NeMo's state-dict keys (`pre_encode.conv.0`, `layers.3.self_attn.linear_q`,
`conv.batch_norm`, ...), so a NeMo checkpoint loads without renaming. B batch, T frames, D width,
H heads.
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import build


@dataclass(frozen=True)
class FastConformerConfig:
    # Defaults are nvidia/parakeet-ctc-0.6b's encoder; always read the real values with from_nemo.
    feat_in: int = 80
    n_layers: int = 24
    d_model: int = 1024
    n_heads: int = 8
    ff_expansion_factor: int = 4
    conv_kernel_size: int = 9
    subsampling_factor: int = 8  # 1 = Linear pre_encode, else a power of two (dw_striding)
    subsampling_conv_channels: int = 256
    xscaling: bool = True  # multiply pre_encode's output by sqrt(d_model); differs between checkpoints
    untie_biases: bool = True  # per-layer pos_bias_u/v (shared ones are copied into every layer)
    use_bias: bool = True  # biases of the Linear/Conv1d layers inside Conformer layers
    conv_norm_type: str = "batch_norm"  # or "layer_norm"
    feat_out: int = -1  # > 0 and != d_model adds a final Linear `out_proj`
    dropout: float = 0.1
    dropout_pre_encoder: float = 0.1
    dropout_att: float = 0.1

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        f = self.subsampling_factor
        if f < 1 or f & (f - 1):
            raise ValueError(f"subsampling_factor must be 1 or a power of two, got {f}")
        if self.conv_kernel_size % 2 == 0:
            raise ValueError(f"conv_kernel_size must be odd for a centred conv, got {self.conv_kernel_size}")
        if self.conv_norm_type not in ("batch_norm", "layer_norm"):
            raise ValueError(f"conv_norm_type {self.conv_norm_type!r} is not implemented")

    @classmethod
    def from_nemo(cls, enc: dict) -> "FastConformerConfig":
        """Pick our fields from a NeMo `encoder:` block, refusing variants we don't implement."""
        def bad(field, value, why):
            raise ValueError(f"unsupported NeMo encoder setting {field}={value!r}: {why}")

        target = enc.get("_target_", "ConformerEncoder")
        if not target.endswith("ConformerEncoder"):
            bad("_target_", target, "only ConformerEncoder (FastConformer) is implemented")
        if enc.get("self_attention_model", "rel_pos") != "rel_pos":
            bad("self_attention_model", enc["self_attention_model"], "only rel_pos is implemented")
        ctx = enc.get("att_context_size") or [-1, -1]
        if isinstance(ctx[0], (list, tuple)):  # multi-lookahead models: the first entry is the default
            ctx = ctx[0]
        if list(ctx) != [-1, -1]:
            bad("att_context_size", ctx, "only full-context (offline) attention is implemented")
        if enc.get("causal_downsampling", False):
            bad("causal_downsampling", True, "only offline subsampling is implemented")
        k = enc.get("conv_kernel_size", 31)
        conv_ctx = enc.get("conv_context_size")
        if conv_ctx not in (None, [(k - 1) // 2, (k - 1) // 2]):
            bad("conv_context_size", conv_ctx, "only centred (non-causal) convolutions are implemented")
        factor = enc.get("subsampling_factor", 4)
        if factor > 1 and enc.get("subsampling", "striding") != "dw_striding":
            bad("subsampling", enc.get("subsampling"), "only dw_striding is implemented")
        if enc.get("reduction") or enc.get("reduction_position") not in (None, -1):
            bad("reduction", enc.get("reduction"), "time reduction inside the encoder is not implemented")
        if enc.get("self_attention_model") == "rel_pos_local_attn":
            bad("self_attention_model", "rel_pos_local_attn", "not implemented")
        return cls(
            feat_in=enc["feat_in"],
            n_layers=enc["n_layers"],
            d_model=enc["d_model"],
            n_heads=enc.get("n_heads", 4),
            ff_expansion_factor=enc.get("ff_expansion_factor", 4),
            conv_kernel_size=k,
            subsampling_factor=factor,
            subsampling_conv_channels=enc.get("subsampling_conv_channels", -1) if factor > 1 else 0,
            # NeMo's class default for xscaling is True; the key is absent in some older configs.
            xscaling=bool(enc.get("xscaling", True)),
            untie_biases=bool(enc.get("untie_biases", True)),
            use_bias=bool(enc.get("use_bias", True)),
            conv_norm_type=enc.get("conv_norm_type", "batch_norm"),
            feat_out=enc.get("feat_out", -1),
            dropout=enc.get("dropout", 0.1),
            dropout_pre_encoder=enc.get("dropout_pre_encoder", 0.1),
            dropout_att=enc.get("dropout_att", 0.1),
        )

    @classmethod
    def from_dict(cls, d: dict, where: str = "encoder.") -> "FastConformerConfig":
        return build(cls, d, where)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def out_dim(self) -> int:
        return self.feat_out if self.feat_out > 0 else self.d_model


# ----------------------------------------------------------------------------------------------
# helpers


def make_pad_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B,) lengths -> (B, max_len) bool, True at padding."""
    return torch.arange(max_len, device=lengths.device)[None, :] >= lengths[:, None]


def subsampled_lengths(lengths: torch.Tensor, factor: int) -> torch.Tensor:
    """Encoder frames for `lengths` mel frames: each stride-2 conv (k=3, pad=1) maps n to
    (n - 1) // 2 + 1, i.e. ceil(n / 2), so the total is ceil(n / factor) applied as repeated halvings
    (NeMo's `calc_length`, which does the same in float and floors)."""
    for _ in range(int(math.log2(factor))):
        lengths = torch.div(lengths - 1, 2, rounding_mode="floor") + 1
    return lengths


def rel_shift(bd: torch.Tensor) -> torch.Tensor:
    """(B, H, T, 2T-1) scores against positions T-1 .. -(T-1) -> (B, H, T, T) with
    out[i, j] = bd[i, T-1-i+j], the score for relative position i - j.

    NeMo gets this with a pad/reshape trick; a strided view reads the same elements without copies:
    element (i, j) sits at flat offset i*(2T-1) + (T-1-i+j) = (T-1) + i*(2T-2) + j."""
    b, h, t, n = bd.shape
    bd = bd.contiguous()
    s = bd.stride()
    return bd.as_strided((b, h, t, t), (s[0], s[1], n - 1, 1), bd.storage_offset() + t - 1)


def rel_positions(t: int, d_model: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Sinusoidal table for relative positions T-1 .. -(T-1) -> (1, 2T-1, D).

    Built in float32 exactly as NeMo's RelPositionalEncoding builds its table (positive positions are
    keys to the left of the query). A row depends only on its position, so computing just the 2T-1
    rows we need gives the same values as slicing NeMo's 5000-position table."""
    pos = torch.arange(t - 1, -t, -1, dtype=torch.float32, device=device)[:, None]  # (2T-1, 1)
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32, device=device) * -(math.log(10000.0) / d_model))
    pe = torch.zeros(2 * t - 1, d_model, device=device)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)
    return pe[None].to(dtype)


# ----------------------------------------------------------------------------------------------
# subsampling


class DwStridingSubsampling(nn.Module):
    """NeMo ConvSubsampling("dw_striding"): (B, F, T_mel) -> (B, ceil(T_mel/factor), D).

    `conv` indices match NeMo's nn.Sequential: 0 conv, 1 ReLU, then (depthwise, pointwise, ReLU) per
    further stage, so weights sit at conv.0, conv.2, conv.3, conv.5, conv.6 for factor 8."""

    def __init__(self, cfg: FastConformerConfig):
        super().__init__()
        c, stages = cfg.subsampling_conv_channels, int(math.log2(cfg.subsampling_factor))
        layers = [nn.Conv2d(1, c, 3, stride=2, padding=1), nn.ReLU()]
        for _ in range(stages - 1):
            layers += [nn.Conv2d(c, c, 3, stride=2, padding=1, groups=c), nn.Conv2d(c, c, 1), nn.ReLU()]
        freq = cfg.feat_in
        for _ in range(stages):
            freq = (freq - 1) // 2 + 1
        # NeMo registers `out` before `conv`; order only matters for state-dict listing.
        self.out = nn.Linear(c * freq, cfg.d_model)
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor):
        x = x.transpose(1, 2)[:, None]  # (B, 1, T_mel, F): time is the image height
        # Zero the frames past each item's length before every module (NeMo >= 2.5), so that a
        # padded batch gives the same valid frames as each item alone. Without padding the masks
        # are all ones and are skipped.
        padded = bool((lengths < x.shape[2]).any())
        for layer in self.conv:
            if padded:
                x = x * (~make_pad_mask(lengths, x.shape[2]))[:, None, :, None].to(x.dtype)
            x = layer(x)
            if isinstance(layer, nn.Conv2d) and layer.stride[0] == 2:
                lengths = subsampled_lengths(lengths, 2)
        if padded:
            x = x * (~make_pad_mask(lengths, x.shape[2]))[:, None, :, None].to(x.dtype)
        b, c, t, f = x.shape
        x = x.transpose(1, 2).reshape(b, t, c * f)  # channel-major flattening: index c*F' + f
        return self.out(x), lengths  # (B, T, D)


# ----------------------------------------------------------------------------------------------
# Conformer layer


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float, bias: bool):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x):
        return self.linear2(self.dropout(F.silu(self.linear1(x))))


class RelPositionMultiHeadAttention(nn.Module):
    def __init__(self, cfg: FastConformerConfig):
        super().__init__()
        d, h = cfg.d_model, cfg.n_heads
        self.h, self.d_k, self.dropout_p = h, d // h, cfg.dropout_att
        self.linear_q = nn.Linear(d, d, bias=cfg.use_bias)
        self.linear_k = nn.Linear(d, d, bias=cfg.use_bias)
        self.linear_v = nn.Linear(d, d, bias=cfg.use_bias)
        self.linear_out = nn.Linear(d, d, bias=cfg.use_bias)
        self.linear_pos = nn.Linear(d, d, bias=False)  # never has a bias upstream
        # Transformer-XL's u and v; zeros until loaded. With untie_biases=False NeMo shares one pair
        # across layers, which the converter copies into every layer.
        self.pos_bias_u = nn.Parameter(torch.zeros(h, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(h, self.d_k))

    def forward(self, x, pos_emb, att_mask):
        b, t, _ = x.shape
        q = self.linear_q(x).view(b, t, self.h, self.d_k)
        k = self.linear_k(x).view(b, t, self.h, self.d_k).transpose(1, 2)  # (B, H, T, d_k)
        v = self.linear_v(x).view(b, t, self.h, self.d_k).transpose(1, 2)
        p = self.linear_pos(pos_emb).view(1, -1, self.h, self.d_k).transpose(1, 2)  # (1, H, 2T-1, d_k)
        q_u = (q + self.pos_bias_u).transpose(1, 2)  # (B, H, T, d_k)
        q_v = (q + self.pos_bias_v).transpose(1, 2)
        # NeMo computes softmax((q_u k^T + rel_shift(q_v p^T)) / sqrt(d_k)); SDPA scales q_u k^T by
        # the same 1/sqrt(d_k), so the position term goes in pre-scaled as an additive bias.
        bias = rel_shift(q_v @ p.transpose(-2, -1)) / math.sqrt(self.d_k)  # (B, H, T, T)
        if att_mask is not None:
            # -10000 rather than -inf, as NeMo: fully padded query rows then stay finite.
            bias = bias.masked_fill(att_mask[:, None], -10000.0)
        ctx = F.scaled_dot_product_attention(
            q_u, k, v, attn_mask=bias.to(q_u.dtype), dropout_p=self.dropout_p if self.training else 0.0
        )
        if att_mask is not None:
            # NeMo zeroes the probabilities of masked positions after the softmax, so padded query
            # rows give a zero context (only linear_out's bias survives).
            ctx = ctx.masked_fill(att_mask.all(-1)[:, None, :, None], 0.0)
        return self.linear_out(ctx.transpose(1, 2).reshape(b, t, -1))


class ConformerConvolution(nn.Module):
    def __init__(self, cfg: FastConformerConfig):
        super().__init__()
        d, k = cfg.d_model, cfg.conv_kernel_size
        self.pointwise_conv1 = nn.Conv1d(d, 2 * d, 1, bias=cfg.use_bias)
        self.depthwise_conv = nn.Conv1d(d, d, k, padding=(k - 1) // 2, groups=d, bias=cfg.use_bias)
        # NeMo keeps the attribute name `batch_norm` whatever the norm type.
        self.batch_norm = nn.BatchNorm1d(d) if cfg.conv_norm_type == "batch_norm" else nn.LayerNorm(d)
        self.pointwise_conv2 = nn.Conv1d(d, d, 1, bias=cfg.use_bias)

    def forward(self, x, pad_mask):
        # A kernel-1 Conv1d is a Linear over channels; as a matmul on (B, T, D) it skips two
        # transposes and runs faster than the convolution path, bf16 especially.
        p1, p2 = self.pointwise_conv1, self.pointwise_conv2
        x = F.glu(F.linear(x, p1.weight[..., 0], p1.bias), dim=-1)  # (B, T, D)
        if pad_mask is not None:
            # The only place padding is zeroed inside a layer: it keeps the depthwise conv from
            # reading padded frames into the valid ones.
            x = x.masked_fill(pad_mask[..., None], 0.0)
        x = self.depthwise_conv(x.transpose(1, 2))  # (B, D, T)
        if isinstance(self.batch_norm, nn.LayerNorm):
            x = self.batch_norm(x.transpose(1, 2))
        else:
            x = self.batch_norm(x).transpose(1, 2)  # (B, T, D)
        return F.linear(F.silu(x), p2.weight[..., 0], p2.bias)


class ConformerLayer(nn.Module):
    def __init__(self, cfg: FastConformerConfig):
        super().__init__()
        d, d_ff = cfg.d_model, cfg.d_model * cfg.ff_expansion_factor
        self.norm_feed_forward1 = nn.LayerNorm(d)
        self.feed_forward1 = FeedForward(d, d_ff, cfg.dropout, cfg.use_bias)
        self.norm_conv = nn.LayerNorm(d)
        self.conv = ConformerConvolution(cfg)
        self.norm_self_att = nn.LayerNorm(d)
        self.self_attn = RelPositionMultiHeadAttention(cfg)
        self.norm_feed_forward2 = nn.LayerNorm(d)
        self.feed_forward2 = FeedForward(d, d_ff, cfg.dropout, cfg.use_bias)
        self.norm_out = nn.LayerNorm(d)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, pos_emb, att_mask, pad_mask):
        # Macaron layout: two half-step feed-forwards around attention and convolution.
        x = x + 0.5 * self.dropout(self.feed_forward1(self.norm_feed_forward1(x)))
        x = x + self.dropout(self.self_attn(self.norm_self_att(x), pos_emb, att_mask))
        x = x + self.dropout(self.conv(self.norm_conv(x), pad_mask))
        x = x + 0.5 * self.dropout(self.feed_forward2(self.norm_feed_forward2(x)))
        return self.norm_out(x)


# ----------------------------------------------------------------------------------------------
# encoder


class FastConformer(nn.Module):
    def __init__(self, cfg: FastConformerConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.subsampling_factor > 1:
            self.pre_encode = DwStridingSubsampling(cfg)
        else:
            self.pre_encode = nn.Linear(cfg.feat_in, cfg.d_model)
        self.pre_dropout = nn.Dropout(cfg.dropout_pre_encoder)
        self.layers = nn.ModuleList(ConformerLayer(cfg) for _ in range(cfg.n_layers))
        if cfg.feat_out > 0 and cfg.feat_out != cfg.d_model:
            self.out_proj = nn.Linear(cfg.d_model, cfg.feat_out)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return subsampled_lengths(lengths, self.cfg.subsampling_factor)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor, layer_hook=None):
        """features (B, feat_in, T_mel), lengths (B,) valid mel frames -> (B, T, D_out), (B,) int64.

        `layer_hook(i, x, lengths)`, if given, runs on the input of every layer i and returns the new
        input (the speaker kernels use it; a hook that returns x unchanged can record it)."""
        lengths = lengths.to(torch.long)
        features = features.to(next(self.parameters()).dtype)  # fp32 features into a bf16 encoder
        if isinstance(self.pre_encode, DwStridingSubsampling):
            x, lengths = self.pre_encode(features, lengths)
        else:
            x = self.pre_encode(features.transpose(1, 2))
        if self.cfg.xscaling:
            x = x * math.sqrt(self.cfg.d_model)
        x = self.pre_dropout(x)
        b, t, _ = x.shape
        pos_emb = rel_positions(t, self.cfg.d_model, x.device, x.dtype)  # (1, 2T-1, D)
        pad_mask = make_pad_mask(lengths, t)  # (B, T)
        att_mask = None
        if pad_mask.any():
            att_mask = pad_mask[:, None, :] | pad_mask[:, :, None]  # (B, T, T): query or key is padding
        else:
            pad_mask = None
        for i, layer in enumerate(self.layers):
            if layer_hook is not None:
                x = layer_hook(i, x, lengths)
            x = layer(x, pos_emb, att_mask, pad_mask)
        if hasattr(self, "out_proj"):
            x = self.out_proj(x)
        return x, lengths
