"""The streaming turn detector on the earlier demo model (tests/data/stream_model). Run: python -m pytest -q tests/test_turn.py

Streams are espeak-ng clips (tests/data/stream) joined by silences; the reference for every decision is
model.predict on the audio the detector says it judged, cut from the stream by hand."""
import itertools
import json
import math
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import infer
from conftest import STREAM_CLIPS, STREAM_MODEL
from speechllm.audio import pad_batch, resample
from speechllm.model import SpeechLLM
from speechllm.turn import BACKCHANNEL, COMPLETE, INCOMPLETE, TurnConfig, TurnDetector, frame_levels, play

ROOT = Path(__file__).resolve().parents[1]
SR = 16000
WALL = ("compute_s", "latency_s")  # wall-clock fields; everything else is on the stream's clock


@pytest.fixture(scope="module")
def model():
    return SpeechLLM.from_pretrained(STREAM_MODEL)


@pytest.fixture(scope="module")
def clips():
    return {p.stem: sf.read(p, dtype="float32")[0] for p in sorted(STREAM_CLIPS.glob("*.wav"))}


class Counting:
    """A model whose predict calls are counted, with the audio each one heard."""

    def __init__(self, model):
        self.model, self.heard = model, []

    def parameters(self):
        return self.model.parameters()

    def predict(self, audio, lengths, max_new_tokens):
        self.heard.append(audio[0, : lengths[0]].clone())
        return self.model.predict(audio, lengths, max_new_tokens)


class Scripted:
    """No model: answers predict with the next tag of a script (cycled), to test the turn logic alone."""

    def __init__(self, tags):
        self.tags, self.heard = itertools.cycle(tags), []

    def parameters(self):
        return iter([torch.zeros(1)])

    def predict(self, audio, lengths, max_new_tokens):
        self.heard.append(audio[0, : lengths[0]].clone())
        tag = next(self.tags)
        probs = {t: float(t == tag) for t in (COMPLETE, INCOMPLETE, BACKCHANNEL)}
        return [{"tag": tag, "probs": probs, "transcript": "", "tag_mass": 1.0, "tag_forced": False, "timings": {}}]


def join(clips, *parts):
    """A stream from clip names and silences in seconds; returns it and where each clip starts."""
    pieces, starts, n = [], [], 0
    for p in parts:
        x = np.zeros(round(p * SR), np.float32) if isinstance(p, (int, float)) else clips[p]
        if not isinstance(p, (int, float)):
            starts.append(n / SR)
        pieces.append(x)
        n += len(x)
    return np.concatenate(pieces), starts


def run(det, x, sizes=320, flags=None):
    """Push x in chunks (an int, or a list of sizes cycled) and collect the events."""
    sizes = [sizes] if isinstance(sizes, int) else sizes
    events, i, k = [], 0, 0
    while i < len(x):
        n = sizes[k % len(sizes)]
        events += det.push(x[i:i + n], None if flags is None else flags[i])
        i, k = i + n, k + 1
    return events


def stable(events):
    return [{k: v for k, v in e.items() if k not in WALL} for e in events]


def decisions(events):
    return [e for e in events if e["event"] in ("decision", "backchannel")]


def reference(model, audio):
    return model.predict(*pad_batch([np.asarray(audio, np.float32)]))[0]


# -----------------------------------------------------------------------------
# decisions


