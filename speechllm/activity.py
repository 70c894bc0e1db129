"""Speaker activity: who talks when, one value per encoder frame, for the speaker kernels (speaker.py).

    RTTM / manifest segments (s) --speaker_activity--> (S, T) --target_masks--> s, g (T,)
    SortFormer probs (T, S) --------------------------masks_from_probs--> s, g (T,)
    per clip, --fit_masks--> s, g (B, T_enc) --SpeechLLM.predict(spk_targets=s, bg_spk_targets=g)

s is the target speaker's activity and g everyone else's. Speakers are numbered by first onset,
SortFormer's arrival order, so a speaker index means the same thing from either source.

The grid comes from the model's config (`grid_of`): segments are drawn on the mel frames (10 ms:
sample_rate / hop_length cells per second) and read per encoder frame (subsampling_factor cells,
80 ms for parakeet and SortFormer). `Grid()` is that usual grid, the default of the helpers that
take no model.

From segments, masks follow NeMo's multitalker training labels
(asr_multispeaker_utils.speaker_to_target): onset and offset are floored to a mel cell, encoder
frame i takes the mean of the cells within half a frame of its centre (for 8 cells: the nine
around 80*i ms; frame 0: the first four; the last frame: all cells to the end of the audio) and is
active above 0.5; g is the OR of all speakers but the target. So a segment from 0.16 s to 0.40 s,
frame-aligned, marks frames 3..5: the onset frame itself sees only 4 of its 9 cells active.

From a diarizer they are built as NeMo's multitalker inference builds them (SpeakerTaggedASR,
offline here): s is the target's probability (or, with `binary`, its > threshold), g is 1 where
any other speaker is above the threshold.

Choices that are ours, not NeMo's:
- Each clip is diarized alone. NeMo scales a batch by its joint peak (sortformer.py), so batching
  would let one clip change another's activity.
- target "auto" is the speaker whose turn is being judged: the one still talking when talk stops.
  Take the last frame where any speaker is above the threshold; of the speakers active there, the
  one with the highest mean probability over the 0.5 s (6 frames) up to it wins, the lowest index
  on a tie. Trailing silence is skipped on purpose: turn-taking clips often end in a pause. Nobody
  active at all: speaker 0, the first to arrive.
- One fitting rule (`fit_masks`): the diarizer and the encoder both emit one frame per 80 ms from
  the same sample count; if their frame counts still differ (e.g. a legacy frontend on one side),
  a clip's mask is cut or extended with its last value at the end, because frame i means the same
  time in both. (A mask handed to the model at another length gets NeMo's rule instead:
  speaker.fit_mask.)
- RTTM onsets are seconds from the start of the audio file, as in NeMo; a manifest entry with an
  offset uses the part of its file's RTTM from offset to offset + duration.
"""
import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .audio import feature_lengths, load_audio
from .cli import output_dir, output_file
from .sortformer import SortFormer

Segment = tuple[float, float, str]  # (start s, end s, speaker)
AUTO_WINDOW_S = 0.5  # "auto" compares the speakers over this much audio before talk stops


@dataclass(frozen=True)
class Grid:
    cells_per_s: float = 100.0  # mel frames per second: sample_rate / hop_length
    cells_per_frame: int = 8  # mel frames per encoder frame: the subsampling factor

    @property
    def frame_s(self) -> float:
        return self.cells_per_frame / self.cells_per_s


def grid_of(cfg) -> Grid:
    """The grid of a model whose config has a preprocessor and an encoder (ASR, Speech-LLM, SortFormer)."""
    if cfg.preprocessor is None:  # a Whisper Speech-LLM: no speaker kernels, so no activity grid either
        raise ValueError("speaker activity steers FastConformer speaker kernels; this model's encoder is Whisper")
    return Grid(cfg.preprocessor.sample_rate / cfg.preprocessor.hop_length, cfg.encoder.subsampling_factor)


# -----------------------------------------------------------------------------
# RTTM and segments


