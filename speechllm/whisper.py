"""Whisper's audio encoder with its log-mel front end, matching transformers 5.23's
`WhisperFeatureExtractor` (torch path) and `WhisperModel.encoder` without transformers.

    audio (B, N) @16 kHz --pad/cut to 30 s--> (B, 480000) --frontend--> log-mel (B, n_mels, 3000) 10 ms
          --conv1, conv2 (stride 2) + embed_positions--> (B, 1500, D) --pre-LN layers, layer_norm--> (B, 1500, D) 20 ms

Whisper always listens to a full 30 s window: the mel is padded to 3000 frames and the encoder
attends over all 1500 positions, with no padding mask. We do the same. Running only the frames of
a short clip (with embed_positions[:T], the whisper.cpp `audio_ctx` shortcut) changes the valid
outputs by O(1) for a model trained on full windows. What we add is the bookkeeping a Speech-LLM
needs: `features` returns the mel frames that cover audio, ceil(samples / 160), `encode` the encoder
frames, ceil(samples / 320), and by default trims its output to the longest of those in the batch
(`trim=False` keeps all 1500). Frames past an item's length are computed, not masked: they are
Whisper's view of the silence after the clip, and a caller keeps only `lengths` of them.

- Front end: samples past each length are zeroed, so a padded batch gives each item's own features
  (the max - 8 floor is per example). It runs in float32 with autocast off, whatever the encoder's
  dtype; its window and filters are computed here, not stored in checkpoints (transformers does the
  same), and stay float32 through any `model.to(dtype)` (as audio.LogMelFrontend). Dither, if
  configured, is added in training mode only.
- Encoder: `embed_positions` is read from the checkpoint, never recomputed: in a bf16/fp16 checkpoint
  the stored table is the rounded one. k_proj has no bias. GELU is the erf form.

Checkpoints: `from_pretrained` reads a Hugging Face WhisperModel or WhisperForConditionalGeneration
directory (encoder keys `encoder.*` or `model.encoder.*`; the decoder and `proj_out` are reported and
left out) or one written by `save_pretrained` (model_type "whisper_encoder"). Module names are
transformers' state-dict keys minus the `encoder.` prefix. B batch, N samples, T frames, D d_model,
H heads.
"""
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .audio import SAMPLE_RATE, AudioError, Float32Frontend, mel_filterbank
from .convert import dropped_keys, place, remap
from .config import build
from .weights import headers, open_safetensors, read_json, save_dir, weight_files

log = logging.getLogger(__name__)

# Hugging Face Whisper key prefix -> ours; None: known and deliberately not imported.
WHISPER_HF_KEYS = {
    "encoder.": "",  # WhisperModel
    "model.encoder.": "",  # WhisperForConditionalGeneration
    "decoder.": None,
    "model.decoder.": None,
    "proj_out.": None,  # the LM head, tied to the decoder's token embedding
}

# Which of our fields come from config.json and which from preprocessor_config.json.
HF_MODEL_KEYS = ("num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
                 "max_source_positions", "activation_function", "dropout", "attention_dropout", "activation_dropout")
HF_PREPROCESSOR_KEYS = ("sampling_rate", "n_fft", "hop_length", "chunk_length", "dither")