def test_decisions_are_predict_on_the_turn_audio(model, clips):
    x, starts = join(clips, 0.4, "complete_2", 1.0, "incomplete_1", 0.3, "complete_1", 1.0, "backchannel_1", 1.0)
    counted = Counting(model)
    events = run(TurnDetector(counted), x)
    cfg = TurnConfig()
    # The VAD: speech starts in the frame that holds a clip's start, or at most 20 ms later.
    onsets = [e["time_s"] for e in events if e["event"] == "speech_start"]
    assert len(onsets) == 4 and all(-0.01 < t - s <= 0.02 for t, s in zip(onsets, starts))
    made = decisions(events)
    # Four predict calls for three decisions: the 0.3 s gap (plus incomplete_1's own tail) is a pause
    # longer than early_ms, so the turn was judged there, and speech came back before stop_ms.
    assert len(made) == 3 and len(counted.heard) == 4
    for e in made:
        start, end = round(e["audio_start_s"] * SR), round(e["computed_at_s"] * SR)
        turn = x[start:end]
        assert any(torch.equal(h, torch.from_numpy(turn)) for h in counted.heard)  # the model heard that slice
        want = reference(model, turn)  # and the decision is predict on it
        assert e["tag"] == want["tag"] and e["transcript"] == want["transcript"]
        assert all(abs(e["probs"][t] - p) < 1e-6 for t, p in want["probs"].items())
        assert e["event"] == ("backchannel" if e["tag"] == BACKCHANNEL else "decision")
        assert e["computed_at_s"] == pytest.approx(e["end_of_speech_s"] + cfg.early_ms / 1000)
        assert e["decided_at_s"] == pytest.approx(e["end_of_speech_s"] + cfg.stop_ms / 1000)
        assert e["latency_s"] >= cfg.stop_ms / 1000 - 1e-9 and e["compute_s"] > 0
    # The second turn spans incomplete_1, the short pause and complete_1 (its pre-roll included).
    assert made[1]["audio_start_s"] == pytest.approx(onsets[1] - cfg.pre_speech_ms / 1000)
    assert made[1]["end_of_speech_s"] > starts[2]


def test_early_decision_is_reused_or_dropped(model, clips):
    # A long silence: the decision made at the pause (early_ms) is the one that comes out.
    x, _ = join(clips, 0.2, "complete_2", 1.0)
    counted = Counting(model)
    (made,) = decisions(run(TurnDetector(counted), x))
    assert len(counted.heard) == 1 and made["computed_at_s"] < made["decided_at_s"]
    # Speech comes back after a pause (0.2 s and the clip's own tail: past early_ms, before stop_ms):
    # the early decision is thrown away and the one that comes out hears both clips.
    x, starts = join(clips, 0.2, "incomplete_2", 0.2, "complete_2", 1.0)
    counted = Counting(model)
    events = run(TurnDetector(counted), x)
    assert [e["event"] for e in events] == ["speech_start", "speech_end", "speech_start", "speech_end", "decision"]
    (made,) = decisions(events)
    assert len(counted.heard) == 2  # the thrown-away one, and the one used
    assert made["computed_at_s"] > starts[1] and made["audio_start_s"] < starts[0]
    assert torch.equal(counted.heard[1], torch.from_numpy(x[round(made["audio_start_s"] * SR): round(made["computed_at_s"] * SR)]))
    # early_ms == stop_ms: nothing ahead of time, the decision is computed when it comes out.
    counted = Counting(model)
    (late,) = decisions(run(TurnDetector(counted, TurnConfig(early_ms=500, stop_ms=500)), x))
    assert len(counted.heard) == 1 and late["computed_at_s"] == late["decided_at_s"]


def test_incomplete_keeps_the_turn_backchannel_drops_it():
    """The turn logic alone, with scripted tags on a synthetic voice (a 200 Hz tone)."""
    tone = lambda s: (0.3 * np.sin(2 * np.pi * 200 * np.arange(round(s * SR)) / SR)).astype(np.float32)  # noqa: E731
    quiet = lambda s: np.zeros(round(s * SR), np.float32)  # noqa: E731
    x = np.concatenate([quiet(0.5), tone(1.0), quiet(1.0), tone(0.8), quiet(4.0), tone(0.5), quiet(1.0), tone(0.6), quiet(1.0)])
    script = Scripted([INCOMPLETE, INCOMPLETE, BACKCHANNEL, COMPLETE])
    events = run(TurnDetector(script), x)
    kinds = [e["event"] for e in events if e["event"] not in ("speech_start", "speech_end")]
    assert kinds == ["decision", "decision", "timeout", "backchannel", "decision"]
    first, second, timeout, bc, last = [e for e in events if e["event"] not in ("speech_start", "speech_end")]
    assert second["audio_start_s"] == first["audio_start_s"]  # <INCOMPLETE>: the next speech joined the turn
    assert timeout["time_s"] == pytest.approx(second["end_of_speech_s"] + 3.0)  # timeout_ms of silence ended it
    assert bc["audio_start_s"] >= timeout["time_s"]  # a new turn
    assert last["audio_start_s"] >= bc["decided_at_s"]  # the backchannel's audio is not part of the next turn
    assert [len(h) / SR for h in script.heard] == pytest.approx(
        [0.02 + 1.0 + 0.25, 0.02 + 1.0 + 1.0 + 0.8 + 0.25, 0.02 + 0.5 + 0.25, 0.02 + 0.6 + 0.25], abs=0.011)


