"""Loading variants every LLM reader must handle, built in tmp_path from each fixture: sharded
files, half-precision files, an untied head. One set of tests over Qwen2, Qwen3 and Qwen3.5, since
they share one reader contract (weights.read_state / check_fit); each model's own parity and
config tests stay in its test file."""
import json
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import write_hf_dir
from speechllm.qwen2 import Qwen2ForCausalLM
from speechllm.qwen3_5 import Qwen3_5ForCausalLM

# fixture directory -> (class, reference file, the prompt its logits are compared on)
LLMS = {
    "llm_hf": (Qwen2ForCausalLM, "llm_ref.safetensors", lambda ref: ref["single0.input_ids"]),
    "qwen3_hf": (Qwen2ForCausalLM, "qwen3_ref.safetensors", lambda ref: ref["single0.input_ids"]),
    "qwen3_5_hf": (Qwen3_5ForCausalLM, "qwen3_5_ref.safetensors", lambda ref: ref["long.input_ids"][:, :40]),
}


@pytest.fixture(scope="module", params=list(LLMS))
def llm_case(request, fixtures):
    cls, ref_file, prompt = LLMS[request.param]
    directory = fixtures / request.param
    return SimpleNamespace(cls=cls, model=cls.from_pretrained(directory),
                           config=json.loads((directory / "config.json").read_text()),
                           weights=load_file(directory / "model.safetensors"),
                           ids=prompt(load_file(fixtures / ref_file)))


@torch.no_grad()
def logits(model, case):
    return model(case.ids)


def test_sharded_checkpoint(tmp_path, llm_case):
    names = sorted(llm_case.weights)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half],
              "model-00002-of-00002.safetensors": names[half:]}
    write_hf_dir(tmp_path, llm_case.config, None)
    for file, keys in shards.items():
        save_file({k: llm_case.weights[k] for k in keys}, str(tmp_path / file), metadata={"format": "pt"})
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    assert torch.equal(logits(llm_case.cls.from_pretrained(tmp_path), llm_case),
                       logits(llm_case.model, llm_case))
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
        llm_case.cls.from_pretrained(tmp_path)


@pytest.mark.parametrize("key", ["torch_dtype", "dtype"])  # transformers 4.x and 5.x spell it so
@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16])
def test_half_precision_file(tmp_path, llm_case, stored, key):
    name = str(stored).removeprefix("torch.")
    config = {k: v for k, v in llm_case.config.items() if k not in ("torch_dtype", "dtype")}
    write_hf_dir(tmp_path, config | {key: name}, {k: v.to(stored) for k, v in llm_case.weights.items()})
    kept = llm_case.cls.from_pretrained(tmp_path)
    assert {p.dtype for p in kept.parameters()} == {stored}
    assert kept.config.torch_dtype == name
    upcast = llm_case.cls.from_pretrained(tmp_path, dtype=torch.float32)
    for param, p in upcast.state_dict().items():
        source = llm_case.weights["model.embed_tokens.weight" if param == "lm_head.weight" else param]
        assert p.dtype == torch.float32 and torch.equal(p, source.to(stored).float()), param


def test_untied_head(tmp_path, llm_case):
    # An explicit head of 2 x embedding: logits must double exactly, so the stored head is used.
    config = llm_case.config | {"tie_word_embeddings": False}
    weights = llm_case.weights | {"lm_head.weight": 2 * llm_case.weights["model.embed_tokens.weight"]}
    write_hf_dir(tmp_path, config, weights)
    loaded = llm_case.cls.from_pretrained(tmp_path)
    assert loaded.lm_head.weight.data_ptr() != loaded.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(logits(loaded, llm_case), 2 * logits(llm_case.model, llm_case),
                               rtol=1e-6, atol=1e-6)
    write_hf_dir(tmp_path, config, llm_case.weights)  # untied, but the file has no head
    with pytest.raises(ValueError, match="missing.*lm_head.weight"):
        llm_case.cls.from_pretrained(tmp_path)


def test_tied_head_shares_the_embedding(llm_case):
    model = llm_case.model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert len(list(model.parameters())) == len(model.state_dict()) - 1
