"""Qwen3.5 text model against transformers 5.23 fixtures, plus kernels, caching, loading variants and
errors. Run: python -m pytest -q tests/test_qwen3_5.py"""
import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import max_diff, write_hf_dir
from speechllm.generate import generate
from speechllm.qwen3_5 import (Qwen3_5Cache, Qwen3_5Config, Qwen3_5ForCausalLM, Qwen3_5RMSNorm,
                               Qwen3_5RMSNormGated, chunk_gated_delta_rule, partial_rope,
                               recurrent_gated_delta_rule)

# fp32 vs the fixture. Each of our blocks matches transformers' to 1-2 ulp given the same input,
# but the random model amplifies rounding: transformers 5.23 itself, rerun on this machine, is
# 7e-5 (batch), 1.25e-4 (long logits) and 1.6e-4 (gen scores) away from its own fixture, and
# fp32 is 3e-4 from float64 on the long prompt. Measured here: batch 6.4e-5, long 1.2e-4.
TOL = 1e-4  # batch, unpadded rows, longbatch tail
TOL_LONG = 2.5e-4  # the 89-token prompt and generation scores
REL_HIDDEN = 1e-5  # hidden states (max |h| ~ 45): max error / max |h|; measured 5e-6


@pytest.fixture(scope="module")
def ref(fixtures):
    return load_file(fixtures / "qwen3_5_ref.safetensors")


@pytest.fixture(scope="module")
def model(fixtures):
    return Qwen3_5ForCausalLM.from_pretrained(fixtures / "qwen3_5_hf")


@pytest.fixture(scope="module")
def hf_config(fixtures):
    return json.loads((fixtures / "qwen3_5_hf" / "config.json").read_text())


@pytest.fixture(scope="module")
def hf_weights(fixtures):
    return load_file(fixtures / "qwen3_5_hf" / "model.safetensors")


def assert_hidden_close(ours, theirs):
    assert len(ours) == len(theirs) == 5  # embeddings, 3 linear + 1 full layer outputs (last normed)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert max_diff(a, b) <= REL_HIDDEN * b.abs().max().item(), f"hidden state {i}"


@torch.no_grad()
def single_logits(model, ref):
    return model(ref["long.input_ids"][:, :40])


# ---------------------------------------------------------------------------------------------
# Parity with transformers


@torch.no_grad()
def test_left_padded_batch_logits_and_hidden_states(model, ref):
    valid = ref["batch.attention_mask"].bool()
    logits, hidden = model(ref["batch.input_ids"], attention_mask=ref["batch.attention_mask"],
                           position_ids=ref["batch.position_ids"], output_hidden_states=True)
    assert logits.shape == ref["batch.logits"].shape
    assert max_diff(logits[valid], ref["batch.logits"][valid]) < TOL
    assert torch.equal(logits[valid].argmax(-1), ref["batch.logits"][valid].argmax(-1))  # margin .08
    assert_hidden_close([h[valid] for h in hidden], [h[valid] for h in ref["batch.hidden_states"]])


@torch.no_grad()
def test_unpadded_rows(model, ref):
    for key in ("single0", "single1"):
        assert max_diff(model(ref[f"{key}.input_ids"]), ref[f"{key}.logits"]) < TOL


@torch.no_grad()
def test_long_prompt_over_two_chunks(model, ref):
    logits, hidden = model(ref["long.input_ids"], output_hidden_states=True)
    assert max_diff(logits, ref["long.logits"]) < TOL_LONG
    assert torch.equal(logits.argmax(-1), ref["long.logits"].argmax(-1))  # smallest margin 0.0089
    assert_hidden_close(hidden, ref["long.hidden_states"])


@torch.no_grad()
def test_longbatch_padding_fills_a_whole_chunk(model, ref):
    # Row 1 has 73 pads: the first chunk is all padding, which must leave its state at zero.
    logits = model(ref["longbatch.input_ids"], attention_mask=ref["longbatch.attention_mask"],
                   position_ids=ref["longbatch.position_ids"], logits_to_keep=16)
    assert max_diff(logits, ref["longbatch.tail_logits"]) < TOL


@pytest.mark.parametrize("prompt, new_ids, scores", [
    ("gen.prompt_ids", "gen.new_token_ids", "gen.scores"),
    ("long.input_ids", "long.gen_new_token_ids", "long.gen_scores"),  # chunked prefill + steps
])
def test_greedy_generation_matches_transformers(model, ref, prompt, new_ids, scores):
    out = generate(model, ref[prompt], max_new_tokens=12, return_scores=True)
    assert torch.equal(out.tokens[0], ref[new_ids])
    assert out.scores.shape == (1, 12, 448) and out.scores.dtype == torch.float32
    assert max_diff(out.scores[0], ref[scores]) < TOL_LONG  # measured 1.2e-4 / 6.0e-5


