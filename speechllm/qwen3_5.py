"""Qwen3.5 text model (Gated DeltaNet + gated full attention) in plain PyTorch.

Matches transformers 5.23's `Qwen3_5ForCausalLM` with its pure-torch kernels (checked against
fixtures written by it, fp32), loads its Hugging Face directories in the text-only layout and in the
multimodal layout of the published checkpoints, and plugs into speechllm.generate like Qwen2.
Module names are the HF state-dict keys.

Layers are of two kinds (config.layer_types, by default three linear then one full):
- linear_attention: Gated DeltaNet. A depthwise causal conv (kernel 4, SiLU) over the concatenated
  [q | k | v] channels, then the gated delta rule on a per-head fp32 state S (Dk, Dv):
      S_t = exp(g_t) S_{t-1} + k_t beta_t (v_t - exp(g_t) S_{t-1}^T k_t)^T,   o_t = S_t^T q_t
  with q, k L2-normalised, q scaled by Dk^-0.5, g = -exp(A_log) softplus(a + dt_bias) and
  beta = sigmoid(b). Prompts run the chunked (64) form, cached decoding the recurrence. Key head j
  serves value heads j*r .. j*r + r - 1 (repeat_interleave). The output is RMS-normalised per
  head and gated by silu(z).
- full_attention: GQA with q/k RMSNorm before RoPE, RoPE on the first head_dim/4 dims only, and an
  output gate: q_proj's rows hold, per head, head_dim query rows then head_dim gate rows, and the
  attention output is multiplied by sigmoid(gate) before o_proj.

Numerical quirks kept on purpose (transformers' modeling_qwen3_5.py):
- Every layer norm, the final norm and q_norm/k_norm are zero-centred, x_hat * (1 + w), with the
  multiply in fp32 BEFORE the cast back (the opposite order to Qwen2). The DeltaNet output norm is
  not centred: w * x_hat.to(dtype), then * silu(z) in fp32.
- L2 norm is x * rsqrt(sum(x^2) + 1e-6) in fp32 (eps inside the sum). The DeltaNet runs in fp32.
- Left padding is exact: with a 2-D mask that has zeros and more than one new token, each DeltaNet
  layer multiplies its input by the mask, so pads give q = k = v = 0 and leave the state at zero.
  Right padding gives right logits on real tokens but a wrong final state (do not decode from it).
  Rows never mix; packed documents inside one row are NOT reset (as upstream's torch path).
- With text positions the three M-RoPE streams are equal, so M-RoPE is plain RoPE.

Dimension letters: B batch, L new tokens, D hidden, H query heads, K kv heads, hd head_dim,
Hk/Hv DeltaNet key/value heads, Dk/Dv their dims, C conv channels, V vocab.
"""
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import build
from .convert import place
from .qwen2 import (KVCache, Qwen2ForCausalLM, Qwen2MLP, _read_config, apply_rope, attention_mask_4d,
                    embed_inputs, rope_cos_sin, take_weights)
from .weights import check_fit, headers, open_safetensors, weight_files

log = logging.getLogger(__name__)

LAYER_TYPES = ("linear_attention", "full_attention")


