"""speechllm against Pipecat's default turn analyzer, Smart Turn v3.2, on the same clips; prints JSON.

    python -m speechllm.synth --out /tmp/synth --train 0 --dev 0 --test 100   # the test splits only
    python bench/bench_turn.py --data /tmp/synth                     # the bundled demo model
    python bench/bench_turn.py --data /tmp/synth --model checkpoints/tt --full-size

Needs pipecat-ai (its wheel bundles smart-turn-v3.2-cpu.onnx and a numpy Whisper feature extractor)
and onnxruntime: `pip install -e '.[pipecat]'`, or in a bare environment
`pip install --no-deps pipecat-ai==1.14.0 && pip install loguru pydantic wait_for2 onnxruntime soxr`.

Both engines sit behind the same speechllm.TurnDetector (its VAD, early_ms pause, stop_ms decision,
pre-roll and 8 s window): Smart Turn is wrapped as a model whose predict runs Pipecat's own
LocalSmartTurnAnalyzerV3 inference (resample, pad or cut to 8 s, Whisper log-mel, ONNX) and
answers <COMPLETE> when its probability is above 0.5, else <INCOMPLETE>. It has no backchannel
class. Measured:

- clips: each clip of test (and test_heldout_engine) played alone through a fresh detector; its
  decision is the last one of the clip. Accuracy and macro-F1 on COMPLETE vs INCOMPLETE clips,
  where only <COMPLETE> ends the turn (speechllm's <BACKCHANNEL> counts as not complete), and the
  share of BACKCHANNEL clips called complete (the agent would take a turn nobody gave it); per
  condition: each synthesis engine, telephone-band clips, voices held out of training, and the
  held-out engine apart. speechllm's 3-way accuracy beside it.
- compute_s: the predict call's wall time, per decision.
- streams: the clips shuffled into streams of --turns turns joined by pauses of 0.2-1.5 s of
  silence; latency_s per decision is the detector's: from the end of speech to when a caller
  pushing in real time would get the decision (at least stop_ms; more when predict, started at
  early_ms, takes longer than stop_ms - early_ms).
- --full-size: a parakeet-ctc-0.6b + projector + Qwen2.5-0.5B Speech-LLM with random weights
  (bench_e2e.full_size_model) on a stream of --full-turns turns: its compute and latency on this
  CPU (tags meaningless; random weights never write a tag, so each predict runs all of
  --full-new-tokens steps, like a trained model writing a transcript that long).

Each timing comes with the machine's 2048^3 matmul rate in fp32 and bf16 (--threads threads).
"""
import argparse
import hashlib
import importlib.metadata
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, replace
from importlib import resources
from pathlib import Path

import numpy as np
import torch

import speechllm
from bench_e2e import full_size_model  # the random-weight full-size model that bench_e2e times
from speechllm.audio import load_audio
from speechllm.data import ManifestError, read_manifest
from speechllm.metrics import classification_report
from speechllm.precision import fast_dtype, matmul_gflops
from speechllm.turn import BACKCHANNEL, COMPLETE, INCOMPLETE, TurnConfig, TurnDetector, play

try:  # Pipecat and onnxruntime are optional: only this benchmark and speechllm.integrations need them
    import onnxruntime
    from loguru import logger
    from pipecat.audio.turn.smart_turn.local_smart_turn_v3 import LocalSmartTurnAnalyzerV3
except ImportError as e:
    PIPECAT_MISSING = e
else:
    PIPECAT_MISSING = None

ROOT = Path(__file__).resolve().parents[1]
SR = 16000
SMART_TURN_ONNX = "smart-turn-v3.2-cpu.onnx"  # in the pipecat-ai wheel: pipecat/audio/turn/smart_turn/data


