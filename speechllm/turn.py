"""Live turn-taking: a streaming end-of-turn detector on top of SpeechLLM.predict.

    detector = TurnDetector(SpeechLLM.from_pretrained("checkpoints/demo"))
    for frame in microphone:                 # mono, float in [-1, 1] or int16, any frame size
        for event in detector.push(frame):   # dicts; times in seconds on the stream's clock
            ...

The stream is cut into VAD frames of frame_ms (10 ms); every event falls on a frame edge, so the
size of the pieces the caller pushes never changes the events. Each frame is voiced or not, by the
built-in VAD below or by the caller's flag (`push(frame, is_speech=...)`, e.g. from Silero). The
turn logic on top of that:

    voiced for start_ms     -> speech_start (time: the first voiced frame); the turn opens (voiced
                               frames counted when a decision or timeout ends the old turn count
                               for the new one: its start is not moved past the decision)
    unvoiced for early_ms   -> speech_end (time: the end of the last voiced frame), and the turn so
                               far goes through model.predict ahead of time (early_ms is the VAD's
                               hangover: shorter gaps, between words, are not pauses)
    voiced for start_ms     -> speech_start again: the speaker went on, the early result is dropped
    unvoiced for stop_ms    -> the decision: the early result (computed already unless speech came
                               back in between), else computed now. By its tag:
        <COMPLETE>            a decision event; the turn is over, the next speech opens a new one
        <INCOMPLETE>          a decision event; the turn stays open: more speech joins it and the
                              next decision hears all of it; timeout_ms of silence ends it with a
                              timeout event (Pipecat's smart-turn analyzers force the end after
                              stop_secs the same way)
        <BACKCHANNEL>         a backchannel event, never the end of a turn: the agent keeps the
                              floor, the audio judged a backchannel is dropped (it does not prefix
                              the next turn), and the detector listens for a new turn

Events (times on the stream's clock: samples pushed / sample_rate):
    {"event": "speech_start", "time_s"}
    {"event": "speech_end", "time_s"}                    emitted early_ms after time_s
    {"event": "decision" | "backchannel", "end_of_speech_s", "decided_at_s", "tag", "probs",
     "transcript", "audio_start_s", "computed_at_s", "compute_s", "latency_s"}
        the model heard [audio_start_s, computed_at_s): the turn from pre_speech_ms before its first
        speech, its last max_seconds at most (Smart Turn's 8 s); compute_s is predict's wall time;
        latency_s = max(decided_at_s, computed_at_s + compute_s) - end_of_speech_s, the delay from
        end of speech that a real-time caller sees when push() runs inline
    {"event": "timeout", "end_of_speech_s", "time_s"}    an open <INCOMPLETE> turn ended by silence

Defined behaviour for bad streams:
- memory: a ring buffer holds the stream's last max_seconds; nothing else grows with the stream
  (a trailing piece shorter than a frame waits for the next push). A monologue with no pause
  costs no predict call; when it pauses, the model hears its last max_seconds.
- silence only: no events, no predict calls.
- NaN or infinite samples, a non-1-D array, an integer dtype other than int16: ValueError, and the
  detector is left as it was before the call.
- float samples beyond [-1, 1] are clipped there (what an ADC does); clipped audio is just loud.
- DC offset: the VAD removes each frame's mean and looks at 100-4000 Hz only, so it never sees
  DC; the model hears the audio as pushed (its pre-emphasis and per-feature normalisation all but
  ignore a constant).
- sample_rate other than 16 kHz (TurnDetector(model, sample_rate=8000)): the VAD and the clock run
  at the caller's rate and the ring holds that rate; a turn is resampled to 16 kHz as a whole
  (speechllm.audio.resample) right before predict, so pushes never meet filter edges.

Threads: push() holds a per-detector lock, so one stream may be fed from several threads (in
order). Many detectors may share one model: predict only reads it (under torch.inference_mode) and
keeps its KV cache per call.
"""
import math
import threading
import time
from dataclasses import dataclass, fields