@dataclass(frozen=True)
class Qwen3_5Config:
    # Defaults are transformers' Qwen3_5TextConfig (a 9B-sized model); from_hf fills the same.
    vocab_size: int = 248320
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 32
    layer_types: tuple | None = None  # None: every 4th layer full attention, the rest linear
    # full attention
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int = 256  # explicit, never hidden_size // heads
    attention_bias: bool = False
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.25  # RoPE rotates the first int(head_dim * this) dims
    mrope_section: tuple = (11, 11, 10)  # M-RoPE (images/video); equal streams for text, unused
    mrope_interleaved: bool = True
    # linear attention (Gated DeltaNet)
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768  # informational: RoPE is computed for any position
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"  # dtype of the stored weights; written back on save

    def __post_init__(self):
        if self.layer_types is None:  # frozen dataclass: fill the derived default once, here
            object.__setattr__(self, "layer_types", tuple(
                "full_attention" if (i + 1) % 4 == 0 else "linear_attention"
                for i in range(self.num_hidden_layers)))
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "mrope_section", tuple(self.mrope_section))
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for "
                             f"num_hidden_layers {self.num_hidden_layers}")
        if unknown := sorted(set(self.layer_types) - set(LAYER_TYPES)):
            raise ValueError(f"layer_types {unknown} are not supported (only {list(LAYER_TYPES)})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ValueError(f"linear_num_value_heads {self.linear_num_value_heads} is not a "
                             f"multiple of linear_num_key_heads {self.linear_num_key_heads}")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ValueError(f"partial_rotary_factor {self.partial_rotary_factor} gives rotary dim "
                             f"{self.rotary_dim} for head_dim {self.head_dim}; it must be even")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def conv_dim(self) -> int:  # DeltaNet conv channels: q | k | v
        return (2 * self.linear_num_key_heads * self.linear_key_head_dim
                + self.linear_num_value_heads * self.linear_value_head_dim)

    @classmethod
    def from_hf(cls, cfg: dict) -> "Qwen3_5Config":
        """Read a transformers config.json: model_type qwen3_5_text, or the multimodal qwen3_5 whose
        text fields sit under text_config. Keys it does not know are ignored, as by transformers;
        settings that would change the computation and are not implemented raise."""
        if cfg.get("model_type") == "qwen3_5":
            if not isinstance(cfg.get("text_config"), dict):
                raise ValueError("model_type 'qwen3_5' config has no text_config")
            # Qwen3_5ForConditionalGeneration reads tie_word_embeddings (and dtype) at the top.
            top = {k: cfg[k] for k in ("tie_word_embeddings", "dtype", "torch_dtype") if k in cfg}
            cfg = {"model_type": "qwen3_5_text"} | cfg["text_config"] | top
        if cfg.get("model_type") != "qwen3_5_text":
            raise ValueError(f"model_type {cfg.get('model_type')!r} is not supported: only "
                             "'qwen3_5_text' and 'qwen3_5' (its text model) are implemented")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {cfg['hidden_act']!r} is not supported (only 'silu')")
        if not cfg.get("attn_output_gate", True):
            raise ValueError("attn_output_gate false is not supported (Qwen3.5 gates attention)")
        if cfg.get("num_experts") or cfg.get("mlp_only_layers"):
            raise ValueError("num_experts / mlp_only_layers: mixture-of-experts is not supported")
        field = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
        rope = cfg.get(field) or {}
        if (rope_type := rope.get("rope_type", rope.get("type", "default"))) != "default":
            raise ValueError(f"{field} with rope_type {rope_type!r} is not supported "
                             "(only plain RoPE)")
        # Keys named as our fields are read as they are; missing ones keep the upstream defaults.
        special = {"layer_types", "rope_theta", "partial_rotary_factor", "mrope_section",
                   "mrope_interleaved", "torch_dtype"}
        kw = {f.name: cfg[f.name] for f in fields(cls) if f.name in cfg and f.name not in special}
        n_layers = kw.get("num_hidden_layers", cls.num_hidden_layers)
        every = cfg.get("full_attention_interval", 4)  # the older way to give layer_types
        kw["layer_types"] = tuple(cfg.get("layer_types") or (
            "full_attention" if (i + 1) % every == 0 else "linear_attention"
            for i in range(n_layers)))
        for name in ("rope_theta", "partial_rotary_factor", "mrope_section", "mrope_interleaved"):
            if name in rope or name in cfg:  # 5.x: inside rope_parameters; 4.x: top level
                kw[name] = rope.get(name, cfg.get(name))
        kw["rope_theta"] = float(kw.get("rope_theta", cls.rope_theta))  # 4.x writes an int
        kw["torch_dtype"] = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
        try:
            return build(cls, kw)  # a wrong-typed value is refused with its key
        except ValueError as e:
            raise ValueError(f"unsupported Qwen3.5 config: {e}") from None

    def to_hf(self) -> dict:
        """config.json of a text-only Qwen3_5ForCausalLM, as transformers 5.x writes it."""
        c = asdict(self)
        rope = {"rope_type": "default", "rope_theta": c.pop("rope_theta"),
                "partial_rotary_factor": c.pop("partial_rotary_factor"),
                "mrope_section": list(c.pop("mrope_section")),
                "mrope_interleaved": c.pop("mrope_interleaved")}
        dtype = c.pop("torch_dtype")
        return {"architectures": ["Qwen3_5ForCausalLM"], "model_type": "qwen3_5_text", **c,
                "layer_types": list(self.layer_types), "dtype": dtype, "rope_parameters": rope,
                "hidden_act": "silu", "attention_dropout": 0.0, "use_cache": True}


# ---------------------------------------------------------------------------------------------
# Building blocks