@pytest.mark.parametrize("own_vad", [True, False])
@pytest.mark.parametrize("ending", [COMPLETE, BACKCHANNEL, "timeout"])
def test_speech_starting_just_before_a_decision_keeps_its_onset(ending, own_vad):
    """Speech that starts less than start_ms before a decision (or a timeout) ends the old turn has
    its first frames counted already; the new turn starts at its first voiced frame, not start_ms
    later, and the model hears it from there. Synthetic voice: 200 Hz tone bursts starting on frame
    edges, so the onset is known to the sample; the VAD is the built-in one or exact flags."""
    cfg = TurnConfig()
    tone = lambda n: (0.3 * np.sin(2 * np.pi * 200 * np.arange(n) / SR)).astype(np.float32)  # noqa: E731
    ms = lambda v: round(v * SR / 1000)  # noqa: E731
    first_end = ms(1500)  # the first burst: 0.5 s to 1.5 s
    ends_at = first_end + ms(cfg.timeout_ms if ending == "timeout" else cfg.stop_ms)  # the old turn ends here
    tags = [INCOMPLETE, COMPLETE] if ending == "timeout" else [ending, COMPLETE]
    for lead in range(ms(cfg.frame_ms), ms(cfg.start_ms), ms(cfg.frame_ms)):  # 10 .. 50 ms before it
        onset = ends_at - lead
        x = np.zeros(onset + ms(800) + ms(1000), np.float32)
        x[ms(500):first_end] = tone(first_end - ms(500))
        x[onset:onset + ms(800)] = tone(ms(800))
        speech = np.zeros(len(x), bool)  # exact flags
        speech[ms(500):first_end] = speech[onset:onset + ms(800)] = True
        script = Scripted(tags)
        events = run(TurnDetector(script), x, 160, flags=None if own_vad else speech)
        kinds = [e["event"] for e in events if e["event"] not in ("speech_start", "speech_end")]
        assert kinds == {"timeout": ["decision", "timeout", "decision"], BACKCHANNEL: ["backchannel", "decision"],
                         COMPLETE: ["decision", "decision"]}[ending]
        old_end = next(e for e in events if e["event"] in ("timeout", "backchannel") or e.get("tag") == COMPLETE)
        assert old_end.get("decided_at_s", old_end.get("time_s")) == pytest.approx(ends_at / SR)
        onsets = [e["time_s"] for e in events if e["event"] == "speech_start"]
        assert onsets == pytest.approx([0.5, onset / SR], abs=1e-9), f"lead {lead / SR * 1000:.0f} ms"
        last = decisions(events)[-1]
        # the new turn's audio: from its onset (pre_speech_ms would reach into the ended turn) to early_ms after it
        assert last["audio_start_s"] == pytest.approx(onset / SR, abs=1e-9)
        assert torch.equal(script.heard[-1], torch.from_numpy(x[onset:onset + ms(800) + ms(cfg.early_ms)]))


def test_chunk_size_and_sample_format_do_not_change_the_events(model, clips):
    x, _ = join(clips, 0.3, "incomplete_1", 0.25, "complete_2", 0.8, "backchannel_2", 0.8)
    want = stable(run(TurnDetector(model), x, 160))  # 10 ms
    assert len(decisions(want)) == 2
    rng = np.random.default_rng(0)
    assert stable(run(TurnDetector(model), x, 512)) == want  # 32 ms
    assert stable(run(TurnDetector(model), x, list(rng.integers(1, 3000, 50)))) == want  # 1 sample to 190 ms
    # int16 samples and the same values as floats (and as a torch tensor) give the same events, and
    # the model hears the same audio (a scripted model: only what it hears matters here).
    pcm = np.round(x * 32767).astype(np.int16)
    runs = []
    for y in (pcm, pcm.astype(np.float32) / 32768, torch.from_numpy(pcm.astype(np.float64) / 32768)):
        script = Scripted([COMPLETE])
        runs.append((stable(run(TurnDetector(script), y, 320)), script.heard))
    (events, heard), others = runs[0], runs[1:]
    assert len(heard) == 3 and all(e == events and all(map(torch.equal, h, heard)) for e, h in others)
    assert [e["event"] for e in events if "tag" not in e] == [e["event"] for e in want if "tag" not in e]


