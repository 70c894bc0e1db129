"""Run a speechllm checkpoint on audio files.

    python infer.py clip.wav [more.flac ...] --checkpoint DIR

With an ASR checkpoint (from `convert_weights.py nemo`) it prints one transcript per file.
Any format soundfile reads, any sample rate or channel count; audio is resampled to 16 kHz mono.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from speechllm.asr import ASRModel, prepare_clip
from speechllm.audio import AudioError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("audio", nargs="+", help="audio files (wav, flac, ogg, ...)")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (config.json + model.safetensors)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="weight precision; bfloat16 is about 3x faster on CPUs with AVX512-BF16 (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="clips per forward pass (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--format", choices=["text", "json"], default="text",
                   help="text: 'path<TAB>transcript' per line; json: one JSON object per line (default: %(default)s)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model = ASRModel.from_pretrained(args.checkpoint, dtype=getattr(torch, args.dtype))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    # Load everything first: one bad file is reported and skipped, the others still run.
    clips, failed = {}, 0
    for path in args.audio:
        try:
            clips[path] = prepare_clip(Path(path), path, model.cfg.preprocessor.hop_length)
        except (AudioError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
    texts = model.transcribe(list(clips.values()), batch_size=args.batch_size, progress=len(clips) > 4 * args.batch_size)
    for path, text in zip(clips, texts):
        print(json.dumps({"audio": path, "text": text}) if args.format == "json" else f"{path}\t{text}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
