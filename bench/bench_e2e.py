"""End-to-end speed of a full-size Speech-LLM with random weights on CPU; prints JSON.

    python bench/bench_e2e.py                       # fp32 and bf16, 5 s and 20 s clips
    python bench/bench_e2e.py --dtype bfloat16 --seconds 5 --new-tokens 16 --runs 3

parakeet-ctc-0.6b-sized encoder with a random CTC head (SentencePiece pieces + blank, at most
parakeet's 1024, trained here on the synthetic grammar's sentences) + the default projector (Conv1d
1024->896 stride 2 + 2 Transformer layers) + Qwen2.5-0.5B, from a clip to the tag: features,
encoder, CTC head, projector, the prompt, the answer of --new-tokens tokens and the tag read at
its last one (random weights never write a tag, so predict reads it at the last step, which costs
what a trained model writing a transcript of that length costs).

Modes, each on the same clip, one warm-up and the median of --runs:
  baseline            the path before speculative.py: whole prompt, generate() with full scores
  greedy              speculative.decode without a draft (no prompt cache)
  greedy+cache        ... with the prompt prefix's keys and values cached
  speculative         the draft verified (no prompt cache)
  speculative+cache   ... with the cached prefix
  wrong_middle+cache  a draft right for half the answer, wrong from the middle on
  upstream            (--upstream, where NeMo and transformers import: a separate environment,
                      `PYTHONPATH=. /tmp/venv_up/bin/python bench/bench_e2e.py --upstream`) NeMo 3.0's
                      preprocessor and ConformerEncoder holding the same tensors, our projector
                      (it has no upstream twin), the same prompt splice, transformers' greedy
                      generate() with scores; upstream_vs_baseline: same tokens, tag probabilities
  *+int8              baseline, greedy+cache, speculative+cache after quantize_int8 on the LLM
                      (the int8 model's own greedy answer as the draft), on the last clip only
The draft: random weights write byte noise that no SentencePiece head can spell, so the CTC head
runs (its cost is in the timings) but the draft predict verifies is set to the LLM's own greedy
answer (predict's drafts=), i.e. a CTC transcript with 100 % acceptance; wrong_middle keeps its
first half. `same_answer` checks every float mode gives the baseline's tokens, tag and
probabilities. Stage times come from forward hooks (features, encoder, ctc, projector) and
predict's own timings (prefix_s, prefill_s, decode_s: the verification or decode passes).
"""
import random
import resource
import statistics
import time

import sentencepiece
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from bench_encoder import REFERENCE_GFLOPS, dtype_parser, report, timed_build
from bench_llm import transformers, transformers_model
from speechllm.asr import CTCHead
from speechllm.audio import PreprocessorConfig
from speechllm.fastconformer import FastConformerConfig
from speechllm.generate import generate
from speechllm.model import CTCConfig, SpeechLLM, SpeechLLMConfig
from speechllm.precision import matmul_gflops
from speechllm.projector import ProjectorConfig
from speechllm.quant import quantize_int8
from speechllm.qwen2 import Qwen2Config
from speechllm.sentences import complete
from speechllm.tokenizer import TAGS, Tokenizer, train_sentencepiece

try:  # the upstream pipeline: only a benchmark environment has NeMo (and transformers, bench_llm)
    from nemo.collections.asr.modules import AudioToMelSpectrogramPreprocessor, ConformerEncoder
except ImportError:
    ConformerEncoder = None


def byte_tokenizer() -> Tokenizer:
    """A byte-level tokenizer with Qwen's special tokens: enough to build prompts offline."""
    tok = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return Tokenizer(tok)


def ctc_pieces(n: int = 1024) -> bytes:
    """A SentencePiece model of n pieces trained on the synthetic grammar's sentences."""
    rng = random.Random(0)
    return train_sentencepiece([complete(rng)["text"].lower() for _ in range(5000)], n)


