"""SortFormer speaker diarizer: NeMo's offline SortformerEncLabelModel without NeMo.

    audio (B, N) @16 kHz --peak normalise--> --preprocessor--> (B, n_mels, T_mel)
          --encoder (FastConformer)--> (B, T, D_fc) --encoder_proj--> (B, T, D_tf)
          --transformer_encoder (post-LN)--> --head--> sigmoid (B, T, S), one row per 80 ms frame

Each speaker gets an independent sigmoid (overlap allowed); speakers are numbered by arrival time,
up to 4. Matches NeMo 3.0.0 (diar_sortformer_4spk-v1 layout) to float32 rounding. Quirks:
- The waveform batch is scaled by 1 / (max + 1e-3), the signed max over the whole padded batch, so
  a clip's output depends (slightly) on what it is batched with. Batch 1 to be independent of that.
- The frontend pads to a multiple of 16 frames (pad_to, AudioToMelSpectrogramPreprocessor's class
  default), then NeMo trims the features to the longest valid length before the encoder.
- The Transformer has no positional encoding; q and k are each divided by d_head^(1/4) instead of
  the scores by sqrt(d_head); padded keys get -10000, padded queries are not masked.
- The head (relu, Linear, relu, Linear) starts with a ReLU on the Transformer output.
- `sortformer_modules.hidden_to_spks` is in every checkpoint but unused by this path; the import
  table in convert.py lists it as deliberately dropped.
- Output frames past each item's length are exactly 0.
"""
import logging
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .audio import LogMelFrontend, PreprocessorConfig
from .config import build, refuse_unknown
from .convert import dropped_keys, open_nemo, reading, remap
from .fastconformer import FastConformer, FastConformerConfig, make_pad_mask
from .weights import read_config, read_state, require, save_dir

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class TransformerConfig:
    """NeMo TransformerEncoder arguments (post-LN only); defaults are diar_sortformer_4spk-v1's."""

    num_layers: int = 18
    hidden_size: int = 192  # tf_d_model
    inner_size: int = 768
    num_attention_heads: int = 8
    attn_score_dropout: float = 0.5
    attn_layer_dropout: float = 0.5
    ffn_dropout: float = 0.5

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"transformer hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")

    @classmethod
    def from_nemo(cls, d: dict) -> "TransformerConfig":
        for key, only in (("pre_ln", False), ("hidden_act", "relu"), ("mask_future", False)):
            if d.get(key, only) != only:
                raise ValueError(f"transformer_encoder {key}={d[key]!r} is not supported (only {only!r})")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class SortFormerConfig:
    preprocessor: PreprocessorConfig
    encoder: FastConformerConfig
    transformer: TransformerConfig = TransformerConfig()
    num_spks: int = 4
    dropout_rate: float = 0.5  # sortformer_modules.dropout_rate: the head's dropout
    eps: float = 1e-3  # peak normalisation: audio / (max + eps)

    @classmethod
    def from_nemo(cls, c: dict, legacy_frontend: bool = False) -> "SortFormerConfig":
        if c.get("streaming_mode", False):
            raise ValueError("streaming_mode=True (streaming SortFormer with a speaker cache) is not implemented; "
                             "only the offline model is")
        enc = FastConformerConfig.from_nemo(c["encoder"])
        tf = TransformerConfig.from_nemo(c["transformer_encoder"])
        mods = c["sortformer_modules"]
        if mods.get("fc_d_model", enc.out_dim) != enc.out_dim or mods.get("tf_d_model", tf.hidden_size) != tf.hidden_size:
            raise ValueError(f"sortformer_modules fc_d_model/tf_d_model={mods.get('fc_d_model')}/{mods.get('tf_d_model')} "
                             f"disagree with the encoder ({enc.out_dim}) and transformer ({tf.hidden_size})")
        return cls(
            preprocessor=PreprocessorConfig.from_nemo(c["preprocessor"], legacy=legacy_frontend),
            encoder=enc,
            transformer=tf,
            num_spks=int(mods.get("num_spks", 4)),
            dropout_rate=float(mods.get("dropout_rate", 0.5)),
            eps=float(c.get("eps", 1e-3)),
        )

    def to_dict(self) -> dict:
        return {
            "model_type": "sortformer",
            "preprocessor": self.preprocessor.to_dict(),
            "encoder": self.encoder.to_dict(),
            "transformer": asdict(self.transformer),
            "num_spks": self.num_spks,
            "dropout_rate": self.dropout_rate,
            "eps": self.eps,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "SortFormerConfig":
        if d.get("model_type") != "sortformer":
            raise ValueError(f"not a SortFormer checkpoint config: model_type={d.get('model_type')!r}")
        refuse_unknown(d, ("model_type", "preprocessor", "encoder", "transformer", "num_spks", "dropout_rate", "eps"))
        return cls(
            preprocessor=PreprocessorConfig.from_dict(d["preprocessor"]),
            encoder=FastConformerConfig.from_dict(d["encoder"]),
            transformer=build(TransformerConfig, d["transformer"], "transformer."),
            num_spks=d["num_spks"],
            dropout_rate=d["dropout_rate"],
            eps=d["eps"],
        )


def peak_scale(audio: torch.Tensor, eps: float) -> torch.Tensor:
    """NeMo's offline input scaling: 1 / (max + eps), the signed max over the whole padded batch."""
    return 1.0 / (audio.max() + eps)


# -----------------------------------------------------------------------------
# post-LN Transformer (NeMo TransformerEncoder)


class MultiHeadAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        d, self.h = cfg.hidden_size, cfg.num_attention_heads
        self.d_head = d // self.h
        self.query_net = nn.Linear(d, d)
        self.key_net = nn.Linear(d, d)
        self.value_net = nn.Linear(d, d)
        self.out_projection = nn.Linear(d, d)
        self.score_dropout = cfg.attn_score_dropout
        self.layer_dropout = nn.Dropout(cfg.attn_layer_dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        # NeMo scales q and k by d_head^(-1/4) each, not the scores by d_head^(-1/2): same maths,
        # its rounding. So SDPA runs with scale 1.
        scale = math.sqrt(math.sqrt(self.d_head))
        q = self.query_net(x).view(b, t, self.h, self.d_head).transpose(1, 2) / scale  # (B, H, T, d_head)
        k = self.key_net(x).view(b, t, self.h, self.d_head).transpose(1, 2) / scale
        v = self.value_net(x).view(b, t, self.h, self.d_head).transpose(1, 2)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0,
                                             dropout_p=self.score_dropout if self.training else 0.0)
        return self.layer_dropout(self.out_projection(ctx.transpose(1, 2).reshape(b, t, d)))  # (B, T, D)


class PositionWiseFF(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.dense_in = nn.Linear(cfg.hidden_size, cfg.inner_size)
        self.dense_out = nn.Linear(cfg.inner_size, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.ffn_dropout)

    def forward(self, x):
        return self.dropout(self.dense_out(F.relu(self.dense_in(x))))


class TransformerEncoderBlock(nn.Module):
    """Post-LN: h = LN1(x + MHA(x)); y = LN2(h + FFN(h))."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.layer_norm_1 = nn.LayerNorm(cfg.hidden_size)
        self.first_sub_layer = MultiHeadAttention(cfg)
        self.layer_norm_2 = nn.LayerNorm(cfg.hidden_size)
        self.second_sub_layer = PositionWiseFF(cfg)

    def forward(self, x, bias):
        x = self.layer_norm_1(x + self.first_sub_layer(x, bias))
        return self.layer_norm_2(x + self.second_sub_layer(x))


class TransformerEncoder(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.layers = nn.ModuleList(TransformerEncoderBlock(cfg) for _ in range(cfg.num_layers))

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """x (B, T, D), valid (B, T) bool -> (B, T, D). Only keys are masked."""
        bias = (1.0 - valid.to(x.dtype))[:, None, None, :] * -10000.0  # (B, 1, 1, T), NeMo's NEG_INF
        for layer in self.layers:
            x = layer(x, bias)
        return x


class SortformerModules(nn.Module):
    """NeMo's SortformerModules, the parts the offline model uses: encoder_proj and the speaker head."""

    def __init__(self, cfg: SortFormerConfig):
        super().__init__()
        d_fc, d_tf = cfg.encoder.out_dim, cfg.transformer.hidden_size
        self.encoder_proj = nn.Linear(d_fc, d_tf)
        self.first_hidden_to_hidden = nn.Linear(d_tf, d_tf)
        self.single_hidden_to_spks = nn.Linear(d_tf, cfg.num_spks)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def speaker_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Transformer output (B, T, D_tf) -> logits (B, T, S); NeMo applies the sigmoid after."""
        x = self.first_hidden_to_hidden(self.dropout(F.relu(x)))
        return self.single_hidden_to_spks(self.dropout(F.relu(x)))


# -----------------------------------------------------------------------------
# the model


class SortFormer(nn.Module):
    def __init__(self, cfg: SortFormerConfig):
        super().__init__()
        self.cfg = cfg
        self.preprocessor = LogMelFrontend(cfg.preprocessor)
        self.encoder = FastConformer(cfg.encoder)
        self.sortformer_modules = SortformerModules(cfg)
        self.transformer_encoder = TransformerEncoder(cfg.transformer)

    def features(self, audio: torch.Tensor, lengths: torch.Tensor):
        """audio (B, N), lengths (B,) samples -> features (B, n_mels, max valid frames), lengths (B,)."""
        audio = audio * peak_scale(audio, self.cfg.eps)
        feats, lengths = self.preprocessor(audio, lengths)
        # NeMo drops the pad_to padding and the always-invalid last frame before the encoder.
        return feats[..., : int(lengths.max())], lengths

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor):
        """audio (B, N) float at 16 kHz, lengths (B,) samples -> probs (B, T, S), lengths (B,) frames."""
        feats, feat_lens = self.features(audio, lengths)
        x, lengths = self.encoder(feats, feat_lens)  # (B, T, D_fc)
        x = self.sortformer_modules.encoder_proj(x)  # (B, T, D_tf)
        valid = ~make_pad_mask(lengths, x.shape[1])  # (B, T)
        x = self.transformer_encoder(x, valid)
        probs = torch.sigmoid(self.sortformer_modules.speaker_logits(x))  # (B, T, S)
        return probs * valid[..., None], lengths

    @torch.inference_mode()
    def diarize(self, audio: torch.Tensor, lengths: torch.Tensor | None = None):
        """audio (B, N) float at 16 kHz, lengths (B,) samples -> speaker probabilities (B, T, S) per 80 ms
        frame, zero past each item's length, and lengths (B,) frames. Items share one peak scale, as
        in NeMo; activity.probs_to_segments turns probabilities into segments."""
        if lengths is None:
            lengths = torch.full(audio.shape[:1], audio.shape[1], dtype=torch.long)
        device = next(self.parameters()).device
        return self(audio.to(device), lengths.to(device))

    # -- checkpoints -----------------------------------------------------------------------------

    @classmethod
    def from_nemo(cls, path, legacy_frontend: bool = False) -> "SortFormer":
        archive, table = open_nemo(path, "sortformer", "a SortFormer diarizer")
        with reading(archive, path):
            target = archive.target
            model = cls(SortFormerConfig.from_nemo(archive.config, legacy_frontend))
            source = archive.state_dict()
            sd = remap(table, source, model.state_dict(), f"{path} ({target})")
            model.load_state_dict(sd, strict=True)
            log.info("%s: left out, unused by the offline forward: %s", path, ", ".join(dropped_keys(table, source)))
        return model.eval()

    @classmethod
    def from_pretrained(cls, path) -> "SortFormer":
        path = Path(path)
        require(path, ("config.json", "model.safetensors"), "a SortFormer checkpoint directory")
        cfg = read_config(path / "config.json", SortFormerConfig.from_dict)
        with torch.device("meta"):
            model = cls(cfg)
        model.load_state_dict(read_state(path, model.state_dict()), strict=True, assign=True)
        return model.eval()

    def save_pretrained(self, path) -> None:
        save_dir(path, self.cfg.to_dict(), self.state_dict())
