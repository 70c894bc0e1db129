"""Whisper encoder + log-mel front end against transformers 5.23 (fixtures whisper_hf/, whisper_ref.*)."""
import json
import logging
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from speechllm.audio import AudioError, load_audio, pad_batch
from speechllm.convert import ConversionError
from speechllm.whisper import WhisperEncoder, WhisperEncoderConfig, whisper_mel_filters

TOL = 1e-4  # fp32 parity; the front end's float32 STFT alone differs from the fixture's by ~2e-5 (CPU kernels)


@pytest.fixture(scope="module")
def ref(fixtures):
    return load_file(fixtures / "whisper_ref.safetensors"), json.loads((fixtures / "whisper_ref.json").read_text())


@pytest.fixture(scope="module")
def model(fixtures):
    return WhisperEncoder.from_pretrained(fixtures / "whisper_hf")


@pytest.fixture(scope="module")
def clips(fixtures):
    return [load_audio(fixtures / f"audio_{i}.wav") for i in range(2)]


def full_mel(tensors, i):
    head = tensors[f"single{i}.input_features_head"]  # (1, 80, 256); frames 256.. all equal the tail value
    tail = tensors[f"single{i}.input_features_tail_value"].expand(1, head.shape[1], 3000 - head.shape[2])
    return torch.cat([head, tail], -1)


def hf_dir_copy(fixtures, dest, transform):
    """The fixture's WhisperModel directory with its tensors passed through transform(dict) -> dict."""
    dest.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(fixtures / "whisper_hf" / name, dest / name)
    save_file(transform(load_file(fixtures / "whisper_hf" / "model.safetensors")), dest / "model.safetensors")
    return dest


# -- front end ----------------------------------------------------------------------------------


