"""Qwen2 / Qwen2.5 and Qwen3 (dense) decoder-only language models in plain PyTorch.

Matches transformers' `Qwen2ForCausalLM` and `Qwen3ForCausalLM` (checked against fixtures written
by transformers 5.23, fp32, to ~1e-5 on logits) and loads their Hugging Face directories directly:
module names are the HF state-dict keys, so loading is a plain `load_state_dict` with no renaming.
One class serves both; `config.model_type` selects the few places where Qwen3 differs.

Numerical quirks kept on purpose (spec: shared/spec/qwen2_hf.md, section 2):
- RMSNorm normalises in float32, casts back to the input dtype, and only then multiplies by the
  weight (Qwen3.5 multiplies first; Qwen2 does not).
- RoPE is the rotate-half (GPT-NeoX) layout; inv_freq and the angles position * inv_freq are
  float32 products exactly as transformers computes them, then cos/sin are cast to the model dtype.
- Qwen2's q/k/v projections have biases; o_proj and the MLP do not.
- The output head is tied to the token embedding when `tie_word_embeddings` (Qwen2.5-0.5B/1.5B):
  the file then has no `lm_head.weight`.
- hidden_states follow HF: the input of every layer, and last the output of the final norm.
- Qwen3 differs in three places (transformers' modeling_qwen3.py): q_norm / k_norm, RMSNorms over
  head_dim applied to every query and key head before RoPE (same dtype recipe as the layer norms);
  no biases at all, `attention_bias` covering q, k, v and o_proj alike; and an explicit head_dim,
  defaulting to 128 when config.json lacks it, so q_proj's heads * head_dim rows need not equal
  hidden_size (Qwen3-0.6B: 16 * 128 = 2048 for hidden 1024).

Dimension letters: B batch, L new tokens, S keys (cached + new), D hidden, H query heads,
K key/value heads, hd head_dim, V vocab.
"""
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import build
from .weights import read_json, read_state, save_dir


