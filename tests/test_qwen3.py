"""Qwen3 (dense) against transformers 5.23 fixtures, loading variants, config and load_llm.
Run: python -m pytest -q tests/test_qwen3.py"""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import max_diff, stop_ids, write_hf_dir
from speechllm import load_llm
from speechllm.generate import generate
from speechllm.qwen2 import KVCache, Qwen2Config, Qwen2ForCausalLM
from speechllm.tokenizer import Tokenizer, format_chat

TOL = 1e-4  # fp32 vs transformers (eager attention): measured ~1e-5


@pytest.fixture(scope="module")
def ref(fixtures):
    return load_file(fixtures / "qwen3_ref.safetensors")


@pytest.fixture(scope="module")
def ref_json(fixtures):
    return json.loads((fixtures / "qwen3_ref.json").read_text())


@pytest.fixture(scope="module")
def model(fixtures):
    return Qwen2ForCausalLM.from_pretrained(fixtures / "qwen3_hf")


@pytest.fixture(scope="module")
def hf_config(fixtures):
    return json.loads((fixtures / "qwen3_hf" / "config.json").read_text())


@pytest.fixture(scope="module")
def hf_weights(fixtures):
    return load_file(fixtures / "qwen3_hf" / "model.safetensors")


@pytest.fixture(scope="module")
def tok(fixtures):
    return Tokenizer.from_pretrained(fixtures / "qwen3_hf")


@torch.no_grad()
def single_logits(model, ref):
    return model(ref["single0.input_ids"])


# ---------------------------------------------------------------------------------------------
# Parity


def test_fixture_is_qwen3_with_qk_norm(model):
    config = model.config
    assert (config.model_type, config.head_dim, config.attention_bias) == ("qwen3", 16, False)
    attn = model.model.layers[0].self_attn
    assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (16,)
    assert all(p.bias is None for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
    assert model.lm_head.weight is model.model.embed_tokens.weight


@torch.no_grad()
def test_left_padded_batch_logits_and_hidden_states(model, ref):
    valid = ref["batch.attention_mask"].bool()
    logits, hidden = model(ref["batch.input_ids"], attention_mask=ref["batch.attention_mask"],
                           position_ids=ref["batch.position_ids"], output_hidden_states=True)
    assert logits.shape == ref["batch.logits"].shape
    assert max_diff(logits[valid], ref["batch.logits"][valid]) < TOL  # measured 9.5e-6
    # The smallest top-2 margin on valid positions is 0.0014, 100x our error.
    assert torch.equal(logits[valid].argmax(-1), ref["batch.logits"][valid].argmax(-1))
    assert len(hidden) == 3 == ref["batch.hidden_states"].shape[0]
    for ours, theirs in zip(hidden, ref["batch.hidden_states"]):
        assert max_diff(ours[valid], theirs[valid]) < TOL  # measured 0, 1.1e-5, 2.1e-6


@torch.no_grad()
def test_unpadded_rows(model, ref):
    for key in ("single0", "single1"):
        assert max_diff(model(ref[f"{key}.input_ids"]), ref[f"{key}.logits"]) < TOL


@torch.no_grad()
def test_qk_norm_weights_matter(model, ref):
    # The fixture's q/k norm weights are 1 + N(0, 0.25^2): dropping them moves the logits by far
    # more than TOL, so the parity above does check that they are applied.
    attn = model.model.layers[0].self_attn
    saved = attn.k_norm.weight.clone()
    try:
        attn.k_norm.weight.fill_(1.0)
        assert max_diff(single_logits(model, ref), ref["single0.logits"]) > 100 * TOL
    finally:
        attn.k_norm.weight.copy_(saved)


@torch.no_grad()
def test_cached_decoding_matches_full_forward(model, ref):
    ids, mask, pos = ref["batch.input_ids"], ref["batch.attention_mask"], ref["batch.position_ids"]
    L = ids.shape[1]
    full = model(ids, attention_mask=mask, position_ids=pos)
    cache = KVCache(model.config, batch_size=2, max_len=L)
    steps = [model(ids[:, :20], attention_mask=mask[:, :20], position_ids=pos[:, :20], cache=cache)]
    for t in range(20, L):
        steps.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1],
                           position_ids=pos[:, t:t + 1], cache=cache))
    cached = torch.cat(steps, dim=1)
    valid = mask.bool()
    assert cache.length == L
    assert max_diff(cached[valid], full[valid]) < 5e-5
    assert max_diff(cached[valid], ref["batch.logits"][valid]) < TOL