def full_size_model(dtype) -> SpeechLLM:
    pre = PreprocessorConfig(window_size=0.025, window_stride=0.01, n_fft=512, features=80, pad_to=0)
    pieces = ctc_pieces()
    n = sentencepiece.SentencePieceProcessor(model_proto=pieces).get_piece_size()  # up to 1024: the grammar's words
    cfg = SpeechLLMConfig(pre, FastConformerConfig(), ProjectorConfig(), Qwen2Config(), ctc=CTCConfig(n))
    with torch.device("meta"):
        model = SpeechLLM(cfg, byte_tokenizer(), pieces)
    model.preprocessor = type(model.preprocessor)(pre)  # real window and filterbank (float32 under any cast)
    model.to(dtype).to_empty(device="cpu")  # allocate the rest once, in the benchmark's dtype
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.02)
        model.ctc = CTCHead(1024, n)
        model.ctc.weight.normal_(std=0.02)
    model.llm.tie_weights()
    for m in model.modules():  # BatchNorm statistics were left uninitialised by to_empty
        if isinstance(m, torch.nn.BatchNorm1d):
            m.reset_running_stats()
    return model.eval()


@torch.inference_mode()
def baseline(model: SpeechLLM, audio, lengths, n: int) -> dict:
    """predict as it was: the whole prompt spliced, generate() keeping (B, N, V) scores."""
    t0 = time.perf_counter()
    embeds, lens = model.embed_audio(audio, lengths, ctc=True)[:2]
    t1 = time.perf_counter()
    x, mask, _ = model.splice(embeds, lens, [model.prompt_ids()])
    stop = model.tag_ids + model.tokenizer.eos_ids
    gen = generate(model.llm, inputs_embeds=x, attention_mask=mask, max_new_tokens=n, eos_ids=stop,
                   pad_id=model.tokenizer.pad_id, return_scores=True)
    ids = gen.tokens[0].tolist()
    at = next((k for k, t in enumerate(ids) if t in stop), len(ids) - 1)
    probs = torch.softmax(gen.scores[0, at][model.tag_ids].float(), -1)
    return {"ids": ids, "probs": dict(zip(TAGS, probs.tolist())), "llm_passes": len(ids) - 1,
            "timings": {"audio_s": t1 - t0, "llm_s": time.perf_counter() - t1}}


def nemo_audio_side(model: SpeechLLM, dtype):
    """NeMo 3.0's preprocessor and ConformerEncoder of the model's configs, holding its tensors."""
    p, e = model.cfg.preprocessor, model.cfg.encoder
    pre = AudioToMelSpectrogramPreprocessor(
        sample_rate=p.sample_rate, window_size=p.window_size, window_stride=p.window_stride, window=p.window,
        n_fft=p.n_fft, features=p.features, normalize=p.normalize, dither=p.dither, pad_to=p.pad_to, log=True,
        frame_splicing=p.frame_splicing, preemph=p.preemph).eval()
    pre.featurizer.window.copy_(model.preprocessor.window)
    pre.featurizer.fb.copy_(model.preprocessor.fb)
    enc = ConformerEncoder(
        feat_in=e.feat_in, n_layers=e.n_layers, d_model=e.d_model, n_heads=e.n_heads, feat_out=-1,
        subsampling="dw_striding", subsampling_factor=e.subsampling_factor,
        subsampling_conv_channels=e.subsampling_conv_channels, ff_expansion_factor=e.ff_expansion_factor,
        self_attention_model="rel_pos", xscaling=e.xscaling, untie_biases=e.untie_biases, pos_emb_max_len=5000,
        conv_kernel_size=e.conv_kernel_size, conv_norm_type=e.conv_norm_type, use_bias=e.use_bias, dropout=0.0,
        dropout_pre_encoder=0.0,
        dropout_emb=0.0, dropout_att=0.0).to(dtype).eval()
    missing, unexpected = enc.load_state_dict(model.encoder.state_dict(), strict=False)
    if unexpected or missing:
        raise RuntimeError(f"NeMo's encoder keys differ from ours: missing {missing}, unexpected {unexpected}")
    return pre, enc


