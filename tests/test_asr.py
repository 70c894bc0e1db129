"""ASRModel end to end against NeMo 3.0.0 (asr_ctc.nemo), the converter and the CLI.
Run: python -m pytest -q tests/test_asr.py"""
import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import load_script, max_valid_diff, rewrite_nemo, run_main
from speechllm.asr import ASRModel, ctc_greedy
from speechllm.audio import AudioError
from speechllm.convert import ConversionError, NemoArchive

TOL = 1e-4


@pytest.mark.parametrize("run", ["batch", "single0", "single1"])
def test_features_encoder_and_log_probs_match_nemo(asr, asr_ref, run):
    lengths = asr_ref[f"{run}.input_signal_length"]
    if run == "batch":
        audio = asr_ref["batch.input_signal"]
    else:  # single runs store no signal: it is the batch row, unpadded
        i = int(run[-1])
        audio = asr_ref["batch.input_signal"][i:i + 1, : int(lengths[0])]
    with torch.no_grad():
        feats, feat_lens = asr.features(audio, lengths)
        assert feat_lens.tolist() == asr_ref[f"{run}.features_length"].tolist()
        assert feats.shape == asr_ref[f"{run}.features"].shape
        assert max_valid_diff(feats.transpose(1, 2), asr_ref[f"{run}.features"].transpose(1, 2), feat_lens) < TOL
        x, enc_lens = asr.encode(feats, feat_lens)
        assert enc_lens.tolist() == asr_ref[f"{run}.encoded_length"].tolist()
        assert max_valid_diff(x, asr_ref[f"{run}.encoder_output"].transpose(1, 2), enc_lens) < TOL
        log_probs, lens = asr(audio, lengths)
    assert max_valid_diff(log_probs, asr_ref[f"{run}.log_probs"], lens) < TOL
    for i, n in enumerate(lens.tolist()):
        assert log_probs[i, :n].argmax(-1).tolist() == asr_ref[f"{run}.greedy_frame_ids"][i, :n].tolist()


def test_greedy_ids_and_text_identical(asr, asr_ref, asr_ref_json, fixtures):
    with torch.no_grad():
        log_probs, lens = asr(asr_ref["batch.input_signal"], asr_ref["batch.input_signal_length"])
    ids = ctc_greedy(log_probs, lens, asr.blank_id)
    assert ids == asr_ref_json["batch"]["greedy_token_ids"]
    assert [asr.tokenizer.decode(i) for i in ids] == asr_ref_json["batch"]["greedy_text"]
    # The same through transcribe(), from the WAV files themselves.
    texts = asr.transcribe([fixtures / "audio_0.wav", fixtures / "audio_1.wav"])
    assert texts == asr_ref_json["batch"]["greedy_text"]


def test_tokenizer_matches_nemo_probes(asr, asr_ref_json):
    for text, ids in asr_ref_json["tokenizer_probes"].items():
        assert asr.tokenizer.encode(text) == ids, text
    assert [asr.tokenizer.id_to_piece(i) for i in range(asr.cfg.vocab_size)] == asr_ref_json["vocabulary"]


def test_transcribe_batch_equals_single(asr, fixtures):
    a0, _ = sf.read(fixtures / "audio_0.wav", dtype="float32")
    a1, _ = sf.read(fixtures / "audio_1.wav", dtype="float32")
    together = asr.transcribe([a1, a0, a1], batch_size=3)
    assert together == [asr.transcribe(a1), asr.transcribe(a0), asr.transcribe(a1)]


def test_save_and_load_pretrained_round_trip(asr, asr_ref, tmp_path):
    asr.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors", "tokenizer.model"}
    again = ASRModel.from_pretrained(tmp_path)
    audio, lengths = asr_ref["batch.input_signal"], asr_ref["batch.input_signal_length"]
    with torch.no_grad():
        a, _ = asr(audio, lengths)
        b, _ = again(audio, lengths)
    assert torch.equal(a, b)
    assert again.tokenizer.encode("hello world") == asr.tokenizer.encode("hello world")


def test_bf16_weights_stay_close(asr, asr_ref, tmp_path):
    asr.save_pretrained(tmp_path)
    half = ASRModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    audio, lengths = asr_ref["batch.input_signal"], asr_ref["batch.input_signal_length"]
    with torch.no_grad():
        a, lens = asr(audio, lengths)
        b, _ = half(audio, lengths)
    # bf16 has an 8-bit mantissa; through 2 layers the log-probs move by a few hundredths at most.
    assert max_valid_diff(a, b, lens) < 0.25
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8


# ----------------------------------------------------------------------------------------------
# bad checkpoints