def test_greedy_generation_matches_transformers(model, ref, tok):
    out = generate(model, ref["gen.prompt_ids"], max_new_tokens=12, eos_ids=stop_ids(model, tok),
                   return_scores=True)
    assert torch.equal(out.tokens[0], ref["gen.new_token_ids"])
    assert torch.equal(torch.cat([ref["gen.prompt_ids"], out.tokens], 1), ref["gen.sequences"])
    assert out.scores.shape == (1, 12, 448)
    assert max_diff(out.scores[0], ref["gen.scores"]) < TOL


# ---------------------------------------------------------------------------------------------
# Tokenizer (a copy of the Qwen2 fixture's files)


def test_tokenizer_probes_and_prompt(tok, ref_json):
    assert len(ref_json["tokenizer_probes"]) >= 6
    for text, ids in ref_json["tokenizer_probes"].items():
        assert tok.encode(text) == ids, text
    assert tok.encode(ref_json["batch"]["texts"][0]) == ref_json["batch"]["input_ids"][0]
    gen = ref_json["generation"]
    assert tok.encode(gen["prompt"]) == gen["prompt_ids"]
    content = gen["prompt"].split("user\n", 1)[1].split("<|im_end|>", 1)[0]
    assert format_chat([{"role": "user", "content": content}]) == gen["prompt"]
    assert tok.eos_ids == [400, 402] and tok.pad_id == 400


# ---------------------------------------------------------------------------------------------
# Config


def test_config_reads_the_fixture(hf_config):
    c = Qwen2Config.from_hf(hf_config)
    assert (c.model_type, c.head_dim, c.attention_bias, c.qk_norm) == ("qwen3", 16, False, True)
    assert c.rope_theta == 1e6 and isinstance(c.rope_theta, float)  # the file has the int 1000000
    assert (c.vocab_size, c.max_position_embeddings, c.tie_word_embeddings) == (448, 2048, True)


def v5_dialect(hf_config: dict) -> dict:
    """The fixture's 4.x config.json as transformers 5 writes it."""
    legacy = ("rope_theta", "torch_dtype", "rope_scaling")
    return {k: v for k, v in hf_config.items() if k not in legacy} | {
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}, "dtype": "float32",
        "layer_types": ["full_attention"] * 2}


def test_config_dialects_agree(hf_config):
    assert Qwen2Config.from_hf(v5_dialect(hf_config)) == Qwen2Config.from_hf(hf_config)


def test_head_dim_defaults_to_128_not_hidden_over_heads(hf_config):
    config = {k: v for k, v in hf_config.items() if k != "head_dim"}
    assert Qwen2Config.from_hf(config).head_dim == 128  # Qwen3Config's default; 64 / 4 = 16
    assert Qwen2Config(model_type="qwen3").head_dim == 128
    assert Qwen2Config(model_type="qwen3").attention_bias is False
    assert Qwen2Config().head_dim == 64  # Qwen2 still derives it: 896 / 14


def test_config_round_trips_through_config_json():
    c = Qwen2Config(model_type="qwen3", vocab_size=1000, hidden_size=96, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=32, attention_bias=True,
                    tie_word_embeddings=False, torch_dtype="float32")
    hf = json.loads(json.dumps(c.to_hf()))
    assert hf["architectures"] == ["Qwen3ForCausalLM"] and hf["model_type"] == "qwen3"
    assert hf["head_dim"] == 32 and hf["attention_bias"] is True
    assert Qwen2Config.from_hf(hf) == c
    assert "attention_bias" not in Qwen2Config().to_hf()  # a Qwen2 file keeps its own keys


