"""Speed of speechllm.audio.resample on CPU; prints JSON.

    python bench/bench_resample.py                  # 60 s of 44.1 kHz and 48 kHz audio to 16 kHz
    python bench/bench_resample.py --seconds 600 --runs 5

One warm-up, then the median of --runs; the 2048^3 matmul rate is printed beside it, since the
shared machines here vary. Measured here (matmul 116 GFLOP/s fp32): a minute of audio in 0.14 s
from 44.1 kHz, 0.26 s from 48 kHz, 0.02 s from 22.05 kHz, 0.08 s from 8 kHz. (tests/test_audio.py
used to assert < 1 s for 44.1 kHz, which a loaded machine could miss.)
"""
import argparse
import json
import statistics
import time

import torch

from speechllm.audio import resample
from speechllm.precision import matmul_gflops


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--rates", type=int, nargs="+", default=[44100, 48000, 22050, 8000])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for sr in args.rates:
        x = torch.randn(int(args.seconds * sr))
        resample(x, sr, 16000)  # warm-up
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            resample(x, sr, 16000)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        results.append({"from_hz": sr, "audio_s": args.seconds, "median_s": round(med, 4),
                        "runs_s": [round(t, 4) for t in times], "x_real_time": round(args.seconds / med, 1)})
    print(json.dumps({"benchmark": "resample", "to_hz": 16000, "threads": torch.get_num_threads(),
                      "matmul_gflops": round(matmul_gflops(torch.float32), 1), "results": results}, indent=1))


if __name__ == "__main__":
    main()
