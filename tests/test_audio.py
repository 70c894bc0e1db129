"""Audio loading, resampling and the NeMo log-mel frontend. Run: python -m pytest -q tests/test_audio.py"""
import io
import json
import math
import tarfile

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import max_valid_diff
from speechllm.audio import (
    AudioError,
    LogMelFrontend,
    PreprocessorConfig,
    check_audio,
    feature_lengths,
    load_audio,
    normalize,
    resample,
)

# -----------------------------------------------------------------------------
# log-mel frontend against NeMo 3.0.0


@pytest.fixture(scope="module")
def nemo_cfg(asr_ref_json):
    return PreprocessorConfig.from_nemo(asr_ref_json["preprocessor"])


@pytest.fixture(scope="module")
def nemo_buffers(fixtures):
    with tarfile.open(fixtures / "asr_ctc.nemo") as tar:
        sd = torch.load(io.BytesIO(tar.extractfile("./model_weights.ckpt").read()), weights_only=True)
    return {k: sd[f"preprocessor.featurizer.{k}"] for k in ("window", "fb")}



@pytest.mark.parametrize("run", ["batch", "single0", "single1"])
def test_features_match_nemo(asr_ref, nemo_cfg, nemo_buffers, run):
    frontend = LogMelFrontend(nemo_cfg).eval()
    frontend.load_state_dict(nemo_buffers)
    lengths = asr_ref[f"{run}.input_signal_length"]
    audio = asr_ref["batch.input_signal"]
    if run != "batch":  # single runs are the batch rows unpadded
        i = int(run[-1])
        audio = audio[i:i + 1, :int(lengths[0])]
    feats, feat_lens = frontend(audio, lengths)
    expected = asr_ref[f"{run}.features"]
    assert feat_lens.dtype == torch.int64 and feats.dtype == torch.float32
    assert feat_lens.tolist() == asr_ref[f"{run}.features_length"].tolist()
    assert feats.shape == expected.shape
    diff = max_valid_diff(feats.transpose(1, 2), expected.transpose(1, 2), feat_lens)
    print(f"{run}: max abs diff {diff:.3g}")
    assert diff <= 1e-4
    for i, n in enumerate(feat_lens.tolist()):
        assert (feats[i, :, n:] == nemo_cfg.pad_value).all()


def test_fresh_window_and_filterbank_match_checkpoint(nemo_cfg, nemo_buffers):
    frontend = LogMelFrontend(nemo_cfg)
    dw = (frontend.window - nemo_buffers["window"]).abs().max().item()
    dfb = (frontend.fb - nemo_buffers["fb"]).abs().max().item()
    print(f"window max diff {dw:.3g}, fb max diff {dfb:.3g}")
    assert frontend.fb.shape == nemo_buffers["fb"].shape == (1, 80, 257)
    assert dw <= 1e-6 and dfb <= 1e-6
    # and the filterbank is not trivially close: it has real triangles in it
    assert nemo_buffers["fb"].max() > 1e-2


def test_config_from_nemo_and_back(nemo_cfg):
    assert (nemo_cfg.win_length, nemo_cfg.hop_length, nemo_cfg.fft_size) == (400, 160, 512)
    assert (nemo_cfg.features, nemo_cfg.pad_to, nemo_cfg.dither, nemo_cfg.legacy) == (80, 0, 0.0, False)
    assert PreprocessorConfig.from_dict(json.loads(json.dumps(nemo_cfg.to_dict()))) == nemo_cfg
    defaults = PreprocessorConfig()  # NeMo's class defaults
    assert (defaults.win_length, defaults.fft_size, defaults.features, defaults.pad_to) == (320, 512, 64, 16)
    assert PreprocessorConfig.from_nemo({"features": 80}, legacy=True).legacy


@pytest.mark.parametrize("block, field", [
    ({"frame_splicing": 3}, "frame_splicing"),
    ({"pad_to": "max"}, "pad_to"),
    ({"normalize": {"fixed_mean": [0.0], "fixed_std": [1.0]}}, "normalize"),
    ({"_target_": "nemo.collections.asr.modules.AudioToMFCCPreprocessor"}, "_target_"),
    ({"n_window_size": 400}, "n_window_size"),
    ({"window": "kaiser"}, "window"),
    ({"mel_norm": 2}, "mel_norm"),
])
def test_config_refuses_unsupported(block, field):
    with pytest.raises(ValueError, match=field):
        PreprocessorConfig.from_nemo(block)


