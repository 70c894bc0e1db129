"""NeMo SALM checkpoints imported as a SpeechLLM, against salm/ and salm_ref.*.
Run: python -m pytest -q tests/test_salm.py"""
import json

import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from conftest import max_valid_diff
from speechllm.audio import pad_batch
from speechllm.convert import ConversionError, remap
from speechllm.model import SpeechLLM
from speechllm.generate import Generation, generate
from speechllm.salm import SALM_KEYS, load_salm, load_state

TOL = 1e-4
CASES = ("single", "batch")


# Running the imported model the way SALM does:
#   prompt ids (B, L_tok), one audio tag each, left-padded --prepare_inputs--> (B, L, D), mask (B, L)
#   --logits--> (B, L, V)          SALM.forward
#   --greedy_generate--> (B, n)    SALM.generate: greedy, KV cache, stops at the tokenizer's eos

def encode_prompt(model: SpeechLLM, text: str) -> list[int]:
    """One user turn in the qwen format, ending with the assistant prefix, as ids."""
    return model.tokenizer.encode_chat([{"role": "user", "content": text}])


def left_pad(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    """Token rows -> (B, L_tok) left-padded with pad_id (NeMo's left_collate_vectors)."""
    width = max(len(r) for r in rows)
    return torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])


def prepare_inputs(model: SpeechLLM, prompt_ids: torch.Tensor, audio: torch.Tensor, lengths: torch.Tensor):
    """prompt_ids (B, L_tok) left-padded with the pad id, one audio tag per row; audio (B, N), lengths (B,)
    -> inputs_embeds (B, L, D) left-padded with zeros, attention_mask (B, L) bool."""
    audio_embeds, audio_lens = model.embed_audio(audio, lengths)  # (B, T', D)
    pad = model.tokenizer.pad_id
    rows = []
    for ids in prompt_ids.tolist():
        lead = next((i for i, t in enumerate(ids) if t != pad), len(ids))
        rows.append(ids[lead:])  # SALM strips the leading pads only
    inputs, mask, _ = model.splice(audio_embeds, audio_lens, rows)
    return inputs, mask


def logits(model: SpeechLLM, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids=None):
    """SALM.forward: logits (B, L, V) at every position. position_ids None counts 0..L-1 through the
    left padding, as HF does when SALM passes none."""
    return model.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids)


def greedy_generate(model: SpeechLLM, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                    max_new_tokens: int = 128) -> Generation:
    """SALM.generate after splicing: greedy with the KV cache; a row stops at the tokenizer's eos
    (SALM's GenerationConfig; not <|im_end|>) and is padded with the pad id. Returns the new
    tokens (B, n) and their raw logits (B, n, V)."""
    tok = model.tokenizer
    return generate(model.llm, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                    max_new_tokens=max_new_tokens, eos_ids=[tok.token_to_id(tok.eos_token)],
                    pad_id=tok.pad_id, return_scores=True)


@pytest.fixture(scope="module")
def model(fixtures):
    return load_salm(fixtures / "salm")


@pytest.fixture(scope="module")
def ref(fixtures):
    return load_file(fixtures / "salm_ref.safetensors")


@pytest.fixture(scope="module")
def ref_json(fixtures):
    return json.loads((fixtures / "salm_ref.json").read_text())


def case_inputs(fixtures, ref_json, model, case):
    """(prompt ids (B, L_tok), audio (B, N), lengths (B,)) of a case, built from its texts and WAVs."""
    c = ref_json["cases"][case]
    audio, lengths = pad_batch([sf.read(fixtures / f, dtype="float32")[0] for f in c["audio_files"]])
    ids = left_pad([encode_prompt(model, text) for text in c["prompts"]], model.tokenizer.pad_id)
    return ids, audio, lengths


@pytest.fixture(scope="module")
def spliced(model, ref_json, fixtures):
    out = {}
    for case in CASES:
        ids, audio, lengths = case_inputs(fixtures, ref_json, model, case)
        with torch.no_grad():
            out[case] = prepare_inputs(model, ids, audio, lengths)
    return out


def test_tokens_and_prompts_match_salm(model, ref, ref_json, fixtures):
    tokens = ref_json["tokens"]
    assert model.audio_id == tokens["audio_locator_tag_id"] == 403
    assert model.tokenizer.pad_id == tokens["text_pad_id"] and model.llm.config.vocab_size == tokens["embedding_rows"]
    assert model.tag_ids == [404, 405, 406]  # ours, on spare rows: SALM has no turn-taking tags
    assert sum(p.numel() for p in model.parameters()) == ref_json["num_parameters"]  # the tied head counted once
    for case in CASES:
        ids, audio, lengths = case_inputs(fixtures, ref_json, model, case)
        assert torch.equal(ids, ref[f"{case}.prompt_ids"])
        assert torch.equal(lengths, ref[f"{case}.audio_lens"])
    row = ref_json["cases"]["single"]["rows"][0]
    assert model.tokenizer.decode(ref["single.prompt_ids"][0]) == row["formatted_prompt"]


