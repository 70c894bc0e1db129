"""Qwen2 against transformers 5.23 fixtures, plus loading variants and errors.
Run: python -m pytest -q tests/test_qwen2.py"""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import max_diff, write_hf_dir
from speechllm.qwen2 import KVCache, Qwen2Config, Qwen2ForCausalLM, RMSNorm, rope_cos_sin

TOL = 1e-4  # fp32 vs transformers (eager attention): measured ~1e-5


@pytest.fixture(scope="module")
def hf_config(fixtures):
    return json.loads((fixtures / "llm_hf" / "config.json").read_text())


@pytest.fixture(scope="module")
def hf_weights(fixtures):
    return load_file(fixtures / "llm_hf" / "model.safetensors")


@torch.no_grad()
def single_logits(llm, llm_ref):
    return llm(llm_ref["single0.input_ids"])


# ---------------------------------------------------------------------------------------------
# Parity


@torch.no_grad()
def test_left_padded_batch_logits_and_hidden_states(llm, llm_ref):
    valid = llm_ref["batch.attention_mask"].bool()
    logits, hidden = llm(llm_ref["batch.input_ids"], attention_mask=llm_ref["batch.attention_mask"],
                           position_ids=llm_ref["batch.position_ids"], output_hidden_states=True)
    assert logits.shape == llm_ref["batch.logits"].shape
    assert max_diff(logits[valid], llm_ref["batch.logits"][valid]) < TOL
    # The smallest top-2 margin is 0.01, so every greedy choice must agree.
    assert torch.equal(logits[valid].argmax(-1), llm_ref["batch.logits"][valid].argmax(-1))
    assert len(hidden) == llm.config.num_hidden_layers + 1 == llm_ref["batch.hidden_states"].shape[0]
    for ours, theirs in zip(hidden, llm_ref["batch.hidden_states"]):
        assert max_diff(ours[valid], theirs[valid]) < TOL


@torch.no_grad()
def test_unpadded_rows(llm, llm_ref):
    for key in ("single0", "single1"):
        assert max_diff(llm(llm_ref[f"{key}.input_ids"]), llm_ref[f"{key}.logits"]) < TOL


@torch.no_grad()
def test_default_positions_with_left_padding_are_shift_invariant(llm, llm_ref):
    # Without position_ids row 1's tokens sit at positions 10..23; RoPE only sees offsets, so the
    # logits equal the unpadded ones up to rounding of the different absolute angles.
    logits = llm(llm_ref["batch.input_ids"], attention_mask=llm_ref["batch.attention_mask"])
    assert max_diff(logits[1, 10:], llm_ref["single1.logits"][0]) < TOL


@torch.no_grad()
def test_inputs_embeds_equal_input_ids(llm, llm_ref):
    ids = llm_ref["single0.input_ids"]
    assert torch.equal(llm(inputs_embeds=llm.model.embed_tokens(ids)), llm(ids))
    with pytest.raises(ValueError, match="exactly one"):
        llm(ids, inputs_embeds=llm.model.embed_tokens(ids))


@torch.no_grad()
def test_cached_decoding_matches_full_forward(llm, llm_ref):
    ids, mask, pos = llm_ref["batch.input_ids"], llm_ref["batch.attention_mask"], llm_ref["batch.position_ids"]
    full = llm(ids, attention_mask=mask, position_ids=pos)
    cache = KVCache(llm.config, batch_size=2, max_len=24)
    steps = [llm(ids[:, :16], attention_mask=mask[:, :16], position_ids=pos[:, :16], cache=cache)]
    for t in range(16, 24):
        steps.append(llm(ids[:, t:t + 1], attention_mask=mask[:, :t + 1],
                           position_ids=pos[:, t:t + 1], cache=cache))
    cached = torch.cat(steps, dim=1)
    valid = mask.bool()
    assert cache.length == 24
    # Different kernels (SDPA on 1 query vs 24) round differently: transformers' own cached vs
    # full difference on this batch is 6e-6, ours 8e-6.
    assert max_diff(cached[valid], full[valid]) < 5e-5
    assert max_diff(cached[valid], llm_ref["batch.logits"][valid]) < TOL