@dataclass(frozen=True)
class WhisperEncoderConfig:
    # Defaults are transformers' WhisperConfig and WhisperFeatureExtractor defaults (whisper-tiny's
    # encoder); always read the real values with from_hf.
    num_mel_bins: int = 80  # 128 for large-v3
    d_model: int = 384
    encoder_layers: int = 4
    encoder_attention_heads: int = 6
    encoder_ffn_dim: int = 1536
    max_source_positions: int = 1500  # encoder frames in one window
    activation_function: str = "gelu"  # of the feed-forward; the two convs always use GELU
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    # preprocessor_config.json (WhisperFeatureExtractor)
    sampling_rate: int = 16000
    n_fft: int = 400
    hop_length: int = 160
    chunk_length: int = 30  # seconds in one window
    dither: float = 0.0  # training mode only

    def __post_init__(self):
        def refuse(what):
            raise ValueError(f"WhisperEncoderConfig: {what}")

        if self.d_model % self.encoder_attention_heads:
            refuse(f"d_model {self.d_model} is not divisible by encoder_attention_heads {self.encoder_attention_heads}")
        if self.activation_function != "gelu":
            refuse(f"activation_function {self.activation_function!r} is not supported (only 'gelu')")
        if self.sampling_rate != SAMPLE_RATE:
            refuse(f"sampling_rate {self.sampling_rate} is not supported (only {SAMPLE_RATE})")
        if self.n_frames != 2 * self.max_source_positions:
            # transformers refuses the same mismatch at run time: conv2 halves the mel frames.
            refuse(f"{self.chunk_length} s at hop {self.hop_length} gives {self.n_frames} mel frames, but "
                   f"max_source_positions {self.max_source_positions} needs {2 * self.max_source_positions}")

    @property
    def n_samples(self) -> int:
        return self.chunk_length * self.sampling_rate  # 480000

    @property
    def n_frames(self) -> int:
        return self.n_samples // self.hop_length  # 3000

    @classmethod
    def from_hf(cls, config: dict, preprocessor: dict, where: str = "config") -> "WhisperEncoderConfig":
        """From a Hugging Face Whisper config.json and preprocessor_config.json (as dicts). Keys we do
        not need (the decoder's, generation settings) are ignored."""
        if config.get("model_type") != "whisper":
            raise ValueError(f"{where}: model_type {config.get('model_type')!r} is not a Whisper model ('whisper')")
        kind = preprocessor.get("feature_extractor_type", "WhisperFeatureExtractor")
        if kind != "WhisperFeatureExtractor":
            raise ValueError(f"{where}: feature_extractor_type {kind!r} is not supported "
                             "(only WhisperFeatureExtractor)")
        n_mels = config.get("num_mel_bins", cls.num_mel_bins)
        if preprocessor.get("feature_size", n_mels) != n_mels:
            raise ValueError(f"{where}: the feature extractor makes feature_size={preprocessor['feature_size']} "
                             f"mels but the encoder expects num_mel_bins={n_mels}")
        cfg = cls(**{k: config[k] for k in HF_MODEL_KEYS if k in config},
                  **{k: preprocessor[k] for k in HF_PREPROCESSOR_KEYS if k in preprocessor})
        for key, ours in (("n_samples", cfg.n_samples), ("nb_max_frames", cfg.n_frames)):
            if preprocessor.get(key, ours) != ours:
                raise ValueError(f"{where}: preprocessor {key}={preprocessor[key]} disagrees with chunk_length "
                                 f"{cfg.chunk_length} s (expected {ours})")
        return cfg

    @classmethod
    def from_dict(cls, d: dict) -> "WhisperEncoderConfig":
        d = dict(d)
        if d.pop("model_type", None) != "whisper_encoder":
            raise ValueError(f"not a Whisper encoder config: model_type={d.get('model_type')!r}")
        return build(cls, d)

    def to_dict(self) -> dict:
        return {"model_type": "whisper_encoder", **asdict(self)}


# ----------------------------------------------------------------------------------------------
# front end