def test_external_vad_flags(model, clips):
    x, starts = join(clips, 0.5, "complete_2", 1.0, "incomplete_1", 1.0)
    speech = np.zeros(len(x), bool)
    for s, name in zip(starts, ["complete_2", "incomplete_1"]):
        speech[round(s * SR): round(s * SR) + len(clips[name])] = True
    counted = Counting(model)
    events = run(TurnDetector(counted), x, 320, flags=speech)  # each 20 ms chunk flagged as its first sample
    onsets = [e["time_s"] for e in events if e["event"] == "speech_start"]
    assert onsets == pytest.approx([math.ceil(s * SR / 320) * 320 / SR for s in starts])  # the first flagged chunk
    made = decisions(events)
    assert len(made) == 2 and [e["tag"] for e in made] == [reference(model, h)["tag"] for h in counted.heard]
    # The flags overrule the built-in VAD: loud noise flagged as silence is silence, and the reverse.
    noise = (0.3 * np.random.default_rng(1).standard_normal(3 * SR)).astype(np.float32)
    assert TurnDetector(model).push(noise, is_speech=False) == []
    events = TurnDetector(model).push(np.concatenate([np.zeros(SR, np.float32), np.zeros(SR, np.float32)]), is_speech=True)
    assert [e["event"] for e in events] == ["speech_start"] and events[0]["time_s"] == 0


# -----------------------------------------------------------------------------
# bad streams


def test_silence_only(model):
    counted = Counting(model)
    det = TurnDetector(counted)
    rng = np.random.default_rng(0)
    for _ in range(1500):  # 30 s: digital silence, then faint noise (-70 dBFS)
        assert det.push(np.zeros(160, np.float32)) == []
        assert det.push((3e-4 * rng.standard_normal(160)).astype(np.float32)) == []
    assert counted.heard == [] and det.time_s == pytest.approx(30.0)


