"""speechllm.activity: RTTM and segments, masks on the encoder's grid, the target speaker, and speaker
activity from a SortFormer or an RTTM into a Speech-LLM with speaker kernels.
Run: python -m pytest -q tests/test_activity.py"""
import json
import os
from types import SimpleNamespace

import pytest
import soundfile as sf
import torch

from conftest import load_script
from speechllm.activity import (Grid, auto_target, clip_segments, diarizer_masks, encoder_frames, fit_masks,
                                format_rttm, grid_of, main, masks_from_probs, parse_target, pick_target,
                                predict_with_activity, probs_to_segments, read_rttm, rttm_masks, speaker_activity,
                                target_masks, write_manifest_rttms)
from speechllm.audio import PreprocessorConfig, pad_batch
from speechllm.fastconformer import FastConformerConfig
from speechllm.model import assemble
from speechllm.sortformer import SortFormer

CLIPS = ("audio_2spk.wav", "audio_1.wav")
MIX_DURATION = 64927 / 16000
MIX_RTTM = ("SPEAKER audio_2spk 1 0.100 2.123 <NA> <NA> A <NA> <NA>\n"
            "SPEAKER audio_2spk 1 1.673 2.235 <NA> <NA> B <NA> <NA>\n")  # the mix's turns (fixture README)


@pytest.fixture(scope="module")
def model(fixtures):
    """A tiny Speech-LLM on the multitalker encoder: its trained speaker kernels come along."""
    return assemble(fixtures / "asr_spk_kernel.nemo", fixtures / "llm_hf", seed=0)


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


def test_fit_masks_cuts_or_extends_each_clip_then_pads():
    m = torch.tensor([0.2, 0.7, 0.9])
    assert fit_masks([m], [2])[0].tolist() == pytest.approx([0.2, 0.7])
    assert fit_masks([m], [5])[0].tolist() == pytest.approx([0.2, 0.7, 0.9, 0.9, 0.9])
    assert fit_masks([torch.zeros(0)], [2])[0].tolist() == [0, 0]
    both = fit_masks([m, m], [5, 2])  # the shorter clip is right-padded with 0
    assert both.shape == (2, 5) and both[1].tolist() == pytest.approx([0.2, 0.7, 0, 0, 0])


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
    got = predict_with_activity(model, audio, lengths, diarizer, max_new_tokens=8)
    s, g, targets = diarizer_masks(diarizer, audio, lengths, encoder_frames(model, lengths).tolist())
    want = model.predict(audio, lengths, 8, spk_targets=s, bg_spk_targets=g)
    assert [r.pop("speaker") for r in got] == targets
    assert without_timings(got) == without_timings(want)
    plain = model.predict(audio, lengths, 8)  # NeMo's single-speaker default: the masks do matter
    assert [r["transcript"] for r in plain] != [r["transcript"] for r in want]
    with pytest.raises(ValueError, match="no speaker kernels"):
        predict_with_activity(SimpleNamespace(spk_kernels=None), audio, lengths, diarizer)


def test_predict_with_rttm(model, batch, tmp_path):
    audio, lengths = batch
    (tmp_path / "mix.rttm").write_text(MIX_RTTM)
    rttm = read_rttm(tmp_path / "mix.rttm")
    mix = clip_segments(rttm, "audio_2spk")
    other = [(0.2, 0.9, "X"), (0.8, 1.5, "Y")]  # made-up turns for audio_1.wav
    got = predict_with_activity(model, audio, lengths, [mix, other], "auto", max_new_tokens=8)
    assert [r.pop("speaker") for r in got] == ["B", "Y"]  # who talks last
    s_mix, g_mix = target_masks(mix, "B", 51, MIX_DURATION)
    s_other, g_other = target_masks(other, "Y", 21, 25760 / 16000)
    s, g = torch.zeros(2, 51), torch.zeros(2, 51)
    s[0], g[0], s[1, :21], g[1, :21] = s_mix, g_mix, s_other, g_other
    want = model.predict(audio, lengths, 8, spk_targets=s, bg_spk_targets=g)
    assert without_timings(got) == without_timings(want)
    silent = predict_with_activity(model, audio[:1], lengths[:1], [mix], 5, max_new_tokens=8)  # no 6th speaker
    assert silent[0]["speaker"] is None