# model_type -> the architecture name config.json carries for it.
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@dataclass(frozen=True)
class Qwen2Config:
    # Defaults are Qwen2.5-0.5B's config.json (transformers' own Qwen2Config defaults differ).
    model_type: str = "qwen2"  # "qwen2" (Qwen2, Qwen2.5) or "qwen3" (Qwen3 dense)
    vocab_size: int = 151936  # embedding rows; the tokenizer has 151665 tokens, the rest are spare
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: int | None = None  # None: qwen2 hidden_size // num_attention_heads; qwen3 128
    max_position_embeddings: int = 32768  # informational: RoPE is computed for any position
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151643
    torch_dtype: str = "bfloat16"  # dtype of the published weights; written back on save
    # Qwen3 only: biases on q, k, v and o_proj (None -> False, Qwen3Config's default). Qwen2 keeps
    # None: its biases are fixed, on q/k/v and not on o_proj, and config.json has no such key.
    attention_bias: bool | None = None

    def __post_init__(self):
        if self.model_type not in ARCHITECTURES:
            raise ValueError(f"model_type {self.model_type!r} is not supported: only "
                             "'qwen2' (Qwen2 / Qwen2.5) and 'qwen3' (Qwen3 dense)")
        # frozen dataclass: derived defaults are filled once, here.
        if self.model_type == "qwen3":
            if self.head_dim is None:  # Qwen3Config's default, NOT hidden / heads
                object.__setattr__(self, "head_dim", 128)
            if self.attention_bias is None:
                object.__setattr__(self, "attention_bias", False)
        elif self.attention_bias is not None:
            raise ValueError("attention_bias is a Qwen3 setting; Qwen2 always has q/k/v biases and "
                             "no o_proj bias")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                                 f"num_attention_heads {self.num_attention_heads}; set head_dim")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")

    @property
    def qk_norm(self) -> bool:
        """Qwen3 RMS-normalises every query and key head before RoPE."""
        return self.model_type == "qwen3"

    @classmethod
    def from_hf(cls, cfg: dict) -> "Qwen2Config":
        """Read a transformers config.json (model_type qwen2 or qwen3), either dialect: 4.x
        (top-level rope_theta, torch_dtype) or 5.x (rope_parameters, dtype, layer_types). Missing
        optional keys take transformers' Qwen2Config / Qwen3Config defaults, not Qwen2.5-0.5B's,
        because that is what HF would do."""
        model_type = cfg.get("model_type")
        if model_type not in ARCHITECTURES:
            raise ValueError(f"model_type {model_type!r} is not supported: only 'qwen2' "
                             "(Qwen2 / Qwen2.5) and 'qwen3' (Qwen3 dense) are implemented")
        archs = cfg.get("architectures") or [ARCHITECTURES[model_type]]
        if ARCHITECTURES[model_type] not in archs:
            raise ValueError(f"architectures {archs} are not supported for model_type "
                             f"{model_type!r} (only {ARCHITECTURES[model_type]})")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads")
        if missing := [k for k in required if k not in cfg]:
            raise ValueError(f"config is missing required keys {missing}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {cfg['hidden_act']!r} is not supported (only 'silu')")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            field = "rope_parameters" if "rope_parameters" in cfg else "rope_scaling"
            raise ValueError(f"{field} with rope_type {rope_type!r} is not supported "
                             "(only plain RoPE)")
        n_layers = cfg["num_hidden_layers"]
        layer_types = cfg.get("layer_types")
        if layer_types is None and cfg.get("use_sliding_window"):
            # transformers' rule: layers at index >= max_window_layers use the sliding window.
            sliding = cfg.get("max_window_layers", 28) < n_layers
            layer_types = ["sliding_attention" if sliding else "full_attention"]
        if layer_types is not None and set(layer_types) != {"full_attention"}:
            field = "layer_types" if "layer_types" in cfg else "use_sliding_window"
            raise ValueError(f"{field}: sliding-window attention is not supported "
                             f"(layer types {sorted(set(layer_types))})")
        # build: a wrong-typed value ("hidden_size": "896") is refused here, with its key
        return build(cls, dict(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=n_layers,
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            head_dim=cfg.get("head_dim"),
            max_position_embeddings=cfg.get("max_position_embeddings", 32768),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            torch_dtype=cfg.get("dtype") or cfg.get("torch_dtype") or "float32",
            # transformers ignores the key in a Qwen2 config; its Qwen2 biases are hard-wired.
            attention_bias=cfg.get("attention_bias", False) if model_type == "qwen3" else None,
        ))

    def to_hf(self) -> dict:
        """config.json in the transformers 4.x dialect that the Qwen2.5 / Qwen3 repositories use."""
        fields = asdict(self)  # model_type first, as in the published files
        if self.model_type == "qwen2":
            del fields["attention_bias"]  # not a Qwen2 key
        return {
            "architectures": [ARCHITECTURES[self.model_type]], **fields,
            "hidden_act": "silu", "attention_dropout": 0.0, "rope_scaling": None,
            "use_sliding_window": False, "sliding_window": None,
            "max_window_layers": self.num_hidden_layers, "use_cache": True,
        }


# ---------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        # Qwen2RMSNorm casts back BEFORE the weight multiply (a bf16 * bf16 product in bf16 models).
        return self.weight * x.to(dtype)