class Qwen3_5RMSNorm(nn.Module):
    """Zero-centred RMSNorm: x_hat * (1 + w), multiplied in fp32, then cast (Gemma style)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))  # zero = identity scale, as upstream inits
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)


class Qwen3_5RMSNormGated(nn.Module):
    """DeltaNet output norm, per value head: w * x_hat.to(dtype) * silu(z) (not centred)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x, z):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        # the weight product rounds in the model dtype, the gate product is fp32
        return (self.weight * xf.to(x.dtype) * F.silu(z.float())).to(x.dtype)


class Qwen3_5Cache(KVCache):
    """Decoding state of every layer. Full-attention layers: keys/values as KVCache,
    (n_full, B, K, max_len, hd). DeltaNet layers: `conv` (n_linear, B, C, kernel - 1), the last
    pre-conv inputs in the model dtype, and `state` (n_linear, B, Hv, Dk, Dv), always fp32.
    A layer indexes these with its `slot` (its position among the layers of its kind)."""

    def __init__(self, config: Qwen3_5Config, batch_size: int, max_len: int,
                 dtype=torch.float32, device="cpu"):
        n_full = config.layer_types.count("full_attention")
        super().__init__(config, batch_size, max_len, dtype, device, n_layers=n_full)
        n_linear = config.num_hidden_layers - n_full
        self.conv = torch.zeros(n_linear, batch_size, config.conv_dim,
                                config.linear_conv_kernel_dim - 1, dtype=dtype, device=device)
        self.state = torch.zeros(n_linear, batch_size, config.linear_num_value_heads,
                                 config.linear_key_head_dim, config.linear_value_head_dim,
                                 dtype=torch.float32, device=device)

    def reset(self):
        super().reset()
        self.conv.zero_()
        self.state.zero_()


def l2norm(x, eps: float = 1e-6):
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)  # eps inside the sum (FLA's)


def chunk_gated_delta_rule(q, k, v, g, beta, state, chunk: int = 64):
    """The gated delta rule over L tokens, `chunk` at a time (the prompt path).

    q, k (B, H, L, Dk), v (B, H, L, Dv), g (log decay) and beta (B, H, L), state (B, H, Dk, Dv),
    all fp32. Returns the outputs (B, H, L, Dv) and the state after the last token.

    Inside a chunk, with gamma_i the cumulative log decay from the chunk start and S0 the state
    entering it, the values written are u = (I + A)^-1 (beta v - beta e^gamma k S0), with
    A_ij = beta_i e^(gamma_i - gamma_j) k_i.k_j for j < i; then
    o_i = e^gamma_i S0^T q_i + sum_{j<=i} e^(gamma_i - gamma_j) (q_i.k_j) u_j and
    S = e^gamma_C S0 + sum_j e^(gamma_C - gamma_j) k_j u_j^T."""
    B, H, L, Dk = k.shape
    Dv = v.shape[-1]
    pad = -L % chunk  # zero padding at the end is inert: k = 0 writes nothing, g = 0 keeps S
    q, k, v = (F.pad(x, (0, 0, 0, pad)).reshape(B, H, -1, chunk, x.shape[-1]) for x in (q, k, v))
    g, beta = (F.pad(x, (0, pad)).reshape(B, H, -1, chunk) for x in (g, beta))
    gamma = g.cumsum(-1)  # (B, H, N, c)
    future = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    decay = (gamma[..., :, None] - gamma[..., None, :]).masked_fill(future, float("-inf")).exp()
    k_beta = k * beta[..., None]
    # Only A's strict lower triangle is read: unitriangular supplies the identity.
    A = (k_beta @ k.transpose(-1, -2)) * decay  # (B, H, N, c, c)
    rhs = torch.cat([v * beta[..., None], k_beta * gamma.exp()[..., None]], dim=-1)
    u0, w = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True).split(
        [Dv, Dk], dim=-1)  # u = u0 - w @ S0
    attn = (q @ k.transpose(-1, -2)) * decay  # (B, H, N, c, c), diagonal included
    q_in = q * gamma.exp()[..., None]  # reads the entering state
    k_out = k * (gamma[..., -1:] - gamma).exp()[..., None]  # decayed to the chunk end
    chunk_decay = gamma[..., -1].exp()[..., None, None]  # (B, H, N, 1, 1)
    out = []
    for n in range(gamma.shape[2]):  # sequential over chunks only
        u = u0[:, :, n] - w[:, :, n] @ state  # (B, H, c, Dv)
        out.append(q_in[:, :, n] @ state + attn[:, :, n] @ u)
        state = state * chunk_decay[:, :, n] + k_out[:, :, n].transpose(-1, -2) @ u
    return torch.cat(out, dim=2)[:, :, :L], state