import numpy as np
import torch

from .audio import SAMPLE_RATE, resample

COMPLETE, INCOMPLETE, BACKCHANNEL = "<COMPLETE>", "<INCOMPLETE>", "<BACKCHANNEL>"


@dataclass(frozen=True)
class TurnConfig:
    frame_ms: int = 10  # VAD frame; events fall on frame edges
    start_ms: int = 60  # voiced this long: speech (shorter bursts, clicks, are not)
    # unvoiced this long: a pause, and the turn is judged ahead of the decision. 250 ms: the demo
    # model's training clips end 0.2-0.8 s after the last word (synth.py), so a shorter tail is
    # audio it never heard
    early_ms: int = 250
    stop_ms: int = 500  # unvoiced this long: the decision comes out
    timeout_ms: int = 3000  # after <INCOMPLETE>, unvoiced this long ends the turn (Pipecat: stop_secs 3)
    # audio before the first voiced frame that the model hears too: enough for a soft first frame
    pre_speech_ms: int = 20
    max_seconds: float = 8.0  # the model hears at most the turn's last max_seconds (Smart Turn: 8 s)
    threshold_db: float = -45.0  # voiced: in-band level above this, dB re full scale (a full-scale sine: -3)
    snr_db: float = 10.0  # ... and this far above the noise floor
    noise_rise_db: float = 6.0  # dB per second the noise floor may rise; it falls to any quieter frame at once
    band_low_hz: float = 100.0  # the VAD's band, where voiced speech has its energy (the frame's
    band_high_hz: float = 4000.0  # mean, DC, is removed before)
    max_new_tokens: int = 64  # transcript length limit for predict

    def __post_init__(self):
        if self.frame_ms < 1 or self.start_ms < 0 or self.pre_speech_ms < 0:
            raise ValueError(f"turn config: need frame_ms >= 1, start_ms >= 0, pre_speech_ms >= 0 ({self})")
        if not 0 < self.early_ms <= self.stop_ms <= self.timeout_ms:
            raise ValueError(f"turn config: need 0 < early_ms <= stop_ms <= timeout_ms, got {self.early_ms}, "
                             f"{self.stop_ms}, {self.timeout_ms}")
        if self.max_seconds * 1000 < self.start_ms + self.early_ms:
            raise ValueError(f"turn config: max_seconds {self.max_seconds} cannot hold start_ms + early_ms")
        if not 0 <= self.band_low_hz < self.band_high_hz or self.noise_rise_db < 0 or self.max_new_tokens < 1:
            raise ValueError(f"turn config: need 0 <= band_low_hz < band_high_hz, noise_rise_db >= 0, "
                             f"max_new_tokens >= 1 ({self})")

    @classmethod
    def from_dict(cls, d: dict) -> "TurnConfig":
        """Keys are field names; values may be strings ("800", from a command line)."""
        types = {f.name: f.type for f in fields(cls)}
        unknown = set(d) - set(types)
        if unknown:
            raise ValueError(f"unknown turn config keys: {sorted(unknown)} (known: {sorted(types)})")
        try:
            values = {k: types[k](v) for k, v in d.items()}
        except (TypeError, ValueError) as e:
            raise ValueError(f"turn config: bad value in {d} ({e})") from e
        return cls(**values)


class Ring:
    """The last `size` samples of a stream, addressed by absolute sample index."""

    def __init__(self, size: int):
        self.buf = np.zeros(size, np.float32)
        self.size, self.end = size, 0  # end: samples ever written

    def write(self, x: np.ndarray) -> None:
        n, x = len(x), x[-self.size:]  # only the tail can survive
        i = (self.end + n - len(x)) % self.size
        k = min(len(x), self.size - i)
        self.buf[i:i + k] = x[:k]
        self.buf[:len(x) - k] = x[k:]
        self.end += n

    def read(self, start: int) -> np.ndarray:
        """Samples [start, end), or the last `size` of them."""
        start = max(start, self.end - self.size)
        i, n = start % self.size, self.end - start
        k = min(n, self.size - i)
        return np.concatenate([self.buf[i:i + k], self.buf[:n - k]])


