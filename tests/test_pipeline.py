"""Speaker activity from a SortFormer or an RTTM into a Speech-LLM with speaker kernels.
Run: python -m pytest -q tests/test_pipeline.py"""
import json
import os
from types import SimpleNamespace

import pytest
import soundfile as sf
import torch

from speechllm.audio import pad_batch
from speechllm.model import assemble
from speechllm.pipeline import (auto_target, clip_segments, diarizer_masks, encoder_frames, fit_frames, main,
                                parse_target, pick_target, predict_with_diarizer, predict_with_rttm,
                                write_manifest_rttms)
from speechllm.sortformer import SortFormer, probs_to_segments
from speechllm.speaker import masks_from_probs, read_rttm, target_masks

CLIPS = ("audio_2spk.wav", "audio_1.wav")
MIX_DURATION = 64927 / 16000
MIX_RTTM = ("SPEAKER audio_2spk 1 0.100 2.123 <NA> <NA> A <NA> <NA>\n"
            "SPEAKER audio_2spk 1 1.673 2.235 <NA> <NA> B <NA> <NA>\n")  # the mix's turns (fixture README)


@pytest.fixture(scope="module")
def model(fixtures):
    """A tiny Speech-LLM on the multitalker encoder: its trained speaker kernels come along."""
    return assemble(fixtures / "asr_spk_kernel.nemo", fixtures / "llm_hf", seed=0)


@pytest.fixture(scope="module")
def diarizer(fixtures):
    return SortFormer.from_nemo(fixtures / "diar_sortformer.nemo")


@pytest.fixture(scope="module")
def clips(fixtures):
    return [sf.read(fixtures / name, dtype="float32")[0] for name in CLIPS]


@pytest.fixture(scope="module")
def batch(clips):
    return pad_batch(clips)


def without_timings(results):
    return [{k: v for k, v in r.items() if k != "timings"} for r in results]


def test_auto_target_is_the_speaker_talking_when_talk_stops():
    T = 20
    probs = torch.full((T, 3), 0.05)
    probs[0:10, 0] = 0.9
    probs[5:14, 1] = 0.8  # speaker 1 talks last, then 6 frames of silence
    assert auto_target(probs) == 1  # trailing silence is skipped
    probs[12:15, 2] = 0.6  # speaker 2 outlasts it by one frame
    assert auto_target(probs) == 2
    probs[14, 1] = 0.7  # both talk at the last active frame: the 0.5 s mean decides
    assert auto_target(probs) == 1
    probs[14, 1] = 0.45  # higher mean, but no longer talking at that frame
    assert auto_target(probs) == 2
    assert auto_target(probs, threshold=0.85) == 0  # only speaker 0 ever clears 0.85
    assert auto_target(torch.full((T, 4), 0.1)) == 0  # nobody talks: the first to arrive
    tie = torch.zeros(T, 2)
    tie[-3:] = 0.9
    assert auto_target(tie) == 0
    # The window: speaker 0's mean over the last 6 frames wins although speaker 1 ends higher.
    w = torch.zeros(10, 2)
    w[4:, 0], w[:, 1] = 0.9, 0.55
    w[-1, 1] = 0.95
    assert auto_target(w) == 0 and auto_target(w, window_s=0.08) == 1


def test_target_parsing_and_range():
    assert parse_target("auto") == "auto" and parse_target("2") == 2
    for bad in ("-1", "x", "1.5", ""):
        with pytest.raises(ValueError, match="auto"):
            parse_target(bad)
    probs = torch.rand(5, 4)
    assert pick_target(probs, 3) == 3
    with pytest.raises(ValueError, match="4 speakers"):
        pick_target(probs, 4)


def test_fit_frames():
    m = torch.tensor([0.2, 0.7, 0.9])
    assert fit_frames(m, 2).tolist() == pytest.approx([0.2, 0.7])
    assert fit_frames(m, 5).tolist() == pytest.approx([0.2, 0.7, 0.9, 0.9, 0.9])
    assert fit_frames(torch.zeros(0), 2).tolist() == [0, 0]


def test_auto_picks_the_last_talker_of_the_mix(diarizer, clips, fixtures):
    """B talks last in audio_2spk.wav; NeMo's own segments of this diarizer end with speaker_1."""
    ref = json.loads((fixtures / "diar_sortformer_ref.json").read_text())
    lines = ref["diarize_api"]["segments_default_postprocessing"]["audio_2spk.wav"]  # "start end speaker"
    last = max(lines, key=lambda line: float(line.split()[1]))
    assert last.split()[2] == "speaker_1"
    probs, lens = diarizer.diarize(torch.from_numpy(clips[0])[None])
    assert auto_target(probs[0, :lens[0]]) == 1


def test_masks_per_clip_at_the_encoder_rate(model, diarizer, clips, batch):
    """One mask value per 80 ms encoder frame, the encoder's length per row; every clip is diarized
    alone, so the shorter one does not take the mix's peak scale (which batching would give it)."""
    audio, lengths = batch
    frames = encoder_frames(model, lengths)
    with torch.no_grad():
        _, enc_lens = model.encoder(*model.preprocessor(audio, lengths))
    assert torch.equal(frames, enc_lens) and frames.tolist() == [51, 21]
    s, g, targets = diarizer_masks(diarizer, audio, lengths, frames.tolist())
    assert s.shape == g.shape == (2, 51) and s[1, 21:].sum() == 0 and g[1, 21:].sum() == 0
    for i, clip in enumerate(clips):
        probs, n = diarizer.diarize(torch.from_numpy(clip)[None])
        probs = probs[0, :n[0]]
        assert targets[i] == auto_target(probs) and len(probs) == frames[i]
        want_s, want_g = masks_from_probs(probs, targets[i])
        assert torch.equal(s[i, :frames[i]], want_s) and torch.equal(g[i, :frames[i]], want_g)
    batched, _ = diarizer.diarize(audio, lengths)
    assert not torch.equal(batched[1, :21, targets[1]], s[1, :21])  # the coupling we avoid
    s2, _, t2 = diarizer_masks(diarizer, audio, lengths, frames.tolist(), target=0, binary=True)
    assert t2 == [0, 0] and set(s2.unique().tolist()) <= {0.0, 1.0}


