"""speechllm.integrations.pipecat driven by Pipecat itself: its UserTurnController with the VAD
start strategy and TurnAnalyzerUserTurnStopStrategy, fed 20 ms int16 frames of example clips (from
the demo's synthetic test split) joined by pauses, with Pipecat's Silero VAD reporting speech as in
a pipeline. The reference for every decision is a plain TurnDetector on the same audio.
Needs `pip install -e '.[pipecat]'` (skipped without it). Run: python -m pytest -q tests/test_pipecat.py"""
import asyncio
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

pytest.importorskip("pipecat")

from pipecat.audio.turn.base_turn_analyzer import BaseTurnAnalyzer, EndOfTurnState  # noqa: E402
from pipecat.audio.vad.silero import SileroVADAnalyzer  # noqa: E402
from pipecat.audio.vad.vad_analyzer import VADState  # noqa: E402
from pipecat.clocks.system_clock import SystemClock  # noqa: E402
from pipecat.frames.frames import (InputAudioRawFrame, MetricsFrame, StartFrame, VADUserStartedSpeakingFrame,  # noqa: E402
                                   VADUserStoppedSpeakingFrame)
from pipecat.processors.frame_processor import FrameProcessorSetup  # noqa: E402
from pipecat.turns.user_start import VADUserTurnStartStrategy  # noqa: E402
from pipecat.turns.user_stop import TurnAnalyzerUserTurnStopStrategy  # noqa: E402
from pipecat.turns.user_turn_controller import UserTurnController  # noqa: E402
from pipecat.turns.user_turn_strategies import UserTurnStrategies  # noqa: E402
from pipecat.utils.asyncio.task_manager import TaskManager  # noqa: E402

from conftest import STREAM_CLIPS, STREAM_MODEL  # noqa: E402
from speechllm.integrations.pipecat import SpeechLLMTurnAnalyzer, SpeechLLMTurnParams  # noqa: E402
from speechllm.model import SpeechLLM  # noqa: E402
from speechllm.turn import BACKCHANNEL, COMPLETE, INCOMPLETE, TurnConfig, TurnDetector  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SR, FRAME = 16000, 320  # Pipecat's input frames: 20 ms
WALL = ("compute_s", "latency_s")  # wall-clock fields; everything else is on the stream's clock
# 18 s: a sentence; a fragment, a pause shorter than stop_ms and a sentence (one turn); a
# backchannel; a fragment left hanging until the <INCOMPLETE> timeout
PARTS = [0.4, "complete_2", 1.0, "incomplete_1", 0.3, "complete_1", 1.0, "backchannel_1", 1.0, "incomplete_2", 3.5]