class SmartTurn:
    """Smart Turn v3.2 behind SpeechLLM.predict's interface, so that a TurnDetector can drive it."""

    def __init__(self, threads: int):
        logger.remove()  # Pipecat logs every load and prediction at DEBUG
        logger.add(sys.stderr, level="WARNING")
        self.path = resources.files("pipecat.audio.turn.smart_turn.data").joinpath(SMART_TURN_ONNX)
        self.analyzer = LocalSmartTurnAnalyzerV3(smart_turn_model_path=str(self.path), cpu_count=threads)

    def parameters(self):  # TurnDetector asks for the model's device
        return iter([torch.zeros(1)])

    def predict(self, audio, lengths, max_new_tokens=None) -> list[dict]:
        out = []
        for a, n in zip(audio, lengths):
            # Pipecat's own inference for one segment: at 16 kHz (the analyzer's rate is unset), the
            # last 8 s or zero-padded to 8 s at the front, Whisper log-mel, the ONNX graph, > 0.5
            r = self.analyzer._predict_endpoint(a[: int(n)].float().numpy())
            p = float(r["probability"])
            out.append({"tag": COMPLETE if r["prediction"] == 1 else INCOMPLETE, "transcript": "",
                        "probs": {COMPLETE: p, INCOMPLETE: 1 - p, BACKCHANNEL: 0.0}})
        return out


# -----------------------------------------------------------------------------
# measuring


def pct(values, q: float):
    return round(float(np.percentile(values, q)), 4) if len(values) else None


def timing(values) -> dict:
    return {"n": len(values), "mean": round(statistics.fmean(values), 4) if values else None,
            "p50": pct(values, 50), "p95": pct(values, 95)}


def clip_decisions(model, cfg: TurnConfig, clips: list[dict]) -> list[dict]:
    """Each clip alone through a fresh detector: its last decision (None if the VAD heard no turn)."""
    out = []
    for c in clips:
        made = [e for e in play(TurnDetector(model, cfg), c["audio"]) if e["event"] in ("decision", "backchannel")]
        out.append({"tag": made[-1]["tag"] if made else None, "compute_s": [e["compute_s"] for e in made]})
    return out


def scores(clips: list[dict], got: list[dict]) -> dict:
    """COMPLETE vs INCOMPLETE clips: does the decision end the turn? BACKCHANNEL clips: called complete?"""
    ci = [(c["label"], g["tag"]) for c, g in zip(clips, got) if c["label"] != BACKCHANNEL]
    bc = [g["tag"] for c, g in zip(clips, got) if c["label"] == BACKCHANNEL]
    r = classification_report([t for t, _ in ci], [COMPLETE if p == COMPLETE else INCOMPLETE for _, p in ci])
    three = [(c["label"], g["tag"]) for c, g in zip(clips, got)]
    return {
        "n_complete_incomplete": len(ci), "n_backchannel": len(bc),
        "accuracy": round(r["accuracy"], 4) if ci else None,
        "macro_f1": round((r["per_class"][COMPLETE]["f1"] + r["per_class"][INCOMPLETE]["f1"]) / 2, 4) if ci else None,
        "false_cutoff_rate": round(r["false_cutoff_rate"], 4) if ci else None,
        "backchannel_called_complete": round(sum(t == COMPLETE for t in bc) / len(bc), 4) if bc else None,
        "accuracy_3way": round(sum(t == p for t, p in three) / len(three), 4) if three else None,
        "no_decision": sum(g["tag"] is None for g in got),
    }


def conditions(clips: list[dict]) -> dict[str, list[int]]:
    """Condition name -> the indexes of its clips."""
    groups = {}
    for i, c in enumerate(clips):
        split = "heldout_engine" if c["split"] == "test_heldout_engine" else "test"
        keys = [f"{split}: all", f"{split}: {c.get('engine', '?')}"]
        if c.get("telephone"):
            keys.append(f"{split}: telephone")
        if c.get("voice_heldout"):
            keys.append(f"{split}: held-out voices")
        for k in keys:
            groups.setdefault(k, []).append(i)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0].startswith("heldout"), not kv[0].endswith("all"), kv[0])))


def streams(clips: list[dict], turns: int, seed: int) -> list[np.ndarray]:
    """The clips shuffled into streams of `turns` turns, joined by 0.2-1.5 s of silence."""
    rng = random.Random(seed)
    order = list(range(len(clips)))
    rng.shuffle(order)
    out = []
    for i in range(0, len(order), turns):
        parts = []
        for k in order[i:i + turns]:
            parts += [np.zeros(round(rng.uniform(0.2, 1.5) * SR), np.float32), clips[k]["audio"]]
        out.append(np.concatenate(parts))
    return out


