"""CPU speed of our LLMs at Qwen2.5-0.5B, Qwen3-0.6B or Qwen3.5-0.8B size: prefill and cached decode.

Same protocol as shared/spec/reference_timings.md (transformers 5.23 on this 2-core VM): random
weights, batch 1, a 100-token prompt; prefill = one forward filling the cache with logits for the
last position only; decode = 32 greedy single-token steps after an untimed prefill; generate =
generate() end to end (prefill + 32 new tokens). 1 warm-up + median of 3 runs,
torch.set_num_threads(2), inference mode. Each dtype runs in its own subprocess, so peak RSS
(ru_maxrss) is per dtype and includes imports and building the model; by default the dtypes are
float32 and, when speechllm.precision finds bf16 faster here, bfloat16.

When transformers is importable (a separate environment: it is no dependency of ours), the same
process then times transformers' model of the same config on the very same weight tensors
(load_state_dict(assign=True)), with the same protocol (DynamicCache, sdpa, generate with
min_new_tokens), checks that both give the same last-position logits, and reports ours / theirs.
Our peak RSS is read before transformers' model is built.

Run: python bench/bench_llm.py            (Qwen2.5-0.5B, prints JSON)
     python bench/bench_llm.py --model qwen3-0.6b qwen3.5-0.8b --runs 5
     python bench/bench_llm.py --layers 1 --runs 1 --new 2   (a quick check that it runs)
     /tmp/venv_hf/bin/python bench/bench_llm.py --model qwen3.5-0.8b   (with transformers beside ours)
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
from speechllm.llm import build_llm
from speechllm.precision import fast_dtype, matmul_gflops
from speechllm.qwen2 import Qwen2Config, RMSNorm
from speechllm.qwen3_5 import Qwen3_5Config, Qwen3_5RMSNorm, Qwen3_5RMSNormGated

try:
    import transformers
except ImportError:  # the usual case: only a benchmark environment has it
    transformers = None

# The published config.json of each model (random weights here).
CONFIGS = {
    "qwen2.5-0.5b": Qwen2Config(),
    # 16 heads x 128 = 2048 query rows for hidden 1024; q/k norms, no biases, tied head.
    "qwen3-0.6b": Qwen2Config(model_type="qwen3", vocab_size=151936, hidden_size=1024,
                              intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                              num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                              tie_word_embeddings=True, eos_token_id=151645),
    # Qwen3.5-0.8B's text model (the model card, cross-checked with mllm's Qwen3.5 port): hidden 1024,
    # 24 layers as 6 x (3 Gated DeltaNet + 1 gated attention: layers 3, 7, .., 23 full), SwiGLU 3584;
    # attention 8 query / 2 KV heads of 256 with RoPE on 64 dims (partial 0.25, theta 1e7); DeltaNet
    # 16 QK and 16 V heads of 128; vocabulary 248320 (padded), tied head.
    "qwen3.5-0.8b": Qwen3_5Config(vocab_size=248320, hidden_size=1024, intermediate_size=3584,
                                  num_hidden_layers=24, num_attention_heads=8, num_key_value_heads=2,
                                  head_dim=256, rope_theta=10000000.0, partial_rotary_factor=0.25,
                                  linear_num_key_heads=16, linear_num_value_heads=16,
                                  linear_key_head_dim=128, linear_value_head_dim=128,
                                  max_position_embeddings=262144, tie_word_embeddings=True,
                                  eos_token_id=248046),
}

# transformers 5.23, sdpa, same machine and protocol (shared/spec/reference_timings.md); measured
# for Qwen2.5-0.5B only.
REFERENCE = {"qwen2.5-0.5b": {
    "float32": {"prefill_s": 0.551, "decode_ms_per_token": 124.2, "generate_s": 4.298,
                "peak_rss_mb": 2792},
    "bfloat16": {"prefill_s": 0.170, "decode_ms_per_token": 48.4, "generate_s": 1.674,
                 "peak_rss_mb": 1590},
}}


def random_model(config: Qwen2Config | Qwen3_5Config, dtype):
    """Random weights allocated once, directly in `dtype` (no float32 copy on the way to bf16):
    matrices N(0, 0.02) (HF initializer_range), norms at their identity (1, or 0 for Qwen3.5's
    zero-centred 1 + w), DeltaNet decay A = 1..16 and dt_bias 1 as transformers initialises them."""
    with torch.device("meta"):
        model = build_llm(config).to(dtype)
    model = model.to_empty(device="cpu")
    if config.tie_word_embeddings:
        model.tie_weights()  # to_empty gives each module its own tensor
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
        for name, m in model.named_modules():
            if isinstance(m, (RMSNorm, Qwen3_5RMSNorm, Qwen3_5RMSNormGated)):
                m.weight.fill_(0.0 if isinstance(m, Qwen3_5RMSNorm) else 1.0)
            if hasattr(m, "A_log"):
                m.A_log.copy_(torch.linspace(1.0, 16.0, m.A_log.numel()).log())
                m.dt_bias.fill_(1.0)
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


def paired_runs(fns: list, runs: int) -> list[list[float]]:
    """timed_runs for several functions, interleaved (a warm-up of each, then run r of each in
    turn), so that ours and transformers' see the same moments of a shared machine's load."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(runs):
        for fn, out in zip(fns, times):
            t0 = time.perf_counter()
            inner = fn()
            out.append(inner if isinstance(inner, float) else time.perf_counter() - t0)
    return times