def recurrent_gated_delta_rule(q, k, v, g, beta, state):
    """The same rule one token at a time (the decoding path); shapes as chunk_gated_delta_rule."""
    out = []
    for t in range(k.shape[2]):
        state = state * g[:, :, t, None, None].exp()
        k_t = k[:, :, t, None]  # (B, H, 1, Dk)
        delta = (v[:, :, t, None] - k_t @ state) * beta[:, :, t, None, None]  # (B, H, 1, Dv)
        state = state + k_t.transpose(-1, -2) @ delta  # + k delta^T
        out.append(q[:, :, t, None] @ state)  # S^T q as a row, (B, H, 1, Dv)
    return torch.cat(out, dim=2), state


class Qwen3_5GatedDeltaNet(nn.Module):
    def __init__(self, config: Qwen3_5Config, slot: int):
        super().__init__()
        D, C = config.hidden_size, config.conv_dim
        self.slot = slot
        self.Hk, self.Hv = config.linear_num_key_heads, config.linear_num_value_heads
        self.Dk, self.Dv = config.linear_key_head_dim, config.linear_value_head_dim
        self.in_proj_qkv = nn.Linear(D, C, bias=False)
        self.in_proj_z = nn.Linear(D, self.Hv * self.Dv, bias=False)
        self.in_proj_b = nn.Linear(D, self.Hv, bias=False)
        self.in_proj_a = nn.Linear(D, self.Hv, bias=False)
        kernel = config.linear_conv_kernel_dim  # depthwise: weight (C, 1, kernel), no bias
        self.conv1d = nn.Conv1d(C, C, kernel, groups=C, padding=kernel - 1, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.Hv))
        self.A_log = nn.Parameter(torch.zeros(self.Hv))
        self.norm = Qwen3_5RMSNormGated(self.Dv, config.rms_norm_eps)
        self.out_proj = nn.Linear(self.Hv * self.Dv, D, bias=False)

    def forward(self, x, pad_mask, cache: Qwen3_5Cache | None):
        B, L, _ = x.shape
        if pad_mask is not None:  # (B, L): padded tokens become zeros and leave the state alone
            x = x * pad_mask[:, :, None].to(x.dtype)
        qkv = self.in_proj_qkv(x).transpose(1, 2)  # (B, C, L)
        kernel = self.conv1d.weight.shape[-1]
        window = (cache.conv[self.slot] if cache is not None else
                  qkv.new_zeros(B, qkv.shape[1], kernel - 1))  # the previous inputs (B, C, k-1)
        qkv = torch.cat([window, qkv], dim=-1)  # (B, C, k - 1 + L)
        if cache is not None:
            cache.conv[self.slot] = qkv[..., -(kernel - 1):]
        qkv = F.silu(F.conv1d(qkv, self.conv1d.weight, groups=qkv.shape[1]))  # (B, C, L) causal
        q, k, v = qkv.transpose(1, 2).split([self.Hk * self.Dk, self.Hk * self.Dk,
                                             self.Hv * self.Dv], dim=-1)
        # fp32 from here: unit-norm keys, queries scaled by Dk^-0.5, key head j -> value heads j*r..
        r = self.Hv // self.Hk
        q = (l2norm(q.reshape(B, L, self.Hk, self.Dk).float()) * self.Dk ** -0.5)
        k = l2norm(k.reshape(B, L, self.Hk, self.Dk).float())
        q, k = (t.repeat_interleave(r, dim=2).transpose(1, 2) for t in (q, k))  # (B, Hv, L, Dk)
        v = v.reshape(B, L, self.Hv, self.Dv).float().transpose(1, 2)  # (B, Hv, L, Dv)
        beta = self.in_proj_b(x).sigmoid().float().transpose(1, 2)  # (B, Hv, L)
        g = -self.A_log.float().exp() * F.softplus(self.in_proj_a(x).float() + self.dt_bias)
        g = g.transpose(1, 2)  # (B, Hv, L) log decay, <= 0
        state = (cache.state[self.slot] if cache is not None else
                 v.new_zeros(B, self.Hv, self.Dk, self.Dv))
        rule = recurrent_gated_delta_rule if L == 1 else chunk_gated_delta_rule
        y, state = rule(q, k, v, g, beta, state)  # (B, Hv, L, Dv)
        if cache is not None:
            cache.state[self.slot] = state
        y = y.transpose(1, 2).to(x.dtype)  # (B, L, Hv, Dv)
        y = self.norm(y, self.in_proj_z(x).view(B, L, self.Hv, self.Dv))
        return self.out_proj(y.reshape(B, L, -1))  # (B, L, D)