def read_rttm(path) -> dict[str, list[Segment]]:
    """RTTM -> {file_id: [(start, end, speaker), ...]} from its SPEAKER lines, in file order.

    Fields of a SPEAKER line: type, file id, channel, onset (s), duration (s), <NA>, <NA>, speaker,
    <NA>, <NA>. Other line types, ';;' comments and blank lines are skipped."""
    out: dict[str, list[Segment]] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        f = line.split()
        if not f or f[0] != "SPEAKER":
            continue
        try:
            start, duration, speaker = float(f[3]), float(f[4]), f[7]
        except (IndexError, ValueError):
            raise ValueError(f"{path}:{n}: not an RTTM SPEAKER line: {line.strip()!r}") from None
        if start < 0 or duration < 0:
            raise ValueError(f"{path}:{n}: negative onset or duration: {line.strip()!r}")
        out.setdefault(f[1], []).append((start, start + duration, speaker))
    return out


def format_rttm(segments, file_id: str) -> str:
    """[(start, end, speaker)] -> RTTM text: one 'SPEAKER <file> 1 <onset> <duration> <NA> <NA>
    <speaker> <NA> <NA>' line per segment, times in seconds to the millisecond."""
    if not file_id or any(c.isspace() for c in file_id):
        raise ValueError(f"RTTM file id {file_id!r} must be non-empty and contain no whitespace")
    return "".join(f"SPEAKER {file_id} 1 {start:.3f} {end - start:.3f} <NA> <NA> {spk} <NA> <NA>\n"
                   for start, end, spk in segments)


def rttm_file_id(audio_path) -> str:
    return "_".join(Path(audio_path).stem.split()) or "audio"  # RTTM fields cannot hold whitespace


def clip_segments(rttm: dict[str, list[Segment]], file_id: str, offset: float = 0.0,
                  duration: float | None = None) -> list[Segment]:
    """The segments of `file_id` (read_rttm's output) that fall in [offset, offset + duration), in
    seconds from the clip's start."""
    if file_id not in rttm:
        raise ValueError(f"the RTTM has no file id {file_id!r} (it holds {sorted(rttm)[:10]})")
    end = math.inf if duration is None else offset + duration
    inside = [(a, b, spk) for a, b, spk in rttm[file_id] if b > offset and a < end]
    return [(max(a, offset) - offset, min(b, end) - offset, spk) for a, b, spk in inside]


def probs_to_segments(probs: torch.Tensor, threshold: float = 0.5, min_duration: float = 0.0,
                      frame_s: float = Grid().frame_s, unit_s: float = 0.01) -> list[Segment]:
    """One item's valid diarizer frames (T, S) -> [(start s, end s, "speaker_<k>")], sorted by start.

    Frame t is active when its probability is above `threshold` and spans [t, t + 1) * frame_s; a
    run of active frames is one segment, kept if it lasts at least `min_duration` seconds. With the
    defaults this is NeMo's default diarize() post-processing (onset = offset = 0.5, no padding),
    including its end rule: NeMo repeats each frame on a 10 ms grid and closes a run still open at
    the end at the last 10 ms step's start, so such a segment ends `unit_s` before the last frame's
    end (4.07 s, not 4.08 s)."""
    active = F.pad((probs > threshold).to(torch.int8).T, (1, 1))  # (S, T + 2), a silent frame each side
    edges = active.diff(dim=1)  # +1 at an onset, -1 one past an offset
    segments = []
    for k in range(active.shape[0]):
        starts = (edges[k] == 1).nonzero().flatten().tolist()
        ends = (edges[k] == -1).nonzero().flatten().tolist()
        for a, b in zip(starts, ends):
            start, end = a * frame_s, b * frame_s - (unit_s if b == probs.shape[0] else 0.0)
            if end - start >= min_duration:
                segments.append((round(start, 6), round(end, 6), f"speaker_{k}"))
    return sorted(segments, key=lambda seg: (seg[0], seg[2]))


# -----------------------------------------------------------------------------
# masks: from segments, from a diarizer