def frame_levels(frames: np.ndarray, sample_rate: int, low_hz: float, high_hz: float) -> np.ndarray:
    """frames (n, F) -> in-band level (n,) in dB re full scale: the mean power of the frame's content
    between low_hz and high_hz after removing its mean (so DC never counts), from a Hann-windowed
    rFFT. Scaled by Parseval so that a full-scale sine in the band reads -3 dB."""
    F = frames.shape[1]
    w = np.hanning(F + 2)[1:-1]  # no zero end points: every sample counts
    spec = np.abs(np.fft.rfft((frames - frames.mean(1, keepdims=True)) * w, axis=1)) ** 2  # (n, F//2+1)
    freqs = np.fft.rfftfreq(F, 1 / sample_rate)
    band = (freqs >= low_hz) & (freqs <= high_hz)
    power = 2 * spec[:, band].sum(1) / (F * (w ** 2).sum())
    return 10 * np.log10(power + 1e-12)


class TurnDetector:
    """One audio stream in, turn-taking events out; see the module docstring."""

    def __init__(self, model, config: TurnConfig | None = None, sample_rate: int = SAMPLE_RATE):
        if not isinstance(sample_rate, int) or sample_rate < 8000:
            raise ValueError(f"TurnDetector: sample_rate must be an int >= 8000 Hz, got {sample_rate!r}")
        self.model, self.cfg, self.sample_rate = model, config or TurnConfig(), sample_rate
        self.device = next(model.parameters()).device
        c = self.cfg

        def ms(v):  # milliseconds -> samples
            return round(v * sample_rate / 1000)

        self.frame = max(1, ms(c.frame_ms))
        self.n_start, self.n_early, self.n_stop, self.n_timeout, self.n_pre = (
            ms(c.start_ms), ms(c.early_ms), ms(c.stop_ms), ms(c.timeout_ms), ms(c.pre_speech_ms))
        self.ring = Ring(round(c.max_seconds * sample_rate))
        self.noise_rise = c.noise_rise_db * self.frame / sample_rate  # dB per frame
        self._lock = threading.Lock()
        self._pending = np.zeros(0, np.float32)  # samples of the next, incomplete frame
        self._pending_flags = np.zeros(0, np.int8)  # their speech flags: 1, 0, or -1 (the VAD decides)
        self.noise_db = math.inf  # unknown: the first frame sets it
        self._reset()

    def reset(self) -> None:
        """Forget the current turn and any speech in progress; the clock and noise floor go on."""
        with self._lock:
            self._reset()

    def _reset(self, run: int = 0) -> None:
        """run: voiced frames in a row, ending at ring.end, that the next turn keeps. A decision or
        timeout can fall while speech is starting (voiced for less than start_ms): those frames are
        the next turn's first, so its speech_start and its audio begin at the first of them."""
        self.run = run  # voiced frames in a row
        self.speaking = False  # between speech_start and speech_end
        self.in_turn = False  # a turn is open (from its first speech to its decision)
        self.turn_start = self.last_voiced = 0  # absolute samples
        # where the last turn ended: the next one's audio starts after (its pre-roll stops here too)
        self.closed_at = self.ring.end - run * self.frame
        self.early = None  # predict's result at the current pause, if any
        self.decided = None  # the tag decided at the current pause, if any

    @property
    def time_s(self) -> float:
        """The stream's clock: samples pushed so far / sample_rate."""
        return (self.ring.end + len(self._pending)) / self.sample_rate

    @property
    def buffered_samples(self) -> int:
        """Samples of the current turn held for the model (at most max_seconds)."""
        return min(self.ring.end - self.turn_start, self.ring.size) if self.in_turn else 0

    # -- input -----------------------------------------------------------------------------------

    def push(self, pcm, is_speech: bool | None = None) -> list[dict]:
        """Feed mono samples (float in [-1, 1] or int16, any length); return the events they complete.
        is_speech: the caller's VAD for these samples (None: the built-in VAD decides)."""
        x = self._check(pcm)
        flag = -1 if is_speech is None else int(bool(is_speech))
        with self._lock:
            pending = np.concatenate([self._pending, x])
            flags = np.concatenate([self._pending_flags, np.full(len(x), flag, np.int8)])
            n = len(pending) // self.frame * self.frame
            self._pending, self._pending_flags = pending[n:], flags[n:]
            frames = pending[:n].reshape(-1, self.frame)  # (n_frames, F)
            flags = flags[:n].reshape(-1, self.frame)
            theirs = flags.min(1) >= 0  # frames the caller flagged throughout
            votes = flags.mean(1) >= 0.5  # ... as speech, by a majority of their samples
            high = min(self.cfg.band_high_hz, self.sample_rate / 2)
            events = []
            for i in range(0, len(frames), 1000):  # levels by blocks: however much is pushed, temporaries stay small
                levels = frame_levels(frames[i:i + 1000], self.sample_rate, self.cfg.band_low_hz, high)
                for frame, level, own, vote in zip(frames[i:i + 1000], levels, ~theirs[i:i + 1000], votes[i:i + 1000]):
                    voiced = self._vad(level) if own else bool(vote)
                    self.ring.write(frame)
                    self._step(voiced, events)
            return events

    def _check(self, pcm) -> np.ndarray:
        """-> float32 samples in [-1, 1]; raises ValueError before anything changes."""
        x = np.asarray(pcm.detach().cpu() if isinstance(pcm, torch.Tensor) else pcm)
        if x.ndim != 1:
            raise ValueError(f"TurnDetector.push: expected 1-D mono samples, got shape {x.shape}")
        if x.dtype == np.int16:
            return x.astype(np.float32) / 32768
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"TurnDetector.push: expected float samples in [-1, 1] or int16, got {x.dtype}")
        bad = np.flatnonzero(~np.isfinite(x))
        if len(bad):
            raise ValueError(f"TurnDetector.push: {len(bad)} NaN or infinite samples (first at sample {bad[0]} of "
                             f"this push, {self.time_s + bad[0] / self.sample_rate:.3f} s into the stream)")
        return np.clip(x, -1, 1).astype(np.float32, copy=False)

    def _vad(self, level: float) -> bool:
        """Built-in VAD: loud enough, and far enough above the noise floor. The floor follows the
        quietest recent frames: it starts at the first frame's level, drops to a quieter frame at once
        and rises by noise_rise_db a second otherwise, so steady background noise, even above
        threshold_db, is the floor within seconds while the dips between syllables keep it low."""
        voiced = level > self.cfg.threshold_db and level > self.noise_db + self.cfg.snr_db
        self.noise_db = min(level, self.noise_db + self.noise_rise)
        return voiced

    # -- turn logic ------------------------------------------------------------------------------

    def _step(self, voiced: bool, events: list) -> None:
        """Advance by one frame, which ends at self.ring.end."""
        end = self.ring.end
        self.run = self.run + 1 if voiced else 0
        if self.speaking:
            if voiced:
                self.last_voiced = end
            elif end - self.last_voiced >= self.n_early:  # a pause
                self.speaking = False
                events.append({"event": "speech_end", "time_s": self._s(self.last_voiced)})
                if self.n_early < self.n_stop:
                    self.early = self._judge(end)
        elif voiced and self.run * self.frame >= self.n_start:
            onset = end - self.run * self.frame
            if not self.in_turn:
                self.in_turn, self.turn_start = True, max(onset - self.n_pre, self.closed_at)
            self.speaking, self.last_voiced, self.early, self.decided = True, end, None, None
            events.append({"event": "speech_start", "time_s": self._s(onset)})
        if self.in_turn and not self.speaking:
            quiet = end - self.last_voiced
            if self.decided is None and quiet >= self.n_stop:
                self._decide(end, events)
            elif self.decided == INCOMPLETE and quiet >= self.n_timeout:
                events.append({"event": "timeout", "end_of_speech_s": self._s(self.last_voiced), "time_s": self._s(end)})
                self._reset(self.run)

    def _decide(self, end: int, events: list) -> None:
        r = self.early or self._judge(end)
        self.early, self.decided = None, r["tag"]
        eos = self._s(self.last_voiced)
        events.append({
            "event": "backchannel" if r["tag"] == BACKCHANNEL else "decision",
            "end_of_speech_s": eos, "decided_at_s": self._s(end), **r,
            "latency_s": round(max(self._s(end), r["computed_at_s"] + r["compute_s"]) - eos, 4),
        })
        if r["tag"] != INCOMPLETE:
            self._reset(self.run)

    def _judge(self, end: int) -> dict:
        """The model's verdict on the turn so far: its audio from turn_start (the last max_seconds)."""
        start = max(self.turn_start, end - self.ring.size)
        audio = torch.from_numpy(self.ring.read(start))
        if self.sample_rate != SAMPLE_RATE:
            audio = resample(audio, self.sample_rate, SAMPLE_RATE)
        t0 = time.perf_counter()
        with torch.inference_mode():
            r = self.model.predict(audio[None].to(self.device), torch.tensor([len(audio)], device=self.device),
                                   self.cfg.max_new_tokens)[0]
        return {"tag": r["tag"], "probs": r["probs"], "transcript": r["transcript"], "audio_start_s": self._s(start),
                "computed_at_s": self._s(end), "compute_s": round(time.perf_counter() - t0, 4)}

    def _s(self, samples: int) -> float:
        return samples / self.sample_rate