def test_infer_cli_with_a_diarizer_or_an_rttm(model, diarizer, fixtures, tmp_path, capsys):
    """infer.py --diarizer / --rttm give predict_with_activity's tags and name the target speaker."""
    infer = load_script("infer")
    model.save_pretrained(tmp_path / "sllm")
    diarizer.save_pretrained(tmp_path / "diar")
    (tmp_path / "mix.rttm").write_text(MIX_RTTM)
    wav = str(fixtures / "audio_2spk.wav")
    audio, lengths = pad_batch([sf.read(wav, dtype="float32")[0]])
    common = [wav, "--checkpoint", str(tmp_path / "sllm"), "--dtype", "float32", "--max-new-tokens", "8", "--json"]
    for source, speakers in (["--diarizer", str(tmp_path / "diar")], diarizer), \
            (["--rttm", str(tmp_path / "mix.rttm")], [clip_segments(read_rttm(tmp_path / "mix.rttm"), "audio_2spk")]):
        assert infer.main(common + source) == 0
        got = json.loads(capsys.readouterr().out)
        want = predict_with_activity(model, audio, lengths, speakers, max_new_tokens=8)[0]
        assert got["speaker"] == want["speaker"] and got["tag"] == want["tag"]
        assert got["probs"] == pytest.approx(want["probs"], abs=1e-5)
    assert infer.main(common + ["--rttm", str(tmp_path / "mix.rttm"), "--diarizer", str(tmp_path / "diar")]) == 1
    assert "not both" in capsys.readouterr().err


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


# ----------------------------------------------------------------------------------------------
# activity masks from RTTM and segments

# audio_2spk.wav (diar_sortformer_ref.json "mix"): A 0.1 - 2.222875 s, B 1.672875 - 3.9079375 s.
TWO_SPEAKER_RTTM = """;; two espeak voices
SPKR-INFO mix 1 <NA> <NA> <NA> unknown B <NA> <NA>
SPEAKER mix 1 1.672875 2.2350625 <NA> <NA> B <NA> <NA>
SPEAKER mix 1 0.100 2.122875 <NA> <NA> A <NA> <NA>

SPEAKER other 1 0.5 1.0 <NA> <NA> C <NA> <NA>
"""


def test_read_rttm(tmp_path):
    (tmp_path / "a.rttm").write_text(TWO_SPEAKER_RTTM)
    got = read_rttm(tmp_path / "a.rttm")
    assert list(got) == ["mix", "other"]
    assert [spk for _, _, spk in got["mix"]] == ["B", "A"]
    assert got["mix"][1][0] == 0.1 and abs(got["mix"][1][1] - 2.222875) < 1e-9
    assert got["other"] == [(0.5, 1.5, "C")]
    (tmp_path / "b.rttm").write_text("SPEAKER x 1 0.0 1.0 <NA> <NA> A <NA> <NA>\n\nSPEAKER x 1 zero\n")
    with pytest.raises(ValueError, match="b.rttm:3"):
        read_rttm(tmp_path / "b.rttm")


def test_activity_follows_nemo_training_labels():
    # A segment from frame 2's start to frame 5's start covers cells 16..39 of the 10 ms grid. Frame i
    # averages cells 8i-5 .. 8i+3: frame 2 sees 4/9 of them active, 3 and 4 all, 5 sees 5/9.
    act, speakers = speaker_activity([(0.16, 0.40, "A")], 8)
    assert speakers == ["A"] and act[0].tolist() == [0, 0, 0, 1, 1, 1, 0, 0]
    soft, _ = speaker_activity([(0.16, 0.40, "A")], 8, soft=True)
    assert torch.allclose(soft[0], torch.tensor([0, 0, 4 / 9, 1, 1, 5 / 9, 0, 0]))
    # Frame 0 averages cells 0..3 only; the last frame cells 51..69, to the end of the audio. 0.58 s
    # is cell 57, not 58: NeMo floors 0.58 * 100 = 57.99999999999999.
    soft, _ = speaker_activity([(0.0, 0.03, "A"), (0.58, 0.7, "B")], 8, duration=0.7, soft=True)
    assert torch.allclose(soft[:, 0], torch.tensor([3 / 4, 0])) and torch.allclose(soft[1, 7], torch.tensor(13 / 19))
    # Speakers come in order of first onset, whatever the order of the segments.
    _, speakers = speaker_activity([(1.0, 2.0, "late"), (0.5, 0.6, "early"), (0.0, 0.1, "late")], 30)
    assert speakers == ["late", "early"]


def test_target_masks_for_the_two_speaker_mix(tmp_path):
    (tmp_path / "mix.rttm").write_text(TWO_SPEAKER_RTTM)
    segments = read_rttm(tmp_path / "mix.rttm")["mix"]
    s, g = target_masks(segments, "A", 51, MIX_DURATION)
    assert s.nonzero().flatten().tolist() == list(range(2, 28))
    assert g.nonzero().flatten().tolist() == list(range(21, 49))
    s_b, g_b = target_masks(segments, "B", 51, MIX_DURATION)
    assert torch.equal(s_b, g) and torch.equal(g_b, s)
    s_c, g_c = target_masks(segments, "C", 51, MIX_DURATION)  # absent: silent target, both others background
    assert s_c.sum() == 0 and torch.equal(g_c, torch.maximum(s, g))