def stream_latency(model, cfg: TurnConfig, audio: list[np.ndarray]) -> dict:
    made = [e for x in audio for e in play(TurnDetector(model, cfg), x) if e["event"] in ("decision", "backchannel")]
    tags = {t: sum(e["tag"] == t for e in made) for t in (COMPLETE, INCOMPLETE, BACKCHANNEL)}
    return {"decisions": len(made), "tags": tags, "compute_s": timing([e["compute_s"] for e in made]),
            "latency_s": timing([e["latency_s"] for e in made]),
            "stream_s": round(sum(len(x) for x in audio) / SR, 1)}


def full_size(args, cfg: TurnConfig, clips: list[dict]) -> dict:
    torch.set_num_threads(args.full_threads)
    dtype = fast_dtype() if args.full_dtype == "auto" else getattr(torch, args.full_dtype)
    gflops = {"float32": round(matmul_gflops(torch.float32), 1), "bfloat16": round(matmul_gflops(torch.bfloat16), 1)}
    t0 = time.perf_counter()
    model = full_size_model(dtype)
    build_s = time.perf_counter() - t0
    n = 16000
    model.predict(0.1 * torch.randn(1, n), torch.tensor([n]), max_new_tokens=args.full_new_tokens)  # warm-up
    x = streams(clips[: args.full_turns], args.full_turns, args.seed)
    r = stream_latency(model, replace(cfg, max_new_tokens=args.full_new_tokens), x)
    return {"model": "parakeet-ctc-0.6b + projector + Qwen2.5-0.5B, random weights", "dtype": str(dtype).split(".")[1],
            "threads": args.full_threads, "matmul_gflops": gflops,
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1), "build_s": round(build_s, 1),
            "new_tokens": args.full_new_tokens, **r}


# -----------------------------------------------------------------------------
# input, output