def test_conversion_lists_missing_extra_and_mismatched_tensors(fixtures, tmp_path):
    sd = NemoArchive(fixtures / "asr_ctc.nemo").state_dict()
    del sd["encoder.layers.1.self_attn.linear_q.weight"]
    sd["encoder.layers.0.conv.depthwise_conv.weight"] = torch.zeros(64, 1, 5)
    sd["encoder.mystery.weight"] = torch.zeros(3)
    sd["joint.pred.weight"] = torch.zeros(3)
    bad = rewrite_nemo(fixtures / "asr_ctc.nemo", tmp_path / "bad.nemo", state=sd)
    with pytest.raises(ConversionError) as e:
        ASRModel.from_nemo(bad)
    msg = str(e.value)
    for name in ["encoder.layers.1.self_attn.linear_q.weight", "encoder.layers.0.conv.depthwise_conv.weight",
                 "(64, 1, 5)", "encoder.mystery.weight", "joint.pred.weight", str(bad)]:
        assert name in msg


def test_conversion_refuses_other_models_and_encoders(fixtures, tmp_path):
    cfg = NemoArchive(fixtures / "asr_ctc.nemo").config
    rnnt = rewrite_nemo(fixtures / "asr_ctc.nemo", tmp_path / "rnnt.nemo",
                        config={**cfg, "target": "nemo.collections.asr.models.EncDecRNNTBPEModel"})
    with pytest.raises(ConversionError, match="EncDecRNNTBPEModel"):
        ASRModel.from_nemo(rnnt)
    lstm = rewrite_nemo(fixtures / "asr_ctc.nemo", tmp_path / "lstm.nemo",
                        config={**cfg, "encoder": {**cfg["encoder"], "_target_": "nemo.collections.asr.modules.RNNEncoder"}})
    with pytest.raises(ValueError, match="RNNEncoder"):
        ASRModel.from_nemo(lstm)


def test_nemo_archive_never_runs_code_or_extracts(fixtures, tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    sd = NemoArchive(fixtures / "asr_ctc.nemo").state_dict()
    sd["evil"] = Evil()
    bad = rewrite_nemo(fixtures / "asr_ctc.nemo", tmp_path / "evil.nemo", state=sd,
                       extra=[("../escaped.txt", b"x"), ("/tmp/absolute_escape.txt", b"x")])
    with pytest.raises(ConversionError, match="safely"):
        ASRModel.from_nemo(bad)
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path.parent / "escaped.txt").exists()


def test_not_a_nemo_file(tmp_path):
    junk = tmp_path / "junk.nemo"
    junk.write_bytes(b"definitely not a tar archive" * 100)
    with pytest.raises(ConversionError, match="junk.nemo"):
        ASRModel.from_nemo(junk)
    with pytest.raises(FileNotFoundError, match="missing.nemo"):
        ASRModel.from_nemo(tmp_path / "missing.nemo")


def test_too_short_and_bad_arrays_are_named(asr):
    with pytest.raises(AudioError, match="too short"):
        asr.transcribe(np.zeros(100, dtype=np.float32))
    with pytest.raises(AudioError, match="input #1"):
        asr.transcribe([np.zeros(16000, dtype=np.float32), np.full(16000, np.nan, dtype=np.float32)])


# ----------------------------------------------------------------------------------------------
# command line


SCRIPTS = {name: load_script(name) for name in ("infer", "convert_weights")}


def test_cli_convert_then_transcribe(fixtures, tmp_path, asr_ref_json, capsys):
    run = lambda script, *args: run_main(SCRIPTS[script.removesuffix(".py")].main, args, capsys)
    out = tmp_path / "asr"
    r = run("convert_weights.py", "nemo", str(fixtures / "asr_ctc.nemo"), str(out))
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "config.json").read_text())["preprocessor"]["legacy"] is False
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF....not really audio")
    r = run("infer.py", str(fixtures / "audio_0.wav"), str(bad), str(fixtures / "audio_1.wav"),
            "--checkpoint", str(out), "--json", "--dtype", "float32")
    assert r.returncode == 1  # one bad file: reported, the others still transcribed
    assert "bad.wav" in r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [d["text"] for d in lines] == asr_ref_json["batch"]["greedy_text"]


def test_cli_help_and_errors(tmp_path, capsys):
    run = lambda script, *args: run_main(SCRIPTS[script.removesuffix(".py")].main, args, capsys)
    for script in ("infer.py", "convert_weights.py"):
        r = run(script, "--help")
        assert r.returncode == 0 and "usage" in r.stdout
    r = run("infer.py", "x.wav", "--checkpoint", str(tmp_path / "nowhere"))
    assert r.returncode == 1 and "nowhere" in r.stderr
    r = run("convert_weights.py", "nemo", str(tmp_path / "missing.nemo"), str(tmp_path / "out"))
    assert r.returncode == 1 and "missing.nemo" in r.stderr
