"""CPU speed of Qwen2ForCausalLM at Qwen2.5-0.5B or Qwen3-0.6B size: prefill and cached decode.

Same protocol as shared/spec/reference_timings.md (transformers 5.23 on this 2-core VM): random
weights, batch 1, a 100-token prompt; prefill = one forward filling the cache with logits for the
last position only; decode = 32 greedy single-token steps after an untimed prefill; generate =
generate() end to end (prefill + 32 new tokens). 1 warm-up + median of 3 runs,
torch.set_num_threads(2), inference mode. Each dtype runs in its own subprocess, so peak RSS
(ru_maxrss) is per dtype and includes imports and building the model.

Run: python bench/bench_llm.py            (Qwen2.5-0.5B, both dtypes, prints JSON)
     python bench/bench_llm.py --model qwen3-0.6b --dtype bfloat16 --runs 5
     python bench/bench_llm.py --layers 1 --runs 1 --new 2   (a quick check that it runs)
"""
import argparse
import json
import resource
import statistics
import time
from dataclasses import replace

import torch

from bench_encoder import per_dtype_processes
from speechllm.generate import decode_one_token, generate, prefill
from speechllm.precision import matmul_gflops
from speechllm.qwen2 import KVCache, Qwen2Config, Qwen2ForCausalLM

# The published config.json of each model (random weights here).
CONFIGS = {
    "qwen2.5-0.5b": Qwen2Config(),
    # 16 heads x 128 = 2048 query rows for hidden 1024; q/k norms, no biases, tied head.
    "qwen3-0.6b": Qwen2Config(model_type="qwen3", vocab_size=151936, hidden_size=1024,
                              intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                              num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                              tie_word_embeddings=True, eos_token_id=151645),
}

# transformers 5.23, sdpa, same machine and protocol (shared/spec/reference_timings.md); measured
# for Qwen2.5-0.5B only.
REFERENCE = {"qwen2.5-0.5b": {
    "float32": {"prefill_s": 0.551, "decode_ms_per_token": 124.2, "generate_s": 4.298,
                "peak_rss_mb": 2792},
    "bfloat16": {"prefill_s": 0.170, "decode_ms_per_token": 48.4, "generate_s": 1.674,
                 "peak_rss_mb": 1590},
}}


def random_model(config: Qwen2Config, dtype) -> Qwen2ForCausalLM:
    """Random weights allocated once, directly in `dtype` (no float32 copy on the way to bf16)."""
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config).to(dtype)
    model = model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives each module its own tensor
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0.0, 0.02)  # HF initializer_range
    return model.eval()


def timed_runs(fn, runs: int) -> list[float]:
    """Seconds per call after one warm-up; fn may return its own timing (seconds) instead."""
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        inner = fn()
        times.append(inner if isinstance(inner, float) else time.perf_counter() - t0)
    return times


def median_time(fn, runs: int) -> float:
    return statistics.median(timed_runs(fn, runs))


def bench(model_name: str, dtype_name: str, runs: int, n_prompt: int, n_new: int,
          layers: int | None = None) -> dict:
    torch.set_num_threads(2)
    dtype = getattr(torch, dtype_name)
    # this machine's 2048^3 matmul rate now, against the reference table's (198 GFLOP/s fp32, 849 bf16):
    # other jobs on the same cores show up here first
    gflops_before = round(matmul_gflops(dtype), 1)
    config = CONFIGS[model_name]
    if layers is not None:  # a shallower model for quick checks: timings not comparable then
        config = replace(config, num_hidden_layers=layers)
    t0 = time.perf_counter()
    model = random_model(config, dtype)
    build_s = time.perf_counter() - t0
    ids = torch.randint(0, 151643, (1, n_prompt), generator=torch.Generator().manual_seed(0))
    cache = KVCache(config, 1, n_prompt + n_new, dtype=dtype)

    def run_prefill():
        cache.reset()
        return prefill(model, cache, ids)

    def run_decode():  # prefill untimed, then n_new greedy steps
        logits = run_prefill()
        t0 = time.perf_counter()
        for i in range(n_new):
            token = logits.argmax(-1, keepdim=True)  # (1, 1)
            position = torch.tensor([[n_prompt + i]])
            logits = decode_one_token(model, cache, token, position)
        return time.perf_counter() - t0

    with torch.inference_mode():
        prefill_runs = timed_runs(run_prefill, runs)
        decode_runs = timed_runs(run_decode, runs)
        generate_s = median_time(lambda: generate(model, ids, max_new_tokens=n_new), runs)
    prefill_s, decode_s = statistics.median(prefill_runs), statistics.median(decode_runs)
    full_depth = config.num_hidden_layers == CONFIGS[model_name].num_hidden_layers
    reference = REFERENCE.get(model_name, {}).get(dtype_name) if full_depth else None
    return {
        "model": model_name,
        "layers": config.num_hidden_layers,
        "dtype": dtype_name,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "build_s": round(build_s, 2),
        "prefill_s": round(prefill_s, 3),
        "prefill_tok_s": round(n_prompt / prefill_s, 1),
        "decode_s": round(decode_s, 3),
        "decode_ms_per_token": round(1000 * decode_s / n_new, 1),
        "decode_tok_s": round(n_new / decode_s, 2),
        "generate_s": round(generate_s, 3),
        # Other jobs on the same 2 cores inflate medians; the fastest run is the cleaner number.
        "prefill_s_min": round(min(prefill_runs), 3),
        "decode_ms_per_token_min": round(1000 * min(decode_runs) / n_new, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "matmul_gflops_before_after": [gflops_before, round(matmul_gflops(dtype), 1)],
        "reference_transformers": reference,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(CONFIGS), default="qwen2.5-0.5b")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="one dtype, in-process")
    parser.add_argument("--layers", type=int, help="override the layer count (quick checks)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=100, help="prompt tokens")
    parser.add_argument("--new", type=int, default=32, help="decoded tokens")
    args = parser.parse_args()
    if args.dtype:
        print(json.dumps(bench(args.model, args.dtype, args.runs, args.prompt, args.new,
                               args.layers)))
        return
    dtypes = ["float32", "bfloat16"]
    extra = ["--model", args.model, "--runs", str(args.runs), "--prompt", str(args.prompt), "--new", str(args.new)]
    extra += ["--layers", str(args.layers)] if args.layers is not None else []
    runs = per_dtype_processes(__file__, dtypes, extra)
    print(json.dumps({"torch": torch.__version__, "threads": 2, "model": args.model, **dict(zip(dtypes, runs))},
                     indent=2))


if __name__ == "__main__":
    main()
