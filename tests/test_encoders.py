"""Any encoder with any LLM: load_encoder, and Speech-LLMs built from the Whisper / Qwen3 / Qwen3.5
fixtures (seed 004's system is Whisper + causal_transformer + Qwen3.5).
Run: python -m pytest -q tests/test_encoders.py"""
import json

import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from conftest import max_valid_diff
from speechllm import ASRModel, WhisperEncoder, load_encoder
from speechllm.audio import pad_batch
from speechllm.model import SpeechLLM, SpeechLLMConfig, assemble
from speechllm.speaker import SpeakerKernelConfig

SMALL_CAUSAL = {"kind": "causal_transformer", "hidden": 64, "n_heads": 4, "ffn_dim": 128, "n_layers": 2, "dropout": 0.0}


@pytest.fixture(scope="module")
def batch(fixtures):
    return pad_batch([sf.read(fixtures / f"audio_{i}.wav", dtype="float32")[0] for i in (0, 1)])


@pytest.fixture(scope="module")
def seed004(fixtures):
    """Whisper encoder + causal Transformer projector + Qwen3.5 (the projector scaled down)."""
    return assemble(fixtures / "whisper_hf", fixtures / "qwen3_5_hf", SMALL_CAUSAL, seed=0)


# -- load_encoder --------------------------------------------------------------------------------


def test_load_encoder_picks_the_kind_and_both_share_one_contract(fixtures, batch, tmp_path):
    audio, lens = batch
    asr = ASRModel.from_nemo(fixtures / "asr_ctc.nemo")
    asr.save_pretrained(tmp_path / "fc")
    whisper = WhisperEncoder.from_pretrained(fixtures / "whisper_hf")
    whisper.save_pretrained(tmp_path / "ours")
    ref = load_file(fixtures / "whisper_ref.safetensors")
    with torch.no_grad():
        want, want_lens = asr.encode(*asr.features(audio, lens))
    for path, kind in [(fixtures / "asr_ctc.nemo", ASRModel), (tmp_path / "fc", ASRModel),
                       (fixtures / "whisper_hf", WhisperEncoder), (tmp_path / "ours", WhisperEncoder)]:
        enc = load_encoder(path)
        assert type(enc) is kind and not enc.training
        with torch.no_grad():
            feats, feat_lens = enc.features(audio, lens)
            x, enc_lens = enc.encode(feats, feat_lens)
        assert feats.dtype == torch.float32 and x.shape == (2, int(enc_lens.max()), enc.out_dim)
        if kind is WhisperEncoder:  # 20 ms frames covering audio, and transformers' numbers on them
            assert enc_lens.tolist() == [119, 81]
            assert max_valid_diff(x, ref["batch.encoder_output"], enc_lens) < 1e-4
        else:  # the ASR model's own encoder, bit for bit
            assert torch.equal(enc_lens, want_lens) and torch.equal(x, want)


def test_load_encoder_refuses_what_is_not_an_encoder(fixtures, tmp_path):
    with pytest.raises(ValueError, match=r"model_type 'qwen3_5_text' is not an encoder"):
        load_encoder(fixtures / "qwen3_5_hf")
    with pytest.raises(FileNotFoundError, match="not an encoder"):
        load_encoder(tmp_path)


# -- the Speech-LLM with a Whisper encoder and Qwen3.5 -------------------------------------------------


def test_seed004_parts_reproduce_the_standalone_models(seed004, fixtures, batch):
    assert seed004.cfg.encoder_kind == "whisper" and seed004.preprocessor is None
    audio, lens = batch
    alone = WhisperEncoder.from_pretrained(fixtures / "whisper_hf")
    with torch.no_grad():
        want, want_lens = alone(audio, lens)
        got, got_lens = seed004.encode(*seed004.features(audio, lens))
    assert torch.equal(got_lens, want_lens) and torch.equal(got, want)
    ref = load_file(fixtures / "qwen3_5_ref.safetensors")
    with torch.no_grad():
        logits = seed004.llm(ref["batch.input_ids"], attention_mask=ref["batch.attention_mask"],
                             position_ids=ref["batch.position_ids"])
    valid, n = ref["batch.attention_mask"].bool(), 403  # rows 403.. now hold <audio> and the tags
    assert (logits[valid][:, :n] - ref["batch.logits"][valid][:, :n]).abs().max() < 1e-4
    # the projector: stacked frames (stride 1 here: one LLM position per 20 ms Whisper frame)
    with torch.no_grad():
        emb, emb_lens = seed004.embed_audio(audio, lens)
    assert emb.shape == (2, 119, 64) and emb_lens.tolist() == [119, 81]


