"""Autoregressive decoding with a preallocated cache (gpt-fast style) for Qwen2ForCausalLM and
Qwen3_5ForCausalLM: the model's `new_cache` makes its cache (KV, or KV + DeltaNet states).

Matches transformers' generate() for greedy decoding: prefill over the prompt, then one token per
step; left-padded batches use position_ids = cumsum(mask) - 1 and a mask that grows by a column of
ones per step; rows that produced an eos id emit `pad_id` afterwards; stop when every row is done.
Sampling applies temperature, then top-k, then top-p, in transformers' order and with its top-p
rule. No repetition penalty or other logits processors. Prompts can be token ids or embeddings
(audio embeddings spliced into text), in which case only the new tokens exist as ids anyway, so
`generate` always returns the new tokens only.
"""
from typing import NamedTuple

import torch

from .qwen2 import Qwen2ForCausalLM


class Generation(NamedTuple):
    tokens: torch.Tensor  # (B, N) new token ids; pad_id after a row's eos
    scores: torch.Tensor | None  # (B, N, V) float32 raw next-token logits, if asked for


def top_p_filter(logits, top_p: float):
    """Keep the smallest set of most likely tokens whose probability reaches top_p (at least one);
    the rest get -inf. transformers' rule: sort ascending, drop tokens whose cumulative
    probability is <= 1 - top_p."""
    sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
    cum_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cum_probs <= 1 - top_p
    drop[..., -1] = False  # the most likely token always survives
    drop = torch.zeros_like(drop).scatter(-1, order, drop)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample(logits, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None):
    """Next ids (B,) from logits (B, V). temperature 0 is greedy (argmax, first index on ties)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def prefill(model, cache, input_ids=None, inputs_embeds=None, attention_mask=None,
            position_ids=None):
    """Run the prompt through the model, filling the cache; logits of the last position (B, V)."""
    logits = model(input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                   position_ids=position_ids, cache=cache, logits_to_keep=1)
    return logits[:, -1].float()  # generate() takes float32 copies of the step's logits


def decode_one_token(model, cache, token, position_ids, attention_mask=None):
    """One step: token (B, 1) at position_ids (B, 1) -> next-token logits (B, V)."""
    logits = model(token, attention_mask=attention_mask, position_ids=position_ids, cache=cache)
    return logits[:, -1].float()


@torch.inference_mode()
def generate(model: Qwen2ForCausalLM, input_ids=None, *, inputs_embeds=None, attention_mask=None,
             max_new_tokens: int = 32, eos_ids=(), pad_id: int | None = None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             generator: torch.Generator | None = None, return_scores: bool = False) -> Generation:
    """Decode up to max_new_tokens after a prompt of input_ids (B, L) or inputs_embeds (B, L, D).

    attention_mask (B, L) is 1 for real tokens; batches must be left-padded so every row's next
    token follows its last real one. Each row stops at its first id in eos_ids (kept in the
    output); pad_id (default: the first eos id, else 0) fills the row afterwards."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompt = input_ids if input_ids is not None else inputs_embeds
    B, L = prompt.shape[:2]
    device = prompt.device
    if attention_mask is None:
        attention_mask = torch.ones(B, L, dtype=torch.bool, device=device)
    if not attention_mask[:, -1].all():
        raise ValueError("generate needs left padding: the last prompt position must be real")
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
    pad_id = pad_id if pad_id is not None else (int(eos[0]) if len(eos) else 0)

    # Everything is allocated once; the loop only writes into it.
    cache = model.new_cache(B, L + max_new_tokens, device=device)  # in the model's dtype
    padded = not attention_mask.all()  # no padding: skip masks, SDPA runs its causal fast path
    mask = torch.ones(B, L + max_new_tokens, dtype=torch.bool, device=device)
    mask[:, :L] = attention_mask.bool()
    # Real tokens count from 0 in every row; pads get 1 (transformers 4.57; they are never seen).
    position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    next_pos = position_ids[:, -1:] + 1  # (B, 1)
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    scores = [] if return_scores else None
    done = torch.zeros(B, dtype=torch.bool, device=device)

    logits = prefill(model, cache, input_ids, inputs_embeds, mask[:, :L] if padded else None,
                     position_ids)
    for n in range(max_new_tokens):
        if scores is not None:
            scores.append(logits)
        token = sample(logits, temperature, top_k, top_p, generator).masked_fill(done, pad_id)
        tokens[:, n] = token
        done |= torch.isin(token, eos)
        if n + 1 == max_new_tokens or done.all():
            break
        step_mask = mask[:, :L + n + 1] if padded else None
        logits = decode_one_token(model, cache, token[:, None], next_pos + n, step_mask)
    return Generation(tokens[:, :n + 1], torch.stack(scores, dim=1) if scores is not None else None)
