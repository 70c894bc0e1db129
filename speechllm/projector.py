"""Projectors: encoder frames (B, T, D_enc) at 80 ms -> LLM embeddings (B, T', D_llm).

Three kinds, chosen by `ProjectorConfig.kind`:
- "conv_transformer" (default, seed 000): Conv1d D_enc -> D_llm with stride 2 (one LLM position
  per 160 ms), then a small pre-norm Transformer encoder over the audio positions.
- "salm": NeMo SALM's modality adapter: a FastConformer with subsampling 1 (its `pre_encode` is a
  Linear), then `proj` Linear to the LLM width. Names mirror NeMo's `perception.modality_adapter.*`
  and `perception.proj.*`, so SALM checkpoints load through a prefix table.
- "causal_transformer" (seed 004): stack `stride` frames, Linear, then pre-norm RMSNorm / SwiGLU /
  RoPE causal attention layers (Qwen2's RMSNorm and RoPE), then a Linear to the LLM width.

Every kind maps (x, lengths) -> (y, new_lengths) and never lets padded frames reach valid ones.
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import build
from .fastconformer import FastConformer, FastConformerConfig, make_pad_mask
from .qwen2 import RMSNorm, apply_rope, rope_cos_sin

KINDS = ("conv_transformer", "salm", "causal_transformer")


@dataclass(frozen=True)
class ProjectorConfig:
    kind: str = "conv_transformer"
    in_dim: int = 1024  # parakeet-ctc-0.6b d_model
    out_dim: int = 896  # Qwen2.5-0.5B hidden size
    stride: int = 2  # encoder frames per LLM position (conv_transformer, causal_transformer)
    kernel_size: int = 3  # conv_transformer's Conv1d
    n_layers: int = 2
    n_heads: int = 14  # head size 64 at width 896, as Qwen2.5-0.5B
    hidden: int = 512  # causal_transformer's width (seed 004); conv_transformer works at out_dim
    ffn_dim: int = 3584  # 4 x width for conv_transformer; seed 004 uses 2048 at width 512
    dropout: float = 0.1
    rope_theta: float = 10000.0  # causal_transformer only
    adapter: dict | None = None  # salm: the FastConformerConfig fields of the modality adapter

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"projector kind {self.kind!r} is not one of {KINDS}")
        if self.kind == "salm" and self.adapter is None:
            raise ValueError("a 'salm' projector needs `adapter` (the modality adapter's FastConformer config)")
        width = self.out_dim if self.kind == "conv_transformer" else self.hidden
        if self.kind != "salm" and width % self.n_heads:
            raise ValueError(f"projector width {width} is not divisible by n_heads {self.n_heads}")

    @classmethod
    def from_dict(cls, d: dict) -> "ProjectorConfig":
        return build(cls, d, "projector.")

    def to_dict(self) -> dict:
        return asdict(self)


def build_projector(cfg: ProjectorConfig) -> nn.Module:
    return {"conv_transformer": ConvTransformerProjector, "salm": SALMProjector,
            "causal_transformer": CausalTransformerProjector}[cfg.kind](cfg)


# ----------------------------------------------------------------------------------------------
# conv_transformer


class TransformerLayer(nn.Module):
    """Pre-norm Transformer layer (LayerNorm, bidirectional attention over valid frames, GELU MLP)."""

    def __init__(self, d: int, n_heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d)

    def forward(self, x, key_mask):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, hd)
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=p)
        x = x + F.dropout(self.out(a.transpose(1, 2).reshape(b, t, d)), p, self.training)
        return x + F.dropout(self.fc2(F.gelu(self.fc1(self.norm2(x)))), p, self.training)


class ConvTransformerProjector(nn.Module):
    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        self.cfg = cfg
        self.conv = nn.Conv1d(cfg.in_dim, cfg.out_dim, cfg.kernel_size, stride=cfg.stride, padding=cfg.kernel_size // 2)
        self.layers = nn.ModuleList(
            TransformerLayer(cfg.out_dim, cfg.n_heads, cfg.ffn_dim, cfg.dropout) for _ in range(cfg.n_layers)
        )
        self.norm = nn.LayerNorm(cfg.out_dim)

    def output_lengths(self, lengths):
        k, s, p = self.cfg.kernel_size, self.cfg.stride, self.cfg.kernel_size // 2
        return torch.div(lengths + 2 * p - k, s, rounding_mode="floor") + 1

    def forward(self, x, lengths):
        # Zero the padding first: the conv's receptive field reaches one frame past the last valid one.
        x = x.masked_fill(make_pad_mask(lengths, x.shape[1])[..., None], 0.0)
        x = self.conv(x.transpose(1, 2)).transpose(1, 2)  # (B, T', D_llm)
        lengths = self.output_lengths(lengths)
        pad = make_pad_mask(lengths, x.shape[1])
        key_mask = ~pad[:, None, None, :]  # (B, 1, 1, T'): True = attend
        for layer in self.layers:
            x = layer(x, key_mask)
        return self.norm(x), lengths

    @torch.no_grad()
    def init_weights(self):
        """conv, qkv, out, fc1: N(0, 0.02); fc2 and out scaled by 1/sqrt(2 n_layers) (GPT-2's residual
        scaling); biases 0; LayerNorms 1/0. The final norm keeps the output near unit scale, about
        what the LLM's own embeddings have after its first RMSNorm."""
        std = 0.02
        nn.init.normal_(self.conv.weight, std=std)
        nn.init.zeros_(self.conv.bias)
        for layer in self.layers:
            for lin, s in ((layer.qkv, std), (layer.fc1, std), (layer.out, std / math.sqrt(2 * len(self.layers))),
                           (layer.fc2, std / math.sqrt(2 * len(self.layers)))):
                nn.init.normal_(lin.weight, std=s)
                nn.init.zeros_(lin.bias)
            for norm in (layer.norm1, layer.norm2):
                nn.init.ones_(norm.weight)
                nn.init.zeros_(norm.bias)
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)