def test_padded_batch_equals_each_clip_alone():
    cfg = PreprocessorConfig(window_size=0.025, features=80, pad_value=-3.0)  # pad_to 16
    frontend = LogMelFrontend(cfg).eval()
    clips = [torch.randn(n) * 0.1 for n in (16000, 12345, 1120)]
    batch = torch.zeros(len(clips), 16000)
    for i, c in enumerate(clips):
        batch[i, :len(c)] = c
    lengths = torch.tensor([len(c) for c in clips])
    feats, feat_lens = frontend(batch, lengths)
    assert feats.shape[-1] % 16 == 0
    for i, c in enumerate(clips):
        alone, n = frontend(c[None], lengths[i:i + 1])
        assert n.item() == feat_lens[i].item() == len(c) // 160
        assert (feats[i, :, :n] - alone[0, :, :n]).abs().max() <= 1e-5
        assert (feats[i, :, n:] == -3.0).all()


# Spec section 1.7: samples -> (STFT frames, valid frames) for NeMo 3.0.0, pad_to 0
@pytest.mark.parametrize("samples, frames, valid", [
    (16000, 101, 100), (16159, 101, 100), (16160, 102, 101), (12345, 78, 77), (1120, 8, 7),
])
def test_frame_counts(nemo_cfg, samples, frames, valid):
    feats, lengths = LogMelFrontend(nemo_cfg)(torch.randn(1, samples), torch.tensor([samples]))
    assert feats.shape == (1, 80, frames) and lengths.tolist() == [valid]
    assert feature_lengths(samples, nemo_cfg) == valid
    assert (feats[0, :, valid:] == 0).all() and (feats[0, :, valid - 1] != 0).any()
    padded, _ = LogMelFrontend(PreprocessorConfig(window_size=0.025, features=80, pad_to=16))(
        torch.randn(1, samples), torch.tensor([samples]))
    assert padded.shape[-1] == 16 * math.ceil(frames / 16)
    legacy = PreprocessorConfig(window_size=0.025, features=80, pad_to=0, legacy=True)
    assert feature_lengths(samples, legacy) == valid + 1 == samples // 160 + 1


def test_exact_pad_frame_count():
    cfg = PreprocessorConfig(window_size=0.025, features=80, pad_to=0, exact_pad=True)
    feats, lengths = LogMelFrontend(cfg)(torch.randn(1, 16000), torch.tensor([16000]))
    assert feats.shape[-1] == 100 and lengths.item() == 99  # spec 1.7: the new formula's quirk


def test_legacy_differs_only_at_the_edges():
    """Without normalisation, NeMo <= 2.4 and 3.0.0 differ only in frames whose window reaches past
    either end of the clip (reflect vs zero padding), and legacy keeps the last frame valid."""
    samples = 12345
    x = torch.randn(1, samples) * 0.1
    new_cfg = PreprocessorConfig(window_size=0.025, features=80, pad_to=0, normalize="NA")
    old_cfg = PreprocessorConfig(window_size=0.025, features=80, pad_to=0, normalize="NA", legacy=True)
    new, n_new = LogMelFrontend(new_cfg).eval()(x, torch.tensor([samples]))
    old, n_old = LogMelFrontend(old_cfg).eval()(x, torch.tensor([samples]))
    assert n_old.item() == n_new.item() + 1 == samples // 160 + 1
    t = torch.arange(new.shape[-1])
    inside = (t * 160 - 200 >= 0) & (t * 160 + 200 <= samples)  # the 400-sample window stays in the clip
    edge = ~inside & (t < n_new.item())
    assert (new[..., inside] - old[..., inside]).abs().max() <= 1e-5
    assert edge.sum() >= 3 and (new[..., edge] - old[..., edge]).abs().amax(dim=1).min() > 1e-2
    assert (old[0, :, -1] != 0).any() and (new[0, :, -1] == 0).all()