@torch.no_grad()
def test_chunked_prefill_without_mask(llm, llm_ref):
    # A second multi-token chunk on top of a cache needs the offset causal mask (tril(past)).
    ids = llm_ref["single0.input_ids"]
    cache = KVCache(llm.config, batch_size=1, max_len=30)
    logits = torch.cat([llm(ids[:, :10], cache=cache), llm(ids[:, 10:], cache=cache)], dim=1)
    assert max_diff(logits, llm_ref["single0.logits"]) < TOL


@torch.no_grad()
def test_kv_cache_overflow_and_reset(llm, llm_ref):
    ids = llm_ref["single0.input_ids"]
    cache = KVCache(llm.config, batch_size=1, max_len=24)
    first = llm(ids, cache=cache)
    with pytest.raises(ValueError, match="overflow"):
        llm(ids[:, :1], cache=cache)
    cache.reset()
    assert torch.equal(llm(ids, cache=cache), first)


@torch.no_grad()
def test_bf16_close_to_fp32(fixtures, llm_ref):
    # bf16 keeps 8 significant bits (relative step 2^-8). On this fixture, rounding only the
    # weights to bf16 (computing in fp32) already moves logits by up to 0.21 (logit std 1.5), and
    # bf16 activations are rounded again after each of ~10 matmuls: measured 0.28 max / 0.03 mean.
    # 0.5 / 0.06 leaves 2x headroom; real bugs (RoPE, mask, norm order) move logits by O(1).
    llm = Qwen2ForCausalLM.from_pretrained(fixtures / "llm_hf", dtype=torch.bfloat16)
    assert llm.lm_head.weight.dtype == torch.bfloat16
    logits = llm(llm_ref["single0.input_ids"])
    assert logits.dtype == torch.bfloat16  # transformers >= 4.46 keeps logits in the model dtype
    err = (logits.float() - llm_ref["single0.logits"]).abs()
    assert err.max() < 0.5 and err.mean() < 0.06


def test_rmsnorm_casts_before_the_weight():
    # In bf16 the order matters; Qwen2RMSNorm rounds the normalised x to bf16, then multiplies.
    norm = RMSNorm(64, 1e-6).bfloat16()
    torch.nn.init.normal_(norm.weight, 1.0, 0.3)
    x = torch.randn(4, 64).bfloat16()
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.equal(norm(x), norm.weight * normed.bfloat16())
    assert not torch.equal(norm(x), (norm.weight.float() * normed).bfloat16())


def test_rope_angles_are_float32_products():
    # transformers 4.40 built its table with torch.outer in float32; later versions use a matmul
    # or a broadcast product, all bitwise equal. A float64 angle rounds differently.
    positions = torch.arange(4096)
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, 64, 2).float() / 64))
    table = torch.cat([torch.outer(positions.float(), inv_freq)] * 2, dim=-1)
    cos, sin = rope_cos_sin(positions[None], 64, 1e6, torch.float32)
    assert torch.equal(cos[0], table.cos()) and torch.equal(sin[0], table.sin())
    inv_freq64 = 1.0 / (1e6 ** (torch.arange(0, 64, 2).double() / 64))
    table64 = torch.cat([torch.outer(positions.double(), inv_freq64)] * 2, dim=-1)
    assert (table64.cos().float() - cos[0]).abs().max() > 1e-5


# ---------------------------------------------------------------------------------------------
# Config


def test_config_defaults_are_qwen25_05b():
    c = Qwen2Config()
    assert (c.vocab_size, c.hidden_size, c.intermediate_size) == (151936, 896, 4864)
    assert c.num_hidden_layers == 24
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (14, 2, 64)
    assert (c.rope_theta, c.rms_norm_eps, c.tie_word_embeddings) == (1e6, 1e-6, True)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        Qwen2Config(num_key_value_heads=3)


def test_config_dialects_agree(hf_config):
    v4 = Qwen2Config.from_hf(hf_config)
    v5 = {k: v for k, v in hf_config.items()
          if k not in ("rope_theta", "torch_dtype", "rope_scaling")}
    v5 |= {"rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}, "dtype": "float32",
           "layer_types": ["full_attention"] * 2}
    assert Qwen2Config.from_hf(v5) == v4
    assert (v4.head_dim, v4.rope_theta, v4.vocab_size) == (16, 1e6, 448)
    assert v4.tie_word_embeddings