@pytest.mark.parametrize("change, field", [
    ({"model_type": "llama"}, "llama"),
    ({"architectures": ["Qwen2ForCausalLM"]}, "Qwen2ForCausalLM"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1},
     "use_sliding_window"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
])
def test_config_refuses_unsupported_variants(hf_config, change, field):
    with pytest.raises(ValueError, match=field):
        Qwen2Config.from_hf(hf_config | change)


def test_attention_bias_is_a_qwen3_setting():
    with pytest.raises(ValueError, match="attention_bias"):
        Qwen2Config(attention_bias=True)
    with pytest.raises(ValueError, match="llama"):
        Qwen2Config(model_type="llama")


# ---------------------------------------------------------------------------------------------
# head_dim != hidden / heads and attention_bias, against a float64 recomputation


def reference_forward(model, ids):
    """Qwen3 written out from transformers' modeling_qwen3.py in float64, one unpadded row, with
    K/V heads repeated (repeat_kv) and an explicit causal softmax."""
    c = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps))

    def rope(x, pos):  # x (H, L, hd); cos/sin in float32 as transformers computes them
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2).float() / c.head_dim))
        angles = torch.cat([pos.float()[:, None] * inv_freq] * 2, dim=-1)  # (L, hd)
        x1, x2 = x[..., :c.head_dim // 2], x[..., c.head_dim // 2:]
        return x * angles.cos().double() + torch.cat([-x2, x1], dim=-1) * angles.sin().double()

    L, hd = ids.shape[1], c.head_dim
    h = sd["model.embed_tokens.weight"][ids[0]]  # (L, D)
    pos = torch.arange(L)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        x = rms(h, sd[p + "input_layernorm.weight"])
        proj = {n: F.linear(x, sd[f"{p}self_attn.{n}_proj.weight"],
                            sd[f"{p}self_attn.{n}_proj.bias"]) for n in "qkv"}
        q = rms(proj["q"].view(L, -1, hd), sd[p + "self_attn.q_norm.weight"]).transpose(0, 1)
        k = rms(proj["k"].view(L, -1, hd), sd[p + "self_attn.k_norm.weight"]).transpose(0, 1)
        v = proj["v"].view(L, -1, hd).transpose(0, 1)
        q, k = rope(q, pos), rope(k, pos)
        groups = q.shape[0] // k.shape[0]
        k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)  # (H, L, hd)
        scores = q @ k.transpose(1, 2) * hd ** -0.5
        scores = scores.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(0, 1).reshape(L, -1)  # (L, H * hd)
        h = h + F.linear(y, sd[p + "self_attn.o_proj.weight"], sd[p + "self_attn.o_proj.bias"])
        x = rms(h, sd[p + "post_attention_layernorm.weight"])
        gate = F.linear(x, sd[p + "mlp.gate_proj.weight"])
        h = h + F.linear(F.silu(gate) * F.linear(x, sd[p + "mlp.up_proj.weight"]),
                         sd[p + "mlp.down_proj.weight"])
    return F.linear(rms(h, sd["model.norm.weight"]), sd["lm_head.weight"])  # (L, V)


@torch.no_grad()
def test_wide_heads_with_biases_match_float64_reference(tmp_path):
    # hidden 48 but 4 heads x 24 = 96 query rows, and biases on q, k, v and o_proj.
    config = Qwen2Config(model_type="qwen3", vocab_size=64, hidden_size=48, intermediate_size=80,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=24, attention_bias=True, tie_word_embeddings=False,
                         torch_dtype="float32")
    model = Qwen2ForCausalLM(config)
    for name, p in model.named_parameters():  # every norm weight away from 1, biases non-zero
        torch.nn.init.normal_(p, 1.0 if "norm" in name else 0.0, 0.3)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (96, 48) and attn.o_proj.weight.shape == (48, 96)
    assert attn.o_proj.bias.shape == (48,)
    ids = torch.randint(0, 64, (1, 11))
    expected = reference_forward(model, ids)
    assert max_diff(model(ids)[0], expected) < 1e-4  # float32 rounding: measured 4e-6 to 7e-6
    model.float().save_pretrained(tmp_path)
    assert torch.equal(Qwen2ForCausalLM.from_pretrained(tmp_path)(ids), model(ids))