class Qwen3_5Attention(nn.Module):
    def __init__(self, config: Qwen3_5Config, slot: int):
        super().__init__()
        D, hd, bias = config.hidden_size, config.head_dim, config.attention_bias
        H, K = config.num_attention_heads, config.num_key_value_heads
        self.slot, self.head_dim = slot, hd
        self.q_proj = nn.Linear(D, H * hd * 2, bias=bias)  # per head: hd query rows, hd gate rows
        self.k_proj = nn.Linear(D, K * hd, bias=bias)
        self.v_proj = nn.Linear(D, K * hd, bias=bias)
        self.o_proj = nn.Linear(H * hd, D, bias=bias)
        self.q_norm = Qwen3_5RMSNorm(hd, config.rms_norm_eps)
        self.k_norm = Qwen3_5RMSNorm(hd, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache: Qwen3_5Cache | None):
        B, L, _ = x.shape
        hd = self.head_dim
        q, gate = self.q_proj(x).view(B, L, -1, 2 * hd).chunk(2, dim=-1)  # (B, L, H, hd) each
        q = self.q_norm(q).transpose(1, 2)  # (B, H, L, hd)
        k = self.k_norm(self.k_proj(x).view(B, L, -1, hd)).transpose(1, 2)  # (B, K, L, hd)
        v = self.v_proj(x).view(B, L, -1, hd).transpose(1, 2)  # (B, K, L, hd)
        q, k = partial_rope(q, cos, sin), partial_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.slot, k, v)  # (B, K, S, hd)
        H, K = q.shape[1], k.shape[1]
        if L == 1:  # one new token: no causal mask, no K/V expansion (as Qwen2Attention)
            y = F.scaled_dot_product_attention(q.reshape(B, K, H // K, hd), k, v, attn_mask=mask,
                                               scale=hd ** -0.5)  # (B, K, H/K, hd)
        else:  # mask None means causal (attention_mask_4d decided); pad query rows give zeros
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               scale=hd ** -0.5, enable_gqa=True)  # (B, H, L, hd)
            y = y.transpose(1, 2)
        y = y.reshape(B, L, -1) * torch.sigmoid(gate.reshape(B, L, -1))  # output gate
        return self.o_proj(y)  # (B, L, D)


def partial_rope(x, cos, sin):
    """RoPE (rotate-half) on the first cos.shape[-1] dims of x (B, H, L, hd); the rest pass."""
    r = cos.shape[-1]
    return torch.cat([apply_rope(x[..., :r], cos, sin), x[..., r:]], dim=-1)


class Qwen3_5DecoderLayer(nn.Module):
    def __init__(self, config: Qwen3_5Config, layer_type: str, slot: int):
        super().__init__()
        self.layer_type = layer_type
        if layer_type == "linear_attention":
            self.linear_attn = Qwen3_5GatedDeltaNet(config, slot)
        else:
            self.self_attn = Qwen3_5Attention(config, slot)
        self.mlp = Qwen2MLP(config)  # the same SwiGLU
        self.input_layernorm = Qwen3_5RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = Qwen3_5RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, pad_mask, cache):
        h = self.input_layernorm(x)
        if self.layer_type == "linear_attention":
            h = self.linear_attn(h, pad_mask, cache)
        else:
            h = self.self_attn(h, cos, sin, mask, cache)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


# ---------------------------------------------------------------------------------------------
# The model

# Checkpoint key prefix -> ours (speechllm.convert.place: the longest prefix wins). The text-only
# layout is ours already; published checkpoints are Qwen3_5ForConditionalGeneration, whose text
# model sits under model.language_model.*. None: known and deliberately not loaded.
QWEN3_5_KEYS = {
    "model.": "model.",
    "lm_head.": "lm_head.",
    "model.language_model.": "model.",
    "model.visual.": None,  # the vision tower
    "mtp.": None,  # the multi-token-prediction head (speculative decoding)
}


