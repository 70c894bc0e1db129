"""Run a speechllm checkpoint on audio.

    python infer.py clip.wav [more.flac ...] --checkpoint DIR           # one line per clip
    python infer.py --manifest test.jsonl --checkpoint DIR              # score a labelled manifest
    python infer.py --stream call.wav [--realtime] [--turn stop_ms=800]  # live turn-taking events

A Speech-LLM checkpoint prints the turn-taking tag, its probability, the other two and the
transcript; an ASR checkpoint (from `convert_weights.py nemo`) prints the transcript; a SortFormer
diarizer checkpoint prints RTTM lines. Any format
soundfile reads, any sample rate or channel count: audio is resampled to 16 kHz mono. Clips longer
than --max-seconds are refused (the encoder attends over the whole clip at once). --stream plays
one recording of any length through speechllm.turn.TurnDetector, 20 ms at a time, and prints its
events with their times on the recording's clock (--json: one JSON object per event).
"""
import argparse
import json
import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import speechllm
from speechllm import dist
from speechllm.activity import (clip_segments, format_rttm, grid_of, manifest_segments, parse_target,
                                predict_with_activity, probs_to_segments, read_rttm, rttm_file_id)
from speechllm.asr import ASRModel, prepare_clip
from speechllm.audio import SAMPLE_RATE, AudioError, clip_warnings, load_audio, pad_batch
from speechllm.cli import at_least, checked
from speechllm.data import read_manifest
from speechllm.metrics import classification_report, format_report
from speechllm.model import NO_KERNELS, SpeechLLM
from speechllm.precision import fast_dtype
from speechllm.quant import quantize_int8
from speechllm.qwen2 import Qwen2ForCausalLM
from speechllm.sortformer import SortFormer
from speechllm.turn import TurnConfig, TurnDetector, format_event, play