# ----------------------------------------------------------------------------------------------
# salm


class SALMProjector(nn.Module):
    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        self.cfg = cfg
        self.modality_adapter = FastConformer(FastConformerConfig.from_dict(cfg.adapter, "projector.adapter."))
        self.proj = nn.Linear(self.modality_adapter.cfg.out_dim, cfg.out_dim)

    def forward(self, x, lengths):
        # NeMo's adapter takes channels-first input, like any ConformerEncoder.
        x, lengths = self.modality_adapter(x.transpose(1, 2), lengths)  # (B, T, D_adapter)
        return self.proj(x), lengths

    @torch.no_grad()
    def init_weights(self):
        """Fresh adapter: PyTorch's default init for its layers (as NeMo builds it), pos_bias_u/v 0,
        and `proj` N(0, 0.02) with zero bias."""
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)


# ----------------------------------------------------------------------------------------------
# causal_transformer


class CausalLayer(nn.Module):
    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        d = cfg.hidden
        self.n_heads, self.theta, self.dropout = cfg.n_heads, cfg.rope_theta, cfg.dropout
        self.attn_norm = RMSNorm(d, 1e-6)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.o_proj = nn.Linear(d, d, bias=False)
        self.mlp_norm = RMSNorm(d, 1e-6)
        self.gate_proj = nn.Linear(d, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(d, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, d, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        h = self.attn_norm(x)
        q, k, v = (p(h).view(b, t, self.n_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        cos, sin = rope_cos_sin(torch.arange(t, device=x.device)[None], q.shape[-1], self.theta, q.dtype)
        # Causal: a frame never sees later ones, so right padding cannot reach valid frames.
        a = F.scaled_dot_product_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, t, d))
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class CausalTransformerProjector(nn.Module):
    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        self.cfg = cfg
        self.in_proj = nn.Linear(cfg.in_dim * cfg.stride, cfg.hidden)
        self.layers = nn.ModuleList(CausalLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden, 1e-6)
        self.out_proj = nn.Linear(cfg.hidden, cfg.out_dim)

    def forward(self, x, lengths):
        s = self.cfg.stride
        x = x.masked_fill(make_pad_mask(lengths, x.shape[1])[..., None], 0.0)
        x = F.pad(x, (0, 0, 0, (-x.shape[1]) % s))  # whole groups of `stride` frames
        b, t, d = x.shape
        x = self.in_proj(x.reshape(b, t // s, s * d))  # (B, T/s, hidden): stacked frames
        for layer in self.layers:
            x = layer(x)
        return self.out_proj(self.norm(x)), torch.div(lengths + s - 1, s, rounding_mode="floor")

    @torch.no_grad()
    def init_weights(self):
        """Linear weights N(0, 0.02), o_proj/down_proj scaled by 1/sqrt(2 n_layers), biases 0, norms 1."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "norm" in name:
                nn.init.ones_(p)
            else:
                scale = math.sqrt(2 * len(self.layers)) if name.endswith(("o_proj.weight", "down_proj.weight")) else 1
                nn.init.normal_(p, std=0.02 / scale)