def test_padded_batch_equals_each_clip_alone(seed004, batch):
    """Left padding through Qwen3.5's DeltaNet layers (prefill, then cached steps) and right padding
    of the audio through Whisper: each clip's loss and prediction as when it is alone."""
    audio, lens = batch
    texts, tags = ["hello world", "speech"], ["<COMPLETE>", "<BACKCHANNEL>"]
    with torch.no_grad():
        loss, stats = seed004(audio, lens, texts, tags)
        rows = [seed004(audio[i:i + 1, :lens[i]], lens[i:i + 1], texts[i:i + 1], tags[i:i + 1]) for i in range(2)]
    total = sum(float(l_) * float(s["weight"]) for l_, s in rows)
    assert abs(float(loss) * float(stats["weight"]) - total) < 1e-4 * total
    out = seed004.predict(audio, lens, max_new_tokens=5)
    for i, o in enumerate(out):
        alone = seed004.predict(audio[i:i + 1, :lens[i]], lens[i:i + 1], max_new_tokens=5)[0]
        assert alone["transcript"] == o["transcript"]
        assert max(abs(alone["probs"][t] - o["probs"][t]) for t in o["probs"]) < 1e-4
        assert abs(alone["tag_mass"] - o["tag_mass"]) < 1e-4 * alone["tag_mass"]


def test_save_load_round_trip_and_bf16(seed004, batch, tmp_path):
    seed004.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["encoder_kind"], config["preprocessor"], config["encoder"]["model_type"],
            config["llm"]["model_type"]) == ("whisper", None, "whisper_encoder", "qwen3_5_text")
    again = SpeechLLM.from_pretrained(tmp_path)
    a, b = seed004.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.llm.lm_head.weight is again.llm.model.embed_tokens.weight  # tied, as the fixture
    audio, lens = batch
    assert again.predict(audio, lens, 3)[0]["probs"] == seed004.predict(audio, lens, 3)[0]["probs"]
    half = SpeechLLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    front = half.encoder.frontend
    assert half.encoder.conv1.weight.dtype == torch.bfloat16 and front.mel_filters.dtype == torch.float32
    assert torch.equal(front.mel_filters, seed004.encoder.frontend.mel_filters)  # float32 values, not bf16 ones
    p16, p32 = half.predict(audio, lens, 2)[0]["probs"], seed004.predict(audio, lens, 2)[0]["probs"]
    assert max(abs(p16[t] - p32[t]) for t in p32) < 0.05


def test_whisper_refuses_clips_past_its_window(seed004):
    audio = torch.zeros(1, 30 * 16000 + 1)
    with pytest.raises(ValueError, match="longer than Whisper's 30 s window"):
        seed004.predict(audio, torch.tensor([audio.shape[1]]))
    assert (seed004.max_samples, seed004.hop_length) == (480000, 160)


def test_speaker_kernels_are_fastconformer_only(seed004, fixtures, batch):
    with pytest.raises(ValueError, match="FastConformer-only"):
        assemble(fixtures / "whisper_hf", fixtures / "qwen3_5_hf", SMALL_CAUSAL, speaker=SpeakerKernelConfig(layers=(0,)))
    with pytest.raises(ValueError, match="FastConformer-only"):
        seed004.new_speaker_kernels(SpeakerKernelConfig(layers=(0,)))
    audio, lens = batch
    with pytest.raises(ValueError, match="FastConformer-only"):
        seed004.predict(audio, lens, 1, spk_targets=torch.ones(2, 119))
    d = seed004.cfg.to_dict()
    with pytest.raises(ValueError, match="FastConformer-only"):
        SpeechLLMConfig.from_dict({**d, "speaker_kernels": {"layers": [0]}})


# -- config.json: the kinds, and files written before them ------------------------------------------


def test_config_kinds_and_older_files(seed004, fixtures):
    fc_qwen3 = assemble(fixtures / "asr_ctc.nemo", fixtures / "qwen3_hf")
    assert fc_qwen3.cfg.describe() == "FastConformer 2 x 64, conv_transformer projector, Qwen3 2 x 64"
    assert seed004.cfg.describe() == "Whisper encoder 2 x 64, causal_transformer projector, Qwen3.5 4 x 64"
    for model in (fc_qwen3, seed004):
        assert SpeechLLMConfig.from_dict(model.cfg.to_dict()) == model.cfg
    older = fc_qwen3.cfg.to_dict()
    del older["encoder_kind"]  # config.json before Whisper: a FastConformer
    assert SpeechLLMConfig.from_dict(older) == fc_qwen3.cfg
    d = seed004.cfg.to_dict()
    with pytest.raises(ValueError, match="encoder_kind 'wav2vec'"):
        SpeechLLMConfig.from_dict({**d, "encoder_kind": "wav2vec"})
    with pytest.raises(ValueError, match="llm: model_type 'llama'"):
        SpeechLLMConfig.from_dict({**d, "llm": {**d["llm"], "model_type": "llama"}})
    with pytest.raises(ValueError, match="not a Whisper encoder config"):  # a FastConformer config read as Whisper's
        SpeechLLMConfig.from_dict({**fc_qwen3.cfg.to_dict(), "encoder_kind": "whisper", "preprocessor": None})
