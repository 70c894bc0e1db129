"""Speaker activity for a Speech-LLM with speaker kernels: from a SortFormer, or from RTTM files.

    clip (N,) --SortFormer, alone--> probs (T, S) at 80 ms --pick target k-->
        s = probs[:, k], g = any other speaker > 0.5 (T,) --SpeechLLM.predict(spk_targets=s, bg_spk_targets=g)

The masks are built as NeMo's multitalker inference builds them (SpeakerTaggedASR, offline here):
s is the target's probability (or, with `binary`, its > threshold), g is 1 where any other speaker is
above the threshold (speaker.masks_from_probs). From an RTTM they are the training-time masks of
speaker.py instead (9-cell majority per frame), with speakers numbered by first onset, which is
SortFormer's arrival order, so a speaker index means the same thing from either source.

Choices that are ours, not NeMo's:
- Each clip is diarized alone. NeMo scales a batch by its joint peak (sortformer.py), so batching
  would let one clip change another's activity.
- target "auto" is the speaker whose turn is being judged: the one still talking when talk stops.
  Take the last frame where any speaker is above the threshold; of the speakers active there, the
  one with the highest mean probability over the 0.5 s (6 frames) up to it wins, the lowest index
  on a tie. Trailing silence is skipped on purpose: turn-taking clips often end in a pause. Nobody
  active at all: speaker 0, the first to arrive.
- The diarizer and the encoder both emit one frame per 80 ms from the same sample count; if their
  frame counts still differ (e.g. a legacy frontend on one side), the masks are cut or extended with
  their last value at the end, because frame i means the same time in both.
- RTTM onsets are seconds from the start of the audio file, as in NeMo; a manifest entry with an
  offset uses the part of its file's RTTM from offset to offset + duration.
"""
import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from .audio import SAMPLE_RATE, feature_lengths, load_audio
from .sortformer import SortFormer, format_rttm, probs_to_segments
from .speaker import FRAME_S, Segment, masks_from_probs, speaker_activity, target_masks

AUTO_WINDOW_S = 0.5  # "auto" compares the speakers over this much audio before talk stops


# -----------------------------------------------------------------------------
# choosing the target speaker


def parse_target(text: str) -> int | str:
    """--target-speaker value: 'auto' or a speaker index N >= 0 (arrival order)."""
    if text == "auto":
        return text
    if not text.isdigit():
        raise ValueError(f"target speaker must be 'auto' or an index >= 0, got {text!r}")
    return int(text)


def auto_target(probs: torch.Tensor, threshold: float = 0.5, window_s: float = AUTO_WINDOW_S) -> int:
    """probs (T, S), one clip's valid frames -> the index of the speaker whose turn ends the clip
    (the rule is in the module docstring)."""
    active = probs > threshold  # (T, S)
    talking = active.any(1).nonzero().flatten()
    if len(talking) == 0:
        return 0
    end = int(talking[-1])
    w = max(1, round(window_s / FRAME_S))  # 0.5 s -> 6 frames
    score = probs[max(0, end + 1 - w):end + 1].float().mean(0)  # (S,)
    score[~active[end]] = -1.0  # only those still talking at the last active frame
    return int(score.argmax())


def pick_target(probs: torch.Tensor, target: int | str, threshold: float = 0.5) -> int:
    if target == "auto":
        return auto_target(probs, threshold)
    if not 0 <= target < probs.shape[-1]:
        raise ValueError(f"target speaker {target} is out of range: the diarizer has {probs.shape[-1]} speakers")
    return target


def fit_frames(mask: torch.Tensor, n: int) -> torch.Tensor:
    """(T,) -> (n,): cut at the end, or extend with the last value (see the module docstring)."""
    if len(mask) >= n:
        return mask[:n]
    last = mask[-1] if len(mask) else mask.new_zeros(())
    return torch.cat([mask, last.expand(n - len(mask))])


def encoder_frames(model, lengths: torch.Tensor) -> torch.Tensor:
    """(B,) samples -> (B,) frames the model's encoder emits for them."""
    return model.encoder.output_lengths(feature_lengths(lengths.cpu(), model.cfg.preprocessor))


def stack_masks(masks: list[torch.Tensor]) -> torch.Tensor:
    """Per-clip (T_i,) -> (B, T_max), right-padded with 0 (padded frames are masked in the encoder)."""
    out = torch.zeros(len(masks), max(len(m) for m in masks))
    for i, m in enumerate(masks):
        out[i, :len(m)] = m
    return out


# -----------------------------------------------------------------------------
# activity from a diarizer


def diarizer_masks(diarizer, audio: torch.Tensor, lengths: torch.Tensor, num_frames: list[int],
                   target: int | str = "auto", threshold: float = 0.5, binary: bool = False):
    """Diarize each clip of audio (B, N) alone -> s, g (B, max num_frames) and the target per clip.
    num_frames: the encoder frames of each clip (encoder_frames)."""
    s, g, targets = [], [], []
    for i, n in enumerate(lengths.tolist()):
        probs, valid = diarizer.diarize(audio[i:i + 1, :n])  # (1, T, S): the clip's own peak scale
        probs = probs[0, :int(valid[0])].float().cpu()  # (T, S)
        k = pick_target(probs, target, threshold)
        s_i, g_i = masks_from_probs(probs, k, binary, threshold)  # (T,) each
        s.append(fit_frames(s_i, num_frames[i]))
        g.append(fit_frames(g_i, num_frames[i]))
        targets.append(k)
    return stack_masks(s), stack_masks(g), targets