def test_text_embeddings(model, ref):
    """SALM embeds the audio tag as id 0 (that row is discarded by splicing anyway)."""
    for case in CASES:
        ids = ref[f"{case}.prompt_ids"]
        with torch.no_grad():
            got = model.llm.model.embed_tokens(ids.where(ids != model.audio_id, 0))
        assert (got - ref[f"{case}.text_embeds"]).abs().max() < TOL


@pytest.mark.parametrize("case", CASES)
def test_perception_encoder_adapter_and_proj(model, ref, ref_json, fixtures, case):
    _, audio, lengths = case_inputs(fixtures, ref_json, model, case)
    with torch.no_grad():
        x, lens = model.encoder(*model.preprocessor(audio, lengths))  # (B, T', 64)
        assert torch.equal(lens, ref[f"{case}.encoded_length"])
        assert max_valid_diff(x, ref[f"{case}.encoder_output"].transpose(1, 2), lens) < TOL
        x, lens = model.projector.modality_adapter(x.transpose(1, 2), lens)
        assert max_valid_diff(x, ref[f"{case}.adapter_output"].transpose(1, 2), lens) < TOL
        x = model.projector.proj(x)
        assert max_valid_diff(x, ref[f"{case}.audio_embeds"], lens) < TOL
        embeds, lens2 = model.embed_audio(audio, lengths)
    assert torch.equal(embeds, x) and torch.equal(lens2, lens)


@pytest.mark.parametrize("case", CASES)
def test_spliced_input_embeddings(spliced, ref, case):
    inputs, mask = spliced[case]
    assert torch.equal(mask, ref[f"{case}.attention_mask"])
    assert inputs.shape == ref[f"{case}.input_embeds"].shape
    assert (inputs - ref[f"{case}.input_embeds"]).abs().max() < TOL  # zeros at the left padding included


def test_logits_at_every_position(model, spliced, ref, ref_json):
    inputs, mask = spliced["single"]
    with torch.no_grad():
        got = logits(model, inputs, mask)
    assert got.shape == ref["single.logits"].shape
    assert (got - ref["single.logits"]).abs().max() < TOL
    # Greedy choices hold: the smallest top-2 margin upstream is far above the error.
    assert ref_json["cases"]["single"]["rows"][0]["min_top2_logit_margin_valid_positions"] > 10 * TOL
    assert torch.equal(got.argmax(-1), ref["single.logits"].argmax(-1))


def test_batch_last_logits_with_left_padding(model, spliced, ref):
    """SALM counts positions 0..L-1 through the padding; splice's cumsum positions give the same
    valid rows up to rounding, since RoPE sees only position differences."""
    inputs, mask = spliced["batch"]
    assert not mask[1, :11].any()  # row 1 is left-padded by 11
    shifted = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        assert (logits(model, inputs, mask)[:, -1] - ref["batch.last_logits"]).abs().max() < TOL
        assert (logits(model, inputs, mask, shifted)[:, -1] - ref["batch.last_logits"]).abs().max() < TOL


@pytest.mark.parametrize("case", CASES)
def test_greedy_generation(model, spliced, ref, case):
    gen = greedy_generate(model, *spliced[case], max_new_tokens=8)
    assert torch.equal(gen.tokens, ref[f"{case}.gen_ids"])
    want = ref[f"{case}.gen_scores"].transpose(0, 1)  # (n, B, V) -> (B, n, V)
    assert (gen.scores - want).abs().max() < TOL


def test_import_reports_every_problem(model, fixtures):
    state = load_state(fixtures / "salm" / "model.safetensors")
    assert torch.equal(state["llm.lm_head.weight"], state["embed_tokens.weight"])  # the metadata alias
    expected = model.state_dict()
    assert remap(SALM_KEYS, state, expected, "salm").keys() == expected.keys()
    broken = {k: v for k, v in state.items() if k != "perception.proj.bias"}
    broken["perception.proj.weight"] = torch.zeros(3, 64)
    broken["perception.extra.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError) as e:
        remap(SALM_KEYS, broken, expected, "salm")
    for name in ("perception.extra.weight", "projector.proj.bias", "projector.proj.weight: checkpoint (3, 64)"):
        assert name in str(e.value)


def test_save_and_reload_keeps_logits(model, spliced, tmp_path):
    model.save_pretrained(tmp_path)
    again = SpeechLLM.from_pretrained(tmp_path)
    assert again.cfg == model.cfg and again.audio_id == model.audio_id and again.tag_ids == model.tag_ids
    inputs, mask = spliced["batch"]
    with torch.no_grad():
        assert torch.equal(logits(again, inputs, mask), logits(model, inputs, mask))