@torch.inference_mode()
def upstream(model: SpeechLLM, nemo, hf, audio, lengths, n: int) -> dict:
    """The same clip through NeMo's preprocessor and encoder, our projector (plain torch, no
    upstream twin), the same prompt splice, and transformers' generate (greedy, scores kept)."""
    pre, enc = nemo
    t0 = time.perf_counter()
    feats, flen = pre(input_signal=audio, length=lengths)
    x, xlen = enc(audio_signal=feats.to(next(enc.parameters()).dtype), length=flen)  # (B, D, T)
    t1 = time.perf_counter()
    embeds, lens = model.projector(x.transpose(1, 2), xlen)
    inputs, mask, _ = model.splice(embeds, lens, [model.prompt_ids()])
    stop = model.tag_ids + model.tokenizer.eos_ids
    t2 = time.perf_counter()
    out = hf.generate(inputs_embeds=inputs, attention_mask=mask.long(), max_new_tokens=n, do_sample=False,
                      eos_token_id=stop, pad_token_id=model.tokenizer.pad_id, output_scores=True,
                      return_dict_in_generate=True)
    ids = out.sequences[0].tolist()
    at = next((k for k, t in enumerate(ids) if t in stop), len(ids) - 1)
    probs = torch.softmax(out.scores[at][0, model.tag_ids].float(), -1)
    return {"ids": ids, "probs": dict(zip(TAGS, probs.tolist())), "llm_passes": len(ids) - 1,
            "timings": {"nemo_audio_s": t1 - t0, "projector_splice_s": t2 - t1,
                        "transformers_generate_s": time.perf_counter() - t2}}


class StageClock:
    """Seconds spent in each named module's forward, from hooks."""

    def __init__(self, modules: dict):
        self.s, self.t0 = {}, {}
        for name, m in modules.items():
            m.register_forward_pre_hook(lambda *_, name=name: self.t0.__setitem__(name, time.perf_counter()))
            m.register_forward_hook(lambda *_, name=name: self.s.__setitem__(name, time.perf_counter() - self.t0[name]))


def timed(fn, runs: int, clock: StageClock) -> dict:
    fn()  # warm-up
    totals, rows = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        r = fn()
        totals.append(time.perf_counter() - t0)
        rows.append({**clock.s, **{k: v for k, v in r["timings"].items() if k != "audio_s"}})
    stages = {k: round(statistics.median(row.get(k, 0.0) for row in rows), 4) for k in rows[0]}
    return {"median_s": round(statistics.median(totals), 3), "runs_s": [round(t, 3) for t in totals],
            "stages_s": stages, "llm_passes": r["llm_passes"], "draft_tokens": r.get("draft_tokens", 0),
            "accepted_tokens": r.get("accepted_tokens", 0), "answer": r}