def test_dither_only_in_training():
    frontend = LogMelFrontend(PreprocessorConfig(dither=1e-5))
    x = torch.randn(1, 8000) * 0.1
    before = x.clone()
    a, _ = frontend.eval()(x, torch.tensor([8000]))
    b, _ = frontend(x, torch.tensor([8000]))
    c, _ = frontend.train()(x, torch.tensor([8000]))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a - c).abs().max() < 0.1  # small noise, not a different signal
    assert torch.equal(x, before)  # the caller's audio is not modified


def test_features_stay_float32_under_autocast(nemo_cfg, asr_ref):
    frontend = LogMelFrontend(nemo_cfg)
    audio, lengths = asr_ref["batch.input_signal"], asr_ref["batch.input_signal_length"]
    plain, _ = frontend(audio, lengths)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto, _ = frontend(audio.bfloat16(), lengths)
    assert auto.dtype == torch.float32
    assert (plain - auto).abs().max() < 0.5  # only the bf16 rounding of the input differs
    with torch.autocast("cpu", dtype=torch.bfloat16):
        same, _ = frontend(audio, lengths)
    assert torch.equal(plain, same)


def test_buffers_stay_float32_under_any_cast(nemo_cfg):
    """.to(dtype), .half(), .bfloat16(), .double(), on the frontend or on a model holding it: the
    window and filterbank keep float32 and their float32 values (a bf16 round trip would round them)."""
    frontend = LogMelFrontend(nemo_cfg)
    fb, window = frontend.fb.clone(), frontend.window.clone()
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.bfloat16(), lambda m: m.double(),
                 lambda m: m.to("cpu", torch.float16)):
        cast(frontend)
        assert frontend.fb.dtype == frontend.window.dtype == torch.float32
        assert torch.equal(frontend.fb, fb) and torch.equal(frontend.window, window)
    model = torch.nn.Sequential(LogMelFrontend(nemo_cfg), torch.nn.Linear(2, 2)).bfloat16()
    assert model[0].fb.dtype == torch.float32 and torch.equal(model[0].fb, fb) and model[1].weight.dtype == torch.bfloat16