def predict_with_diarizer(model, diarizer, audio: torch.Tensor, lengths: torch.Tensor, target: int | str = "auto",
                          max_new_tokens: int = 64, threshold: float = 0.5, binary: bool = False) -> list[dict]:
    """SpeechLLM.predict with speaker activity from `diarizer` (a SortFormer); each result also
    names its target speaker ("speaker": k, SortFormer's index)."""
    if model.spk_kernels is None:
        raise ValueError("this Speech-LLM has no speaker kernels: it cannot use a diarizer")
    frames = encoder_frames(model, lengths).tolist()
    s, g, targets = diarizer_masks(diarizer, audio, lengths, frames, target, threshold, binary)
    s, g = s.to(audio.device), g.to(audio.device)
    out = model.predict(audio, lengths, max_new_tokens, spk_targets=s, bg_spk_targets=g)
    return [{**r, "speaker": k} for r, k in zip(out, targets)]


# -----------------------------------------------------------------------------
# activity from RTTM files


def clip_segments(rttm: dict[str, list[Segment]], file_id: str, offset: float = 0.0,
                  duration: float | None = None) -> list[Segment]:
    """The segments of `file_id` (read_rttm's output) that fall in [offset, offset + duration), in
    seconds from the clip's start."""
    if file_id not in rttm:
        raise ValueError(f"the RTTM has no file id {file_id!r} (it holds {sorted(rttm)[:10]})")
    end = math.inf if duration is None else offset + duration
    inside = [(a, b, spk) for a, b, spk in rttm[file_id] if b > offset and a < end]
    return [(max(a, offset) - offset, min(b, end) - offset, spk) for a, b, spk in inside]


def rttm_masks(segments: list[list[Segment]], num_frames: list[int], durations: list[float],
               target: int | str | list = "auto"):
    """Per-clip segments (seconds from each clip's start) -> s, g (B, max num_frames) and the target
    speaker label per clip (None: the clip has no such speaker, so s is silent). target: "auto", an
    index in arrival order, or a speaker label; or a list of those, one per clip."""
    per_clip = target if isinstance(target, list) else [target] * len(segments)
    s, g, targets = [], [], []
    for segs, n, dur, t in zip(segments, num_frames, durations, per_clip, strict=True):
        act, speakers = speaker_activity(segs, n, dur)  # (S, T), arrival order
        if isinstance(t, str) and t != "auto":
            name = t  # a label, as a training manifest's target_speaker gives it
        else:
            k = auto_target(act.T) if t == "auto" else t
            name = speakers[k] if k < len(speakers) else None  # an index past the last: a silent target
        s_i, g_i = target_masks(segs, name, n, dur)
        s.append(s_i)
        g.append(g_i)
        targets.append(name)
    return stack_masks(s), stack_masks(g), targets


def predict_with_rttm(model, audio: torch.Tensor, lengths: torch.Tensor, segments: list[list[Segment]],
                      target: int | str = "auto", max_new_tokens: int = 64) -> list[dict]:
    """SpeechLLM.predict with speaker activity from RTTM segments, one list per clip (clip_segments);
    each result also names its target speaker ("speaker": the RTTM label)."""
    if model.spk_kernels is None:
        raise ValueError("this Speech-LLM has no speaker kernels: it cannot use RTTM activity")
    frames = encoder_frames(model, lengths).tolist()
    s, g, targets = rttm_masks(segments, frames, [n / SAMPLE_RATE for n in lengths.tolist()], target)
    s, g = s.to(audio.device), g.to(audio.device)
    out = model.predict(audio, lengths, max_new_tokens, spk_targets=s, bg_spk_targets=g)
    return [{**r, "speaker": k} for r, k in zip(out, targets)]


# -----------------------------------------------------------------------------
# precomputed activity for a training manifest


def rttm_file_id(audio_path) -> str:
    return "_".join(Path(audio_path).stem.split()) or "audio"  # RTTM fields cannot hold whitespace


def write_manifest_rttms(manifest, out_manifest, diarizer, rttm_dir=None, threshold: float = 0.5,
                         min_duration: float = 0.0, progress: bool = False) -> int:
    """Diarize every entry of a JSONL manifest, write one RTTM per entry into rttm_dir (default:
    <out_manifest stem>_rttm/ beside it), and write out_manifest: the same entries plus
    "rttm_filepath" (relative to out_manifest's folder when inside it). Relative audio paths are
    rewritten for out_manifest's folder. The input is never overwritten. Returns the number of entries."""
    manifest, out_manifest = Path(manifest), Path(out_manifest)
    if out_manifest.resolve() == manifest.resolve():
        raise ValueError(f"{out_manifest}: refusing to overwrite the input manifest; name a new file")
    rttm_dir = Path(rttm_dir) if rttm_dir else out_manifest.with_name(out_manifest.stem + "_rttm")
    rttm_dir.mkdir(parents=True, exist_ok=True)
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
        segments = probs_to_segments(probs[0, :int(valid[0])].cpu(), threshold, min_duration)
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
    """python -m speechllm.pipeline MANIFEST --diarizer DIR --out NEW_MANIFEST [--rttm-dir DIR]"""
    p = argparse.ArgumentParser(prog="python -m speechllm.pipeline",
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