def rope_cos_sin(position_ids, head_dim: int, theta: float, dtype):
    """cos, sin of shape (B, L, hd) for position_ids (B, L).

    Copies transformers' float32 recipe: angles computed in float64 and rounded afterwards differ
    by up to 1.4e-4 at positions < 4096 (spec 2.4). inv_freq is recomputed per call (hd/2 numbers),
    so it is never a meta tensor after loading nor rounded by model.to(bfloat16)."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float()
    inv_freq = 1.0 / (theta ** (exponent / head_dim))  # (hd/2,)
    freqs = position_ids.float()[..., None] * inv_freq  # (B, L, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, L, hd): dims i and i + hd/2 share a frequency
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x (B, H, L, hd) rotated with rotate_half: pairs are (i, i + hd/2), not interleaved."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def attention_mask_4d(attention_mask, L: int, past: int):
    """Boolean SDPA mask, True = attend, or None when plain causal attention is enough.

    attention_mask (B, S) marks real keys with 1 and padding with 0 over the whole sequence
    (cached + new), as in transformers. Causality is by cache order: query i sees keys up to
    past + i."""
    S = past + L
    if attention_mask is None and (past == 0 or L == 1):
        return None  # SDPA's is_causal (prefill) or no mask at all (one new token)
    if attention_mask is not None and attention_mask.shape[-1] != S:
        raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} tokens, expected "
                         f"{S} (cached {past} + new {L})")
    device = attention_mask.device if attention_mask is not None else None
    causal = torch.ones(L, S, dtype=torch.bool, device=device).tril(diagonal=past)  # (L, S)
    if attention_mask is None:
        return causal
    keep = attention_mask[:, None, None, :].bool()  # (B, 1, 1, S)
    return keep if L == 1 else keep & causal  # (B, 1, L, S)


class KVCache:
    """Preallocated keys and values of every layer, (n_layers, B, K, max_len, hd) each.

    Keys are stored after RoPE. `update` writes new entries at `length` and returns views of the
    filled part; the model calls `advance` once all layers have written. n_layers defaults to
    every layer; a hybrid model (Qwen3.5) passes the number of its attention layers."""

    def __init__(self, config: Qwen2Config, batch_size: int, max_len: int,
                 dtype=torch.float32, device="cpu", n_layers: int | None = None):
        n_layers = config.num_hidden_layers if n_layers is None else n_layers
        shape = (n_layers, batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    def update(self, layer: int, k, v):
        end = self.length + k.shape[2]
        if end > self.k.shape[3]:
            raise ValueError(f"KV cache overflow: {end} tokens > max_len {self.k.shape[3]}")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, K, S, hd) views

    def advance(self, n: int):
        self.length += n

    def reset(self):
        self.length = 0


class Qwen2Attention(nn.Module):
    def __init__(self, config: Qwen2Config, layer_idx: int):
        super().__init__()
        D, hd = config.hidden_size, config.head_dim
        self.layer_idx, self.head_dim, self.qk_norm = layer_idx, hd, config.qk_norm
        # Qwen2: biases on q/k/v only. Qwen3: attention_bias decides for all four (False in every
        # released checkpoint).
        bias = config.attention_bias
        qkv_bias, o_bias = (True, False) if config.model_type == "qwen2" else (bias, bias)
        self.q_proj = nn.Linear(D, config.num_attention_heads * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(D, config.num_key_value_heads * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(D, config.num_key_value_heads * hd, bias=qkv_bias)
        self.o_proj = nn.Linear(config.num_attention_heads * hd, D, bias=o_bias)
        if self.qk_norm:  # Qwen3: weights of shape (hd,), shared by all heads
            self.q_norm = RMSNorm(hd, config.rms_norm_eps)
            self.k_norm = RMSNorm(hd, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache: KVCache | None):
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, -1, self.head_dim)  # (B, L, H, hd)
        k = self.k_proj(x).view(B, L, -1, self.head_dim)  # (B, L, K, hd)
        if self.qk_norm:  # Qwen3: each head normalised over hd, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, L, hd), (B, K, L, hd)
        v = self.v_proj(x).view(B, L, -1, self.head_dim).transpose(1, 2)  # (B, K, L, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, K, S, hd)
        H, K = q.shape[1], k.shape[1]
        scale = self.head_dim ** -0.5
        if L == 1:
            # One new token: the H/K query heads sharing a kv head become that head's "queries",
            # (B, H, 1, hd) -> (B, K, H/K, hd); no causal mask is needed and no K/V expansion
            # (transformers 5.x does the same; ~7x faster than enable_gqa in bf16 on CPU).
            y = F.scaled_dot_product_attention(q.reshape(B, K, H // K, -1), k, v, attn_mask=mask,
                                               scale=scale)  # (B, K, H/K, hd)
            return self.o_proj(y.reshape(B, 1, -1))  # (B, 1, D)
        # enable_gqa: query head h reads kv head h // (H / K), as HF's repeat_kv, without copying.
        # A mask of None means causal here (attention_mask_4d decided that). Fully masked query
        # rows (left padding) come out as zeros with torch >= 2.5.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           scale=scale, enable_gqa=True)  # (B, H, L, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, L, -1))  # (B, L, D)


class Qwen2MLP(nn.Module):
    def __init__(self, config: Qwen2Config):
        super().__init__()
        D, F_ = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(D, F_, bias=False)
        self.up_proj = nn.Linear(D, F_, bias=False)
        self.down_proj = nn.Linear(F_, D, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, config: Qwen2Config, layer_idx: int):
        super().__init__()
        self.self_attn = Qwen2Attention(config, layer_idx)
        self.mlp = Qwen2MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


# ---------------------------------------------------------------------------------------------
# The model


def embed_inputs(embed_tokens, input_ids, inputs_embeds, position_ids, cache):
    """The forward's inputs: embeddings (B, L, D) from ids or as given, position ids defaulting to
    arange(cached, cached + L) for every row, and the number of cached positions."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds")
    h = inputs_embeds if input_ids is None else embed_tokens(input_ids)
    past = cache.length if cache is not None else 0
    if position_ids is None:
        B, L, _ = h.shape
        position_ids = torch.arange(past, past + L, device=h.device).expand(B, L)
    return h, position_ids, past


