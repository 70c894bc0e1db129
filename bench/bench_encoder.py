"""Speed and memory of the parakeet-ctc-0.6b-sized encoder (random weights) on CPU; prints JSON.

    python bench/bench_encoder.py                   # fp32 and bf16, 5 s and 20 s, batch 1 and 8
    python bench/bench_encoder.py --dtype bfloat16 --seconds 5 --batch 1

Each dtype runs in its own subprocess so that its peak RSS is its own. Timed: log-mel features +
encoder + CTC head (`ASRModel.forward`) under inference_mode; one warm-up, then the median of
--runs runs. Compare with NeMo 3.0.0 in ../shared/spec/reference_timings.md (0.6-0.8 s for 5 s).

Shared 2-core machines vary by 2x from day to day, so each run also times the reference file's
2048^3 matmul and reports `at_reference_speed_s`: the median rescaled to the matmul rate the NeMo
figures were measured at (198.2 GFLOP/s fp32, 849.0 bf16).
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from speechllm.asr import ASRConfig, ASRModel
from speechllm.audio import PreprocessorConfig
from speechllm.fastconformer import FastConformerConfig
from speechllm.precision import matmul_gflops  # the 2048^3 matmul rate, as the reference table's


def parakeet_ctc_06b(dtype) -> ASRModel:
    pre = PreprocessorConfig(window_size=0.025, window_stride=0.01, n_fft=512, features=80, pad_to=0, dither=1e-5)
    enc = FastConformerConfig()  # the defaults are parakeet-ctc-0.6b's encoder
    model = ASRModel(ASRConfig(pre, enc, vocab_size=1024)).eval()
    model.encoder.to(dtype)
    model.decoder.to(dtype)
    return model


REFERENCE_GFLOPS = {"float32": 198.2, "bfloat16": 849.0}  # reference_timings.md, 2048^3 matmul


def bench_one(model, seconds: float, batch: int, runs: int, speed: float) -> dict:
    n = int(seconds * 16000)
    audio = 0.1 * torch.randn(batch, n)
    lengths = torch.full((batch,), n)
    times = []
    with torch.inference_mode():
        model(audio, lengths)  # warm-up (oneDNN picks kernels on the first call)
        for _ in range(runs):
            t0 = time.perf_counter()
            model(audio, lengths)
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {
        "audio_s": seconds, "batch": batch, "median_s": round(med, 4), "runs_s": [round(t, 4) for t in times],
        "real_time_factor": round(med / (seconds * batch), 5), "x_real_time": round(seconds * batch / med, 1),
        "at_reference_speed_s": round(med * speed, 4),
    }


def timed_build(args, build) -> tuple[torch.dtype, torch.nn.Module, float]:
    """args.threads and args.dtype applied, then build(dtype) -> (dtype, model, seconds it took)."""
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype[0])
    t0 = time.perf_counter()
    model = build(dtype)
    return dtype, model, time.perf_counter() - t0


def run_dtype(args) -> dict:
    dtype, model, build_s = timed_build(args, parakeet_ctc_06b)
    gflops = matmul_gflops(dtype)
    speed = gflops / REFERENCE_GFLOPS[args.dtype[0]]  # < 1: this machine is slower than the reference's
    results = [bench_one(model, s, b, args.runs, speed) for s in args.seconds for b in args.batch]
    return {
        "dtype": args.dtype[0], "threads": torch.get_num_threads(), "torch": torch.__version__,
        "encoder_params_m": round(sum(p.numel() for p in model.encoder.parameters()) / 1e6, 1),
        "build_s": round(build_s, 2), "matmul_gflops": round(gflops, 1), "results": results,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def per_dtype_processes(script: str, dtypes: list[str], args: list[str]) -> list[dict]:
    """Run `script --dtype D *args` once per dtype, each in a fresh process so that its peak RSS is
    its own, and collect the JSON each prints."""
    runs = [subprocess.run([sys.executable, script, "--dtype", d, *args], check=True, capture_output=True, text=True)
            for d in dtypes]
    return [json.loads(r.stdout) for r in runs]


def dtype_parser(doc: str) -> argparse.ArgumentParser:
    """The options of every per-dtype benchmark: --dtype, --runs, --threads (the script adds its own)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    return p


def report(script: str, args, run_dtype, own_args: list[str], header: dict) -> None:
    """One --dtype: run it here and print its JSON. Several: one fresh process each
    (per_dtype_processes, passing own_args on), printed together under `header`."""
    if len(args.dtype) == 1:
        print(json.dumps(run_dtype(args)))
        return
    out = per_dtype_processes(script, args.dtype, ["--runs", str(args.runs), "--threads", str(args.threads), *own_args])
    print(json.dumps({**header, "by_dtype": out}, indent=1))


def main():
    p = dtype_parser(__doc__)
    p.add_argument("--seconds", nargs="+", type=float, default=[5.0, 20.0])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    args = p.parse_args()
    report(__file__, args, run_dtype, ["--seconds", *map(str, args.seconds), "--batch", *map(str, args.batch)],
           {"benchmark": "encoder", "model": "parakeet-ctc-0.6b size, random weights"})


if __name__ == "__main__":
    main()