def test_predict_with_diarizer_equals_hand_made_masks(model, diarizer, batch):
    audio, lengths = batch
    got = predict_with_diarizer(model, diarizer, audio, lengths, max_new_tokens=8)
    s, g, targets = diarizer_masks(diarizer, audio, lengths, encoder_frames(model, lengths).tolist())
    want = model.predict(audio, lengths, 8, spk_targets=s, bg_spk_targets=g)
    assert [r.pop("speaker") for r in got] == targets
    assert without_timings(got) == without_timings(want)
    plain = model.predict(audio, lengths, 8)  # NeMo's single-speaker default: the masks do matter
    assert [r["transcript"] for r in plain] != [r["transcript"] for r in want]
    with pytest.raises(ValueError, match="no speaker kernels"):
        predict_with_diarizer(SimpleNamespace(spk_kernels=None), diarizer, audio, lengths)


def test_predict_with_rttm(model, batch, tmp_path):
    audio, lengths = batch
    (tmp_path / "mix.rttm").write_text(MIX_RTTM)
    rttm = read_rttm(tmp_path / "mix.rttm")
    mix = clip_segments(rttm, "audio_2spk")
    other = [(0.2, 0.9, "X"), (0.8, 1.5, "Y")]  # made-up turns for audio_1.wav
    got = predict_with_rttm(model, audio, lengths, [mix, other], "auto", max_new_tokens=8)
    assert [r.pop("speaker") for r in got] == ["B", "Y"]  # who talks last
    s_mix, g_mix = target_masks(mix, "B", 51, MIX_DURATION)
    s_other, g_other = target_masks(other, "Y", 21, 25760 / 16000)
    s, g = torch.zeros(2, 51), torch.zeros(2, 51)
    s[0], g[0], s[1, :21], g[1, :21] = s_mix, g_mix, s_other, g_other
    want = model.predict(audio, lengths, 8, spk_targets=s, bg_spk_targets=g)
    assert without_timings(got) == without_timings(want)
    silent = predict_with_rttm(model, audio[:1], lengths[:1], [mix], 5, max_new_tokens=8)  # no 6th speaker
    assert silent[0]["speaker"] is None


def test_clip_segments_cut_and_shift():
    rttm = {"rec": [(0.5, 2.0, "A"), (2.5, 3.0, "B"), (4.0, 5.0, "A")]}
    assert clip_segments(rttm, "rec", offset=1.0, duration=2.0) == [(0.0, 1.0, "A"), (1.5, 2.0, "B")]
    assert clip_segments(rttm, "rec") == rttm["rec"]
    with pytest.raises(ValueError, match="no file id 'other'"):
        clip_segments(rttm, "other")


def test_manifest_rttms(diarizer, clips, fixtures, tmp_path):
    lines = [{"audio_filepath": str(fixtures / "audio_2spk.wav"), "text": "hello", "label": "COMPLETE"},
             {"audio_filepath": str(fixtures / "audio_2spk.wav"), "offset": 1.0, "duration": 2.0, "text": "x"}]
    manifest = tmp_path / "in.jsonl"
    manifest.write_text("".join(json.dumps(d) + "\n" for d in lines))
    before = manifest.read_bytes()
    with pytest.raises(ValueError, match="overwrite"):
        write_manifest_rttms(manifest, tmp_path / "sub" / ".." / "in.jsonl", diarizer)
    assert write_manifest_rttms(manifest, tmp_path / "out.jsonl", diarizer) == 2
    assert manifest.read_bytes() == before
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    for entry, original in zip(out, lines):
        assert {k: v for k, v in entry.items() if k != "rttm_filepath"} == original
        assert (tmp_path / entry["rttm_filepath"]).is_file()  # relative to the new manifest
    full, offset = (read_rttm(tmp_path / entry["rttm_filepath"])["audio_2spk"] for entry in out)
    probs, n = diarizer.diarize(torch.from_numpy(clips[0])[None])
    want = probs_to_segments(probs[0, :n[0]])
    assert [spk for *_, spk in full] == [spk for *_, spk in want]
    times = torch.tensor([seg[:2] for seg in full])
    assert torch.allclose(times, torch.tensor([seg[:2] for seg in want]), atol=1e-3)  # RTTM keeps milliseconds
    assert min(a for a, _, _ in offset) >= 1.0 and max(b for _, b, _ in offset) <= 3.0 + 1e-3  # file times

    # The command line, with a relative audio path, writing into another folder.
    relative = os.path.relpath(fixtures / "audio_1.wav", tmp_path)
    (tmp_path / "rel.jsonl").write_text(json.dumps({"audio_filepath": relative}))
    diarizer.save_pretrained(tmp_path / "diar")
    out = tmp_path / "sub" / "m.jsonl"
    assert main([str(tmp_path / "rel.jsonl"), "--diarizer", str(tmp_path / "diar"), "--out", str(out)]) == 0
    entry = json.loads(out.read_text())
    assert entry["rttm_filepath"].startswith("m_rttm/") and (tmp_path / "sub" / entry["rttm_filepath"]).is_file()
    assert (tmp_path / "sub" / entry["audio_filepath"]).resolve() == (fixtures / "audio_1.wav").resolve()