def our_protocol(model, ids, n_new: int) -> dict:
    """prefill (returns the last position's logits), decode (returns its own seconds), generate."""
    n_prompt = ids.shape[1]
    cache = model.new_cache(1, n_prompt + n_new)  # KV, or KV + DeltaNet conv window and state

    def run_prefill():
        cache.reset()
        return prefill(model, cache, ids)

    def run_decode():  # prefill untimed, then n_new greedy steps
        logits = run_prefill()
        t0 = time.perf_counter()
        for i in range(n_new):
            token = logits.argmax(-1, keepdim=True)  # (1, 1)
            logits = decode_one_token(model, cache, token, torch.tensor([[n_prompt + i]]))
        return time.perf_counter() - t0

    return {"prefill": run_prefill, "decode": run_decode,
            "generate": lambda: generate(model, ids, max_new_tokens=n_new)}


def transformers_model(model, config, dtype):
    """transformers' model of `config` holding our weight tensors (assigned, not copied)."""
    hf_config = transformers.AutoConfig.for_model(**config.to_hf())
    hf_config._attn_implementation = "sdpa"
    hf = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False, assign=True)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"transformers' keys differ from ours: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    return hf


def transformers_protocol(hf, ids, n_new: int) -> dict:
    """The reference protocol: a fresh DynamicCache per prefill, decode steps on it, generate()."""
    def run_prefill():
        out = hf(ids, use_cache=True, logits_to_keep=1)
        run_prefill.cache = out.past_key_values
        return out.logits[:, -1].float()

    def run_decode():
        logits = run_prefill()
        cache = run_prefill.cache
        t0 = time.perf_counter()
        for _ in range(n_new):
            out = hf(logits.argmax(-1, keepdim=True), past_key_values=cache, use_cache=True)
            logits, cache = out.logits[:, -1].float(), out.past_key_values
        return time.perf_counter() - t0

    def run_generate():
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new,
                    do_sample=False, pad_token_id=0)

    return {"prefill": run_prefill, "decode": run_decode, "generate": run_generate}


def summary(times: dict, n_prompt: int, n_new: int) -> dict:
    prefill_s, decode_s = statistics.median(times["prefill"]), statistics.median(times["decode"])
    return {
        "prefill_s": round(prefill_s, 3),
        "prefill_tok_s": round(n_prompt / prefill_s, 1),
        "decode_s": round(decode_s, 3),
        "decode_ms_per_token": round(1000 * decode_s / n_new, 1),
        "decode_tok_s": round(n_new / decode_s, 2),
        "generate_s": round(statistics.median(times["generate"]), 3),
        # Other jobs on the same 2 cores inflate medians; the fastest run is the cleaner number.
        "prefill_s_min": round(min(times["prefill"]), 3),
        "decode_ms_per_token_min": round(1000 * min(times["decode"]) / n_new, 1),
        "generate_s_min": round(min(times["generate"]), 3),
    }