def take_weights(model, state: dict, path: Path):
    """Fill a meta-device LLM from a full state dict (lm_head.weight absent when tied) and read
    the directory's generation_config.json; shared by the Qwen2/Qwen3 and Qwen3.5 readers."""
    if model.config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if model.config.tie_word_embeddings:
        model.tie_weights()  # assign=True wraps each key in its own Parameter: re-share
    if (path / "generation_config.json").is_file():
        model.generation_config = read_json(path / "generation_config.json")
    return model.eval()


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.config = config
        self.generation_config: dict = {}  # generation_config.json of a loaded directory
        # A ModuleDict named `model` gives the HF key prefixes (model.embed_tokens, model.layers.N).
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(Qwen2DecoderLayer(config, i)
                                 for i in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.tie_weights()

    def tie_weights(self):
        self.lm_head.weight = self.model.embed_tokens.weight

    def new_cache(self, batch_size: int, max_len: int, dtype=None, device=None) -> KVCache:
        """The decoding cache generate() fills: room for max_len tokens (prompt + new) per row."""
        w = self.model.embed_tokens.weight  # the model's dtype even with an int8 head (quant.py)
        return KVCache(self.config, batch_size, max_len, dtype=dtype or w.dtype,
                       device=device or w.device)

    def forward(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, position_ids=None,
                cache: KVCache | None = None, logits_to_keep: int = 0, output_hidden_states=False,
                return_hidden=False):
        """Logits (B, L', V) with L' = L, or the last `logits_to_keep` positions if > 0.

        Pass input_ids (B, L) or inputs_embeds (B, L, D) (audio embeddings are spliced this way).
        attention_mask (B, cached + L): 1 real, 0 padding. position_ids (B, L) default to
        arange(cached, cached + L) for every row; left-padded batches should pass cumsum(mask) - 1
        as HF generate does. With output_hidden_states, returns (logits, hidden_states), the
        latter num_hidden_layers + 1 tensors of shape (B, L, D)."""
        h, position_ids, past = embed_inputs(self.model.embed_tokens, input_ids, inputs_embeds,
                                             position_ids, cache)  # (B, L, D)
        B, L, _ = h.shape
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, h.dtype)
        mask = attention_mask_4d(attention_mask, L, past)
        hidden_states = []
        for layer in self.model.layers:
            if output_hidden_states:  # else no layer's output outlives the next layer
                hidden_states.append(h)
            h = layer(h, cos, sin, mask, cache)
        h = self.model.norm(h)
        hidden_states.append(h)  # HF: the last entry is after the final norm
        if cache is not None:
            cache.advance(L)
        if return_hidden:  # the final-norm output (B, L, D); the caller applies lm_head where needed
            return h
        # Slicing before the head saves the (L, D) x (D, V) matmul when only the last step matters.
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)
        return (logits, tuple(hidden_states)) if output_hidden_states else logits

    def grow_vocab(self, n: int):
        """Make sure the embedding (and head) have at least n rows; never shrinks. The new rows
        start as init_token_rows says. Build optimizers after calling this: the parameters are
        replaced."""
        old = self.config.vocab_size
        if n <= old:
            return

        def grown(w):  # (old, D) -> (n, D)
            return nn.Parameter(torch.cat([w.detach(), w.new_zeros(n - old, w.shape[1])]), requires_grad=w.requires_grad)

        embed = self.model.embed_tokens
        embed.weight, embed.num_embeddings = grown(embed.weight), n
        if self.config.tie_word_embeddings:
            self.tie_weights()
        else:
            self.lm_head.weight = grown(self.lm_head.weight)
        self.lm_head.out_features = n
        self.config = replace(self.config, vocab_size=n)
        init_token_rows(self, list(range(old, n)))

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device="cpu"):
        """Load a Hugging Face Qwen2 or Qwen3 directory: config.json + model.safetensors or shards
        listed in model.safetensors.index.json. The model is built on the meta device and tensors
        come one at a time from memory-mapped files, so the weights are held once: with dtype None
        (keep the stored dtype) they stay mapped and are paged in on use; a conversion makes one
        new copy."""
        path = Path(path)
        try:
            config = Qwen2Config.from_hf(_read_config(path))
        except ValueError as e:
            raise ValueError(f"{path / 'config.json'}: {e}") from None
        with torch.device("meta"):
            model = cls(config)
        expected = model.state_dict()
        if config.tie_word_embeddings:
            del expected["lm_head.weight"]
        # Old checkpoints may carry the non-persistent RoPE buffer; a tied checkpoint may still carry
        # lm_head.weight: transformers ties (ignores it) in both cases, and so do we.
        state = read_state(path, expected, dtype, device, ignore=("rotary_emb.inv_freq", "lm_head.weight"),
                           what=f"{path} ({config.model_type})")
        return take_weights(model, state, path)

    def save_pretrained(self, path):
        """Write config.json (4.x dialect) and model.safetensors that transformers can load; a tied
        head is left out of the file, as transformers does. Each file is written beside and renamed
        (weights.save_dir): a model loaded from this directory may still be memory-mapping the old
        file, which must not be truncated under it."""
        state = self.state_dict()
        if self.config.tie_word_embeddings:
            del state["lm_head.weight"]  # safetensors refuses tensors that share memory
        dtype = str(state["model.embed_tokens.weight"].dtype).removeprefix("torch.")
        config = replace(self.config, torch_dtype=dtype).to_hf()
        gen = {"generation_config.json": (json.dumps(self.generation_config, indent=2) + "\n").encode()} \
            if self.generation_config else {}
        save_dir(path, config, state, gen)


