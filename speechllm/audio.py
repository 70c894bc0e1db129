"""Audio input, band-limited resampling and NeMo's log-mel frontend.

    file (wav/flac/ogg, any rate, any channels) --load_audio--> (N,) float32 mono at 16 kHz
    audio (B, N), lengths (B,) samples --LogMelFrontend--> features (B, n_mels, T), lengths (B,) frames

`LogMelFrontend` matches NeMo 3.0.0's AudioToMelSpectrogramPreprocessor (FilterbankFeatures) to
float32 rounding: pre-emphasis, centred STFT with a symmetric Hann window, |X| then squared, Slaney
mel filterbank, log(x + 2^-24), per-feature normalisation over the valid frames, padding masked.
Its `window` and `fb` buffers are computed here the way NeMo computes them (torch.hann_window,
librosa.filters.mel) and are overwritten by a checkpoint's, which NeMo does too.

Quirks worth knowing:
- NeMo 2.5 changed the frontend (commit 0fd4de5, "invariance to padding/batch size"): the STFT pads
  with zeros instead of reflecting, samples past each item's length are zeroed after pre-emphasis,
  and the last STFT frame is no longer valid (floor(L/hop) valid frames instead of floor(L/hop) + 1).
  parakeet-ctc-0.6b was trained with the old behaviour, but NeMo 3.0.0 runs it with the new one,
  which is what our fixtures hold. `PreprocessorConfig(legacy=True)` reproduces NeMo <= 2.4.
- The power spectrum is sqrt(re^2 + im^2) squared, not re^2 + im^2: same maths, different rounding.
- Normalisation uses the unbiased std (ddof=1) plus 1e-5 on the std; a 1-frame item gets std 0.
- Dither is added only in training mode (a new module is in training mode, as any nn.Module), so
  evaluation is deterministic.
- The frontend always runs in float32 with autocast off, and without gradients, as NeMo does.
"""
import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import build

SAMPLE_RATE = 16000
SHORTEST_WORD_S = 0.3  # a clip shorter than this holds less than one spoken word
SILENCE_PEAK = 2 ** -15  # below one 16-bit step everywhere: digital silence

# -----------------------------------------------------------------------------
# audio input


class AudioError(ValueError):
    """Audio that cannot be used; the message names the file (or array) and what is wrong."""