@pytest.fixture(autouse=True)
def _one_thread():
    """The demo model is small: one thread runs it as fast as two, and on a shared machine much
    faster (two threads of a 2-core machine wait on each other when other work runs)."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def model():
    return SpeechLLM.from_pretrained(STREAM_MODEL)


@pytest.fixture(scope="module")
def pcm():
    clips = {p.stem: sf.read(p, dtype="float32")[0] for p in sorted(STREAM_CLIPS.glob("*.wav"))}
    x = np.concatenate([np.zeros(round(p * SR), np.float32) if isinstance(p, float) else clips[p] for p in PARTS])
    return np.round(x * 32767).astype(np.int16)


def stable(events):
    return [{k: v for k, v in e.items() if k not in WALL} for e in events]


def same_events(got, want):
    """Equal on the stream's clock; probabilities to float noise (the worker thread's predict)."""
    assert [{k: v for k, v in e.items() if k != "probs"} for e in stable(got)] == \
        [{k: v for k, v in e.items() if k != "probs"} for e in stable(want)]
    for g, w in zip(got, want):
        if "probs" in w:
            assert g["probs"] == pytest.approx(w["probs"], abs=1e-6)


def reference(model, pcm, config=None, flags=None):
    """TurnDetector alone on the same frames (with the same speech flags, if any): its events, and
    the end (in samples) of each frame whose push ended a turn (a <COMPLETE> decision or a timeout)."""
    det, events, ends = TurnDetector(model, config), [], []
    for k in range(0, len(pcm), FRAME):
        new = det.push(pcm[k:k + FRAME], None if flags is None else flags[k // FRAME])
        events += new
        if any(e["event"] == "timeout" or e.get("tag") == COMPLETE and e["event"] == "decision" for e in new):
            ends.append(k + FRAME)
    return events, ends


async def drive(analyzer, pcm):
    """The stream through Pipecat's user-turn machinery, as LLMUserAggregator runs it: per 20 ms
    frame, Silero's VAD (its speech start/stop as VAD frames), then the audio frame. Returns the end
    (in samples) of each frame at which Pipecat ended the user's turn, the VAD flag each frame was
    appended with, and the frames the strategy pushed and broadcast."""
    vad = SileroVADAnalyzer()
    stop = TurnAnalyzerUserTurnStopStrategy(turn_analyzer=analyzer, wait_for_transcript=False)
    controller = UserTurnController(user_turn_strategies=UserTurnStrategies(start=[VADUserTurnStartStrategy()], stop=[stop]))
    stops, flags, pushed, broadcast, now = [], [], [], [], [0]

    @controller.event_handler("on_user_turn_stopped")
    async def on_stopped(controller, strategy, params):
        stops.append(now[0])  # the controller has called the strategy's handle_user_turn_stopped: clear()

    @controller.event_handler("on_push_frame")
    async def on_push(controller, frame, direction):
        pushed.append(frame)

    @controller.event_handler("on_broadcast_frame")
    async def on_broadcast(controller, frame_cls, **kwargs):
        broadcast.append((frame_cls, kwargs))

    setup = FrameProcessorSetup(clock=SystemClock(), task_manager=TaskManager(loop=asyncio.get_running_loop()),
                                pipeline_worker=None, audio_in_sample_rate=SR)
    vad.set_sample_rate(SR)
    await controller.setup(setup)
    await controller.process_frame(StartFrame(audio_in_sample_rate=SR))
    state, speaking = VADState.QUIET, False
    for k in range(0, len(pcm), FRAME):
        now[0] = k + FRAME
        audio = pcm[k:k + FRAME].tobytes()
        new = await vad.analyze_audio(audio)
        if new != state and new in (VADState.SPEAKING, VADState.QUIET):
            state, speaking = new, new == VADState.SPEAKING
            await controller.process_frame(VADUserStartedSpeakingFrame(start_secs=vad.params.start_secs) if speaking
                                           else VADUserStoppedSpeakingFrame(stop_secs=vad.params.stop_secs))
        flags.append(speaking)
        await controller.process_frame(InputAudioRawFrame(audio=audio, sample_rate=SR, num_channels=1))
    await controller.cleanup()
    return stops, flags, pushed, broadcast


def test_decisions_equal_turn_detector_in_a_pipecat_turn_controller(model, pcm):
    events = []
    analyzer = SpeechLLMTurnAnalyzer(model, background=False, on_event=events.append)
    assert isinstance(analyzer, BaseTurnAnalyzer)
    stops, _, pushed, broadcast = asyncio.run(drive(analyzer, pcm))
    want, ends = reference(model, pcm)
    same_events(events, want)
    tags = [e["tag"] for e in want if "tag" in e]
    assert tags == [COMPLETE, COMPLETE, BACKCHANNEL, INCOMPLETE]  # the demo model on these clips
    assert want[-1]["event"] == "timeout"
    # Pipecat ended the user's turn exactly where the detector did: two <COMPLETE>s and the timeout;
    # neither the backchannel nor the <INCOMPLETE> ended one.
    assert stops == ends and len(stops) == 3
    # Each decision reached Pipecat's metrics once, as a TurnMetricsData.
    metrics = [d for f in pushed if isinstance(f, MetricsFrame) for d in f.data]
    decided = [e for e in want if e["event"] == "decision"]
    assert [m.is_complete for m in metrics] == [e["tag"] == COMPLETE for e in decided]
    assert [m.probability for m in metrics] == pytest.approx([e["probs"][COMPLETE] for e in decided], abs=1e-6)
    # StartFrame made the strategy announce the analyzer's parameters.
    assert any(kw.get("turn_params") is analyzer.params for _, kw in broadcast)
    assert analyzer.params == SpeechLLMTurnParams(turn=TurnConfig(), vad_flags=False)


def test_pipecat_vad_flags(model, pcm):
    """vad_flags=True: the detector follows Pipecat's VAD state, with start_secs more pre-roll."""
    events = []
    analyzer = SpeechLLMTurnAnalyzer(model, vad_flags=True, background=False, on_event=events.append)
    stops, flags, _, _ = asyncio.run(drive(analyzer, pcm))
    start_secs = SileroVADAnalyzer().params.start_secs
    assert start_secs > 0 and sum(flags) > 0
    want, ends = reference(model, pcm, replace(TurnConfig(), pre_speech_ms=TurnConfig().pre_speech_ms + 1000 * start_secs), flags)
    same_events(events, want)
    assert stops == ends and len([e for e in want if e["event"] == "decision"]) >= 1
    # Speech starts where Silero's flag rose, also when a decision fell within start_ms after that.
    rises = [i * FRAME / SR for i in range(1, len(flags)) if flags[i] and not flags[i - 1]]
    onsets = [e["time_s"] for e in want if e["event"] == "speech_start"]
    assert onsets == pytest.approx(rises, abs=1e-9)


