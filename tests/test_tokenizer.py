"""Tokenizer against transformers' ids for the fixture, speech tokens and embedding fitting.
Run: python -m pytest -q tests/test_tokenizer.py"""
import json
from dataclasses import replace

import pytest
import tokenizers
import torch

from speechllm.qwen2 import Qwen2ForCausalLM
from speechllm.tokenizer import AUDIO, TAGS, Tokenizer, fit_embeddings, format_chat


def tag_ids(tok) -> dict[str, int]:
    return {tag: tok.token_to_id(tag) for tag in TAGS}


@pytest.fixture(scope="module")
def ref(fixtures):
    return json.loads((fixtures / "llm_ref.json").read_text())


@pytest.fixture
def tok(fixtures):
    return Tokenizer.from_pretrained(fixtures / "llm_hf")


def test_probes_match_transformers(tok, ref):
    assert len(ref["tokenizer_probes"]) == 7
    for text, ids in ref["tokenizer_probes"].items():
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == text  # byte-level BPE is lossless (the probes are NFC already)


def test_batch_texts(tok, ref):
    batch = ref["batch"]
    assert tok.encode(batch["texts"][0]) == batch["input_ids"][0]
    real = [i for i, m in zip(batch["input_ids"][1], batch["attention_mask"][1]) if m]
    assert tok.encode(batch["texts"][1]) == real


def test_chat_format(tok, ref):
    messages = [{"role": "user", "content": "say something about the weather"}]
    assert format_chat(messages) == ref["generation"]["prompt"]  # no default system turn
    assert tok.encode_chat(messages) == ref["generation"]["prompt_ids"]
    closed = format_chat(messages + [{"role": "assistant", "content": "ok"}],
                         add_generation_prompt=False)
    assert closed.endswith("<|im_start|>assistant\nok<|im_end|>\n")
    assert tok.encode_chat([{"role": "system", "content": "x"}])[:1] == [tok.token_to_id("<|im_start|>")]


def test_qwen_special_ids(tok, ref):
    ids = ref["special_token_ids"]
    assert (tok.token_to_id("<|im_start|>"), tok.im_end_id) == (ids["<|im_start|>"], ids["<|im_end|>"])
    assert (tok.token_to_id("<|im_start|>"), tok.im_end_id) == (401, 402)
    assert tok.eos_ids == [ref["eos_token_id"], ref["im_end_id"]] == [400, 402]
    assert tok.pad_id == 400  # tokenizer_config.json: pad_token <|endoftext|>


def test_speech_tokens_appended_after_vocabulary(tok, ref):
    assert ref["tokenizer_size"] == 403
    assert tok.token_to_id(AUDIO) == 403
    assert tag_ids(tok) == {"<COMPLETE>": 404, "<INCOMPLETE>": 405, "<BACKCHANNEL>": 406}
    assert len(tok) == 407
    ids = tok.encode("hi <audio> there <COMPLETE>")
    assert ids.count(403) == 1 and ids[-1] == 404
    assert tok.decode(ids, skip_special_tokens=True) == "hi  there "
    assert tok.decode(ids) == "hi <audio> there <COMPLETE>"


def test_speech_tokens_skip_used_ids(fixtures):
    raw = tokenizers.Tokenizer.from_file(str(fixtures / "llm_hf" / "tokenizer.json"))
    raw.add_special_tokens(["<|extra|>"])  # takes 403
    tok = Tokenizer(raw)
    assert tok.token_to_id("<|extra|>") == 403
    assert tok.token_to_id(AUDIO) == 404 and list(tag_ids(tok).values()) == [405, 406, 407]


def test_save_and_reload_keeps_ids(tmp_path, tok):
    tok.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in saved["added_tokens"]}
    assert added["<audio>"] == 403 and added["<BACKCHANNEL>"] == 406
    again = Tokenizer.from_pretrained(tmp_path)  # adding the speech tokens again is a no-op
    assert len(again) == len(tok) == 407
    assert tag_ids(again) == tag_ids(tok) and again.eos_ids == tok.eos_ids and again.pad_id == 400
    text = "<|im_start|>user\n<audio> café<|im_end|>"
    assert again.encode(text) == tok.encode(text)


def test_unknown_token(tok):
    with pytest.raises(KeyError, match="nope"):
        tok.token_to_id("<nope>")


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------
# Embedding rows for the new tokens


def test_spare_rows_are_used(fixtures, tok):
    model = Qwen2ForCausalLM.from_pretrained(fixtures / "llm_hf")
    before = model.model.embed_tokens.weight
    assert fit_embeddings(model, tok) == 448  # 407 ids fit into the 448 rows
    assert model.model.embed_tokens.weight is before and model.lm_head.weight is before


@torch.no_grad()
def test_growth_when_no_room(fixtures, tok):
    model = Qwen2ForCausalLM.from_pretrained(fixtures / "llm_hf")
    old = model.model.embed_tokens.weight.clone()
    prompt = torch.tensor([tok.encode("hello world")])
    logits_before = model(prompt)
    tok.tokenizer.add_special_tokens([f"<extra_{i}>" for i in range(60)])  # ids up to 466
    assert fit_embeddings(model, tok) == 467 == model.config.vocab_size
    weight = model.model.embed_tokens.weight
    assert weight.shape == (467, 64) and model.lm_head.weight is weight  # still tied
    assert torch.equal(weight[:448], old)
    torch.testing.assert_close(weight[448:], old.mean(0).expand(19, -1))
    logits_after = model(prompt)
    assert logits_after.shape[-1] == 467
    assert torch.equal(logits_after[..., :448], logits_before)


@torch.no_grad()
def test_growth_untied_and_never_shrink(fixtures):
    model = Qwen2ForCausalLM.from_pretrained(fixtures / "llm_hf")
    model.config = replace(model.config, tie_word_embeddings=False)
    model.lm_head.weight = torch.nn.Parameter(2 * model.model.embed_tokens.weight.detach())
    head = model.lm_head.weight.detach().clone()
    model.grow_vocab(450)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    torch.testing.assert_close(model.lm_head.weight[448:], head.mean(0).expand(2, -1))
    model.grow_vocab(100)  # never shrinks
    assert model.config.vocab_size == model.model.embed_tokens.weight.shape[0] == 450
    assert model.lm_head.weight.shape == (450, 64)