# ---------------------------------------------------------------------------------------------
# Cache, padding, kernels


@torch.no_grad()
def test_cached_decoding_matches_full_forward(model, ref):
    # Chunked prefill of 73 tokens, then 16 recurrent steps (transformers' own: 5.1e-5; ours 7.5e-5).
    ids = ref["long.input_ids"]
    full = model(ids)
    cache = model.new_cache(1, 89)
    assert isinstance(cache, Qwen3_5Cache) and cache.state.dtype == torch.float32
    steps = [model(ids[:, :73], cache=cache)] + [model(ids[:, t:t + 1], cache=cache)
                                                 for t in range(73, 89)]
    assert cache.length == 89
    assert max_diff(torch.cat(steps, 1), full) < 1.5e-4
    # Two multi-token pieces: the second starts from the carried conv window and state.
    cache.reset()
    pieces = torch.cat([model(ids[:, :50], cache=cache), model(ids[:, 50:], cache=cache)], 1)
    assert max_diff(pieces, full) < 1.5e-4


@torch.no_grad()
def test_cached_decoding_left_padded_batch(model, ref):
    ids, mask, pos = ref["batch.input_ids"], ref["batch.attention_mask"], ref["batch.position_ids"]
    valid = mask.bool()
    cache = model.new_cache(2, 20)
    steps = [model(ids[:, :12], attention_mask=mask[:, :12], position_ids=pos[:, :12], cache=cache)]
    for t in range(12, 20):
        steps.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1],
                           position_ids=pos[:, t:t + 1], cache=cache))
    assert max_diff(torch.cat(steps, 1)[valid], ref["batch.logits"][valid]) < TOL


@torch.no_grad()
def test_padding_leaves_the_state_of_each_row_alone(model, ref):
    # Row 1 of the batch, padded, ends in the same DeltaNet state and conv window as alone;
    # row 0 is untouched by row 1 (no leak across rows).
    batch = model.new_cache(2, 20)
    model(ref["batch.input_ids"], attention_mask=ref["batch.attention_mask"],
          position_ids=ref["batch.position_ids"], cache=batch)
    for row in (0, 1):
        alone = model.new_cache(1, 20)
        model(ref[f"single{row}.input_ids"], cache=alone)
        for ours, want in ((batch.state[:, row], alone.state[:, 0]),
                           (batch.conv[:, row], alone.conv[:, 0])):
            assert max_diff(ours, want) < 1e-5 * want.abs().max().item()  # measured 1.2e-6
    assert batch.state.abs().max() > 0.1  # the state is not trivially empty


def test_left_padded_generation_equals_rows_alone(model, ref):
    ids, mask = ref["batch.input_ids"], ref["batch.attention_mask"]
    batch = generate(model, ids, attention_mask=mask, max_new_tokens=6, return_scores=True)
    for row in (0, 1):
        alone = generate(model, ref[f"single{row}.input_ids"], max_new_tokens=6, return_scores=True)
        assert torch.equal(batch.tokens[row], alone.tokens[0])
        assert max_diff(batch.scores[row], alone.scores[0]) < TOL


def delta_rule_float64(q, k, v, g, beta, state):
    """The gated delta rule written from its definition, token by token, in float64."""
    q, k, v, g, beta, S = (t.double() for t in (q, k, v, g, beta, state))
    out = torch.zeros_like(v)
    for t in range(k.shape[2]):
        S = torch.exp(g[:, :, t])[..., None, None] * S
        k_t, v_t = k[:, :, t], v[:, :, t]
        pred = torch.einsum("bhkv,bhk->bhv", S, k_t)
        S = S + torch.einsum("bhk,bhv->bhkv", k_t, beta[:, :, t, None] * (v_t - pred))
        out[:, :, t] = torch.einsum("bhkv,bhk->bhv", S, q[:, :, t])
    return out, S


def test_delta_rule_kernels_against_float64():
    # 70 tokens: one full chunk plus a padded one; a non-zero initial state; strong and weak decay.
    torch.manual_seed(0)
    B, H, L, Dk, Dv = 2, 3, 70, 8, 5
    k = torch.nn.functional.normalize(torch.randn(B, H, L, Dk), dim=-1)
    q = torch.nn.functional.normalize(torch.randn(B, H, L, Dk), dim=-1) * Dk ** -0.5
    v, state = torch.randn(B, H, L, Dv), torch.randn(B, H, Dk, Dv)
    g = -torch.rand(B, H, L) * torch.tensor([0.01, 0.5, 3.0])[:, None]
    beta = torch.rand(B, H, L)
    want, want_state = delta_rule_float64(q, k, v, g, beta, state)
    for rule in (chunk_gated_delta_rule, recurrent_gated_delta_rule):
        out, new_state = rule(q, k, v, g, beta, state)
        assert out.shape == (B, H, L, Dv) and new_state.shape == state.shape
        assert max_diff(out, want) < 1e-5 and max_diff(new_state, want_state) < 1e-5, rule
    out, _ = chunk_gated_delta_rule(q, k, v, g, beta, state, chunk=16)  # 5 chunks
    assert max_diff(out, want) < 1e-5


