"""speechllm as a Pipecat turn analyzer: `speechllm.TurnDetector` behind Pipecat's BaseTurnAnalyzer,
the interface its Smart Turn analyzers implement. Needs `pip install -e '.[pipecat]'` (pipecat-ai).

    from pipecat.turns.user_stop import TurnAnalyzerUserTurnStopStrategy
    from speechllm import SpeechLLM
    from speechllm.integrations.pipecat import SpeechLLMTurnAnalyzer

    analyzer = SpeechLLMTurnAnalyzer(SpeechLLM.from_pretrained("checkpoints/demo"))
    stop = [TurnAnalyzerUserTurnStopStrategy(turn_analyzer=analyzer, wait_for_transcript=False)]

How Pipecat drives an analyzer (pipecat-ai 1.14, TurnAnalyzerUserTurnStopStrategy): setup calls
set_sample_rate with the pipeline's input rate; every input audio frame (int16 bytes, usually 20 ms)
goes to append_audio(audio, is_speech), where is_speech is the pipeline VAD's state (Silero by
default: on start_secs after speech starts, off stop_secs after it ends); a COMPLETE from
append_audio ends the user's turn at once (then analyze_end_of_turn is asked for its metrics);
when the VAD reports a stop, analyze_end_of_turn is asked for the state; clear() runs whenever a
user turn ends, whoever ended it.

Like Krisp's analyzer (and unlike Smart Turn, which runs its model when the VAD stops and counts
silence up to stop_secs for its timeout), this one decides inside append_audio: the detector hears
every frame and its own turn logic (turn.py: the pause at early_ms, the decision at stop_ms, the
timeout of an <INCOMPLETE> turn) makes the decisions, so they are exactly TurnDetector's on the
same audio. Mapped onto Pipecat's two states:
    decision <COMPLETE>, timeout  -> COMPLETE (the turn is over)
    decision <INCOMPLETE>         -> INCOMPLETE (the user may go on; timeout_ms ends it)
    backchannel                   -> INCOMPLETE: never the end of a turn; it reaches `on_event`,
                                     where an agent can, say, keep talking instead of stopping

The VAD: by default the detector's own (is_speech is ignored), tuned to its stop_ms; vad_flags=True
follows Pipecat's VAD instead. Its flag turns on start_secs late, so the pre-roll the model hears
grows by the start_secs Pipecat reports (update_vad_start_secs, as Smart Turn's pre_speech_ms does);
its flag also stays on for stop_secs after the speech, which adds to early_ms and stop_ms.

Threads: with background=True (the default) the detector, and so SpeechLLM.predict, runs on one
worker thread of this analyzer, in the order the audio came, so the pipeline's event loop never
waits for the model; a decision then reaches Pipecat at the first append_audio after it is ready,
which adds at most one frame to its latency. background=False runs it inline: deterministic (the
COMPLETE comes back from the very append_audio whose audio completed it), but the event loop
blocks for each predict (20-50 ms on the demo model, seconds for a full-size one on a CPU).
"""
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
from pipecat.audio.turn.base_turn_analyzer import BaseTurnAnalyzer, BaseTurnParams, EndOfTurnState
from pipecat.metrics.metrics import MetricsData, TurnMetricsData
from pydantic import ConfigDict, Field

from ..turn import COMPLETE, TurnConfig, TurnDetector


class SpeechLLMTurnParams(BaseTurnParams):
    """What Pipecat shows of this analyzer (SpeechControlParamsFrame.turn_params): the detector's
    TurnConfig, and where its VAD comes from."""

    model_config = ConfigDict(frozen=True)
    turn: TurnConfig = Field(default_factory=TurnConfig)
    vad_flags: bool = False  # True: Pipecat's VAD (append_audio's is_speech); False: the built-in one


