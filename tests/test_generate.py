"""Generation against transformers' greedy output, batching, stopping and sampling.
Run: python -m pytest -q tests/test_generate.py"""
import math

import pytest
import torch

from conftest import stop_ids
from speechllm.generate import generate, sample, top_p_filter
from speechllm.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(fixtures):
    return Tokenizer.from_pretrained(fixtures / "llm_hf")


def left_pad(rows: list[list[int]], pad_id: int):
    L = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (L - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def test_stop_ids(llm, tok):
    assert stop_ids(llm, tok) == [400, 402]  # generation_config eos + <|im_end|>


def test_greedy_matches_transformers(llm, llm_ref, tok):
    out = generate(llm, llm_ref["gen.prompt_ids"], max_new_tokens=12, eos_ids=stop_ids(llm, tok),
                   return_scores=True)
    assert torch.equal(out.tokens[0], llm_ref["gen.new_token_ids"])
    assert torch.equal(torch.cat([llm_ref["gen.prompt_ids"], out.tokens], 1), llm_ref["gen.sequences"])
    assert out.scores.shape == (1, 12, 448) and out.scores.dtype == torch.float32
    assert (out.scores[0] - llm_ref["gen.scores"]).abs().max() < 1e-4


def test_inputs_embeds_prompt(llm, llm_ref):
    ids = llm_ref["gen.prompt_ids"]
    out = generate(llm, inputs_embeds=llm.model.embed_tokens(ids).detach(), max_new_tokens=12)
    assert torch.equal(out.tokens[0], llm_ref["gen.new_token_ids"])


def test_left_padded_batch_equals_rows_alone(llm, tok):
    prompts = [tok.encode_chat([{"role": "user", "content": text}])
               for text in ("say something about the weather", "hi")]
    ids, mask = left_pad(prompts, tok.pad_id)
    batch = generate(llm, ids, attention_mask=mask, max_new_tokens=8, return_scores=True)
    for i, prompt in enumerate(prompts):
        alone = generate(llm, torch.tensor([prompt]), max_new_tokens=8, return_scores=True)
        assert torch.equal(batch.tokens[i], alone.tokens[0])
        assert (batch.scores[i] - alone.scores[0]).abs().max() < 1e-4
    with pytest.raises(ValueError, match="left padding"):
        generate(llm, ids, attention_mask=mask.flip(1), max_new_tokens=2)


def test_rows_stop_at_eos_and_are_padded(llm, llm_ref, tok):
    hi = tok.encode_chat([{"role": "user", "content": "hi"}])
    ids, mask = left_pad([llm_ref["gen.prompt_ids"][0].tolist(), hi], tok.pad_id)
    free = generate(llm, ids, attention_mask=mask, max_new_tokens=6).tokens
    stop = int(free[0, 2])  # row 0's third token becomes an eos id
    assert stop not in free[0, :2].tolist() and stop not in free[1].tolist()
    out = generate(llm, ids, attention_mask=mask, max_new_tokens=6, eos_ids=[stop], pad_id=399)
    assert torch.equal(out.tokens[0], torch.cat([free[0, :3], torch.tensor([399, 399, 399])]))
    assert torch.equal(out.tokens[1], free[1])
    # When every row is done the loop ends early.
    first = generate(llm, ids[:1], max_new_tokens=6, eos_ids=[int(free[0, 0])])
    assert first.tokens.shape == (1, 1)


# ---------------------------------------------------------------------------------------------
# Sampling


def test_top_k_1_is_greedy(llm, llm_ref):
    g = torch.Generator().manual_seed(1)
    out = generate(llm, llm_ref["gen.prompt_ids"], max_new_tokens=12, temperature=1.5, top_k=1,
                   generator=g)
    assert torch.equal(out.tokens[0], llm_ref["gen.new_token_ids"])


def test_top_p_on_a_known_distribution():
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log()
    inf = -math.inf
    # 0.5 + 0.3 = 0.8 reaches 0.75: the two largest survive.
    assert top_p_filter(logits, 0.75)[0, [0, 2]].tolist() == [inf, inf]
    assert torch.equal(top_p_filter(logits, 0.75)[0, [1, 3]], logits[0, [1, 3]])
    # 0.85 needs the 0.15 token too; only the 0.05 one goes.
    assert top_p_filter(logits, 0.85).isinf().tolist() == [[True, False, False, False]]
    # A tiny top_p keeps the single most likely token.
    assert top_p_filter(logits, 0.01).isfinite().tolist() == [[False, True, False, False]]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, 1.0, top_p=0.75, generator=g) for _ in range(200)])
    assert set(draws.flatten().tolist()) == {1, 3}


def test_top_k_filters_and_sampling_follows_probabilities():
    logits = torch.tensor([[0.1, 0.2, 0.3, 0.4]]).log().expand(4000, -1)
    g = torch.Generator().manual_seed(0)
    draws = sample(logits, 1.0, top_k=2, generator=g)
    assert set(draws.tolist()) == {2, 3}
    assert abs((draws == 3).float().mean().item() - 4 / 7) < 0.03  # 0.4 / (0.3 + 0.4)


def test_seeded_sampling_is_deterministic(llm, llm_ref):
    def run(seed):
        return generate(llm, llm_ref["gen.prompt_ids"], max_new_tokens=12, temperature=1.0,
                        top_p=0.9, generator=torch.Generator().manual_seed(seed)).tokens
    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))