def check_audio(x, name: str = "audio"):
    """Validate a mono waveform (numpy array or torch tensor) and return it unchanged."""
    if x.ndim != 1:
        raise AudioError(f"{name}: expected a 1-D mono waveform, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise AudioError(f"{name}: contains no samples")
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise AudioError(f"{name}: expected float samples in [-1, 1], got {x.dtype}")
        bad = (~torch.isfinite(x)).nonzero().flatten().tolist()
    else:
        if not np.issubdtype(x.dtype, np.floating):
            raise AudioError(f"{name}: expected float samples in [-1, 1], got {x.dtype}")
        bad = np.flatnonzero(~np.isfinite(x)).tolist()
    if bad:
        raise AudioError(f"{name}: {len(bad)} NaN or infinite samples (first at sample {bad[0]})")
    return x


def load_audio(path, sample_rate: int = SAMPLE_RATE, offset: float = 0.0, duration: float | None = None) -> np.ndarray:
    """Read any file soundfile can decode -> (N,) float32 mono at `sample_rate`.

    offset and duration are in seconds, as in NeMo manifests; only those frames are read. A duration
    running past the end is cut there (manifest durations are often rounded up).
    """
    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: no such file")
    if not path.is_file():
        raise AudioError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")
    if offset < 0 or (duration is not None and duration <= 0):
        raise AudioError(f"{path}: need offset >= 0 and duration > 0, got offset={offset}, duration={duration}")
    try:
        with sf.SoundFile(path) as f:
            sr, total = f.samplerate, f.frames
            if total == 0:
                raise AudioError(f"{path}: contains no audio samples")
            start = round(offset * sr)
            if start >= total:
                raise AudioError(f"{path}: offset {offset} s is past the end of the audio ({total / sr:.3f} s)")
            count = total - start if duration is None else min(round(duration * sr), total - start)
            f.seek(start)
            x = f.read(count, dtype="float32", always_2d=True)  # (N, channels)
    except sf.SoundFileError as e:
        raise AudioError(f"{path}: not a readable audio file ({e})") from e
    if len(x) == 0:
        raise AudioError(f"{path}: contains no audio samples")
    x = check_audio(x.mean(axis=1, dtype=np.float32), str(path))
    if sr != sample_rate:
        x = resample(torch.from_numpy(x), sr, sample_rate).numpy()
    return x


def audio_info(path) -> tuple[float, float]:
    """(seconds the file holds, seconds its header announces), read without decoding; AudioError for
    a file soundfile cannot open or that holds no samples. The two differ for a WAV file cut short
    (a partial copy or download): libsndfile then reads what is there and notes the header's size."""
    try:
        info = sf.info(str(path))
    except (sf.SoundFileError, RuntimeError) as e:
        raise AudioError(f"{path}: not a readable audio file ({e})") from None
    if info.frames == 0 or info.samplerate <= 0:
        raise AudioError(f"{path}: contains no audio samples")
    held = info.frames / info.samplerate
    # libsndfile's log of a short WAV says e.g. "data : 32000 (should be 15978)" (bytes).
    data = re.search(r"^data\s*:\s*(\d+)\s*\(should be \d+\)", info.extra_info, re.M)
    align = re.search(r"Block Align\s*:\s*(\d+)", info.extra_info)
    announced = held
    if data and align and 0 < int(data.group(1)) < 0x7FFFFFFF:  # not a streamed WAV's placeholder size
        announced = max(held, int(data.group(1)) / int(align.group(1)) / info.samplerate)
    return held, announced


def clip_warnings(audio: np.ndarray, path=None, offset: float = 0.0, duration: float | None = None,
                  sample_rate: int = SAMPLE_RATE) -> list[str]:
    """What makes a clip's answer doubtful although it can be run: digital silence, less audio than
    one word, or (given its file) a file that ends before its header or the clip says."""
    out = []
    if len(audio) and float(np.abs(audio).max()) < SILENCE_PEAK:
        out.append("digital silence (every sample below one 16-bit step)")
    if len(audio) < SHORTEST_WORD_S * sample_rate:
        out.append(f"{len(audio) / sample_rate:.2f} s is shorter than one word (~{SHORTEST_WORD_S:g} s)")
    if path is not None:
        held, announced = audio_info(path)
        if announced > held:
            out.append(f"the file ends early: its header announces {announced:.2f} s, it holds {held:.2f} s "
                       "(a truncated copy?)")
        elif duration is not None and offset + duration > held + 1e-3:
            out.append(f"the clip runs {offset + duration - held:.3f} s past the end of the file")
    return out


def pad_batch(clips: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D float arrays -> right-zero-padded (B, N_max) float32 and lengths (B,) int64."""
    lengths = torch.tensor([len(c) for c in clips], dtype=torch.long)
    audio = torch.zeros(len(clips), int(lengths.max()))
    for i, c in enumerate(clips):
        audio[i, : len(c)] = torch.from_numpy(np.asarray(c, dtype=np.float32))
    return audio, lengths


# -----------------------------------------------------------------------------
# resampling: Kaiser-windowed sinc, polyphase over the reduced ratio old/new = L/M

# The anti-aliasing filter is flat up to PASSBAND x the lower Nyquist frequency and at least
# STOPBAND_DB down from the lower Nyquist on, so nothing aliases. Its length and Kaiser beta come
# from Kaiser's design formulas (Oppenheim & Schafer 7.6): beta = 0.1102 (A - 8.7),
# taps = (A - 8) / (2.285 * transition width in rad/sample).
PASSBAND = 0.9
STOPBAND_DB = 80.0


def _polyphase_taps(L: int, M: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Taps (M, K) float64 and offsets (M,) such that output k*M + j of a resampling by M/L is
    sum_t taps[j, t] * x[k*L + first[j] + t]."""
    band = min(L, M) / L  # the lower sample rate, in cycles per input sample
    cutoff = band / 2 * (1 + PASSBAND) / 2  # middle of the transition band
    width = 2 * math.pi * band / 2 * (1 - PASSBAND)
    half = math.ceil((STOPBAND_DB - 8) / (2.285 * width) / 2)
    beta = 0.1102 * (STOPBAND_DB - 8.7)
    at = torch.arange(M) * L  # output j sits at input time at[j] / M
    first = at // M - half + 1
    frac = (at % M) / M  # how far past its preceding input sample, in input samples
    t = torch.arange(2 * half, dtype=torch.float64) - (half - 1) - frac[:, None]  # (M, K) input - output time
    kaiser = torch.special.i0(beta * (1 - (t / half) ** 2).clamp(min=0).sqrt()) / torch.special.i0(torch.tensor(beta))
    return 2 * cutoff * torch.sinc(2 * cutoff * t) * kaiser, first


def resample(x: torch.Tensor, old_sr: int, new_sr: int) -> torch.Tensor:
    """Band-limited resampling of x (..., N) -> (..., ceil(N * new_sr / old_sr)).

    Output sample m sits at input time m * old_sr / new_sr (first samples aligned). Samples outside
    the input count as zero, so the first and last few ms (the filter's half length) roll off.
    """
    if old_sr == new_sr:
        return x
    g = math.gcd(old_sr, new_sr)
    L, M = old_sr // g, new_sr // g
    taps, first = _polyphase_taps(L, M)
    taps = taps.to(x.dtype)
    K, n = taps.shape[1], x.shape[-1]
    n_out = -(-n * M // L)
    n_blocks = -(-n_out // M)
    lead = -int(first[0])  # the first output reaches this far before sample 0
    right = max(0, (n_blocks - 1) * L + int(first[-1]) + K - n)
    R = math.prod(x.shape[:-1])
    xp = F.pad(x.reshape(R, 1, n), (lead, right))  # (R, 1, lead + N + right)
    # Each output block of M samples reads a window that slides by L input samples: a strided conv1d
    # with one output channel per phase. Phases are grouped so that a group's shared window is at
    # most about twice the filter length; with a single group, gcd-awkward ratios (16001/44100)
    # would need an M x L weight.
    group = max(1, min(M, -(-K * M // L)))
    outs = []
    for j0 in range(0, M, group):
        rel = first[j0:j0 + group] - first[j0]
        w = torch.zeros(len(rel), int(rel[-1]) + K, dtype=x.dtype)
        w[torch.arange(len(rel))[:, None], rel[:, None] + torch.arange(K)] = taps[j0:j0 + group]
        w = w[:, None].to(x.device)  # (group, 1, span)
        y = F.conv1d(xp[..., lead + int(first[j0]):], w, stride=L)  # (R, group, >= n_blocks)
        outs.append(y[..., :n_blocks])
    y = torch.cat(outs, dim=1).transpose(1, 2).reshape(R, n_blocks * M)
    return y[:, :n_out].reshape(*x.shape[:-1], n_out)


# -----------------------------------------------------------------------------
# log-mel frontend

WINDOWS = {"hann": torch.hann_window, "hamming": torch.hamming_window,
           "blackman": torch.blackman_window, "bartlett": torch.bartlett_window}
NORMALIZE = ("per_feature", "all_features", "NA", None)  # "NA"/None: no normalisation
NORM_EPS = 1e-5  # NeMo's CONSTANT, added to the std

# NeMo options we do not implement, with the only value we accept.
NEMO_INERT = {"n_window_size": None, "n_window_stride": None, "use_grads": False,
              "nb_augmentation_prob": 0.0, "stft_conv": False, "stft_exact_pad": False}


@dataclass(frozen=True)
class PreprocessorConfig:
    """NeMo AudioToMelSpectrogramPreprocessor arguments, with its class defaults."""

    sample_rate: int = 16000
    window_size: float = 0.02  # seconds; int(window_size * sample_rate) samples
    window_stride: float = 0.01  # seconds; the hop
    window: str = "hann"  # built symmetric (periodic=False), as NeMo does
    n_fft: int | None = None  # None: next power of two >= the window length
    features: int = 64  # mel bins
    normalize: str | None = "per_feature"  # "per_feature", "all_features" or "NA"/None (none)
    preemph: float | None = 0.97
    lowfreq: float = 0.0
    highfreq: float | None = None  # None: sample_rate / 2
    log: bool = True
    log_zero_guard_type: str = "add"  # "add": log(x + v); "clamp": log(max(x, v))
    log_zero_guard_value: float | str = 2**-24  # or "tiny" / "eps" of float32
    dither: float = 1e-5  # training mode only
    pad_to: int = 16  # right-pad the time axis to a multiple of this with pad_value (0: off)
    pad_value: float = 0.0
    frame_splicing: int = 1
    exact_pad: bool = False  # STFT without centring, padded by (n_fft - hop) // 2 instead
    mag_power: float = 2.0
    mel_norm: str | None = "slaney"
    legacy: bool = False  # NeMo <= 2.4 behaviour: reflect padding, floor(L/hop) + 1 valid frames

    def __post_init__(self):
        def refuse(field, allowed):
            raise ValueError(f"preprocessor {field}={getattr(self, field)!r} is not supported ({allowed})")

        if self.frame_splicing != 1:
            refuse("frame_splicing", "only 1")
        if self.window not in WINDOWS:
            refuse("window", f"one of {list(WINDOWS)}")
        if self.normalize not in NORMALIZE:
            refuse("normalize", f"one of {list(NORMALIZE)}")
        if not isinstance(self.pad_to, int) or self.pad_to < 0:
            refuse("pad_to", "an int >= 0; 'max' is not implemented")
        if self.log_zero_guard_type not in ("add", "clamp"):
            refuse("log_zero_guard_type", "'add' or 'clamp'")
        if isinstance(self.log_zero_guard_value, str) and self.log_zero_guard_value not in ("tiny", "eps"):
            refuse("log_zero_guard_value", "a number, 'tiny' or 'eps'")
        if self.mel_norm not in ("slaney", None):
            refuse("mel_norm", "'slaney' or None")
        if self.win_length > self.fft_size:
            refuse("n_fft", f"must be >= the window length {self.win_length}")

    @property
    def win_length(self) -> int:
        return int(self.window_size * self.sample_rate)  # int(), not round(), as NeMo

    @property
    def hop_length(self) -> int:
        return int(self.window_stride * self.sample_rate)

    @property
    def fft_size(self) -> int:
        return self.n_fft or 2 ** math.ceil(math.log2(self.win_length))

    @classmethod
    def from_nemo(cls, d: dict, legacy: bool = False) -> "PreprocessorConfig":
        """Pick our fields from a NeMo `preprocessor:` block; other keys are ignored."""
        target = d.get("_target_") or "AudioToMelSpectrogramPreprocessor"
        if not target.endswith("AudioToMelSpectrogramPreprocessor"):
            raise ValueError(f"preprocessor _target_={target!r} is not supported (only AudioToMelSpectrogramPreprocessor)")
        for key, inert in NEMO_INERT.items():
            if d.get(key, inert) not in (inert, None):
                raise ValueError(f"preprocessor {key}={d[key]!r} is not supported (only {inert!r})")
        names = {f.name for f in fields(cls)} - {"legacy"}
        return cls(**{k: v for k, v in d.items() if k in names}, legacy=legacy)

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessorConfig":
        return build(cls, d, "preprocessor.")

    def to_dict(self) -> dict:
        return asdict(self)


def feature_lengths(num_samples, cfg: PreprocessorConfig):
    """Valid frames for a clip of num_samples (int or tensor of ints).

    NeMo 3.0.0: floor((L + 2 * pad - n_fft) / hop) with pad = n_fft // 2 (centred STFT), which is
    floor(L / hop) for an even n_fft: one fewer than the STFT returns. legacy (NeMo <= 2.4): + 1.
    A zero-length clip has zero frames either way.
    """
    pad = (cfg.fft_size - cfg.hop_length) // 2 if cfg.exact_pad else cfg.fft_size // 2
    frames = (num_samples + 2 * pad - cfg.fft_size) // cfg.hop_length + int(cfg.legacy)
    if isinstance(frames, torch.Tensor):
        return torch.where(num_samples == 0, 0, frames.clamp(min=0)).long()
    return 0 if num_samples == 0 else max(int(frames), 0)


def hz_to_mel(f: torch.Tensor) -> torch.Tensor:
    """Slaney's Auditory Toolbox scale (librosa htk=False): linear to 1 kHz, logarithmic above."""
    lin = f / (200 / 3)
    log = 15 + torch.log(f / 1000) / (math.log(6.4) / 27)
    return torch.where(f >= 1000, log, lin)


def mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    lin = m * (200 / 3)
    log = 1000 * torch.exp((math.log(6.4) / 27) * (m - 15))
    return torch.where(m >= 15, log, lin)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float,
                   norm: str | None = "slaney", librosa_rounding: bool = True) -> torch.Tensor:
    """Triangular mel filters (n_mels, n_fft // 2 + 1) float32, as librosa.filters.mel computes them.

    librosa_rounding=False keeps everything in float64 and rounds once at the end, as transformers'
    `mel_filter_bank` does (Whisper's feature extractor); the two differ by about 1 float32 ulp."""
    freqs = torch.arange(n_fft // 2 + 1, dtype=torch.float64) * (sample_rate / n_fft)
    lo, hi = hz_to_mel(torch.tensor([fmin, fmax], dtype=torch.float64))
    edges = mel_to_hz(torch.linspace(lo, hi, n_mels + 2, dtype=torch.float64))  # (n_mels + 2,)
    ramps = edges[:, None] - freqs  # (n_mels + 2, n_freqs)
    gaps = edges.diff()
    rising = -ramps[:-2] / gaps[:-1, None]
    falling = ramps[2:] / gaps[1:, None]
    fb = torch.minimum(rising, falling).clamp(min=0)
    if librosa_rounding:  # librosa stores the triangles in float32 first, then scales them in place: round twice
        fb = fb.float().double()
    if norm == "slaney":
        fb = fb * (2 / (edges[2:] - edges[:-2]))[:, None]  # equal area per filter
    return fb.float()


def normalize(x: torch.Tensor, lengths: torch.Tensor, mode: str | None) -> torch.Tensor:
    """NeMo's normalize_batch over the valid frames of x (B, C, T): ddof=1 std, + 1e-5 on the std."""
    if mode not in ("per_feature", "all_features"):
        return x
    valid = (torch.arange(x.shape[-1], device=x.device) < lengths[:, None])[:, None]  # (B, 1, T)
    dims = (2,) if mode == "per_feature" else (1, 2)
    n = lengths[:, None, None] * (1 if mode == "per_feature" else x.shape[1])
    mean = torch.where(valid, x, 0.0).sum(dims, keepdim=True) / n
    var = torch.where(valid, x - mean, 0.0).pow(2).sum(dims, keepdim=True) / (n - 1.0)
    std = var.sqrt()
    if mode == "per_feature":
        std = std.masked_fill(std.isnan(), 0.0)  # a single frame: 0/0 (NeMo raises instead, on CUDA only)
    return (x - mean) / (std + NORM_EPS)


class Float32Frontend(nn.Module):
    """Base of the log-mel frontends (NeMo's here, Whisper's in whisper.py): they hold no weights,
    only buffers (window, filterbank), which stay float32 whatever cast the model gets."""

    def _apply(self, fn, recurse=True):
        """Every cast and move of a module (.to, .half(), .bfloat16(), .cuda(), ...) runs through here:
        the buffers take the device `fn` gives them but stay float32 with their float32 values, as
        NeMo keeps its frontend (casting to bf16 and back would round the filterbank)."""
        for name, buf in self._buffers.items():
            if buf is not None:
                self._buffers[name] = buf.to(device=fn(buf).device, dtype=torch.float32)
        return self


class LogMelFrontend(Float32Frontend):
    """audio (B, N) float, lengths (B,) samples -> log-mel features (B, n_mels, T) float32, lengths (B,) int64."""

    def __init__(self, cfg: PreprocessorConfig):
        super().__init__()
        self.cfg = cfg
        self.hop_length = cfg.hop_length
        fmax = cfg.highfreq or cfg.sample_rate / 2
        self.register_buffer("window", WINDOWS[cfg.window](cfg.win_length, periodic=False))  # (win_length,)
        fb = mel_filterbank(cfg.sample_rate, cfg.fft_size, cfg.features, cfg.lowfreq, fmax, cfg.mel_norm)
        self.register_buffer("fb", fb[None])  # (1, n_mels, n_fft // 2 + 1)

    @torch.no_grad()
    def forward(self, audio: torch.Tensor, lengths: torch.Tensor | None = None):
        x = audio.float()
        if lengths is None:
            lengths = torch.full(x.shape[:1], x.shape[1], device=x.device)
        lengths = lengths.to(device=x.device, dtype=torch.long)
        frames = feature_lengths(lengths, self.cfg)
        with torch.autocast(x.device.type, enabled=False):
            x = self.power_spectrum(x, lengths)  # (B, n_fft // 2 + 1, T)
            x = torch.matmul(self.fb.float(), x)  # (B, n_mels, T)
            if self.cfg.log:
                x = self.log(x)
            x = normalize(x, frames, self.cfg.normalize)
            x = x.masked_fill(torch.arange(x.shape[-1], device=x.device) >= frames[:, None, None], self.cfg.pad_value)
            if self.cfg.pad_to and x.shape[-1] % self.cfg.pad_to:
                x = F.pad(x, (0, self.cfg.pad_to - x.shape[-1] % self.cfg.pad_to), value=self.cfg.pad_value)
        return x, frames

    def power_spectrum(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if cfg.exact_pad:
            p = (cfg.fft_size - cfg.hop_length) // 2
            x = F.pad(x, (p, p))
        if self.training and cfg.dither > 0:
            x = x + cfg.dither * torch.randn_like(x)
        if cfg.preemph is not None:
            x = torch.cat([x[:, :1], x[:, 1:] - cfg.preemph * x[:, :-1]], dim=1)  # first sample kept
            if not cfg.legacy:
                # NeMo >= 2.5 zeroes index >= L, counted on the tensor as it is here (after any exact_pad)
                x = x.masked_fill(torch.arange(x.shape[1], device=x.device) >= lengths[:, None], 0.0)
        spec = torch.stft(x, cfg.fft_size, cfg.hop_length, cfg.win_length, window=self.window.float(),
                          center=not cfg.exact_pad, pad_mode="reflect" if cfg.legacy else "constant",
                          return_complex=True)  # (B, n_fft // 2 + 1, T)
        mag = torch.view_as_real(spec).pow(2).sum(-1).sqrt()
        return mag.pow(cfg.mag_power) if cfg.mag_power != 1.0 else mag

    def log(self, x: torch.Tensor) -> torch.Tensor:
        guard = self.cfg.log_zero_guard_value
        if isinstance(guard, str):
            guard = getattr(torch.finfo(x.dtype), guard)
        if self.cfg.log_zero_guard_type == "add":
            return torch.log(x + guard)
        return torch.log(x.clamp(min=guard))