DEMO = Path(__file__).resolve().parent / "checkpoints" / "demo"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("audio", nargs="*", help="audio files (wav, flac, ogg, ...)")
    p.add_argument("--checkpoint", default=None, help=f"checkpoint directory (default: the bundled demo model, {DEMO})")
    p.add_argument("--manifest", help="NeMo-style JSONL manifest with labels: score it and print the metrics")
    p.add_argument("--json", action="store_true", help="write one JSON object per clip instead of text lines")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="weight precision; auto = bfloat16 where it measures faster than float32 on this CPU/GPU, else float32 (default: %(default)s)")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8: weight-only int8 for the LLM's linear layers (speechllm/quant.py), for decode-bound "
                        "CPUs; it moves the logits a little, so measure your tags with and without it (default: off)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: %(default)s)")
    p.add_argument("--batch-size", type=at_least(1), default=8, help="clips per forward pass (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=at_least(1), default=64, help="transcript length limit in tokens (default: %(default)s)")
    p.add_argument("--decoding", choices=["greedy", "speculative"], default=None,
                   help="greedy: one LLM pass per token; speculative: the LLM verifies the CTC head's transcript in "
                        "the prompt's own pass, with the same answer (default: speculative where the model has a CTC head)")
    p.add_argument("--max-seconds", type=float, default=120.0, help="refuse longer clips (default: %(default)s)")
    p.add_argument("--threshold", type=float, default=0.5, help="diarizer: speaker activity threshold (default: %(default)s)")
    p.add_argument("--min-duration", type=float, default=0.0, help="diarizer: drop shorter segments, seconds (default: %(default)s)")
    p.add_argument("--diarizer", help="SortFormer checkpoint directory: speaker activity for a Speech-LLM with speaker kernels")
    p.add_argument("--rttm", help="RTTM file with the speakers' turns, instead of --diarizer (file id: the audio "
                                  "file's name without extension)")
    p.add_argument("--target-speaker", type=checked(parse_target), default="auto", metavar="N|auto",
                   help="whose turn to judge: a speaker index in arrival order, or auto, the one talking when talk "
                        "stops; the others are the background (default: %(default)s)")
    p.add_argument("--threads", type=at_least(1), default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--stream", metavar="AUDIO", help="play one recording through the live turn detector and print its events")
    p.add_argument("--realtime", action="store_true", help="--stream at real-time pace (default: as fast as possible)")
    p.add_argument("--chunk-ms", type=at_least(1), default=20, help="--stream: audio per push, ms (default: %(default)s)")
    p.add_argument("--turn", action="append", default=[], metavar="KEY=VALUE",
                   help="--stream: a TurnConfig setting (speechllm/turn.py), e.g. stop_ms=800; repeatable")
    return p.parse_args(argv)


def pick_dtype(name: str, device: str) -> torch.dtype:
    return fast_dtype(device) if name == "auto" else getattr(torch, name)


def clip_limits(model, max_seconds: float):
    """load_clips' limits for this model: (most seconds, least samples, what sets the most, None
    for --max-seconds). A Whisper encoder hears at most its 30 s window."""
    if not isinstance(model, SpeechLLM):
        return max_seconds, model.cfg.preprocessor.hop_length, None
    window = model.max_samples / SAMPLE_RATE if model.max_samples is not None else None
    if window is not None and window < max_seconds:
        return window, model.hop_length, f"the Whisper encoder's {window:g} s window"
    return max_seconds, model.hop_length, None


def load_clips(items, max_seconds: float, min_samples: int, limit: str | None = None):
    """[(name, path, offset, duration)] -> {name: samples}, reporting and skipping bad clips."""
    clips, failed = {}, 0
    for name, path, offset, duration in items:
        try:
            audio = prepare_clip(load_audio(path, offset=offset, duration=duration), str(path), min_samples)
            if len(audio) > max_seconds * SAMPLE_RATE:
                raise AudioError(f"{path}: {len(audio) / SAMPLE_RATE:.1f} s is longer than "
                                 f"{limit or f'--max-seconds {max_seconds:g}'}; cut it into turns first")
            clips[name] = audio
        except AudioError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
    return clips, failed


def run(model, clips: dict, batch_size: int, max_new_tokens: int, device, args, speakers=None, targets=None) -> dict:
    """{name: samples} -> {name: result}; batches hold clips of similar length. speakers: a SortFormer,
    or {name: RTTM segments} (a clip without any is all target speaker, as in training), for a
    Speech-LLM with speaker kernels; targets: {name: target speaker} over --target-speaker."""
    names = sorted(clips, key=lambda n: -len(clips[n]))
    results = {}
    bar = tqdm(total=len(names), unit="clip", disable=len(names) <= batch_size, file=sys.stderr)
    for start in range(0, len(names), batch_size):
        chunk = names[start:start + batch_size]
        if isinstance(model, SortFormer):  # one clip at a time: NeMo scales a batch by its joint peak
            for n in chunk:
                probs, lens = model.diarize(torch.from_numpy(clips[n])[None].to(device))
                segments = probs_to_segments(probs[0, : lens[0]], args.threshold, args.min_duration, grid_of(model.cfg).frame_s)
                results[n] = {"segments": segments, "rttm": format_rttm(segments, Path(n).stem)}
        elif isinstance(model, ASRModel):
            results.update(zip(chunk, ({"text": t} for t in model.transcribe([clips[n] for n in chunk]))))
        else:
            audio, lengths = pad_batch([clips[n] for n in chunk])
            audio, lengths = audio.to(device), lengths.to(device)
            if speakers is not None:  # a SortFormer, or each clip's RTTM segments
                clip_speakers = speakers if isinstance(speakers, SortFormer) else \
                    [speakers.get(n, [(0.0, len(clips[n]) / SAMPLE_RATE, "target")]) for n in chunk]
                target = [targets.get(n, args.target_speaker) for n in chunk] if targets else args.target_speaker
                out = predict_with_activity(model, audio, lengths, clip_speakers, target, max_new_tokens,
                                            args.threshold, decoding=args.decoding)
            else:
                out = model.predict(audio, lengths, max_new_tokens, decoding=args.decoding)
            results.update(zip(chunk, out))
        bar.update(len(chunk))
    bar.close()
    return results


def show(name: str, r: dict, as_json: bool) -> str:
    if as_json:
        return json.dumps({"audio": name, **{k: v for k, v in r.items() if k != "rttm"}})
    if "rttm" in r:
        return r["rttm"].rstrip("\n")
    warn = f"\twarning: {'; '.join(r['warnings'])}" if r.get("warnings") else ""
    if "tag" not in r:
        return f"{name}\t{r['text']}{warn}"
    others = ", ".join(f"{t.strip('<>')} {p:.3f}" for t, p in r["probs"].items() if t != r["tag"])
    who = f"\tspeaker {r['speaker']}" if "speaker" in r else ""
    text = f"\t{r['transcript']!r}" if r["transcript"] else ""  # tag_only models write none
    return f"{name}\t{r['tag']} {r['probs'][r['tag']]:.3f}\t({others}){text}{who}{warn}"


def stream(model, args) -> int:
    """--stream: one recording through the turn detector, one line (or JSON object) per event."""
    try:
        if not isinstance(model, SpeechLLM):
            raise ValueError("--stream needs a Speech-LLM checkpoint")
        pairs = dict(kv.split("=", 1) if "=" in kv else (kv, None) for kv in args.turn)
        detector = TurnDetector(model, TurnConfig.from_dict({"max_new_tokens": args.max_new_tokens, **pairs}))
        audio = load_audio(args.stream)
    except ValueError as e:  # AudioError too
        print(f"error: {e}", file=sys.stderr)
        return 1
    for event in play(detector, audio, args.chunk_ms, args.realtime):
        print(json.dumps(event) if args.json else format_event(event), flush=True)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.audio and not args.manifest and not args.stream:
        print("error: give audio files, --manifest or --stream", file=sys.stderr)
        return 2
    if args.stream and (args.audio or args.manifest):
        print("error: --stream plays one recording; give it alone", file=sys.stderr)
        return 2
    path = Path(args.checkpoint) if args.checkpoint else DEMO
    try:
        args.device = str(dist.check_device(args.device))
        utts = read_manifest(args.manifest, require_label=True) if args.manifest else []  # before any model
        model = speechllm.load(path, pick_dtype(args.dtype, args.device), args.device)
        speechllm.check_runnable(model, path)
        if utts and not isinstance(model, SpeechLLM):
            raise ValueError(f"{path}: --manifest scores turn-taking tags and needs a Speech-LLM checkpoint")
        if (args.diarizer or args.rttm) and isinstance(model, SpeechLLM) and model.cfg.encoder_kind == "whisper":
            raise ValueError(f"{path}: --diarizer and --rttm steer speaker kernels, and {NO_KERNELS}")
        if args.quantize:
            if not isinstance(model, SpeechLLM) or not isinstance(model.llm, Qwen2ForCausalLM):
                raise ValueError(f"{path}: --quantize int8 is for a Speech-LLM with a Qwen2 / Qwen3 LLM")
            quantize_int8(model.llm)
        if args.decoding == "speculative" and not getattr(model, "can_draft", False):
            raise ValueError(f"{path}: --decoding speculative drafts with a CTC head, and this checkpoint has none")
        if (args.diarizer or args.rttm) and getattr(model, "spk_kernels", None) is None:
            raise ValueError(f"{path}: --diarizer and --rttm need a Speech-LLM checkpoint with speaker kernels")
        if args.diarizer and args.rttm:
            raise ValueError("give --diarizer or --rttm, not both")
        rttm = read_rttm(args.rttm) if args.rttm else None
        diarizer = SortFormer.from_pretrained(args.diarizer).to(args.device) if args.diarizer else None
        if diarizer is not None:
            speechllm.check_runnable(diarizer, args.diarizer)
            if isinstance(args.target_speaker, int) and args.target_speaker >= diarizer.cfg.num_spks:
                raise ValueError(f"--target-speaker {args.target_speaker} is out of range: the diarizer {args.diarizer} "
                                 f"tracks {diarizer.cfg.num_spks} speakers (0-{diarizer.cfg.num_spks - 1})")
    except (OSError, ValueError) as e:  # FileNotFoundError, ConversionError, ManifestError, AudioError
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.checkpoint is None:
        print(f"using the bundled demo model ({DEMO}): trained on synthetic speech only (espeak-ng, flite, festival voices)", file=sys.stderr)
    if args.stream:
        return stream(model, args)
    items = [(p, p, 0.0, None) for p in args.audio] + [(f"{u.audio}@{u.offset:g}", u.audio, u.offset, u.duration) for u in utts]
    clips, failed = load_clips(items, *clip_limits(model, args.max_seconds))
    warnings = {name: clip_warnings(clips[name], p, offset, dur) for name, p, offset, dur in items if name in clips}
    speakers, targets = diarizer, None
    if rttm is not None:  # each clip's turns, in seconds from its start
        try:
            speakers = {name: clip_segments(rttm, rttm_file_id(p), offset, dur) for name, p, offset, dur in items}
        except ValueError as e:
            print(f"error: {args.rttm}: {e}", file=sys.stderr)
            return 1
    elif diarizer is None and any(u.speakers is not None for u in utts):  # the manifest's speakers / rttm_filepath
        if model.spk_kernels is None:
            print(f"note: {args.manifest}: speakers / rttm_filepath left unused: the checkpoint has no speaker kernels",
                  file=sys.stderr)
        else:
            speakers, targets = manifest_segments(utts, [name for name, *_ in items[len(args.audio):]])
    results = run(model, clips, args.batch_size, args.max_new_tokens, args.device, args, speakers, targets)
    bad = [n for n, r in results.items() if "probs" in r and not all(map(math.isfinite, r["probs"].values()))]
    if bad:
        print(f"error: {path}: the tag probabilities are not finite (NaN or infinite) for {len(bad)} clip(s), "
              f"e.g. {bad[0]}: the model's activations overflow ({next(model.parameters()).dtype}); no result is printed",
              file=sys.stderr)
        return 1
    for name, r in results.items():
        r.update({"warnings": warnings[name]} if warnings.get(name) else {})
        if "rttm" in r and "warnings" in r:  # RTTM lines have no room for them
            print(f"warning: {name}: {'; '.join(r['warnings'])}", file=sys.stderr)
    for name, *_ in items[: len(args.audio)]:
        if name in results:
            print(show(name, results[name], args.json))
    if utts:
        scored = [(u.label, results[name]["tag"]) for u, (name, *_) in zip(utts, items[len(args.audio):])
                  if name in results]
        if not scored:
            print(f"error: {args.manifest}: none of its {len(utts)} clips could be run; no metrics", file=sys.stderr)
            return 1
        report = classification_report([t for t, _ in scored], [p for _, p in scored])
        if args.json:  # what the draft saved, over the manifest
            done = [results[name] for _, (name, *_) in zip(utts, items[len(args.audio):]) if name in results]
            report["decoding"] = {k: sum(r[k] for r in done) for k in ("llm_passes", "draft_tokens", "accepted_tokens")}
        print(json.dumps(report) if args.json else format_report(report))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