@torch.no_grad()
def init_token_rows(llm: Qwen2ForCausalLM, ids: list[int]) -> None:
    """The one rule for rows of tokens the LLM never saw (new rows, or ours on Qwen's spare,
    untrained rows): the embedding row (and an untied head's) starts at the mean of the rows before
    the first of them, computed in float32: an 'average token' as input, a logit near the average
    as output. transformers instead samples around that mean with the rows' covariance; the mean is
    deterministic."""
    first = min(ids)
    heads = [llm.model.embed_tokens.weight] + ([] if llm.config.tie_word_embeddings else [llm.lm_head.weight])
    for w in heads:
        w[ids] = w[:first].float().mean(0).to(w.dtype)


# ---------------------------------------------------------------------------------------------
# Reading Hugging Face directories


def _read_config(path: Path, supported: tuple[str, ...] | None = None) -> dict:
    """config.json as a dict; `supported` architectures, when given, are checked here (Qwen2 and
    Qwen3 check theirs against model_type in Qwen2Config.from_hf)."""
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory)")
    cfg = read_json(path / "config.json")
    archs = cfg.get("architectures")
    if supported is not None and archs and not set(archs) & set(supported):
        raise ValueError(f"{path / 'config.json'}: architectures {archs} are not supported "
                         f"(only {' / '.join(supported)})")
    return cfg