def whisper_mel_filters(cfg: WhisperEncoderConfig) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) float32: Slaney-scale, Slaney-normalised triangles from 0 to 8000 Hz,
    computed in float64 and rounded once, as transformers' mel_filter_bank (the extractor stores the
    transpose, (n_freqs, n_mels))."""
    return mel_filterbank(cfg.sampling_rate, cfg.n_fft, cfg.num_mel_bins, 0.0, 8000.0, "slaney", librosa_rounding=False)


def mel_lengths(num_samples: torch.Tensor, hop_length: int) -> torch.Tensor:
    """Mel frames that cover audio: frame t is centred on sample t * hop, so ceil(samples / hop)."""
    return torch.div(num_samples + hop_length - 1, hop_length, rounding_mode="floor")


class WhisperFrontend(Float32Frontend):
    """audio (B, N) float at 16 kHz, lengths (B,) samples -> log-mel (B, n_mels, 3000) float32,
    mel lengths (B,) int64."""

    def __init__(self, cfg: WhisperEncoderConfig):
        super().__init__()
        self.cfg = cfg
        # Not persistent: computed, never loaded, and absent from upstream checkpoints.
        self.register_buffer("window", torch.hann_window(cfg.n_fft), persistent=False)  # periodic, (n_fft,)
        self.register_buffer("mel_filters", whisper_mel_filters(cfg), persistent=False)  # (n_mels, n_freqs)

    @torch.no_grad()
    def forward(self, audio: torch.Tensor, lengths: torch.Tensor | None = None):
        cfg = self.cfg
        if audio.ndim != 2 or not audio.is_floating_point():
            raise AudioError(f"expected float audio (B, N), got {audio.dtype} of shape {tuple(audio.shape)}")
        x = audio.float()
        if lengths is None:
            lengths = torch.full(x.shape[:1], x.shape[1], device=x.device)
        lengths = lengths.to(device=x.device, dtype=torch.long)
        if lengths.shape != x.shape[:1] or bool((lengths < 0).any()) or bool((lengths > x.shape[1]).any()):
            raise AudioError(f"lengths {lengths.tolist()} do not fit audio of shape {tuple(x.shape)}")
        if too_long := (lengths > cfg.n_samples).nonzero().flatten().tolist():
            i = too_long[0]
            raise AudioError(
                f"item {i}: {int(lengths[i])} samples ({int(lengths[i]) / cfg.sampling_rate:.2f} s) is longer than "
                f"Whisper's {cfg.chunk_length} s window ({cfg.n_samples} samples); split it first "
                f"({len(too_long)} item(s) too long)")
        # Whisper pads (or cuts) every example to 30 s of zeros before the STFT; zero what lies past
        # each length too, so an item padded into a batch sees what it sees alone.
        x = x[:, : cfg.n_samples]
        x = x.masked_fill(torch.arange(x.shape[1], device=x.device) >= lengths[:, None], 0.0)
        x = F.pad(x, (0, cfg.n_samples - x.shape[1]))  # (B, 480000)
        with torch.autocast(x.device.type, enabled=False):
            if self.training and cfg.dither > 0:
                x = x + cfg.dither * torch.randn_like(x)
            spec = torch.stft(x, cfg.n_fft, cfg.hop_length, window=self.window.float(), center=True,
                              pad_mode="reflect", return_complex=True)  # (B, n_freqs, 3001)
            power = spec[..., :-1].abs() ** 2  # the last frame is dropped: (B, n_freqs, 3000)
            mel = self.mel_filters.float() @ power  # (B, n_mels, 3000)
            mel = mel.clamp(min=1e-10).log10()
            # Floor at 80 dB below the loudest bin of each padded example, then scale to about [-1, 1].
            mel = torch.maximum(mel, mel.amax(dim=(1, 2), keepdim=True) - 8.0)
            mel = (mel + 4.0) / 4.0
        return mel, mel_lengths(lengths, cfg.hop_length)


# ----------------------------------------------------------------------------------------------
# encoder


class WhisperAttention(nn.Module):
    def __init__(self, cfg: WhisperEncoderConfig):
        super().__init__()
        d = cfg.d_model
        self.h, self.dropout_p = cfg.encoder_attention_heads, cfg.attention_dropout
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d, bias=False)  # a key bias would only shift each query's scores by a constant
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (proj(x).view(b, t, self.h, d // self.h).transpose(1, 2)  # (B, H, T, hd)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        # Full bidirectional attention over the 30 s window, no mask; SDPA's default scale is
        # head_dim^-0.5, which transformers applies to q before the product (same maths).
        ctx = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout_p if self.training else 0.0)
        return self.out_proj(ctx.transpose(1, 2).reshape(b, t, d))


class WhisperEncoderLayer(nn.Module):
    def __init__(self, cfg: WhisperEncoderConfig):
        super().__init__()
        d = cfg.d_model
        self.self_attn = WhisperAttention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(d)  # eps 1e-5, as transformers
        self.fc1 = nn.Linear(d, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(cfg.dropout)
        self.activation_dropout = nn.Dropout(cfg.activation_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.self_attn_layer_norm(x)))  # pre-LN
        h = self.activation_dropout(F.gelu(self.fc1(self.final_layer_norm(x))))
        x = x + self.dropout(self.fc2(h))
        if x.dtype == torch.float16:  # transformers keeps fp16 activations finite this way
            big = torch.finfo(torch.float16).max - 1000
            x = x.clamp(-big, big)
        return x


class WhisperEncoder(nn.Module):
    def __init__(self, cfg: WhisperEncoderConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.frontend = WhisperFrontend(cfg)
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, d, 3, padding=1)
        self.conv2 = nn.Conv1d(d, d, 3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(cfg.max_source_positions, d)  # a fixed sinusoid table, loaded
        self.embed_positions.requires_grad_(False)  # frozen, as transformers does
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(WhisperEncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.layer_norm = nn.LayerNorm(d)

    @property
    def out_dim(self) -> int:
        return self.cfg.d_model

    def output_lengths(self, mel_lengths: torch.Tensor) -> torch.Tensor:
        """Encoder frames covering audio: conv2 (k3, s2, p1) maps n frames to ceil(n / 2), so for
        ceil(samples / 160) mel frames this is ceil(samples / 320)."""
        return torch.div(mel_lengths + 1, 2, rounding_mode="floor")

    def features(self, audio: torch.Tensor, lengths: torch.Tensor | None = None):
        """audio (B, N) float at 16 kHz (N any, each length <= 30 s), lengths (B,) samples ->
        log-mel (B, n_mels, 3000) float32, (B,) mel frames covering audio."""
        return self.frontend(audio, lengths)

    def encode(self, features: torch.Tensor, lengths: torch.Tensor | None = None, trim: bool = True,
               return_hidden: bool = False):
        """log-mel (B, n_mels, 3000), (B,) mel lengths (None: all valid) -> encoded (B, T, D),
        (B,) encoder frames covering audio.

        All 1500 frames are always computed. T is the longest length in the batch with `trim`
        (frames past an item's length are Whisper's encoding of the silence after it), else 1500.
        With `return_hidden` a list of (B, T, D) comes back too: the conv stem + positions, then each
        layer's raw output (before the final layer_norm)."""
        cfg = self.cfg
        if features.ndim != 3 or features.shape[1:] != (cfg.num_mel_bins, cfg.n_frames):
            raise ValueError(f"Whisper expects log-mel features (B, {cfg.num_mel_bins}, {cfg.n_frames}), a full "
                             f"{cfg.chunk_length} s window; got {tuple(features.shape)} (use features() to make them)")
        if lengths is None:
            lengths = torch.full(features.shape[:1], cfg.n_frames, device=features.device)
        lengths = self.output_lengths(lengths.to(device=features.device, dtype=torch.long))
        x = features.to(self.conv1.weight.dtype)  # fp32 features into a bf16 encoder
        x = F.gelu(self.conv1(x))  # (B, D, 3000)
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (B, 1500, D)
        x = self.dropout(x + self.embed_positions.weight)
        hidden = [x]
        for layer in self.layers:
            x = layer(x)
            hidden.append(x)
        x = self.layer_norm(x)
        if trim:
            t = int(lengths.max()) if len(lengths) else 0
            x, hidden = x[:, :t], [h[:, :t] for h in hidden]
        return (x, lengths, hidden) if return_hidden else (x, lengths)

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor | None = None, trim: bool = True):
        """audio (B, N), lengths (B,) samples -> encoded (B, T, D), lengths (B,) encoder frames."""
        return self.encode(*self.features(audio, lengths), trim=trim)

    # -- checkpoints -----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None) -> "WhisperEncoder":
        """A Hugging Face Whisper directory (config.json + preprocessor_config.json + safetensors,
        single or sharded) or one written by save_pretrained. dtype None keeps the stored dtype; the
        front end stays float32 either way."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: not a Whisper checkpoint directory (config.json is missing)")
        config = read_json(path / "config.json")
        if config.get("model_type") == "whisper_encoder":
            cfg, table = WhisperEncoderConfig.from_dict(config), {"": ""}
        elif config.get("model_type") == "whisper":
            pre_file = path / "preprocessor_config.json"
            if not pre_file.is_file():
                raise FileNotFoundError(f"{path}: a Hugging Face Whisper directory needs preprocessor_config.json "
                                        "(the feature extractor's settings)")
            cfg = WhisperEncoderConfig.from_hf(config, read_json(pre_file), str(path / "config.json"))
            table = WHISPER_HF_KEYS
        else:
            raise ValueError(f"{path / 'config.json'}: model_type {config.get('model_type')!r} is not a Whisper model "
                             "(expected 'whisper' or 'whisper_encoder')")
        files = weight_files(path)
        with torch.device("meta"):
            model = cls(cfg)
        model.frontend = WhisperFrontend(cfg)  # its buffers are computed, not loaded: build them for real
        # Check names and shapes from the file headers first (every problem at once), then read only
        # the encoder's tensors: a large-v3 decoder is not worth loading to drop.
        shapes = {}
        for file, names in files.items():
            found = headers(file)
            shapes.update({n: torch.empty(found[n][0], device="meta") for n in names})
        remap(table, shapes, model.state_dict(), str(path))
        _, ours, _ = place(table, shapes)
        state = {}
        for file, names in files.items():
            with open_safetensors(file) as f:
                for name in names:
                    if ours.get(name) is not None:
                        t = f.get_tensor(name)
                        state[ours[name]] = t.to(dtype) if dtype is not None else t
        model.load_state_dict(state, strict=True, assign=True)
        model.embed_positions.requires_grad_(False)  # assign=True takes the loaded tensor's flag
        if left_out := dropped_keys(table, shapes):
            log.warning("%s: %d decoder / LM-head tensors not imported (encoder only): %s", path, len(left_out),
                        ", ".join(left_out[:4]) + (", ..." if len(left_out) > 4 else ""))
        return model.eval()

    def save_pretrained(self, path) -> None:
        """config.json (model_type "whisper_encoder") + model.safetensors, keys without a prefix."""
        save_dir(path, self.cfg.to_dict(), self.state_dict())