def test_config_round_trips_through_config_json():
    c = Qwen2Config(vocab_size=1000, head_dim=32, tie_word_embeddings=False, eos_token_id=[1, 2],
                    torch_dtype="float32")
    assert Qwen2Config.from_hf(json.loads(json.dumps(c.to_hf()))) == c


@pytest.mark.parametrize("change, field", [
    ({"model_type": "qwen3"}, "qwen3"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_theta": 1e6, "rope_type": "linear"}}, "rope_parameters"),
    ({"use_sliding_window": True, "max_window_layers": 1}, "use_sliding_window"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_config_refuses_unsupported_variants(hf_config, change, field):
    with pytest.raises(ValueError, match=field):
        Qwen2Config.from_hf(hf_config | change)


def test_sliding_window_flag_inert_when_no_layer_uses_it(hf_config):
    # Qwen2.5 ships use_sliding_window false; true with max_window_layers >= layers is also inert:
    # the same config as without the flag.
    plain = Qwen2Config.from_hf(hf_config)
    for layers in (2, 5):
        assert Qwen2Config.from_hf(hf_config | {"use_sliding_window": True, "max_window_layers": layers}) == plain


# ---------------------------------------------------------------------------------------------
# Loading variants, built in tmp_path from the fixture


def test_v5_config(tmp_path, llm, llm_ref, hf_config, fixtures):
    config = {k: v for k, v in hf_config.items() if k not in ("rope_theta", "torch_dtype")}
    config |= {"rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}, "dtype": "float32",
               "layer_types": ["full_attention"] * 2, "sliding_window": None}
    write_hf_dir(tmp_path, config, None)
    os.symlink(fixtures / "llm_hf" / "model.safetensors", tmp_path / "model.safetensors")
    assert torch.equal(single_logits(Qwen2ForCausalLM.from_pretrained(tmp_path), llm_ref),
                       single_logits(llm, llm_ref))


def test_save_pretrained_round_trip(tmp_path, llm, llm_ref):
    llm.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["torch_dtype"] == "float32" and config["rope_theta"] == 1e6
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert "lm_head.weight" not in f.keys() and f.metadata() == {"format": "pt"}
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == 400
    assert torch.equal(single_logits(Qwen2ForCausalLM.from_pretrained(tmp_path), llm_ref),
                       single_logits(llm, llm_ref))


def test_save_untied_bf16(tmp_path):
    small = Qwen2ForCausalLM(Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=24,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, tie_word_embeddings=False))
    small.to(torch.bfloat16).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = Qwen2ForCausalLM.from_pretrained(tmp_path)
    for name, p in small.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name


# ---------------------------------------------------------------------------------------------
# Errors


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Qwen2ForCausalLM.from_pretrained(tmp_path)


def test_missing_weights(tmp_path, hf_config):
    write_hf_dir(tmp_path, hf_config, None)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*model.safetensors"):
        Qwen2ForCausalLM.from_pretrained(tmp_path)


def test_unsupported_model_type_and_architecture(tmp_path, hf_config):
    write_hf_dir(tmp_path, hf_config | {"model_type": "qwen3"}, None)
    with pytest.raises(ValueError, match="qwen3"):
        Qwen2ForCausalLM.from_pretrained(tmp_path)
    write_hf_dir(tmp_path, hf_config | {"architectures": ["LlamaForCausalLM"]}, None)
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        Qwen2ForCausalLM.from_pretrained(tmp_path)


def test_bad_tensors_are_all_listed(tmp_path, hf_config, hf_weights):
    weights = dict(hf_weights)
    del weights["model.layers.1.mlp.up_proj.weight"], weights["model.norm.weight"]
    weights["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    weights["model.layers.2.mlp.up_proj.weight"] = torch.zeros(1)
    write_hf_dir(tmp_path, hf_config, weights)
    with pytest.raises(ValueError) as err:
        Qwen2ForCausalLM.from_pretrained(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message
    for name in ("model.layers.1.mlp.up_proj.weight", "model.norm.weight",  # missing
                 "model.layers.2.mlp.up_proj.weight",  # unexpected
                 "model.layers.0.self_attn.k_proj.weight: checkpoint (16, 64) vs model (32, 64)"):
        assert name in message