def bench_clip(model, seconds: float, n: int, runs: int, clock, int8: bool, upstream_side=None) -> dict:
    samples = int(seconds * 16000)
    torch.manual_seed(1)
    audio, lengths = 0.1 * torch.randn(1, samples), torch.tensor([samples])

    def predict(**kw):
        return model.predict(audio, lengths, n, **kw)[0]

    out = {"baseline": timed(lambda: baseline(model, audio, lengths, n), runs, clock)}
    answer = out["baseline"]["answer"]["ids"]  # the plain greedy answer: the perfect draft
    if upstream_side is not None:
        out["upstream"] = timed(lambda: upstream(model, *upstream_side, audio, lengths, n), runs, clock)
        theirs = out["upstream"]["answer"]
        out["upstream_vs_baseline"] = {"same_tokens": theirs["ids"] == answer, "max_tag_prob_diff": round(max(
            abs(theirs["probs"][t] - out["baseline"]["answer"]["probs"][t]) for t in TAGS), 6)}
    wrong = answer[:n // 2] + [model.tokenizer.encode("~")[0]] * (n - n // 2)
    modes = {"greedy": dict(decoding="greedy", prompt_cache=False), "greedy+cache": dict(decoding="greedy"),
             "speculative": dict(drafts=[answer], prompt_cache=False), "speculative+cache": dict(drafts=[answer]),
             "wrong_middle+cache": dict(drafts=[wrong])}
    for name, kw in modes.items():
        out[name] = timed(lambda kw=kw: predict(**kw), runs, clock)
    want = out["baseline"]["answer"]
    same = all(r["answer"]["transcript"] == model.tokenizer.decode(want["ids"][:-1], skip_special_tokens=True).strip()
               and max(abs(r["answer"]["probs"][t] - want["probs"][t]) for t in TAGS) < 1e-3
               for k, r in out.items() if k not in ("baseline", "upstream") and "answer" in r)
    if int8:
        float_probs = out["greedy+cache"]["answer"]["probs"]
        quantize_int8(model.llm)
        out["baseline+int8"] = timed(lambda: baseline(model, audio, lengths, n), runs, clock)
        own = out["baseline+int8"]["answer"]["ids"]  # the int8 model's own greedy answer
        out["greedy+cache+int8"] = timed(lambda: predict(decoding="greedy"), runs, clock)
        out["speculative+cache+int8"] = timed(lambda: predict(drafts=[own]), runs, clock)
        q = out["greedy+cache+int8"]["answer"]["probs"]
        out["int8_vs_float"] = {"max_tag_prob_diff": round(max(abs(q[t] - float_probs[t]) for t in TAGS), 5),
                                "same_transcript": out["greedy+cache+int8"]["answer"]["transcript"]
                                == out["greedy+cache"]["answer"]["transcript"]}
    base, up = out["baseline"]["median_s"], out.get("upstream", {}).get("median_s")
    for k, r in out.items():
        if "median_s" in r:
            r.pop("answer")
            r["speedup_vs_baseline"] = round(base / r["median_s"], 2)
            if up:
                r["speedup_vs_upstream"] = round(up / r["median_s"], 2)
    return {"audio_s": seconds, "same_answer": same, "modes": out}


def run_dtype(args) -> dict:
    dtype, model, build_s = timed_build(args, full_size_model)
    clock = StageClock({"features_s": model.preprocessor, "encoder_s": model.encoder, "ctc_s": model.ctc,
                        "projector_s": model.projector})
    rates = {d: round(matmul_gflops(getattr(torch, d)), 1) for d in ("float32", "bfloat16")}
    side = None
    if args.upstream:
        if ConformerEncoder is None or transformers is None:
            raise SystemExit("error: --upstream needs NeMo and transformers importable (a separate environment)")
        side = (nemo_audio_side(model, dtype), transformers_model(model.llm, model.cfg.llm, dtype))
    clips = []
    for i, s in enumerate(args.seconds):  # int8 last: it replaces the LLM's weights for good
        clips.append(bench_clip(model, s, args.new_tokens, args.runs, clock, args.int8 and i == len(args.seconds) - 1,
                                side))
    return {
        "dtype": args.dtype[0], "threads": torch.get_num_threads(), "new_tokens": args.new_tokens,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1), "build_s": round(build_s, 1),
        "matmul_gflops": rates, "machine_vs_reference": round(rates[args.dtype[0]] / REFERENCE_GFLOPS[args.dtype[0]], 2),
        "clips": clips, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main():
    p = dtype_parser(__doc__)
    p.add_argument("--seconds", nargs="+", type=float, default=[5.0, 20.0])
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--no-int8", dest="int8", action="store_false", help="skip the int8 modes")
    p.add_argument("--upstream", action="store_true",
                   help="also the upstream pipeline on the same weights: NeMo's encoder, transformers' generate")
    args = p.parse_args()
    report(__file__, args, run_dtype, ["--seconds", *map(str, args.seconds), "--new-tokens", str(args.new_tokens)]
           + ([] if args.int8 else ["--no-int8"]) + (["--upstream"] if args.upstream else []),
           {"benchmark": "e2e", "model": "parakeet-0.6b + CTC head + projector + Qwen2.5-0.5B, random weights"})


if __name__ == "__main__":
    main()
