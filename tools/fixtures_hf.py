"""The transformers fixtures: Qwen2 (llm_hf), Qwen3 (qwen3_hf), Qwen3.5 text (qwen3_5_hf) and the
Whisper encoder (whisper_hf), each with the outputs transformers computes from it. Called by
tools/make_fixtures.py, which documents the environment.

Each model is built by transformers from its config, randomised (transformers' own init, std 0.02
and norms at 1, gives a model whose layers are near identity and whose greedy output repeats one
token; a port that skipped a norm or a bias would still match it), saved with save_pretrained,
reloaded from the written directory and run in fp32 with eager attention. A seed is kept only if
the outputs make a sharp test: greedy choices far from ties, generation that never hits an eos,
fp32 rounding well below the tests' tolerances (checked against the same model in float64)."""
import json
import math
import shutil
from pathlib import Path

import torch

from make_fixtures import (CLIP_SAMPLES, SPECIALS, min_margin, probes, read_wav, save_tensors, seed_all,
                           text_of_length, versions, write_json)

PAD = 400  # <|endoftext|>: eos = pad, as in Qwen2.5
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


# ----------------------------------------------------------------------------------------------
# randomisation


@torch.no_grad()
def randomise_qwen(model, emb_std: float, centred_norms: bool = False):
    """Embeddings N(0, emb_std^2) with the rows past the tokenizer's 403 scaled by 0.01 (Qwen's
    spare rows are near zero); matrices N(0, 4/fan_in); biases N(0, 0.1^2); norm weights
    1 + N(0, 0.25^2), or N(0, 0.25^2) for Qwen3.5's zero-centred norms (applied as 1 + w).
    Qwen3.5's DeltaNet: A = exp(A_log) log-uniform in [0.02, 4] (some heads keep their state
    longer than a 64-token chunk), dt_bias N(0, 0.5^2), conv1d N(0, 0.5^2), output norm
    1 + N(0, 0.25^2)."""
    for name, p in model.named_parameters():
        if name.endswith("embed_tokens.weight"):
            p.normal_(0, emb_std)
            p[len(SPECIALS) + 400:] *= 0.01
        elif name.endswith("A_log"):
            p.copy_(torch.empty_like(p).uniform_(math.log(0.02), math.log(4.0)).exp().log())
        elif name.endswith("dt_bias"):
            p.normal_(0, 0.5)
        elif "conv1d" in name:
            p.normal_(0, 0.5)
        elif name.endswith("linear_attn.norm.weight"):  # gated RMSNorm: plain weight
            p.normal_(1.0, 0.25)
        elif "norm" in name:
            p.normal_(0.0 if centred_norms else 1.0, 0.25)
        elif name.endswith(".bias"):
            p.normal_(0, 0.1)
        elif p.dim() == 2:
            p.normal_(0, 2 / math.sqrt(p.shape[1]))
        else:
            raise ValueError(f"no rule for {name} {tuple(p.shape)}")


@torch.no_grad()
def randomise_whisper(model):
    """Matrices N(0, 1/fan_in), the two front-end convs N(0, 4/fan_in) (so the audio term is as
    large as the positions), biases N(0, 0.05^2), LayerNorms 1 + N(0, 0.2^2) / N(0, 0.1^2).
    encoder.embed_positions stays the sinusoid table transformers builds."""
    for name, p in model.named_parameters():
        if name == "encoder.embed_positions.weight":
            continue
        if "layer_norm" in name:
            p.normal_(1.0, 0.2) if name.endswith("weight") else p.normal_(0, 0.1)
        elif name.endswith(".bias"):
            p.normal_(0, 0.05)
        elif "conv" in name:
            p.normal_(0, 2 / math.sqrt(p.shape[1] * p.shape[2]))
        else:
            p.normal_(0, 1 / math.sqrt(p.shape[-1]))


# ----------------------------------------------------------------------------------------------
# shared by the three LLMs