def test_batch_masks_drive_encode_like_single_clips(spk_asr, spk_clips, tmp_path):
    """Masks for the fixture's batch come out as NeMo's do: (B, T_enc of the longest), one value per
    80 ms frame, the shorter row padded; batch rows then encode as each clip alone."""
    clips = spk_clips
    (tmp_path / "mix.rttm").write_text(TWO_SPEAKER_RTTM)
    mix = read_rttm(tmp_path / "mix.rttm")["mix"]
    other = [(0.2, 0.9, "X"), (0.8, 1.5, "Y")]  # made-up turns for audio_1.wav (1.61 s)
    lengths = [51, 21]
    s, g, _ = rttm_masks([mix, other], lengths, [MIX_DURATION, len(clips[1]) / 16000], ["B", "X"])
    assert s.shape == g.shape == (2, 51) and s[1, 21:].sum() == 0 and g[1, 21:].sum() == 0
    assert torch.equal(s[0], target_masks(mix, "B", 51, MIX_DURATION)[0])
    with torch.no_grad():
        x, enc_lens = spk_asr.encode(*spk_asr.features(*pad_batch(clips)), s, g)
        assert enc_lens.tolist() == lengths
        for i, n in enumerate(lengths):
            xi, _ = spk_asr.encode(*spk_asr.features(*pad_batch([clips[i]])), s[i:i + 1, :n], g[i:i + 1, :n])
            assert (x[i, :n] - xi[0, :n]).abs().max() < 1e-5


def test_masks_from_diarizer_probs():
    probs = torch.tensor([[[0.9, 0.2, 0.1], [0.4, 0.7, 0.0], [0.6, 0.1, 0.55]]])  # (B=1, T=3, S=3)
    s, g = masks_from_probs(probs, 0)
    assert torch.equal(s, probs[..., 0]) and g.tolist() == [[0, 1, 1]]
    s, g = masks_from_probs(probs, 2, binary=True)
    assert s.tolist() == [[0, 0, 1]] and g.tolist() == [[1, 1, 1]]


def test_probs_to_segments_threshold_and_min_duration():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.5], [0.2, 0.7], [0.1, 0.8], [0.7, 0.9]])  # (T=5, S=2)
    # Runs still open at the end close 10 ms early, as NeMo's binarization does (0.39, not 0.4).
    assert probs_to_segments(probs) == [(0.0, 0.16, "speaker_0"), (0.16, 0.39, "speaker_1"), (0.32, 0.39, "speaker_0")]
    assert probs_to_segments(probs, threshold=0.65) == [(0.0, 0.08, "speaker_0"), (0.16, 0.39, "speaker_1"),
                                                        (0.32, 0.39, "speaker_0")]
    assert probs_to_segments(probs, min_duration=0.1) == [(0.0, 0.16, "speaker_0"), (0.16, 0.39, "speaker_1")]
    assert probs_to_segments(probs, frame_s=0.5)[0] == (0.0, 1.0, "speaker_0")
    assert probs_to_segments(probs, frame_s=0.5)[1] == (1.0, 2.49, "speaker_1")
    assert probs_to_segments(torch.zeros(7, 4)) == []


def test_rttm_round_trip(tmp_path):
    segments = [(0.0, 0.16, "speaker_0"), (0.16, 2.4, "speaker_1"), (1.04, 1.6, "speaker_0")]
    text = format_rttm(segments, "mix_01")
    assert text.splitlines()[1] == "SPEAKER mix_01 1 0.160 2.240 <NA> <NA> speaker_1 <NA> <NA>"
    (tmp_path / "mix.rttm").write_text(text)
    back = read_rttm(tmp_path / "mix.rttm")["mix_01"]
    assert [spk for _, _, spk in back] == [spk for _, _, spk in segments]
    assert torch.allclose(torch.tensor([s[:2] for s in back]), torch.tensor([s[:2] for s in segments]), atol=1e-6)
    with pytest.raises(ValueError, match="whitespace"):
        format_rttm(segments, "two words")


def test_the_grid_follows_the_config():
    """Another subsampling factor moves every frame edge: 4x on 10 ms cells is a 40 ms grid, and a
    frame averages the 5 cells within half a frame of its centre (cells 4i-3 .. 4i+1)."""
    cfg = SimpleNamespace(preprocessor=PreprocessorConfig(), encoder=FastConformerConfig(subsampling_factor=4))
    grid = grid_of(cfg)
    assert grid == Grid(100.0, 4) and grid.frame_s == 0.04 and grid_of(SimpleNamespace(
        preprocessor=PreprocessorConfig(), encoder=FastConformerConfig())).frame_s == 0.08
    act, _ = speaker_activity([(0.16, 0.40, "A")], 16, grid=grid)  # cells 16..39
    assert act[0].tolist() == [0] * 5 + [1] * 6 + [0] * 5
    assert probs_to_segments(act.T, frame_s=grid.frame_s) == [(0.2, 0.44, "speaker_0")]
    w = torch.zeros(20, 2)
    w[8:, 0], w[:, 1] = 0.9, 0.55
    w[-1, 1] = 0.99  # speaker 1 wins the last frame alone, speaker 0 any two
    assert auto_target(w, window_s=0.08) == 1  # 80 ms: one frame
    assert auto_target(w, window_s=0.08, grid=grid) == 0  # 40 ms: two frames