def test_norms_and_partial_rope():
    x = torch.randn(4, 32).bfloat16()
    w = torch.randn(32).bfloat16() * 0.25
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    norm = Qwen3_5RMSNorm(32, 1e-6).bfloat16()
    norm.weight.data = w
    # zero-centred, and the multiply is fp32 BEFORE the cast (Qwen2 casts first)
    assert torch.equal(norm(x), (normed * (1 + w.float())).bfloat16())
    assert not torch.equal(norm(x), (1 + w) * normed.bfloat16())
    gated = Qwen3_5RMSNormGated(32, 1e-6).bfloat16()
    gated.weight.data = 1 + w
    z = torch.randn(4, 32).bfloat16()
    want = ((1 + w) * normed.bfloat16() * torch.nn.functional.silu(z.float())).bfloat16()
    assert torch.equal(gated(x, z), want)
    # RoPE touches only the first rotary dims
    q = torch.randn(1, 2, 3, 32)
    cos, sin = torch.rand(1, 3, 8), torch.rand(1, 3, 8)
    out = partial_rope(q, cos, sin)
    assert torch.equal(out[..., 8:], q[..., 8:]) and not torch.equal(out[..., :8], q[..., :8])


@torch.no_grad()
def test_inputs_embeds_and_cache_reset(model, ref):
    ids = ref["single0.input_ids"]
    assert torch.equal(model(inputs_embeds=model.model.embed_tokens(ids)), model(ids))
    with pytest.raises(ValueError, match="exactly one"):
        model(ids, inputs_embeds=model.model.embed_tokens(ids))
    cache = model.new_cache(1, 20)
    first = model(ids, cache=cache)
    with pytest.raises(ValueError, match="overflow"):
        model(ids[:, :1], cache=cache)
    cache.reset()
    assert cache.state.abs().max() == 0 and torch.equal(model(ids, cache=cache), first)


@torch.no_grad()
def test_bf16_close_to_fp32(fixtures, ref):
    # Rounding only the weights to bf16 moves these logits (std 4) by 0.55 max / 0.07 mean: the
    # random model amplifies. Full bf16 compute: 1.27 / 0.145, bit-identical to transformers 5.23
    # in bf16 on this machine (checked once outside the test suite; transformers is not a dep).
    model = Qwen3_5ForCausalLM.from_pretrained(fixtures / "qwen3_5_hf", dtype=torch.bfloat16)
    logits = model(ref["single0.input_ids"])
    assert logits.dtype == torch.bfloat16
    err = (logits.float() - ref["single0.logits"]).abs()
    assert err.max() < 2.5 and err.mean() < 0.3
    cache = model.new_cache(1, 4)
    assert cache.conv.dtype == torch.bfloat16 and cache.state.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Config


def test_config_from_fixture(hf_config):
    c = Qwen3_5Config.from_hf(hf_config)
    assert c.layer_types == ("linear_attention",) * 3 + ("full_attention",)
    assert (c.head_dim, c.rotary_dim, c.conv_dim, c.rope_theta) == (32, 8, 128, 1e7)
    assert (c.linear_num_key_heads, c.linear_num_value_heads, c.tie_word_embeddings) == (2, 4, True)
    assert Qwen3_5Config.from_hf(json.loads(json.dumps(c.to_hf()))) == c
    assert Qwen3_5Config().layer_types[:4] == c.layer_types  # default: every 4th layer is full
    # The older dialect: top-level rope fields (an int theta), full_attention_interval, torch_dtype.
    old = {k: v for k, v in hf_config.items() if k not in ("rope_parameters", "layer_types", "dtype")}
    old |= {"rope_theta": 10000000, "partial_rotary_factor": 0.25, "full_attention_interval": 4,
            "torch_dtype": "float32", "mrope_section": [2, 1, 1]}
    assert Qwen3_5Config.from_hf(old) == c
    with pytest.raises(TypeError):
        Qwen3_5Config(num_experts=4)


def multimodal_config(hf_config, **top):
    text = {k: v for k, v in hf_config.items() if k not in ("architectures", "tie_word_embeddings")}
    return {"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5",
            "text_config": text, "vision_config": {"depth": 2, "hidden_size": 16},
            "image_token_id": 440, "tie_word_embeddings": True, **top}


