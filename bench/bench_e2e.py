"""End-to-end speed of a full-size Speech-LLM with random weights on CPU; prints JSON.

    python bench/bench_e2e.py                       # fp32 and bf16
    python bench/bench_e2e.py --dtype bfloat16 --seconds 5 --new-tokens 16

parakeet-ctc-0.6b-sized encoder + the default projector (Conv1d 1024->896 stride 2 + 2 Transformer
layers) + Qwen2.5-0.5B, from a clip to the tag: features, encoder, projector, prefill of the
spliced prompt, then --new-tokens greedy steps (the transcript) and the tag read at the last one.
Random weights never emit a tag on their own, so `predict` reads it at the last step, which costs
the same as a trained model writing a transcript of that length. One warm-up, median of --runs.
"""
import resource
import statistics
import time

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from bench_encoder import REFERENCE_GFLOPS, dtype_parser, report, timed_build
from speechllm.audio import PreprocessorConfig
from speechllm.fastconformer import FastConformerConfig
from speechllm.model import SpeechLLM, SpeechLLMConfig
from speechllm.precision import matmul_gflops
from speechllm.projector import ProjectorConfig
from speechllm.qwen2 import Qwen2Config
from speechllm.tokenizer import Tokenizer


def byte_tokenizer() -> Tokenizer:
    """A byte-level tokenizer with Qwen's special tokens: enough to build prompts offline."""
    tok = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return Tokenizer(tok)


def full_size_model(dtype) -> SpeechLLM:
    pre = PreprocessorConfig(window_size=0.025, window_stride=0.01, n_fft=512, features=80, pad_to=0)
    cfg = SpeechLLMConfig(pre, FastConformerConfig(), ProjectorConfig(), Qwen2Config())
    with torch.device("meta"):
        model = SpeechLLM(cfg, byte_tokenizer())
    # real window and filterbank buffers first: the frontend keeps its buffers' values through every
    # cast and move (audio.LogMelFrontend._apply), and a meta tensor has none to keep
    model.preprocessor = type(model.preprocessor)(pre)
    model.to(dtype).to_empty(device="cpu")  # allocate once, in the benchmark's dtype
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.02)
    model.llm.tie_weights()
    for m in model.modules():  # BatchNorm statistics were left uninitialised by to_empty
        if isinstance(m, torch.nn.BatchNorm1d):
            m.reset_running_stats()
    return model.eval()


def run_dtype(args) -> dict:
    dtype, model, build_s = timed_build(args, full_size_model)
    n = int(args.seconds * 16000)
    audio, lengths = 0.1 * torch.randn(1, n), torch.tensor([n])
    model.predict(audio, lengths, max_new_tokens=args.new_tokens)  # warm-up
    times, parts = [], []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        out = model.predict(audio, lengths, max_new_tokens=args.new_tokens)[0]
        times.append(time.perf_counter() - t0)
        parts.append(out["timings"])
    med = statistics.median(times)
    speed = matmul_gflops(dtype) / REFERENCE_GFLOPS[args.dtype[0]]
    return {
        "dtype": args.dtype[0], "threads": torch.get_num_threads(), "audio_s": args.seconds,
        "new_tokens": args.new_tokens, "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "build_s": round(build_s, 1), "median_s": round(med, 3), "runs_s": [round(t, 3) for t in times],
        "audio_part_s": statistics.median(p["audio_s"] for p in parts),
        "llm_part_s": statistics.median(p["llm_s"] for p in parts),
        "at_reference_speed_s": round(med * speed, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main():
    p = dtype_parser(__doc__)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--new-tokens", type=int, default=16)
    args = p.parse_args()
    report(__file__, args, run_dtype, ["--seconds", str(args.seconds), "--new-tokens", str(args.new_tokens)],
           {"benchmark": "e2e", "model": "parakeet-0.6b + projector + Qwen2.5-0.5B, random weights"})


if __name__ == "__main__":
    main()