def reference_log_mel(x, cfg, fb, normalize):
    """float64 numpy log-mel of one unpadded clip, NeMo 3.0.0 semantics, written independently."""
    n_fft, hop, win = cfg.fft_size, cfg.hop_length, cfg.win_length
    y = np.concatenate([x[:1], x[1:] - cfg.preemph * x[:-1]])
    y = np.pad(y, n_fft // 2)  # centred STFT, zero padding
    window = np.zeros(n_fft)
    window[(n_fft - win) // 2:(n_fft + win) // 2] = np.hanning(win)  # symmetric Hann
    n_frames = len(x) // hop + 1
    frames = np.stack([y[t * hop:t * hop + n_fft] for t in range(n_frames)])  # (T, n_fft)
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2  # (T, n_fft // 2 + 1)
    m = np.log(fb @ power.T + 2.0**-24)  # (n_mels, T)
    n = len(x) // hop
    v = m[:, :n]
    if normalize == "per_feature":
        m = (m - v.mean(1, keepdims=True)) / (v.std(1, ddof=1, keepdims=True) + 1e-5)
    elif normalize == "all_features":
        m = (m - v.mean()) / (v.std(ddof=1) + 1e-5)
    m[:, n:] = 0.0
    return m


@pytest.mark.parametrize("normalize", ["per_feature", "all_features", "NA"])
def test_matches_float64_reference(normalize):
    cfg = PreprocessorConfig(window_size=0.025, features=80, pad_to=0, normalize=normalize)
    frontend = LogMelFrontend(cfg).eval()
    rng = np.random.default_rng(0)
    n = 23456
    t = np.arange(n) / 16000
    x = 0.05 * rng.standard_normal(n) + 0.3 * np.sin(2 * np.pi * 440 * t) * (t > 0.5)  # noise, then a tone
    feats, lengths = frontend(torch.from_numpy(x).float()[None], torch.tensor([n]))
    expected = reference_log_mel(x.astype(np.float32).astype(np.float64), cfg, frontend.fb[0].double().numpy(), normalize)
    diff = np.abs(feats[0].double().numpy() - expected).max()
    print(f"{normalize}: max abs diff vs float64 {diff:.3g}")
    # ~1e-4 is float32 FFT rounding in the lowest mel bins, which pre-emphasis leaves ~1e-7 in power
    assert lengths.item() == n // 160 and diff <= 3e-4


def test_normalize_formula():
    """ddof=1 std over the valid frames, and 1e-5 added to the std (not the variance, not a clamp)."""
    x = 1.0 + 1e-4 * torch.randn(2, 3, 9, dtype=torch.float64)  # std ~1e-4, so the epsilon shows
    lengths = torch.tensor([9, 5])
    for mode, axis in (("per_feature", 1), ("all_features", None)):
        out = normalize(x, lengths, mode)
        for b, n in enumerate(lengths.tolist()):
            v = x[b, :, :n].numpy()
            mean = v.mean(axis=axis, keepdims=True)
            expected = (x[b].numpy() - mean) / (v.std(axis=axis, ddof=1, keepdims=True) + 1e-5)
            assert np.abs(out[b, :, :n].numpy() - expected[:, :n]).max() < 1e-9
    assert normalize(x, lengths, "NA") is x


def test_single_frame_item_normalises_to_zero():
    # one valid frame: the ddof=1 std is 0/0, which NeMo replaces by 0 (+1e-5)
    feats, lengths = LogMelFrontend(PreprocessorConfig(pad_to=0))(torch.randn(1, 200), torch.tensor([200]))
    assert lengths.item() == 1 and torch.isfinite(feats).all() and (feats == 0).all()


# -----------------------------------------------------------------------------
# resampling

RATES = [44100, 48000, 22050, 8000]
EDGE = 0.01  # seconds dropped at each end: the filter's reach into the zero padding (<= 6.4 ms)


def interior(y, sr=16000):
    k = int(EDGE * sr)
    return y[k:len(y) - k]


def passband_edge(sr):  # Hz: 0.9 of the lower Nyquist frequency, where the filter's flat band ends
    return 0.9 * min(sr, 16000) / 2


def test_resample_identity_and_lengths():
    x = torch.randn(1000)
    assert resample(x, 16000, 16000) is x
    for sr in RATES + [11025]:
        for n in (1, 7, 441, 4410, 12345):
            assert resample(torch.randn(n), sr, 16000).shape == (math.ceil(n * 16000 / sr),)
    assert resample(torch.randn(4410), 16001, 16000).shape == (4410,)  # gcd 1: many phase groups
    assert resample(torch.randn(2, 3, 4410), 44100, 16000).shape == (2, 3, 1600)
    assert resample(torch.randn(60 * 44100), 44100, 16000).shape == (960000,)  # its speed: bench/bench_resample.py


@pytest.mark.parametrize("sr", RATES)
def test_resample_sines_in_passband(sr):
    t_in, t_out = np.arange(sr // 2) / sr, np.arange(8000) / 16000
    worst = 0.0
    for f in (50.0, 997.0, 3001.0, passband_edge(sr)):
        x = np.sin(2 * np.pi * f * t_in + 0.3)
        y = resample(torch.from_numpy(x), sr, 16000).numpy()
        worst = max(worst, np.abs(interior(y - np.sin(2 * np.pi * f * t_out + 0.3))).max())
    print(f"{sr} Hz sines: max relative error {worst:.3g}")
    assert worst <= 1e-3


@pytest.mark.parametrize("sr", RATES)
def test_resample_band_limited_noise(sr):
    """White noise limited to the passband, periodic over 0.5 s: its exact band-limited values at
    the 16 kHz instants are the same spectrum inverted on the 16 kHz grid."""
    n, n_out = sr // 2, 8000
    rng = np.random.default_rng(sr)
    spec = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / sr)
    spec[freqs > passband_edge(sr)] = 0
    x = np.fft.irfft(spec, n)
    out_spec = np.zeros(n_out // 2 + 1, dtype=complex)
    k = min(len(spec), len(out_spec))
    out_spec[:k] = spec[:k]
    expected = np.fft.irfft(out_spec, n_out) * (n_out / n)
    y = resample(torch.from_numpy(x).float(), sr, 16000).double().numpy()
    err = np.abs(interior(y - expected)).max() / np.abs(expected).max()
    print(f"{sr} Hz noise: max error / peak {err:.3g}")
    assert err <= 1e-3


@pytest.mark.parametrize("sr", [44100, 48000, 22050])
def test_resample_stopband(sr):
    """Sines at or above 8 kHz must not alias into the 16 kHz output."""
    t_in = np.arange(sr // 2) / sr
    worst = -np.inf
    for f in (8000.0, 8100.0, 9000.0, 0.95 * sr / 2):  # phase 0.7: a sine sampled at Nyquist could hide at 0
        y = resample(torch.from_numpy(np.sin(2 * np.pi * f * t_in + 0.7)), sr, 16000).numpy()
        worst = max(worst, 20 * np.log10(np.abs(interior(y)).max()))
    print(f"{sr} Hz stop band: worst leak {worst:.1f} dB")
    assert worst <= -70


# -----------------------------------------------------------------------------
# loading

def tone(sr, seconds, channels):
    t = np.arange(round(sr * seconds)) / sr
    return np.stack([0.3 * np.sin(2 * np.pi * (300 + 500 * c) * t) for c in range(channels)], axis=1)


@pytest.mark.parametrize("fmt, subtype, sr, channels", [
    ("WAV", "PCM_16", 16000, 1),
    ("WAV", "FLOAT", 44100, 2),
    ("WAV", "PCM_16", 8000, 1),
    ("FLAC", "PCM_16", 48000, 1),
    ("FLAC", "PCM_24", 22050, 3),
    ("OGG", "VORBIS", 16000, 2),
    ("OGG", "VORBIS", 44100, 1),
])
def test_load_formats_rates_channels(tmp_path, fmt, subtype, sr, channels):
    path = tmp_path / f"clip.{fmt.lower()}"
    sf.write(path, tone(sr, 0.5, channels), sr, format=fmt, subtype=subtype)
    x = load_audio(path)
    assert x.dtype == np.float32 and x.ndim == 1 and len(x) == math.ceil(round(sr * 0.5) * 16000 / sr)
    expected = tone(16000, 0.5, channels).mean(axis=1)  # the channel average, at 16 kHz
    tol = 0.05 if fmt == "OGG" else 2e-3  # vorbis is lossy
    assert np.abs(interior(x - expected[:len(x)])).max() <= tol


def test_load_offset_and_duration(tmp_path):
    x = np.random.default_rng(0).uniform(-0.5, 0.5, 16000).astype(np.float32)
    path = tmp_path / "a.wav"
    sf.write(path, x, 16000, subtype="FLOAT")
    assert np.array_equal(load_audio(path), x)
    assert np.array_equal(load_audio(path, offset=0.25, duration=0.5), x[4000:12000])
    assert np.array_equal(load_audio(path, offset=0.75, duration=1.0), x[12000:])  # cut at the end
    sf.write(tmp_path / "b.wav", tone(44100, 1.0, 2), 44100)
    assert len(load_audio(tmp_path / "b.wav", offset=0.5, duration=0.25)) == 4000
    with pytest.raises(AudioError, match="past the end") as e:
        load_audio(path, offset=1.0)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"),
    ("empty", "empty file"),
    ("zero_samples", "no audio samples"),
    ("not_audio", "not a readable audio file"),
    ("nan", "NaN or infinite"),
    ("inf", "NaN or infinite"),
])
def test_load_errors_name_the_file(tmp_path, case, message):
    path = tmp_path / f"{case}.wav"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "zero_samples":
        sf.write(path, np.zeros(0, dtype=np.float32), 16000)
    elif case == "not_audio":
        path.write_bytes(b"this is a text file, not a RIFF header" * 10)
    elif case in ("nan", "inf"):
        x = np.zeros(1600, dtype=np.float32)
        x[800] = np.nan if case == "nan" else np.inf
        sf.write(path, x, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match=message) as e:
        load_audio(path)
    assert str(path) in str(e.value)


def test_check_audio_arrays():
    ok = np.zeros(10, dtype=np.float32)
    assert check_audio(ok, "x") is ok
    assert check_audio(torch.zeros(10), "x").shape == (10,)
    bad = {
        "1-D": np.zeros((2, 10), dtype=np.float32),
        "no samples": np.zeros(0, dtype=np.float32),
        "NaN or infinite": torch.tensor([0.0, float("nan")]),
        "float samples": np.zeros(10, dtype=np.int16),
    }
    for message, x in bad.items():
        with pytest.raises(AudioError, match=message) as e:
            check_audio(x, "clip #3")
        assert "clip #3" in str(e.value)