def test_multimodal_config_reads_text_config(hf_config):
    assert Qwen3_5Config.from_hf(multimodal_config(hf_config)) == Qwen3_5Config.from_hf(hf_config)
    untied = Qwen3_5Config.from_hf(multimodal_config(hf_config, tie_word_embeddings=False))
    assert not untied.tie_word_embeddings


@pytest.mark.parametrize("change, field", [
    ({"model_type": "qwen3_5_moe_text"}, "qwen3_5_moe_text"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e7, "factor": 4.0}}, "rope_parameters"),
    ({"layer_types": ["linear_attention", "sliding_attention"] * 2}, "sliding_attention"),
    ({"layer_types": ["linear_attention"] * 3}, "layer_types"),
    ({"attn_output_gate": False}, "attn_output_gate"),
    ({"num_experts": 8}, "num_experts"),
    ({"linear_num_value_heads": 3}, "linear_num_value_heads"),
])
def test_config_refuses_unsupported_variants(tmp_path, hf_config, change, field):
    write_hf_dir(tmp_path, hf_config | change, None)
    with pytest.raises(ValueError, match=field):
        Qwen3_5ForCausalLM.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------
# Loading variants, built in tmp_path from the fixture


def multimodal_weights(hf_weights):
    weights = {k.replace("model.", "model.language_model.", 1): v for k, v in hf_weights.items()}
    return weights | {"model.visual.x": torch.ones(3, 2), "mtp.fc.weight": torch.ones(2, 2)}


def test_multimodal_layout(tmp_path, model, ref, hf_config, hf_weights, caplog):
    write_hf_dir(tmp_path, multimodal_config(hf_config), multimodal_weights(hf_weights))
    with caplog.at_level(logging.INFO, logger="speechllm.qwen3_5"):
        loaded = Qwen3_5ForCausalLM.from_pretrained(tmp_path)
    assert "skipped 2 tensors" in caplog.text and "model.visual.x" in caplog.text
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(single_logits(loaded, ref), single_logits(model, ref))


def test_save_pretrained_round_trip(tmp_path, model, ref):
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "qwen3_5_text"
    assert config["architectures"] == ["Qwen3_5ForCausalLM"] and config["dtype"] == "float32"
    assert config["rope_parameters"]["partial_rotary_factor"] == 0.25
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert "lm_head.weight" not in f.keys() and len(f.keys()) == 55
    loaded = Qwen3_5ForCausalLM.from_pretrained(tmp_path)
    assert loaded.generation_config == model.generation_config
    assert torch.equal(single_logits(loaded, ref), single_logits(model, ref))


@torch.no_grad()
def test_grow_vocab_keeps_old_logits(fixtures, ref):
    model = Qwen3_5ForCausalLM.from_pretrained(fixtures / "qwen3_5_hf")
    before = single_logits(model, ref)
    model.grow_vocab(450)
    assert model.config.vocab_size == 450 and model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(single_logits(model, ref)[..., :448], before)


# ---------------------------------------------------------------------------------------------
# Errors


def test_missing_config_and_unsupported_architecture(tmp_path, hf_config):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Qwen3_5ForCausalLM.from_pretrained(tmp_path)
    write_hf_dir(tmp_path, hf_config | {"architectures": ["Qwen3NextForCausalLM"]}, None)
    with pytest.raises(ValueError, match="Qwen3NextForCausalLM"):
        Qwen3_5ForCausalLM.from_pretrained(tmp_path)


def test_misfitting_tensors_are_named(tmp_path, hf_config, hf_weights):
    weights = multimodal_weights(hf_weights)
    del weights["model.language_model.layers.3.self_attn.q_norm.weight"]
    weights["model.language_model.layers.0.linear_attn.in_proj_a.weight"] = torch.zeros(2, 64)
    weights["model.language_model.layers.4.mlp.up_proj.weight"] = torch.zeros(1)
    weights["vision_tower.x"] = torch.zeros(1)
    write_hf_dir(tmp_path, multimodal_config(hf_config), weights)
    with pytest.raises(ValueError) as err:
        Qwen3_5ForCausalLM.from_pretrained(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "Qwen3.5" in message
    for name in ("missing from the checkpoint", "layers.3.self_attn.q_norm.weight",
                 "tensors the model does not have", "model.language_model.layers.4.mlp.up_proj.weight",
                 "vision_tower.x", "model.language_model.layers.0.linear_attn.in_proj_a.weight: checkpoint "
                 "(2, 64) vs model (4, 64)"):
        assert name in message
    assert "model.visual.x" not in message  # skipped on purpose, not an error