def speechlike(rng, seconds):
    """Noise with a syllable rhythm (4 Hz, 25 dB deep): voiced for the VAD, never a 250 ms gap."""
    period = np.arange(SR // 4) / SR  # one syllable, 250 ms
    env = np.tile(0.02 + 0.3 * np.sin(np.pi * 4 * period) ** 2, round(seconds * 4)).astype(np.float32)
    return env * rng.standard_normal(len(env), dtype=np.float32)


def test_ten_minute_monologue_keeps_bounded_memory(model):
    counted = Counting(model)
    det = TurnDetector(counted)
    limit = round(TurnConfig().max_seconds * SR)
    ring = det.ring.buf
    rng = np.random.default_rng(0)
    starts = ends = 0
    for _ in range(3):
        chunks = [speechlike(rng, 199.0), np.zeros(SR, np.float32)]  # 199 s of talk, then a 1 s pause
        for x in chunks:
            for i in range(0, len(x), 16000):
                events = det.push(x[i:i + 16000])
                starts += sum(e["event"] == "speech_start" for e in events)
                ends += sum(e["event"] == "speech_end" for e in events)
                assert det.buffered_samples <= limit and len(det._pending) < det.frame
    assert det.ring.buf is ring and det.time_s == pytest.approx(600.0)
    assert starts == ends == 3  # one stretch of speech per 200 s, no pause inside it
    assert len(counted.heard) == 3  # one predict per pause, none while talking
    assert all(len(h) == limit for h in counted.heard)  # each heard the last max_seconds of the talk


def test_steady_background_noise_becomes_the_floor(clips):
    x, starts = join(clips, 1.0, "complete_2", 1.0, "backchannel_2", 1.0, "incomplete_2", 3.0)
    noise = (0.02 * np.random.default_rng(0).standard_normal(len(x))).astype(np.float32)  # about -37 dB in band
    kinds = lambda evs: [e["event"] for e in evs]  # noqa: E731
    clean = run(TurnDetector(Scripted([COMPLETE])), x)
    noisy = run(TurnDetector(Scripted([COMPLETE])), x + noise)
    assert kinds(noisy) == kinds(clean) == ["speech_start", "speech_end", "decision"] * 3
    onsets = [e["time_s"] for e in noisy if e["event"] == "speech_start"]
    assert all(0 <= t - s < 0.25 for t, s in zip(onsets, starts))  # soft onsets drown, speech does not
    # A VAD on level alone (no margin over the floor) takes that noise, louder than threshold_db, for speech.
    fixed = run(TurnDetector(Scripted([COMPLETE]), TurnConfig(snr_db=0)), x + noise)
    assert fixed[0]["event"] == "speech_start" and fixed[0]["time_s"] < starts[0] - 0.5 and len(decisions(fixed)) < 3


def test_clipping(model, clips):
    x, _ = join(clips, 0.3, "complete_2", 1.0, "backchannel_1", 1.0)
    loud = 8 * x  # far beyond [-1, 1]
    counted = Counting(model)
    events = run(TurnDetector(counted), loud)
    made = decisions(events)
    assert len(made) == 2 and len(counted.heard) == 2
    for e, heard in zip(made, counted.heard):  # the model heard the stream clipped, as an ADC would
        clipped = np.clip(loud[round(e["audio_start_s"] * SR): round(e["computed_at_s"] * SR)], -1, 1)
        assert torch.equal(heard, torch.from_numpy(clipped)) and e["tag"] == reference(model, clipped)["tag"]
    # Saturated int16, the same stream from a 16-bit ADC: the same turns, the same audio to within a step.
    script = Scripted([e["tag"] for e in made])
    again = run(TurnDetector(script), np.clip(np.round(loud * 32767), -32768, 32767).astype(np.int16))
    assert [(e["event"], e.get("time_s"), e.get("audio_start_s")) for e in again] == \
        [(e["event"], e.get("time_s"), e.get("audio_start_s")) for e in events]
    assert all(float((h - c).abs().max()) < 1e-4 for h, c in zip(script.heard, counted.heard))


def test_dc_offset_is_invisible_to_the_vad(model, clips):
    x, _ = join(clips, 0.3, "complete_2", 1.0, "incomplete_2", 1.0)
    clean = stable(run(TurnDetector(model), 0.5 * x))
    shifted = stable(run(TurnDetector(model), 0.5 * x + 0.4))
    timing = lambda evs: [(e["event"], e.get("time_s"), e.get("decided_at_s"), e.get("audio_start_s")) for e in evs]  # noqa: E731
    assert timing(shifted) == timing(clean) and len(decisions(clean)) == 2
    # The model hears the offset; for the demo model it does not change the tags.
    assert [e["tag"] for e in decisions(shifted)] == [e["tag"] for e in decisions(clean)]


def test_other_sample_rates_are_resampled_per_turn(model, clips):
    x, starts = join(clips, 0.4, "complete_2", 1.0, "backchannel_2", 1.0)
    x8 = resample(torch.from_numpy(x), SR, 8000).numpy()
    counted = Counting(model)
    det = TurnDetector(counted, sample_rate=8000)
    events = run(det, x8, 160)  # 20 ms at 8 kHz
    onsets = [e["time_s"] for e in events if e["event"] == "speech_start"]
    assert len(onsets) == 2 and all(-0.01 < t - s <= 0.03 for t, s in zip(onsets, starts))
    assert det.time_s == pytest.approx(len(x8) / 8000)
    for e, heard in zip(decisions(events), counted.heard):
        turn = x8[round(e["audio_start_s"] * 8000): round(e["computed_at_s"] * 8000)]
        up = resample(torch.from_numpy(turn), 8000, SR)  # the whole turn, resampled at once
        assert torch.equal(heard, up) and e["tag"] == reference(model, up.numpy())["tag"]
    with pytest.raises(ValueError, match="sample_rate"):
        TurnDetector(model, sample_rate=4000)


def snapshot(det):
    return (det.time_s, det.ring.end, det.ring.buf.copy(), det._pending.copy(), det.noise_db, det.run, det.speaking,
            det.in_turn, det.turn_start, det.last_voiced, det.early, det.decided)


def same(a, b):
    return all(np.array_equal(u, v) if isinstance(u, np.ndarray) else u == v for u, v in zip(a, b))


def test_bad_frames_raise_and_leave_the_detector_as_it_was(model, clips):
    x, _ = join(clips, 0.3, "complete_2", 1.0)
    half = 16000 + 77  # mid-speech, mid-frame
    det = TurnDetector(model)
    events = det.push(x[:half])
    before = snapshot(det)
    bad = x[half:half + 1000].copy()
    bad[500] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite.*sample 500"):
        det.push(bad)
    bad[500] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        det.push(bad)
    with pytest.raises(ValueError, match="1-D"):
        det.push(x[half:half + 320].reshape(2, 160))
    with pytest.raises(ValueError, match="int16"):
        det.push(np.zeros(320, np.int32))
    assert same(snapshot(det), before)
    # ... and the stream goes on as if the bad pushes never happened.
    events += det.push(x[half:])
    assert stable(events) == stable(TurnDetector(model).push(x))


def test_vad_level_scale_and_dc():
    t = np.arange(8 * 160) / SR
    sine = np.sin(2 * np.pi * 1000 * t).reshape(8, 160)  # 10 periods a frame
    assert frame_levels(sine, SR, 100, 4000) == pytest.approx(np.full(8, -3.0), abs=0.1)  # mean square 1/2
    assert frame_levels(0.01 * sine + 0.7, SR, 100, 4000) == pytest.approx(np.full(8, -43.0), abs=0.1)  # DC unseen
    assert (frame_levels(np.full((8, 160), 0.7), SR, 100, 4000) < -100).all()


def test_config_refuses_unknown_keys_and_bad_orders():
    assert TurnConfig.from_dict({"stop_ms": "800", "threshold_db": "-40"}) == TurnConfig(stop_ms=800, threshold_db=-40.0)
    with pytest.raises(ValueError, match="unknown turn config keys.*stop_sec"):
        TurnConfig.from_dict({"stop_sec": 1})
    with pytest.raises(ValueError, match="bad value"):
        TurnConfig.from_dict({"stop_ms": "soon"})
    with pytest.raises(ValueError, match="early_ms <= stop_ms"):
        TurnConfig(early_ms=600, stop_ms=500)
    with pytest.raises(TypeError):
        TurnConfig(stop_secs=3)


# -----------------------------------------------------------------------------
# threads and the command line


def test_two_streams_in_two_threads_share_one_model(model, clips):
    a, _ = join(clips, 0.3, "complete_2", 0.8, "backchannel_1", 0.8)
    b, _ = join(clips, 0.2, "incomplete_2", 0.8, "backchannel_2", 0.8)
    want = [stable(run(TurnDetector(model), s)) for s in (a, b)]
    got = [None, None]

    def work(i, s):
        got[i] = stable(run(TurnDetector(model), s))

    threads = [threading.Thread(target=work, args=(i, s)) for i, s in enumerate((a, b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert got == want and all(len(decisions(w)) >= 2 for w in want)


def test_infer_stream(model, clips, tmp_path, capsys):
    x, _ = join(clips, 0.3, "complete_2", 1.0, "incomplete_1", 0.3, "complete_1", 0.2)
    path = tmp_path / "call.wav"
    sf.write(path, x, SR, subtype="FLOAT")
    ckpt = ["--checkpoint", str(STREAM_MODEL)]
    assert infer.main(["--stream", str(path), *ckpt, "--json", "--dtype", "bfloat16", "--turn", "stop_ms=600"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # The library on the same audio, with the silence play() adds after the recording.
    want = stable(play(TurnDetector(model, TurnConfig(stop_ms=600)), x))
    assert stable(rows) == want and len(decisions(want)) == 2
    keys = {"event", "end_of_speech_s", "decided_at_s", "tag", "probs", "transcript"}
    assert all(keys <= set(r) for r in decisions(rows))
    assert decisions(rows)[-1]["decided_at_s"] > len(x) / SR  # the last turn is decided in the added silence
    assert infer.main(["--stream", str(path), *ckpt, "--dtype", "bfloat16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(rows) and "decision" in lines[2] and lines[0].split()[1:] == ["s", "speech_start"]
    assert infer.main(["--stream", str(path), str(path)]) == 2
    assert "give it alone" in capsys.readouterr().err