# -----------------------------------------------------------------------------
# playing a recording (infer.py --stream)


def play(detector: TurnDetector, audio: np.ndarray, chunk_ms: int = 20, realtime: bool = False):
    """Push a recording through `detector` in chunks of chunk_ms and yield its events; then stop_ms
    of silence, as from a speaker who went quiet, so that the last pause gets its decision.
    realtime: push each chunk when it would have been recorded (wall clock), else at once."""
    if chunk_ms < 1:
        raise ValueError(f"chunk_ms must be >= 1, got {chunk_ms}")
    sr = detector.sample_rate
    n = max(1, round(chunk_ms * sr / 1000))
    tail = np.zeros(detector.n_stop + detector.frame, np.float32)
    t0, done = time.monotonic(), 0
    for x in (audio, tail):
        for i in range(0, len(x), n):
            chunk = x[i:i + n]
            done += len(chunk)
            if realtime:  # the chunk's last sample has been "recorded"
                time.sleep(max(0.0, t0 + done / sr - time.monotonic()))
            yield from detector.push(chunk)


def format_event(ev: dict) -> str:
    """One line per event for people: the event's time first."""
    if ev["event"] in ("decision", "backchannel"):
        others = ", ".join(f"{t.strip('<>')} {p:.3f}" for t, p in ev["probs"].items() if t != ev["tag"])
        text = f"  {ev['transcript']!r}" if ev["transcript"] else ""
        return (f"{ev['decided_at_s']:8.3f} s  {ev['event']:<12} {ev['tag']} {ev['probs'][ev['tag']]:.3f} ({others})  "
                f"end of speech {ev['end_of_speech_s']:.3f} s, latency {ev['latency_s']:.3f} s, "
                f"model {ev['compute_s']:.3f} s{text}")
    if ev["event"] == "timeout":
        return f"{ev['time_s']:8.3f} s  timeout      (end of speech {ev['end_of_speech_s']:.3f} s)"
    return f"{ev['time_s']:8.3f} s  {ev['event']}"