class SpeechLLMTurnAnalyzer(BaseTurnAnalyzer):
    """One audio stream's end-of-turn analyzer for Pipecat; see the module docstring. Many analyzers
    (one per call) may share one model."""

    def __init__(self, model, config: TurnConfig | None = None, *, vad_flags: bool = False, background: bool = True,
                 sample_rate: int | None = None, on_event: Callable[[dict], None] | None = None):
        """model: a SpeechLLM (speechllm.load / SpeechLLM.from_pretrained). on_event: called with every
        TurnDetector event (speech_start, speech_end, decision, backchannel, timeout), in order, on
        the thread that calls append_audio."""
        super().__init__(sample_rate=sample_rate)
        self.model, self.on_event, self.background = model, on_event, background
        self._params = SpeechLLMTurnParams(turn=config or TurnConfig(), vad_flags=vad_flags)
        self.detector: TurnDetector | None = None  # made by set_sample_rate, once the input rate is known
        self._vad_start_secs = 0.0
        self._executor: ThreadPoolExecutor | None = None
        self._queued = deque()  # futures of the worker's pushes, oldest first
        self._state, self._metrics = EndOfTurnState.INCOMPLETE, None
        if sample_rate:
            self.set_sample_rate(sample_rate)

    # -- BaseTurnAnalyzer ------------------------------------------------------------------------

    @property
    def speech_triggered(self) -> bool:
        """True while a turn is open: from its first speech to its decision (or timeout)."""
        return self.detector is not None and self.detector.in_turn

    @property
    def params(self) -> SpeechLLMTurnParams:
        return self._params

    def set_sample_rate(self, sample_rate: int):
        """Pipecat calls this at setup with the pipeline's input rate (a rate given to __init__ wins,
        as in every Pipecat analyzer). A new rate starts a new detector; the same rate keeps it."""
        super().set_sample_rate(sample_rate)
        if self.detector is None or self.detector.sample_rate != self._sample_rate:
            self.wait()
            self.detector = TurnDetector(self.model, self._params.turn, sample_rate=self._sample_rate)
            self._set_pre_roll()

    def append_audio(self, buffer: bytes, is_speech: bool) -> EndOfTurnState:
        """buffer: int16 mono samples at sample_rate, any length. COMPLETE when a decision of
        <COMPLETE> or a timeout came out (of this audio, or in background mode of earlier audio
        whose predict has just finished)."""
        if self.detector is None:
            raise RuntimeError("SpeechLLMTurnAnalyzer: append_audio before set_sample_rate (Pipecat calls it at setup)")
        pcm = np.frombuffer(buffer, dtype=np.int16)
        flag = bool(is_speech) if self._params.vad_flags else None
        if self.background:
            self._queued.append(self._worker.submit(self.detector.push, pcm, flag))
            return self._collect(block=False)
        return self._take(self.detector.push(pcm, flag))

    async def analyze_end_of_turn(self) -> tuple[EndOfTurnState, MetricsData | None]:
        """The state the last append_audio returned, and the last decision's metrics (once: Pipecat
        pushes them as a MetricsFrame). The decisions themselves are made in append_audio."""
        metrics, self._metrics = self._metrics, None
        return self._state, metrics

    def update_vad_start_secs(self, vad_start_secs: float):
        """Pipecat's VAD turns its flag on vad_start_secs after speech starts; with vad_flags the
        turn's audio starts that much earlier (plus pre_speech_ms), so its first word is heard."""
        self._vad_start_secs = vad_start_secs
        if self.detector is not None:
            self._run(self._set_pre_roll)

    def clear(self):
        """Forget the open turn, if any (Pipecat calls this whenever a user turn ends; after this
        analyzer's own COMPLETE there is nothing left to forget, so speech that has just started
        is kept)."""
        if self.detector is not None:
            self._run(self._forget_turn)
        self._state = EndOfTurnState.INCOMPLETE

    async def cleanup(self):
        """Stop the worker thread; the analyzer stays usable (Pipecat cleans a strategy up and
        applies it again when the strategies change), a later append_audio starts a new one."""
        self.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # -- the rest --------------------------------------------------------------------------------

    def wait(self) -> EndOfTurnState:
        """Block until the worker has pushed all audio given so far; its decisions are taken as
        append_audio would take them. COMPLETE if one of them ended a turn."""
        return self._collect(block=True)

    @property
    def _worker(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="speechllm-turn")
        return self._executor

    def _run(self, fn) -> None:
        """fn() on the detector's thread, after the audio already queued."""
        if self.background:
            self._queued.append(self._worker.submit(lambda: fn() or []))
        else:
            fn()

    def _set_pre_roll(self) -> None:
        det, cfg = self.detector, self._params.turn
        extra = self._vad_start_secs if self._params.vad_flags else 0.0
        # only read when a turn opens, so changing it between pushes is safe
        det.n_pre = round((cfg.pre_speech_ms / 1000 + extra) * det.sample_rate)

    def _forget_turn(self) -> None:
        if self.detector.in_turn:
            self.detector.reset()

    def _collect(self, block: bool) -> EndOfTurnState:
        """Take the events of finished pushes, oldest first (a failed push raises its error here)."""
        state = EndOfTurnState.INCOMPLETE
        while self._queued and (block or self._queued[0].done()):
            if self._take(self._queued.popleft().result()) == EndOfTurnState.COMPLETE:
                state = EndOfTurnState.COMPLETE
        self._state = state
        return state

    def _take(self, events: list[dict]) -> EndOfTurnState:
        state = EndOfTurnState.INCOMPLETE
        for ev in events:
            if ev["event"] == "decision":
                self._metrics = TurnMetricsData(
                    processor=type(self).__name__, is_complete=ev["tag"] == COMPLETE, probability=ev["probs"][COMPLETE],
                    e2e_processing_time_ms=round(ev["latency_s"] * 1000, 1))  # end of speech to decision
                if ev["tag"] == COMPLETE:
                    state = EndOfTurnState.COMPLETE
            elif ev["event"] == "timeout":
                state = EndOfTurnState.COMPLETE
            if self.on_event is not None:
                self.on_event(ev)
        self._state = state
        return state