def bench(model_name: str, dtype_name: str, runs: int, n_prompt: int, n_new: int,
          layers: int | None = None) -> dict:
    torch.set_num_threads(2)
    dtype = getattr(torch, dtype_name)
    # this machine's 2048^3 matmul rate now, against the reference table's (198 GFLOP/s fp32, 849 bf16):
    # other jobs on the same cores show up here first
    gflops_before = round(matmul_gflops(dtype), 1)
    config = CONFIGS[model_name]
    if layers is not None:  # a shallower model for quick checks: timings not comparable then
        extra = {}
        if isinstance(config, Qwen3_5Config):  # the first `layers` of the pattern, and at least one full
            types = list(config.layer_types[:layers])
            types[-1] = "full_attention" if "full_attention" not in types else types[-1]
            extra = {"layer_types": tuple(types)}
        config = replace(config, num_hidden_layers=layers, **extra)
    t0 = time.perf_counter()
    model = random_model(config, dtype)
    build_s = time.perf_counter() - t0
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before transformers' model exists
    ids = torch.randint(0, 151643, (1, n_prompt), generator=torch.Generator().manual_seed(0))
    sides = {"ours": our_protocol(model, ids, n_new)}
    if transformers is not None:
        sides["transformers"] = transformers_protocol(transformers_model(model, config, dtype), ids, n_new)
    times = {side: {} for side in sides}
    with torch.inference_mode():
        logits = {side: fns["prefill"]() for side, fns in sides.items()}
        for step in ("prefill", "decode", "generate"):
            for side, t in zip(sides, paired_runs([fns[step] for fns in sides.values()], runs)):
                times[side][step] = t
    full_depth = config.num_hidden_layers == CONFIGS[model_name].num_hidden_layers
    out = {
        "model": model_name, "layers": config.num_hidden_layers, "dtype": dtype_name,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1), "build_s": round(build_s, 2),
        **summary(times["ours"], n_prompt, n_new),
        "peak_rss_mb": round(peak_rss),
        "matmul_gflops_before_after": [gflops_before, round(matmul_gflops(dtype), 1)],
        "reference_transformers": REFERENCE.get(model_name, {}).get(dtype_name) if full_depth else None,
    }
    if transformers is not None:
        theirs = summary(times["transformers"], n_prompt, n_new)
        out["transformers"] = {"version": transformers.__version__, **theirs,
                               "max_abs_logit_diff": float((logits["ours"] - logits["transformers"]).abs().max())}
        out["ours_over_transformers"] = {k: round(out[k] / theirs[k], 3) for k in
                                         ("prefill_s", "decode_ms_per_token", "generate_s", "prefill_s_min",
                                          "decode_ms_per_token_min", "generate_s_min")}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", nargs="+", choices=sorted(CONFIGS), default=["qwen2.5-0.5b"])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"],
                        help="one dtype, in-process (default: float32, then bfloat16 where it is faster here)")
    parser.add_argument("--layers", type=int, help="override the layer count (quick checks)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=100, help="prompt tokens")
    parser.add_argument("--new", type=int, default=32, help="decoded tokens")
    args = parser.parse_args()
    if args.dtype:
        print(json.dumps([bench(m, args.dtype, args.runs, args.prompt, args.new, args.layers) for m in args.model]))
        return
    dtypes = ["float32"] + (["bfloat16"] if fast_dtype("cpu") == torch.bfloat16 else [])
    out = {"torch": torch.__version__, "threads": 2, "dtypes": dtypes,  # speechllm.precision's choice, now
           "transformers": transformers.__version__ if transformers is not None else None}
    for model in args.model:
        extra = ["--model", model, "--runs", str(args.runs), "--prompt", str(args.prompt), "--new", str(args.new)]
        extra += ["--layers", str(args.layers)] if args.layers is not None else []
        out[model] = {d: r[0] for d, r in zip(dtypes, per_dtype_processes(__file__, dtypes, extra))}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