# ---------------------------------------------------------------------------------------------
# Loading variants, built in tmp_path from the fixture


def test_bf16_weights(tmp_path, ref, hf_config, hf_weights):
    write_hf_dir(tmp_path, hf_config | {"torch_dtype": "bfloat16"},
              {k: v.bfloat16() for k, v in hf_weights.items()})
    kept = Qwen2ForCausalLM.from_pretrained(tmp_path)
    assert {p.dtype for p in kept.parameters()} == {torch.bfloat16}
    logits = single_logits(kept, ref)
    assert logits.dtype == torch.bfloat16
    # Rounding every weight and activation to 8 significant bits: measured 0.25 max / 0.040 mean
    # on logits of std 3.9 (2x headroom below); a missing q/k norm or a wrong RoPE moves them by
    # O(1).
    err = (logits.float() - ref["single0.logits"]).abs()
    assert err.max() < 0.5 and err.mean() < 0.08


def test_v5_config(tmp_path, model, ref, hf_config, fixtures):
    write_hf_dir(tmp_path, v5_dialect(hf_config), None)
    os.symlink(fixtures / "qwen3_hf" / "model.safetensors", tmp_path / "model.safetensors")
    assert torch.equal(single_logits(Qwen2ForCausalLM.from_pretrained(tmp_path), ref),
                       single_logits(model, ref))


def test_missing_head_dim_means_128_and_the_weights_do_not_fit(tmp_path, hf_config, hf_weights):
    write_hf_dir(tmp_path, {k: v for k, v in hf_config.items() if k != "head_dim"}, hf_weights)
    with pytest.raises(ValueError) as err:
        Qwen2ForCausalLM.from_pretrained(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "qwen3" in message
    assert "model.layers.0.self_attn.q_proj.weight: checkpoint (64, 64) vs model (512, 64)" in message
    assert "model.layers.1.self_attn.k_norm.weight: checkpoint (16,) vs model (128,)" in message


def test_save_pretrained_round_trip(tmp_path, model, ref):
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["architectures"] == ["Qwen3ForCausalLM"]
    assert (config["head_dim"], config["attention_bias"]) == (16, False)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
        assert "model.layers.0.self_attn.q_norm.weight" in f.keys()
    assert torch.equal(single_logits(Qwen2ForCausalLM.from_pretrained(tmp_path), ref),
                       single_logits(model, ref))


# ---------------------------------------------------------------------------------------------
# load_llm


def test_load_llm_picks_by_model_type(fixtures, model, ref):
    qwen2 = load_llm(fixtures / "llm_hf")
    assert isinstance(qwen2, Qwen2ForCausalLM) and qwen2.config.model_type == "qwen2"
    qwen3 = load_llm(fixtures / "qwen3_hf", dtype=torch.bfloat16)
    assert isinstance(qwen3, Qwen2ForCausalLM) and qwen3.config.model_type == "qwen3"
    assert qwen3.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(single_logits(load_llm(fixtures / "qwen3_hf"), ref),
                       single_logits(model, ref))


def test_load_llm_refuses_other_types(tmp_path, hf_config):
    write_hf_dir(tmp_path, hf_config | {"model_type": "llama"}, None)
    with pytest.raises(ValueError, match=r"'llama' is not supported; supported: qwen2, qwen3, "
                                         r"qwen3_5, qwen3_5_text"):
        load_llm(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_llm(tmp_path / "nowhere")


def test_load_llm_picks_qwen3_5(fixtures):
    from speechllm.qwen3_5 import Qwen3_5ForCausalLM
    model = load_llm(fixtures / "qwen3_5_hf")
    assert isinstance(model, Qwen3_5ForCausalLM) and len(model.model.layers) == 4