def test_background_worker_delivers_the_same_decisions(model, pcm):
    """background=True: predict on the analyzer's thread. The test waits for the worker after each
    frame (a stream slower than the model): every COMPLETE reaches Pipecat at its own frame."""
    events = []
    analyzer = SpeechLLMTurnAnalyzer(model, sample_rate=SR, on_event=events.append)
    want, ends = reference(model, pcm)
    got = []
    for k in range(0, len(pcm), FRAME):
        now = analyzer.append_audio(pcm[k:k + FRAME].tobytes(), False)
        if analyzer.wait() == EndOfTurnState.COMPLETE or now == EndOfTurnState.COMPLETE:
            got.append(k + FRAME)
    assert got == ends
    same_events(events, want)
    # Without waiting, the decisions still come out, in order, once the worker catches up.
    events.clear()
    analyzer = SpeechLLMTurnAnalyzer(model, sample_rate=SR, on_event=events.append)
    for k in range(0, len(pcm), FRAME):
        analyzer.append_audio(pcm[k:k + FRAME].tobytes(), False)
    analyzer.wait()
    same_events(events, want)
    asyncio.run(analyzer.cleanup())
    assert analyzer._executor is None


def test_clear_forgets_the_open_turn(model, pcm):
    """Pipecat calls clear() when a turn ends elsewhere (another strategy, its stop timeout): the
    speech so far is dropped, the next decision hears only what follows."""
    events = []
    analyzer = SpeechLLMTurnAnalyzer(model, background=False, sample_rate=SR, on_event=events.append)
    cut = round(1.5 * SR) // FRAME * FRAME  # inside complete_2
    for k in range(0, cut, FRAME):
        analyzer.append_audio(pcm[k:k + FRAME].tobytes(), False)
    assert analyzer.speech_triggered
    analyzer.clear()
    assert not analyzer.speech_triggered
    for k in range(cut, len(pcm), FRAME):
        analyzer.append_audio(pcm[k:k + FRAME].tobytes(), False)
    first = next(e for e in events if "tag" in e)
    assert first["audio_start_s"] >= cut / SR
    with pytest.raises(RuntimeError, match="set_sample_rate"):
        SpeechLLMTurnAnalyzer(model).append_audio(pcm[:FRAME].tobytes(), False)