def load_clips(data: Path, limit: int | None, seed: int) -> list[dict]:
    """The clips of test and test_heldout_engine with their manifest fields; limit: a random subset
    of that many per split (manifests are ordered by class), in manifest order."""
    clips = []
    for split in ("test", "test_heldout_engine"):
        path = data / f"{split}.jsonl"
        if not path.is_file():
            if split == "test":
                raise ManifestError(f"{path}: no such manifest (make one: python -m speechllm.synth --out {data})")
            continue
        utts = read_manifest(path, require_label=True)
        if limit is not None and limit < len(utts):
            utts = [utts[i] for i in sorted(random.Random(seed).sample(range(len(utts)), limit))]
        for u in utts:
            clips.append({"split": split, "label": u.label, "path": str(u.audio), **u.extra,
                          "audio": load_audio(u.audio, SR, u.offset, u.duration)})
    return clips


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def table(result: dict) -> str:
    """The README's tables, from the JSON."""
    names = list(result["clips"])
    cols = " | ".join(f"{n} acc | {n} F1 | {n} BC->C" for n in names)
    lines = [f"| condition | C/I clips | BC clips | {cols} |", "|---|---:|---:|" + "---:|" * 3 * len(names)]
    for cond in result["clips"][names[0]]:
        first = result["clips"][names[0]][cond]
        cells = []
        for n in names:
            r = result["clips"][n][cond]
            cells += [f"{v:.3f}" if v is not None else "-" for v in (r["accuracy"], r["macro_f1"], r["backchannel_called_complete"])]
        lines.append(f"| {cond} | {first['n_complete_incomplete']} | {first['n_backchannel']} | " + " | ".join(cells) + " |")
    lines += ["", "| engine | decisions | compute p50 s | compute p95 s | latency p50 s | latency p95 s |", "|---|---:|---:|---:|---:|---:|"]
    rows = dict(result["streams"])
    if "full_size" in result:
        rows[f"full-size random weights ({result['full_size']['dtype']})"] = result["full_size"]
    for n, r in rows.items():
        c, lat = r["compute_s"], r["latency_s"]
        lines.append(f"| {n} | {r['decisions']} | {c['p50']} | {c['p95']} | {lat['p50']} | {lat['p95']} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a speechllm.synth folder (test.jsonl, test_heldout_engine.jsonl)")
    p.add_argument("--model", default=str(ROOT / "checkpoints" / "demo"), help="Speech-LLM directory (default: the demo)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="speechllm's weights")
    p.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads (Pipecat's Smart Turn default: 1)")
    p.add_argument("--limit", type=int, help="a random subset of this many clips per split")
    p.add_argument("--turns", type=int, default=20, help="turns per simulated stream")
    p.add_argument("--seed", type=int, default=0, help="stream order and pauses")
    p.add_argument("--turn", action="append", default=[], metavar="KEY=VALUE", help="TurnConfig field, for both engines")
    p.add_argument("--full-size", action="store_true", help="also time the full-size random-weight Speech-LLM")
    p.add_argument("--full-size-only", action="store_true", help="time only the full-size model")
    p.add_argument("--full-dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument("--full-threads", type=int, default=2, help="torch threads for the full-size model (bench_e2e's default)")
    p.add_argument("--full-turns", type=int, default=8, help="turns in the full-size model's stream")
    p.add_argument("--full-new-tokens", type=int, default=16, help="transcript steps per full-size predict")
    p.add_argument("--no-table", action="store_true", help="JSON only (the tables go to stderr otherwise)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if PIPECAT_MISSING is not None:
        print(f"error: Smart Turn needs pipecat-ai and onnxruntime ({PIPECAT_MISSING}): pip install -e '.[pipecat]'",
              file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    try:
        cfg = TurnConfig.from_dict(dict(kv.split("=", 1) for kv in args.turn))
        clips = load_clips(Path(args.data), args.limit, args.seed)
        dtype = fast_dtype() if args.dtype == "auto" else getattr(torch, args.dtype)
        ours = speechllm.load(args.model, dtype)
    except (ValueError, FileNotFoundError, ManifestError, speechllm.AudioError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    smart = SmartTurn(args.threads)
    engines = {"speechllm": ours, "smart_turn": smart}
    groups = conditions(clips)
    result = {
        "benchmark": "turn", "threads": args.threads, "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__, "pipecat_ai": importlib.metadata.version("pipecat-ai"),
        "matmul_gflops": {"float32": round(matmul_gflops(torch.float32), 1), "bfloat16": round(matmul_gflops(torch.bfloat16), 1)},
        "speechllm_model": str(args.model), "speechllm_dtype": str(dtype).split(".")[1],
        "speechllm_answer_format": ours.cfg.prompt.answer_format,
        "smart_turn_model": {"file": SMART_TURN_ONNX, "bytes": Path(smart.path).stat().st_size, "sha256": sha256(smart.path)},
        "turn_config": asdict(cfg), "data": str(args.data),
        "clips_per_split": {s: sum(c["split"] == s for c in clips) for s in ("test", "test_heldout_engine")},
        "clips": {}, "compute_s": {}, "streams": {},
    }
    for name, model in engines.items() if not args.full_size_only else ():
        model.predict(torch.zeros(1, SR), torch.tensor([SR]), cfg.max_new_tokens)  # warm-up
        t0 = time.perf_counter()
        got = clip_decisions(model, cfg, clips)
        result["clips"][name] = {k: scores([clips[i] for i in idx], [got[i] for i in idx]) for k, idx in groups.items()}
        result["compute_s"][name] = timing([t for g in got for t in g["compute_s"]])
        for split in ("test", "test_heldout_engine"):
            audio = streams([c for c in clips if c["split"] == split], args.turns, args.seed)
            if audio:
                result["streams"][f"{name} ({split})"] = stream_latency(model, cfg, audio)
        result[f"{name}_wall_s"] = round(time.perf_counter() - t0, 1)
    if args.full_size or args.full_size_only:
        result["full_size"] = full_size(args, cfg, [c for c in clips if c["split"] == "test"])
    print(json.dumps(result, indent=1))
    if not args.no_table and result["clips"]:
        print(table(result), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