def speaker_activity(segments: list[Segment], num_frames: int, duration: float | None = None,
                     soft: bool = False, grid: Grid = Grid()) -> tuple[torch.Tensor, list[str]]:
    """Segments in seconds -> activity (S, T) float32 per encoder frame, and the S speakers in arrival
    order. `duration` is the audio's (default num_frames frames): segments are cut there, and the
    last frame's window runs to it. soft: the active fraction of each window, instead of > 0.5."""
    duration = num_frames * grid.frame_s if duration is None else duration
    speakers = list(dict.fromkeys(spk for _, _, spk in sorted(segments, key=lambda seg: seg[0])))
    n = round(duration * grid.cells_per_s)
    cells = torch.zeros(len(speakers), n, dtype=torch.float64)  # (S, n) on the mel grid
    for start, end, spk in segments:
        # int() floors, as NeMo does, float error included (0.29 s -> cell 28).
        cells[speakers.index(spk), int(max(start, 0.0) * grid.cells_per_s):int(min(end, duration) * grid.cells_per_s)] = 1.0
    i, c = torch.arange(num_frames), grid.cells_per_frame
    lo = (c * i - 1 - c // 2).clamp(0, n)  # (T,) first cell of frame i's window
    hi = (c * i + c // 2).clamp(0, n)  # one past its last
    hi[-1:] = n  # the last frame's window runs to the end of the audio
    csum = F.pad(cells.cumsum(1), (1, 0))  # (S, n + 1)
    frac = (csum[:, hi] - csum[:, lo]) / (hi - lo).clamp(min=1)  # (S, T)
    return (frac if soft else frac > 0.5).float(), speakers


def target_masks(segments: list[Segment], target: str, num_frames: int, duration: float | None = None,
                 soft: bool = False, grid: Grid = Grid()) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, g), each (T,): the target speaker's activity and the OR (soft: max) of everyone else's.
    A target absent from the segments is silent: s = 0."""
    act, speakers = speaker_activity(segments, num_frames, duration, soft, grid)
    others = [k for k, spk in enumerate(speakers) if spk != target]
    s = act[speakers.index(target)] if target in speakers else act.new_zeros(num_frames)
    g = act[others].amax(0) if others else act.new_zeros(num_frames)
    return s, g


def masks_from_probs(probs: torch.Tensor, target: int, binary: bool = False,
                     threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Diarizer output (..., T, S) -> (s, g) (..., T) for speaker `target`, as NeMo's SpeakerTaggedASR
    builds them: s = the target's probability (binary: > threshold), g = any other speaker > threshold."""
    s = probs[..., target]
    s = (s > threshold).to(probs.dtype) if binary else s
    others = torch.cat([probs[..., :target], probs[..., target + 1:]], dim=-1)  # (..., T, S-1)
    return s, (others > threshold).any(-1).to(probs.dtype)


# -----------------------------------------------------------------------------
# the target speaker


def parse_target(text: str) -> int | str:
    """--target-speaker value: 'auto' or a speaker index N >= 0 (arrival order)."""
    if text == "auto":
        return text
    if not text.isdigit():
        raise ValueError(f"target speaker must be 'auto' or an index >= 0, got {text!r}")
    return int(text)


def auto_target(probs: torch.Tensor, threshold: float = 0.5, window_s: float = AUTO_WINDOW_S,
                grid: Grid = Grid()) -> int:
    """probs (T, S), one clip's valid frames -> the index of the speaker whose turn ends the clip
    (the rule is in the module docstring)."""
    active = probs > threshold  # (T, S)
    talking = active.any(1).nonzero().flatten()
    if len(talking) == 0:
        return 0
    end = int(talking[-1])
    w = max(1, round(window_s / grid.frame_s))  # 0.5 s -> 6 frames of 80 ms
    score = probs[max(0, end + 1 - w):end + 1].float().mean(0)  # (S,)
    score[~active[end]] = -1.0  # only those still talking at the last active frame
    return int(score.argmax())


def pick_target(probs: torch.Tensor, target: int | str, threshold: float = 0.5, grid: Grid = Grid()) -> int:
    if target == "auto":
        return auto_target(probs, threshold, grid=grid)
    if not 0 <= target < probs.shape[-1]:
        raise ValueError(f"target speaker {target} is out of range: the diarizer has {probs.shape[-1]} speakers")
    return target


# -----------------------------------------------------------------------------
# a batch of clips, on the encoder's frames


def encoder_frames(model, lengths: torch.Tensor) -> torch.Tensor:
    """(B,) samples -> (B,) frames the model's encoder emits for them."""
    return model.encoder.output_lengths(feature_lengths(lengths.cpu(), model.cfg.preprocessor))


def fit_masks(masks: list[torch.Tensor], num_frames: list[int]) -> torch.Tensor:
    """Per-clip masks (T_i,) -> (B, max num_frames): each cut to its clip's encoder frames or extended
    with its last value (see the module docstring), then right-padded with 0 (padded frames are
    masked in the encoder)."""
    out = torch.zeros(len(masks), max(num_frames))
    for i, (m, n) in enumerate(zip(masks, num_frames, strict=True)):
        if len(m) < n:
            m = torch.cat([m, (m[-1] if len(m) else m.new_zeros(())).expand(n - len(m))])
        out[i, :n] = m[:n]
    return out


def rttm_masks(segments: list[list[Segment]], num_frames: list[int], durations: list[float],
               target: int | str | list = "auto", grid: Grid = Grid()):
    """Per-clip segments (seconds from each clip's start) -> s, g (B, max num_frames) and the target
    speaker label per clip (None: the clip has no such speaker, so s is silent). target: "auto", an
    index in arrival order, or a speaker label; or a list of those, one per clip."""
    per_clip = target if isinstance(target, list) else [target] * len(segments)
    s, g, targets = [], [], []
    for segs, n, dur, t in zip(segments, num_frames, durations, per_clip, strict=True):
        act, speakers = speaker_activity(segs, n, dur, grid=grid)  # (S, T), arrival order
        if isinstance(t, str) and t != "auto":
            name = t  # a label, as a training manifest's target_speaker gives it
        else:
            k = auto_target(act.T, grid=grid) if t == "auto" else t
            name = speakers[k] if k < len(speakers) else None  # an index past the last: a silent target
        s_i, g_i = target_masks(segs, name, n, dur, grid=grid)
        s.append(s_i)
        g.append(g_i)
        targets.append(name)
    return fit_masks(s, num_frames), fit_masks(g, num_frames), targets


def diarizer_masks(diarizer, audio: torch.Tensor, lengths: torch.Tensor, num_frames: list[int],
                   target: int | str = "auto", threshold: float = 0.5, binary: bool = False):
    """Diarize each clip of audio (B, N) alone -> s, g (B, max num_frames) and the target per clip.
    num_frames: the encoder frames of each clip (encoder_frames)."""
    s, g, targets = [], [], []
    for i, n in enumerate(lengths.tolist()):
        probs, valid = diarizer.diarize(audio[i:i + 1, :n])  # (1, T, S): the clip's own peak scale
        probs = probs[0, :int(valid[0])].float().cpu()  # (T, S)
        k = pick_target(probs, target, threshold, grid_of(diarizer.cfg))
        s_i, g_i = masks_from_probs(probs, k, binary, threshold)  # (T,) each
        s.append(s_i)
        g.append(g_i)
        targets.append(k)
    return fit_masks(s, num_frames), fit_masks(g, num_frames), targets


def predict_with_activity(model, audio: torch.Tensor, lengths: torch.Tensor, speakers, target: int | str = "auto",
                          max_new_tokens: int = 64, threshold: float = 0.5, binary: bool = False,
                          decoding: str | None = None) -> list[dict]:
    """SpeechLLM.predict with each clip's speaker activity. speakers: a diarizer (a SortFormer, run on
    each clip alone; threshold and binary apply) or one list of segments per clip (clip_segments).
    Each result also names its target speaker ("speaker": the diarizer's index, or the label)."""
    if model.spk_kernels is None:
        raise ValueError("this Speech-LLM has no speaker kernels: it cannot use speaker activity")
    frames = encoder_frames(model, lengths).tolist()
    if isinstance(speakers, list):
        durations = [n / model.cfg.preprocessor.sample_rate for n in lengths.tolist()]
        s, g, targets = rttm_masks(speakers, frames, durations, target, grid_of(model.cfg))
    else:
        s, g, targets = diarizer_masks(speakers, audio, lengths, frames, target, threshold, binary)
    out = model.predict(audio, lengths, max_new_tokens, spk_targets=s.to(audio.device), bg_spk_targets=g.to(audio.device),
                        decoding=decoding)
    return [{**r, "speaker": k} for r, k in zip(out, targets)]


def manifest_segments(utts, names: list[str]) -> tuple[dict, dict]:
    """A manifest's own turns (data.Utterance.speakers: its `speakers`, or its rttm_filepath's) ->
    ({name: segments}, {name: target_speaker where the line names one}) for predict_with_activity.
    A clip without turns counts as the target speaker's, as in training (train.speaker_masks)."""
    speakers = {n: [tuple(s) for s in u.speakers or []] or [(0.0, u.duration, "target")] for u, n in zip(utts, names)}
    targets = {n: u.extra["target_speaker"] for u, n in zip(utts, names) if u.extra.get("target_speaker") is not None}
    return speakers, targets


# -----------------------------------------------------------------------------
# precomputed activity for a training manifest


def write_manifest_rttms(manifest, out_manifest, diarizer, rttm_dir=None, threshold: float = 0.5,
                         min_duration: float = 0.0, progress: bool = False) -> int:
    """Diarize every entry of a JSONL manifest, write one RTTM per entry into rttm_dir (default:
    <out_manifest stem>_rttm/ beside it), and write out_manifest: the same entries plus
    "rttm_filepath" (relative to out_manifest's folder when inside it). Relative audio paths are
    rewritten for out_manifest's folder. The input is never overwritten. Returns the number of entries."""
    manifest, out_manifest = Path(manifest), output_file(out_manifest)
    if out_manifest.resolve() == manifest.resolve():
        raise ValueError(f"{out_manifest}: refusing to overwrite the input manifest; name a new file")
    rttm_dir = output_dir(rttm_dir if rttm_dir else out_manifest.with_name(out_manifest.stem + "_rttm"))
    rttm_dir.mkdir(parents=True, exist_ok=True)
    frame_s = grid_of(diarizer.cfg).frame_s
    lines = [(n, line) for n, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    out = []
    for n, line in tqdm(lines, desc="diarize", unit="clip", disable=not progress, file=sys.stderr):
        try:
            entry = json.loads(line)
            audio = Path(entry["audio_filepath"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{manifest}:{n}: not a manifest entry with 'audio_filepath' ({e})") from None
        if not audio.is_absolute():
            audio = manifest.parent / audio
            entry["audio_filepath"] = relative_to(audio, out_manifest.parent)
        offset = float(entry.get("offset") or 0.0)
        clip = torch.from_numpy(load_audio(audio, offset=offset, duration=entry.get("duration")))
        probs, valid = diarizer.diarize(clip[None])
        segments = probs_to_segments(probs[0, :int(valid[0])].cpu(), threshold, min_duration, frame_s)
        segments = [(a + offset, b + offset, spk) for a, b, spk in segments]  # seconds in the file
        rttm = rttm_dir / f"{n:06d}_{rttm_file_id(audio)}.rttm"  # line number: one file per entry
        rttm.write_text(format_rttm(segments, rttm_file_id(audio)))
        entry["rttm_filepath"] = relative_to(rttm, out_manifest.parent)
        out.append(json.dumps(entry, ensure_ascii=False))
    out_manifest.parent.mkdir(parents=True, exist_ok=True)
    out_manifest.write_text("".join(line + "\n" for line in out), encoding="utf-8")
    return len(out)


def relative_to(path: Path, folder: Path) -> str:
    """path as written in a manifest in `folder`: relative when inside it, else absolute."""
    path, folder = Path(os.path.abspath(path)), Path(os.path.abspath(folder))
    return str(path.relative_to(folder)) if path.is_relative_to(folder) else str(path)


def main(argv=None) -> int:
    """python -m speechllm.activity MANIFEST --diarizer DIR --out NEW_MANIFEST [--rttm-dir DIR]"""
    p = argparse.ArgumentParser(prog="python -m speechllm.activity",
                                description="Write RTTM files for a manifest with a SortFormer diarizer "
                                            "and a new manifest that points to them (rttm_filepath).")
    p.add_argument("manifest", help="input JSONL manifest (read only)")
    p.add_argument("--diarizer", required=True, help="SortFormer checkpoint directory (convert_weights.py nemo)")
    p.add_argument("--out", required=True, help="the new manifest to write")
    p.add_argument("--rttm-dir", help="where the RTTM files go (default: <out stem>_rttm/ beside --out)")
    p.add_argument("--threshold", type=float, default=0.5, help="speaker activity threshold (default: %(default)s)")
    p.add_argument("--min-duration", type=float, default=0.0,
                   help="drop shorter segments, seconds (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        diarizer = SortFormer.from_pretrained(args.diarizer)
        n = write_manifest_rttms(args.manifest, args.out, diarizer, args.rttm_dir, args.threshold,
                                 args.min_duration, progress=True)
    except (FileNotFoundError, ValueError) as e:  # AudioError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {n} entries with rttm_filepath")
    return 0


if __name__ == "__main__":
    sys.exit(main())