def np_slaney_filters(n_mels, sr=16000, n_fft=400):
    """Independent float64 recomputation: triangles between Slaney-mel-spaced edges, area-normalised."""
    def to_mel(f):
        return np.where(f < 1000, 3 * f / 200, 15 + 27 * np.log(np.maximum(f, 1e-9) / 1000) / np.log(6.4))

    def to_hz(m):
        return np.where(m < 15, 200 * m / 3, 1000 * np.exp(np.log(6.4) * (m - 15) / 27))

    edges = to_hz(np.linspace(to_mel(0.0), to_mel(8000.0), n_mels + 2))
    f = np.linspace(0, sr / 2, n_fft // 2 + 1)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    tri = np.maximum(0, np.minimum((f - lo) / (mid - lo), (hi - f) / (hi - mid)))
    return (tri * (2 / (hi - lo))).astype(np.float32)  # (n_mels, n_freqs)


def test_mel_filters_match_extractor(model, ref):
    ours = whisper_mel_filters(model.cfg).T  # (201, 80), the extractor's layout
    # Computed here, in float64 rounded once as transformers does: bit-identical (librosa's double
    # rounding, audio.py's default, would be 1 ulp off).
    assert ours.shape == (201, 80) and torch.equal(ours, ref[0]["mel_filters"])
    for n in (80, 128):  # large-v3 has 128 mels
        fb = whisper_mel_filters(WhisperEncoderConfig(num_mel_bins=n))
        np.testing.assert_allclose(fb.numpy(), np_slaney_filters(n), rtol=1e-6, atol=1e-9)
        assert (fb.sum(1) > 0).all()  # no empty filter


@pytest.mark.parametrize("i", [0, 1])
def test_log_mel_matches_extractor(model, ref, clips, i):
    tensors, meta = ref
    feats, lengths = model.features(torch.from_numpy(clips[i])[None], torch.tensor([len(clips[i])]))
    assert feats.shape == (1, 80, 3000) and feats.dtype == torch.float32
    assert lengths.tolist() == [meta["clips"][i]["mel_frames_covering_audio"]]
    err = (feats - full_mel(tensors, i)).abs().max().item()
    assert err <= TOL, err


def test_frontend_pads_to_30s_and_refuses_longer(model):
    feats, lengths = model.features(torch.zeros(1, 480000) + 0.01 * torch.randn(1, 480000))
    assert feats.shape == (1, 80, 3000) and lengths.tolist() == [3000]
    assert model.encode(feats, lengths)[1].tolist() == [1500]
    with pytest.raises(AudioError, match=r"30.00 s.*longer than Whisper's 30 s window"):
        model.features(torch.zeros(1, 480001))
    # a wider tensor is fine as long as every item's real audio fits
    wide = model.features(torch.zeros(1, 500000), torch.tensor([16000]))[0]
    assert torch.equal(wide, model.features(torch.zeros(1, 16000))[0])
    with pytest.raises(ValueError, match=r"\(B, 80, 3000\)"):
        model.encode(feats[..., :2000], torch.tensor([2000]))


# -- encoder ------------------------------------------------------------------------------------


@pytest.mark.parametrize("i", [0, 1])
def test_encoder_matches_transformers(model, ref, clips, i):
    tensors, meta = ref
    with torch.inference_mode():
        feats, mel_lens = model.features(torch.from_numpy(clips[i])[None], torch.tensor([len(clips[i])]))
        out, lengths, hidden = model.encode(feats, mel_lens, trim=False, return_hidden=True)
    valid = meta["clips"][i]["encoder_frames_covering_audio"]
    assert lengths.tolist() == [valid] == [math.ceil(len(clips[i]) / 320)]
    assert out.shape == (1, 1500, 64) and len(hidden) == 3
    for name, ours in [("embeds", hidden[0]), ("layer0", hidden[1]), ("layer1", hidden[2]), ("encoder_output", out)]:
        want = tensors[f"single{i}.{name}"]  # (1, 128, 64): the first 128 of 1500 frames
        err_valid = (ours[:, :valid] - want[:, :valid]).abs().max().item()
        err_all = (ours[:, :128] - want).abs().max().item()
        assert err_valid <= TOL and err_all <= TOL, (name, err_valid, err_all)


def test_batch_equals_singles(model, ref, clips):
    tensors, _ = ref
    audio, lengths = pad_batch(clips)
    audio[1, len(clips[1]):] = torch.randn(audio.shape[1] - len(clips[1]))  # junk past a length is ignored
    with torch.inference_mode():
        out, enc_lens = model(audio, lengths)  # trimmed to the longest clip
        full, _ = model(audio, lengths, trim=False)
        singles = [model(torch.from_numpy(c)[None], trim=False)[0] for c in clips]
    assert enc_lens.tolist() == tensors["batch.encoder_frames_covering_audio"].tolist() == [119, 81]
    assert out.shape == (2, 119, 64) and torch.equal(out, full[:, :119])
    for i in range(2):
        assert (full[i] - singles[i][0]).abs().max().item() <= 1e-6  # bit-identical upstream (and here)
    err = (full[:, :128] - tensors["batch.encoder_output"]).abs().max().item()
    assert err <= TOL, err


# -- checkpoints --------------------------------------------------------------------------------


def test_save_pretrained_roundtrip(model, clips, tmp_path):
    model.save_pretrained(tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert cfg["model_type"] == "whisper_encoder" and cfg["num_mel_bins"] == 80
    assert not any(k.startswith("frontend") for k in load_file(tmp_path / "ours" / "model.safetensors"))
    again = WhisperEncoder.from_pretrained(tmp_path / "ours")
    assert again.cfg == model.cfg
    x = torch.from_numpy(clips[1])[None]
    with torch.inference_mode():
        assert torch.equal(again(x)[0], model(x)[0])


def test_bf16_directory_loads(fixtures, model, ref, clips, tmp_path):
    path = hf_dir_copy(fixtures, tmp_path / "bf16", lambda sd: {k: v.to(torch.bfloat16) for k, v in sd.items()})
    stored = load_file(path / "model.safetensors")["encoder.embed_positions.weight"]
    x, n = torch.from_numpy(clips[0])[None], len(clips[0])
    want = ref[0]["single0.encoder_output"][:, :119]
    for dtype, tol in [(None, 0.1), (torch.float32, 0.05)]:
        m = WhisperEncoder.from_pretrained(path, dtype=dtype)
        assert m.conv1.weight.dtype == (dtype or torch.bfloat16)
        assert m.frontend.mel_filters.dtype == m.frontend.window.dtype == torch.float32
        assert torch.equal(m.embed_positions.weight.float(), stored.float())  # the stored (rounded) table
        with torch.inference_mode():
            assert torch.equal(m.features(x)[0], model.features(x)[0])  # the front end is untouched
            out, lengths = m(x, torch.tensor([n]))
        assert lengths.tolist() == [119] and out.dtype == m.conv1.weight.dtype
        err = (out.float() - want).abs().max().item()
        assert 0 < err <= tol, (dtype, err)  # bf16 weights: measured 0.043 (bf16 compute), 0.018 (fp32)


def test_conditional_generation_layout(fixtures, model, clips, tmp_path, caplog):
    def to_cg(sd):
        sd = {f"model.{k}": v for k, v in sd.items()}
        sd["proj_out.weight"] = torch.zeros(32, 64)  # dummy LM head
        return sd

    path = hf_dir_copy(fixtures, tmp_path / "cg", to_cg)
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["WhisperForConditionalGeneration"]
    (path / "config.json").write_text(json.dumps(cfg))
    with caplog.at_level(logging.WARNING, logger="speechllm.whisper"):
        m = WhisperEncoder.from_pretrained(path)
    n_decoder = sum(k.startswith("decoder.") for k in load_file(fixtures / "whisper_hf" / "model.safetensors"))
    assert f"{n_decoder + 1} decoder / LM-head tensors not imported" in caplog.text
    assert "model.decoder." in caplog.text
    for k, v in model.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k


def test_misfit_tensors_are_named(fixtures, tmp_path):
    def break_it(sd):
        sd["encoder.conv1.weight"] = torch.zeros(64, 80, 5)
        del sd["encoder.layer_norm.bias"]
        sd["encoder.extra.weight"] = torch.zeros(3)
        return sd

    path = hf_dir_copy(fixtures, tmp_path / "bad", break_it)
    with pytest.raises(ConversionError) as e:
        WhisperEncoder.from_pretrained(path)
    msg = str(e.value)
    assert "conv1.weight: checkpoint (64, 80, 5) vs model (64, 80, 3)" in msg
    assert "missing" in msg and "layer_norm.bias" in msg
    assert "extra.weight" in msg and str(path) in msg


def test_unsupported_configs_are_refused(fixtures, tmp_path):
    def variant(name, config=None, pre=None):
        path = tmp_path / name
        path.mkdir()
        shutil.copy(fixtures / "whisper_hf" / "model.safetensors", path / "model.safetensors")
        for file, change in (("config.json", config), ("preprocessor_config.json", pre)):
            if change == "absent":
                continue
            d = json.loads((fixtures / "whisper_hf" / file).read_text())
            (path / file).write_text(json.dumps({**d, **(change or {})}))
        return path

    with pytest.raises(ValueError, match="model_type 'wav2vec2' is not a Whisper model"):
        WhisperEncoder.from_pretrained(variant("w2v", {"model_type": "wav2vec2"}))
    with pytest.raises(ValueError, match="activation_function 'relu' is not supported"):
        WhisperEncoder.from_pretrained(variant("relu", {"activation_function": "relu"}))
    with pytest.raises(ValueError, match="feature_size=128 mels but the encoder expects num_mel_bins=80"):
        WhisperEncoder.from_pretrained(variant("mels", pre={"feature_size": 128}))
    with pytest.raises(ValueError, match="max_source_positions 1000"):
        WhisperEncoder.from_pretrained(variant("pos", {"max_source_positions": 1000}))
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        WhisperEncoder.from_pretrained(variant("nopre", pre="absent"))
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        WhisperEncoder.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"unknown config key\(s\): n_layers"):
        WhisperEncoderConfig.from_dict({**WhisperEncoderConfig().to_dict(), "n_layers": 2})