def left_pad(rows):
    """(ids, attention_mask, position_ids) for rows left-padded with PAD; positions count from 0 at
    each row's first token, 1 at pads (what transformers' generate passes)."""
    L = max(map(len, rows))
    ids = torch.tensor([[PAD] * (L - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return ids, mask, pos


def greedy(model, ids, n, mask=None):
    """transformers' greedy generate with the cache: (new ids (B, n), raw logits (n, B, V))."""
    mask = torch.ones_like(ids) if mask is None else mask
    out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=PAD,
                         eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits)


def save_llm(model, directory: Path, tok_dir: Path, legacy: dict | None):
    """save_pretrained, then (for Qwen2/Qwen3) rewrite config.json in the dialect of the published
    repositories: top-level rope_theta, torch_dtype. Copies the tokenizer files beside it."""
    model.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    if legacy is not None:
        (directory / "config.json").write_text(json.dumps(legacy, indent=2, sort_keys=True) + "\n")
    if directory != tok_dir:
        for name in TOKENIZER_FILES:
            shutil.copy(tok_dir / name, directory / name)


def set_generation_config(model):
    g = model.generation_config
    g.bos_token_id, g.eos_token_id, g.pad_token_id = PAD, PAD, PAD
    g.do_sample, g.max_new_tokens = False, 2048


@torch.no_grad()
def llm_reference(model, tok, texts, prompt_text, lengths):
    """batch / single* / gen tensors in the key layout of llm_ref.safetensors, plus the JSON parts."""
    rows = [tok(text_of_length(tok, t, n), add_special_tokens=False)["input_ids"] for t, n in zip(texts, lengths)]
    texts = [tok.decode(r) for r in rows]
    ids, mask, pos = left_pad(rows)
    out = model(ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
    t = {"batch.input_ids": ids, "batch.attention_mask": mask, "batch.position_ids": pos,
         "batch.logits": out.logits, "batch.hidden_states": torch.stack(out.hidden_states)}
    single = []
    for i, r in enumerate(rows):
        x = torch.tensor([r])
        t[f"single{i}.input_ids"], t[f"single{i}.logits"] = x, model(x).logits
        single.append({"length": len(r), "max_abs_diff_vs_batch_upstream":
                       (t[f"single{i}.logits"][0] - out.logits[i, -len(r):]).abs().max().item()})
    prompt = tok.apply_chat_template([{"role": "user", "content": prompt_text}], add_generation_prompt=True,
                                     tokenize=False)
    p = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    new, scores = greedy(model, p, 12)
    full = model(torch.cat([p, new], 1)).logits[0, p.shape[1] - 1:-1]
    t |= {"gen.prompt_ids": p, "gen.new_token_ids": new[0], "gen.sequences": torch.cat([p, new], 1),
          "gen.scores": scores[:, 0]}
    valid = mask.bool()
    meta = {"batch": {"texts": texts, "input_ids": ids.tolist(), "attention_mask": mask.tolist(),
                      "min_top2_logit_margin_valid": min_margin(out.logits[valid])},
            "single": single,
            "generation": {"prompt": prompt, "prompt_ids": p[0].tolist(), "new_token_ids": new[0].tolist(),
                           "new_text": tok.decode(new[0]), "max_new_tokens": 12,
                           "stopped_on_eos": False, "min_top2_logit_margin": min_margin(scores[:, 0]),
                           "max_abs_diff_cached_vs_full_forward_upstream": (full - scores[:, 0]).abs().max().item()}}
    return t, meta


def float64_error(model, *prompts):
    """Largest |fp32 - fp64| of the logits over unpadded prompts (1, L): how much this random model
    amplifies rounding."""
    with torch.no_grad():
        a = [model(ids).logits for ids in prompts]
        b = [model.double()(ids).logits for ids in prompts]
        model.float()
    return max((x.double() - y).abs().max().item() for x, y in zip(a, b))


def common_meta(tok, config_json, directory, model):
    return {"versions": versions(), "hf_dir": directory.name, "weight_files": ["model.safetensors"],
            "saved_dtype": "float32", "compute_dtype": "float32", "attn_implementation": "eager",
            "tokenizer_size": len(tok), "config_vocab_size": model.config.vocab_size,
            "special_token_ids": {s: tok.convert_tokens_to_ids(s) for s in SPECIALS},
            "eos_token_id": PAD, "im_end_id": tok.convert_tokens_to_ids("<|im_end|>"),
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "weight_keys": sorted(k for k in model.state_dict() if k != "lm_head.weight"),
            "config_json": config_json, "tokenizer_probes": probes(tok)}


def pick_seed(base: int, build, accept, tries: int = 20):
    """The first seed from base whose model passes accept(model) -> (ok, why)."""
    for seed in range(base, base + tries):
        seed_all(seed)
        model = build()
        ok, why = accept(model)
        print(f"  seed {seed}: {why}")
        if ok:
            return seed
    raise RuntimeError(f"no seed in {base}..{base + tries - 1} passed")


def legacy_config(model, extra: dict) -> dict:
    """config.json as the published Qwen2.5 / Qwen3 repositories have it (transformers 4.x)."""
    c = model.config
    return {"architectures": [type(model).__name__], "attention_dropout": 0.0, "bos_token_id": PAD,
            "eos_token_id": PAD, "hidden_act": "silu", "hidden_size": c.hidden_size, "initializer_range": 0.02,
            "intermediate_size": c.intermediate_size, "max_position_embeddings": c.max_position_embeddings,
            "max_window_layers": c.num_hidden_layers, "model_type": c.model_type,
            "num_attention_heads": c.num_attention_heads, "num_hidden_layers": c.num_hidden_layers,
            "num_key_value_heads": c.num_key_value_heads, "rms_norm_eps": c.rms_norm_eps, "rope_scaling": None,
            "tie_word_embeddings": True, "torch_dtype": "float32", "transformers_version": versions()["transformers"],
            "use_cache": True, "use_sliding_window": False, "vocab_size": c.vocab_size, **extra}


def qwen_fixture(out: Path, name: str, ref: str, build, legacy, texts, lengths, prompt, seed: int, accept_extra=None):
    """Pick a seed, write <name>/ and <ref>.safetensors/.json for a Qwen2/Qwen3 model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok_dir = out / "llm_hf"
    tok = AutoTokenizer.from_pretrained(tok_dir)

    def accept(model):
        t, meta = llm_reference(model, tok, texts, prompt, lengths)
        new = t["gen.new_token_ids"].tolist()
        m_batch, m_gen = meta["batch"]["min_top2_logit_margin_valid"], meta["generation"]["min_top2_logit_margin"]
        err = float64_error(model, t["single0.input_ids"], t["single1.input_ids"], t["gen.sequences"])
        ok = m_batch > 1e-3 and m_gen > 1e-3 and not {400, 402} & set(new) and err < 2e-5
        why = f"margins {m_batch:.4f}/{m_gen:.4f}, eos in gen {bool({400, 402} & set(new))}, fp64 err {err:.2e}"
        if ok and accept_extra is not None:
            ok, more = accept_extra(model, tok, t)
            why += f", {more}"
        return ok, why

    seed = pick_seed(seed, build, accept)
    seed_all(seed)
    model = build()
    directory = out / name
    save_llm(model, directory, tok_dir, legacy(model))
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()
    t, meta = llm_reference(model, tok, texts, prompt, lengths)
    save_tensors(out / f"{ref}.safetensors", t)
    config_json = json.loads((directory / "config.json").read_text())
    write_json(out / f"{ref}.json", {**meta, "seed": seed, **common_meta(tok, config_json, directory, model)})
    return model, tok, t


# ----------------------------------------------------------------------------------------------
# Qwen2


def rows_stop_property(model, tok, t):
    """tests/test_generate.py makes row 0's third greedy token an eos: it must not occur earlier in
    row 0 nor anywhere in row 1 (the 'hi' prompt) of that left-padded batch."""
    hi = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    ids, mask, _ = left_pad([t["gen.prompt_ids"][0].tolist(), tok(hi, add_special_tokens=False)["input_ids"]])
    free, _ = greedy(model, ids, 6, mask)
    stop = int(free[0, 2])
    ok = stop not in free[0, :2].tolist() and stop not in free[1].tolist()
    return ok, f"stop-at-eos rows ok {ok}"


def make_qwen2(out: Path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    def build():
        config = Qwen2Config(vocab_size=448, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                             tie_word_embeddings=True, bos_token_id=PAD, eos_token_id=PAD, use_sliding_window=False,
                             max_window_layers=2)
        config._attn_implementation = "eager"
        model = Qwen2ForCausalLM(config).eval()
        randomise_qwen(model, emb_std=0.2)
        set_generation_config(model)
        return model

    qwen_fixture(out, "llm_hf", "llm_ref", build,
                 lambda m: legacy_config(m, {"rope_theta": 1e6, "sliding_window": 512}),
                 ["The small model reads a short sentence about speech.", "Hello there, friend!"], [24, 14],
                 "say something about the weather", seed=1000, accept_extra=rows_stop_property)


# ----------------------------------------------------------------------------------------------
# Qwen3


def make_qwen3(out: Path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    def build():
        config = Qwen3Config(vocab_size=448, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                             rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                             attention_bias=False, tie_word_embeddings=True, bos_token_id=PAD, eos_token_id=PAD,
                             use_sliding_window=False, max_window_layers=2)
        config._attn_implementation = "eager"
        model = Qwen3ForCausalLM(config).eval()
        randomise_qwen(model, emb_std=0.5)
        set_generation_config(model)
        return model

    qwen_fixture(out, "qwen3_hf", "qwen3_ref", build,
                 lambda m: legacy_config(m, {"rope_theta": 1000000, "sliding_window": None, "head_dim": 16,
                                             "attention_bias": False}),
                 ["Each query head is normalised first.", "Short one, ok?"], [27, 9],
                 "name three colours of the sky", seed=2000)


# ----------------------------------------------------------------------------------------------
# Qwen3.5 text: 3 Gated DeltaNet layers + 1 gated full-attention layer

LONG_TEXT = ("The gated delta rule keeps a small state for each head and updates it token by token; every "
             "fourth layer still attends to the whole context, so nothing said early is lost.")


@torch.no_grad()
def qwen3_5_extra(model, tok, t):
    """long (89 tokens: two 64-token DeltaNet chunks) and longbatch (single1 left-padded by 73, so
    its padding fills the whole first chunk)."""
    long = torch.tensor([tok(text_of_length(tok, LONG_TEXT, 89), add_special_tokens=False)["input_ids"]])
    out = model(long, output_hidden_states=True)
    new, scores = greedy(model, long, 12)
    ids, mask, pos = left_pad([long[0].tolist(), t["single1.input_ids"][0].tolist()])
    tail = model(ids, attention_mask=mask, position_ids=pos).logits[:, -16:]
    x = {"long.input_ids": long, "long.logits": out.logits, "long.hidden_states": torch.stack(out.hidden_states),
         "long.gen_new_token_ids": new[0], "long.gen_scores": scores[:, 0],
         "longbatch.input_ids": ids, "longbatch.attention_mask": mask, "longbatch.position_ids": pos,
         "longbatch.tail_logits": tail}
    meta = {"text": tok.decode(long[0]), "num_tokens": 89, "num_chunks": 2, "input_ids": long[0].tolist(),
            "min_top2_logit_margin": min_margin(out.logits), "gen_min_top2_logit_margin": min_margin(scores),
            "gen_new_token_ids": new[0].tolist(), "logits_std_over_positions": out.logits[0].std(0).mean().item(),
            "distinct_argmax": len(set(out.logits[0].argmax(-1).tolist()))}
    return x, meta


@torch.no_grad()
def chunked_prefill_spread(model, ids, full):
    """transformers' chunked prefill of 73 tokens, then 16 recurrent steps with the cache, vs one
    chunked forward: max |logits difference|."""
    out = model(ids[:, :73], use_cache=True)
    steps, cache = [out.logits], out.past_key_values
    for i in range(73, ids.shape[1]):
        out = model(ids[:, i:i + 1], past_key_values=cache, use_cache=True)
        steps.append(out.logits)
        cache = out.past_key_values
    return (torch.cat(steps, 1) - full).abs().max().item()


@torch.no_grad()
def bf16_error(model, ids, logits):
    """max |bf16 model logits - fp32 logits|: the tests bound it (2.5 for Qwen3.5)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    err = (model.to(torch.bfloat16)(ids).logits.float() - logits).abs().max().item()
    model.float().load_state_dict(state)
    return err


def make_qwen3_5(out: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3_5ForCausalLM, Qwen3_5TextConfig

    tok_dir = out / "llm_hf"
    tok = AutoTokenizer.from_pretrained(tok_dir)
    layer_types = ["linear_attention"] * 3 + ["full_attention"]

    def build():
        config = Qwen3_5TextConfig(
            vocab_size=448, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=4096, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                             "mrope_section": [2, 1, 1], "mrope_interleaved": True},
            linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
            linear_num_value_heads=4, layer_types=layer_types, tie_word_embeddings=True, bos_token_id=PAD,
            eos_token_id=PAD)
        config._attn_implementation = "eager"
        model = Qwen3_5ForCausalLM(config).eval()
        # emb_std 0.3: logits of std ~2.5. At 0.5 this model amplifies fp32 rounding (the chunked delta
        # rule sums in another order than a port does) to ~1e-4, the tests' tolerance.
        randomise_qwen(model, emb_std=0.3, centred_norms=True)
        set_generation_config(model)
        return model

    texts, lengths = ["Linear and full layers mix here.", "Delta rule, gated!"], [20, 16]
    prompt = "what does a linear layer remember?"

    def accept(model):
        t, meta = llm_reference(model, tok, texts, prompt, lengths)
        x, long = qwen3_5_extra(model, tok, t)
        margins = [meta["batch"]["min_top2_logit_margin_valid"], meta["generation"]["min_top2_logit_margin"],
                   long["min_top2_logit_margin"], long["gen_min_top2_logit_margin"]]
        gen = set(t["gen.new_token_ids"].tolist()) | set(long["gen_new_token_ids"])
        # The DeltaNet kernels compute in fp32 whatever the model dtype, so a float64 run says little;
        # transformers' own disagreement between two summation orders does: a left-padded row vs the
        # row alone, cached generation vs one full forward. The tests allow 1e-4 (2.5e-4 long).
        spread = max(max(s["max_abs_diff_vs_batch_upstream"] for s in meta["single"]),
                     meta["generation"]["max_abs_diff_cached_vs_full_forward_upstream"])
        prefill = chunked_prefill_spread(model, x["long.input_ids"], x["long.logits"])
        bf16 = bf16_error(model, t["single0.input_ids"], t["single0.logits"])
        ok = min(margins) > 2e-3 and not {400, 402} & gen and max(spread, prefill) < 4e-5 and bf16 < 1.25
        return ok, (f"margins {', '.join(f'{m:.4f}' for m in margins)}, eos in gen {bool({400, 402} & gen)}, "
                    f"upstream spread {spread:.2e}, prefill 73 + 16 steps vs full {prefill:.2e}, bf16 {bf16:.2f}")

    seed = pick_seed(3000, build, accept)
    seed_all(seed)
    directory = out / "qwen3_5_hf"
    save_llm(build(), directory, tok_dir, None)  # config.json as transformers 5 writes it
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()
    t, meta = llm_reference(model, tok, texts, prompt, lengths)
    x, long = qwen3_5_extra(model, tok, t)
    save_tensors(out / "qwen3_5_ref.safetensors", t | x)
    config_json = json.loads((directory / "config.json").read_text())
    write_json(out / "qwen3_5_ref.json", {
        **meta, "seed": seed, **common_meta(tok, config_json, directory, model), "layer_types": layer_types,
        "long": long, "longbatch": {"rows": ["long.input_ids", "single1.input_ids left-padded to the long length"],
                                    "num_left_pad_row1": 73, "tail_positions": [73, 89]},
        "deltanet_kernels": "transformers' torch_chunk_gated_delta_rule / torch_recurrent_gated_delta_rule "
                            "(flash-linear-attention and causal-conv1d not installed)"})


# ----------------------------------------------------------------------------------------------
# Whisper encoder


def make_whisper(out: Path):
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    config = WhisperConfig(vocab_size=32, num_mel_bins=80, d_model=64, encoder_layers=2, encoder_attention_heads=4,
                           encoder_ffn_dim=128, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=32,
                           max_source_positions=1500, max_target_positions=16, bos_token_id=29,
                           decoder_start_token_id=29, eos_token_id=30, pad_token_id=31, suppress_tokens=None,
                           begin_suppress_tokens=None, apply_spec_augment=False, scale_embedding=False)
    config._attn_implementation = "eager"
    seed = 4000
    seed_all(seed)
    model = WhisperModel(config).eval()
    randomise_whisper(model)
    directory = out / "whisper_hf"
    model.save_pretrained(directory)
    fe = WhisperFeatureExtractor(feature_size=80, sampling_rate=16000, hop_length=160, chunk_length=30, n_fft=400,
                                 padding_value=0.0, dither=0.0, return_attention_mask=False)
    fe.save_pretrained(directory)
    model = WhisperModel.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()
    fe = WhisperFeatureExtractor.from_pretrained(directory)
    encoder = model.encoder
    raw = {}
    for j, layer in enumerate(encoder.layers):  # each layer's own output (hidden_states[-1] is after the final norm)
        layer.register_forward_hook(lambda m, a, o, j=j: raw.__setitem__(j, o[0] if isinstance(o, tuple) else o))
    names = list(CLIP_SAMPLES)
    clips = [read_wav(out / name) for name in names]
    t = {"mel_filters": torch.from_numpy(fe.mel_filters).float()}
    meta_clips, single = [], []
    with torch.inference_mode():
        for i, clip in enumerate(clips):
            feats = fe(clip, sampling_rate=16000, return_tensors="pt").input_features  # (1, 80, 3000)
            tail = feats[0, 0, -1]
            assert (feats[..., 256:] == tail).all(), "a clip reaches past mel frame 256"
            enc = encoder(feats, output_hidden_states=True)
            t |= {f"single{i}.input_features_head": feats[..., :256], f"single{i}.input_features_tail_value": tail,
                  f"single{i}.embeds": enc.hidden_states[0][:, :128],
                  **{f"single{i}.layer{j}": raw[j][:, :128] for j in raw},
                  f"single{i}.encoder_output": enc.last_hidden_state[:, :128]}
            n = len(clip)
            meta_clips.append({"file": names[i], "num_samples": n, "duration_s": n / 16000,
                               "encoder_frames_covering_audio": math.ceil(n / 320),
                               "mel_frames_covering_audio": math.ceil(n / 160)})
            single.append({"features_max": feats.max().item(), "features_tail_value": tail.item()})
        feats = fe(clips, sampling_rate=16000, return_tensors="pt").input_features
        batch = encoder(feats).last_hidden_state
    t |= {"batch.encoder_output": batch[:, :128], "batch.num_samples": torch.tensor([len(c) for c in clips]),
          "batch.encoder_frames_covering_audio": torch.tensor([math.ceil(len(c) / 320) for c in clips])}
    save_tensors(out / "whisper_ref.safetensors", t)
    write_json(out / "whisper_ref.json", {
        "versions": versions(), "seed": seed, "hf_dir": directory.name, "checkpoint_class": "WhisperModel",
        "reference_class": "WhisperModel(.encoder) + WhisperFeatureExtractor, both from_pretrained(whisper_hf)",
        "saved_dtype": "float32", "compute_dtype": "float32", "attn_implementation": "eager",
        "config_json": json.loads((directory / "config.json").read_text()),
        "preprocessor_config": json.loads((directory / "preprocessor_config.json").read_text()),
        "weight_keys": sorted(model.state_dict()), "clips": meta_clips, "single": single,
        "stored_encoder_frames": 128, "stored_mel_frames": 256,
        "num_parameters_encoder": sum(p.numel() for p in encoder.parameters()),
        "batch_vs_single_encoder_output": max((batch[i, :128] - t[f"single{i}.encoder_output"][0]).abs().max().item()
                                              for i in range(2)),
        "notes": ["The extractor pads every clip with zeros to 30 s before the STFT; the encoder ran on all 1500 "
                  "frames, of which the first 128 are stored. Frames 256.. of the log-mel all equal the tail value."]})