class Qwen3_5ForCausalLM(nn.Module):
    def __init__(self, config: Qwen3_5Config):
        super().__init__()
        self.config = config
        self.generation_config: dict = {}
        slots = {t: 0 for t in LAYER_TYPES}
        layers = []
        for t in config.layer_types:
            layers.append(Qwen3_5DecoderLayer(config, t, slots[t]))
            slots[t] += 1
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(layers),
            norm=Qwen3_5RMSNorm(config.hidden_size, config.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.tie_weights()

    # The head, vocabulary growth and the file format are Qwen2's (save_pretrained writes
    # config.to_hf(), the text-only layout).
    tie_weights = Qwen2ForCausalLM.tie_weights
    grow_vocab = Qwen2ForCausalLM.grow_vocab
    save_pretrained = Qwen2ForCausalLM.save_pretrained

    def new_cache(self, batch_size: int, max_len: int, dtype=None, device=None) -> Qwen3_5Cache:
        """The decoding cache generate() fills: max_len bounds the full-attention KV only."""
        w = self.lm_head.weight
        return Qwen3_5Cache(self.config, batch_size, max_len, dtype=dtype or w.dtype,
                            device=device or w.device)

    def forward(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, position_ids=None,
                cache: Qwen3_5Cache | None = None, logits_to_keep: int = 0,
                output_hidden_states=False, return_hidden=False):
        """Logits (B, L', V) with L' = L, or the last `logits_to_keep` positions if > 0.

        As Qwen2ForCausalLM.forward: input_ids (B, L) or inputs_embeds (B, L, D); attention_mask
        (B, cached + L), 1 real, 0 padding (left padding for decoding); position_ids (B, L),
        default arange(cached, cached + L). With output_hidden_states, returns (logits,
        hidden_states): the embeddings, each layer's output, and last the final-norm output."""
        h, position_ids, past = embed_inputs(self.model.embed_tokens, input_ids, inputs_embeds,
                                             position_ids, cache)  # (B, L, D)
        B, L, _ = h.shape
        cos, sin = rope_cos_sin(position_ids, self.config.rotary_dim, self.config.rope_theta,
                                h.dtype)  # (B, L, rotary_dim)
        mask = attention_mask_4d(attention_mask, L, past)
        # DeltaNet layers see the new tokens' padding, only when there is some and L > 1 (one
        # generated token is never padding), as transformers' create_recurrent_attention_mask.
        pad_mask = None
        if attention_mask is not None and L > 1 and not attention_mask[:, -L:].all():
            pad_mask = attention_mask[:, -L:]
        hidden_states = [h]
        for layer in self.model.layers:
            h = layer(h, cos, sin, mask, pad_mask, cache)
            hidden_states.append(h)
        h = self.model.norm(h)
        hidden_states[-1] = h  # HF: the last entry is after the final norm
        if cache is not None:
            cache.advance(L)
        if return_hidden:
            return h
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)
        return (logits, tuple(hidden_states)) if output_hidden_states else logits

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device="cpu"):
        """Load a Hugging Face Qwen3.5 directory: config.json + model.safetensors or shards listed
        in model.safetensors.index.json, text-only (Qwen3_5ForCausalLM) or multimodal
        (Qwen3_5ForConditionalGeneration: the vision tower and mtp head are skipped and logged).
        dtype None keeps the stored dtype (tensors stay memory-mapped)."""
        path = Path(path)
        config = Qwen3_5Config.from_hf(_read_config(
            path, supported=("Qwen3_5ForCausalLM", "Qwen3_5ForConditionalGeneration")))
        files = weight_files(path)
        with torch.device("meta"):
            model = cls(config)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if config.tie_word_embeddings:
            del expected["lm_head.weight"]
        found = {}  # file key -> shape, from the headers
        for file, names in files.items():
            shapes = headers(file)
            found.update({n: shapes[n][0] for n in names})
        _, ours, _ = place(QWEN3_5_KEYS, found)  # file key -> our key (None: skipped)
        skipped = sorted(n for n, k in ours.items() if k is None)
        if skipped:
            log.info("%s: skipped %d tensors of the vision tower / mtp head: %s", path,
                     len(skipped), ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else ""))
        # Check in the file's own names, so an error names what is in the file.
        file_key = {k: n for n, k in ours.items() if k is not None}
        check_fit({n: s for n, s in found.items() if n not in skipped},
                  {file_key.get(k, k): s for k, s in expected.items()}, f"{path} (Qwen3.5)")

        state = {}
        for file, names in files.items():
            with open_safetensors(file, device) as f:
                for name in names:
                    if ours.get(name) in expected:
                        t = f.get_tensor(name)
                        state[ours[name]] = t.to(dtype) if dtype is not None else t
        return take_weights(model, state, path)
