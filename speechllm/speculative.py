"""Greedy decoding of the Speech-LLM's answer with the repeated work removed, and lossless
speculative decoding with the CTC head's transcript as the draft.

The answer is "transcript <TAG><|im_end|>", and the transcript is nearly what the encoder's own CTC
head already wrote in the same forward pass. So instead of one LLM step per token:

    prompt prefix (text before <audio>)   KV computed once per model and weights (PrefixCache)
    prefill: [audio | prompt suffix | d1 .. dm]
                                          one forward, on top of the prefix's keys and values;
                                          the last prompt position predicts the first token and
                                          d(j) the token after it, so d(j+1) is accepted iff it
                                          is the argmax there; the model's own token is taken at
                                          the first mismatch (or after the last draft token)
    verify:  [pending, d(k+1) ..]         then again, one forward, with the rest of the draft
                                          where the output still lines up with it, else one
                                          plain step (a draft of nothing is exactly greedy)

A right draft is thus verified in the prompt's own pass, and the token after it, the tag, read
there too: the decision costs one LLM forward.

Every token emitted is the argmax of the logits at its position given the tokens before it, as in
plain greedy decoding: only the number of forward passes changes. (Exactly so in exact
arithmetic; in floating point a verification pass computes the same logits in a different matmul
shape, ~1e-6 apart in fp32, so a near tie could in principle fall the other way.)

The cache is rolled back past rejected positions: its length drops to the longest kept prefix,
and in a batch, a row that kept fewer positions masks its rejected ones out of attention (the
rows share one cache timeline, as left padding does; their position ids count real tokens only).
Rows accept different lengths and stop on their own. This needs a KV cache that can be cut back:
Qwen2 / Qwen3 (qwen2.py). Qwen3.5's DeltaNet state cannot be rewound; SpeechLLM.predict decodes
such models with generate() and no draft.

Only what is read leaves the LLM: the LM head runs on the positions whose argmax is needed, and
per emitted token the logits of `keep_ids` (the tags) and the full-vocabulary log-sum-exp are kept,
not a (B, N, V) score tensor.

The Speech-LLM's side (the last section) is what SpeechLLM.predict asks of this module: which
decoding a model gets (choose), its CTC transcript as a draft in the answer's format (draft_ids),
and the answer itself after the spliced prompt (answer). They take the model as an argument, so
this module imports no model.

Dimension letters: B batch, L prompt positions, P prefix tokens, W tokens per pass, V vocabulary.
"""
import itertools
import logging
import time
from typing import NamedTuple

import torch

from .generate import generate
from .qwen2 import Qwen2ForCausalLM
from .tokenizer import TAGS

log = logging.getLogger(__name__)


class Decoded(NamedTuple):
    tokens: list[list[int]]  # per row: the new ids, up to and including its stop id
    kept: torch.Tensor  # (B, N, len(keep_ids)) float32 logits of keep_ids at each new token's step
    lse: torch.Tensor  # (B, N) float32 log-sum-exp of the full logits at that step
    passes: list[int]  # per row: LLM forward passes after the prompt while the row was open
    offered: list[int]  # per row: draft tokens fed to verification passes
    accepted: list[int]  # per row: draft tokens the answer reproduced (0 without drafts)
    timings: dict  # prefix_s (0 when the cached prefix was reused), prefill_s (with the first draft), decode_s


def can_rewind(llm) -> bool:
    """Speculative decoding needs a cache that can be cut back to any length: a plain KV cache."""
    return type(llm) is Qwen2ForCausalLM


# ---------------------------------------------------------------------------------------------
# the prompt's fixed prefix


class PrefixCache:
    """Keys and values of the prompt text before <audio>, computed once and reused for every clip
    and batch row. Recomputed when the ids, the weights (trained in place, moved, cast or
    quantized: each parameter's and buffer's storage and version counter), or autocast change."""

    def __init__(self):
        self.key, self.k, self.v = None, None, None
        self.hits = 0

    def get(self, llm: Qwen2ForCausalLM, ids: list[int]):
        """-> k, v (n_layers, 1, K, P, hd), and the seconds spent (0 when reused)."""
        device = llm.model.embed_tokens.weight.device
        key = (tuple(ids), device, torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type),
               tuple((t.data_ptr(), t._version) for t in itertools.chain(llm.parameters(), llm.buffers())))
        if key == self.key:
            self.hits += 1
            return self.k, self.v, 0.0
        t = time.perf_counter()
        cache = llm.new_cache(1, len(ids))
        if ids:  # the hidden states are not needed; the head is not run
            llm(torch.tensor([ids], device=device), cache=cache, return_hidden=True)
        self.key, self.k, self.v = key, cache.k, cache.v
        return self.k, self.v, time.perf_counter() - t


# ---------------------------------------------------------------------------------------------
# drafts


class Draft:
    """One row's draft (the CTC transcript in LLM ids) and where the output stands in it.

    `at` is the draft slot of the pending token (the last one emitted, not yet fed to the model).
    Each pass offers the draft after that slot: where the pending token is the draft's own, that is
    the draft going on; where the model wrote another token there, the draft is read as going on
    after it (a substituted word, the common CTC error). Once an offer is rejected outright,
    nothing more is offered (plain steps) until the last two output tokens are found in the draft
    within `window` slots of where it stood (the model skipped or added a few tokens): a rejected
    offer costs its positions' compute for nothing. `accepted` counts the output tokens equal to
    the draft at their slot."""

    def __init__(self, ids: list[int], window: int = 4):
        self.ids, self.window = list(ids), window
        self.at, self.misses, self.accepted = -1, 0, 0  # nothing emitted yet: the prefill offers from slot 0

    def offer(self, prev: int | None, pending: int | None, room: int) -> list[int]:
        ids, at = self.ids, self.at
        if at < 0 or at < len(ids) and ids[at] == pending:
            pass
        elif self.misses and prev is not None:
            near = sorted(range(max(1, at - self.window), min(len(ids), at + self.window + 1)), key=lambda i: abs(i - at))
            found = next((i for i in near if ids[i] == pending and ids[i - 1] == prev), None)
            if found is None:
                return []  # a plain step: offering more of a draft that just failed costs compute
            self.at, self.misses = found, 0
            self.accepted += 1
        return ids[self.at + 1:self.at + 1 + max(room, 0)]

    def took(self, n: int, offered: int, token: int) -> None:
        """The pass verified n of `offered` tokens; `token`, the model's own, is the new pending one."""
        if offered:
            self.misses = 0 if n else self.misses + 1
        self.at += 1 + n
        self.accepted += n + int(self.at < len(self.ids) and self.ids[self.at] == token)


# ---------------------------------------------------------------------------------------------
# decoding


def from_generation(gen, stop_ids, keep_ids) -> Decoded:
    """generate()'s output (full scores) in decode()'s terms, for LLMs decoded without a draft."""
    stop, tokens = set(stop_ids), []
    for row in gen.tokens.tolist():
        end = next((k + 1 for k, t in enumerate(row) if t in stop), len(row))
        tokens.append(row[:end])
    return Decoded(tokens, gen.scores[..., list(keep_ids)].float(), torch.logsumexp(gen.scores.float(), -1),
                   [len(t) - 1 for t in tokens], [0] * len(tokens), [0] * len(tokens), {})


def _grow(cache, mask, need: int):
    """Room for `need` positions: the cache and the mask are reallocated, twice the size."""
    if need <= cache.k.shape[3]:
        return mask
    size = max(need, 2 * cache.k.shape[3])
    for name in ("k", "v"):
        old = getattr(cache, name)
        new = old.new_zeros(*old.shape[:3], size, old.shape[4])
        new[:, :, :, :old.shape[3]] = old
        setattr(cache, name, new)
    grown = mask.new_zeros(mask.shape[0], size)
    grown[:, :mask.shape[1]] = mask
    return grown


@torch.inference_mode()
def decode(llm: Qwen2ForCausalLM, inputs_embeds, attention_mask, *, max_new_tokens: int, stop_ids, pad_id: int,
           keep_ids, prefix=None, drafts=None) -> Decoded:
    """Greedy answers after prompts inputs_embeds (B, L, D) with attention_mask (B, L) (left padded:
    each row's last position is real).

    prefix: (k, v) of PrefixCache.get, the keys and values of P tokens that come before every row;
    inputs_embeds then holds only what follows them. drafts: per row a list of token ids (may be
    empty) to verify, or None for plain greedy decoding. Each row stops after its first id in
    stop_ids or after max_new_tokens ids."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    B, L, _ = inputs_embeds.shape
    device = inputs_embeds.device
    if not attention_mask[:, -1].all():
        raise ValueError("decode needs left padding: the last prompt position must be real")
    stop, keep = set(int(t) for t in stop_ids), torch.tensor(list(keep_ids), device=device)
    longest = max(map(len, drafts), default=0) if drafts else 0
    P = prefix[0].shape[3] if prefix is not None else 0

    cache = llm.new_cache(B, P + L + max_new_tokens + longest + 1, device=device)
    mask = torch.zeros(B, cache.k.shape[3], dtype=torch.bool, device=device)  # real keys, in cache order
    mask[:, :P] = True
    mask[:, P:P + L] = attention_mask.bool()
    if P:
        cache.k[:, :, :, :P], cache.v[:, :, :, :P] = prefix[0], prefix[1]  # (n_layers, 1, ...) over B rows
        cache.length = P
    masked = not bool(mask[:, :P + L].all())  # no padding and no holes: no mask, SDPA's fast paths
    position = mask[:, :P + L].long().cumsum(-1) - 1  # real tokens count from 0 in every row

    tokens = [[] for _ in range(B)]
    kept = [[] for _ in range(B)]
    lse = [[] for _ in range(B)]
    done = [False] * B
    passes, offered = [0] * B, [0] * B

    def emit(b, token, row_logits):
        """Append one token with its logits' kept columns; True when the row is finished."""
        tokens[b].append(token)
        kept[b].append(row_logits[keep])
        lse[b].append(torch.logsumexp(row_logits, -1))
        done[b] = token in stop or len(tokens[b]) == max_new_tokens
        return done[b]

    def verify(b, offer, row_logits, best):
        """Row b's pass read the positions of `offer` (row_logits (1 + len(offer), V), best their
        argmaxes): emit the accepted draft tokens, then the model's own. -> positions to keep."""
        n = 0
        while n < len(offer) and best[n] == offer[n]:
            n += 1
        offered[b] += len(offer)
        if drafts:
            drafts[b].took(n, len(offer), best[n])
        for j, t in enumerate(offer[:n] + [best[n]]):  # the model's tokens: n accepted, then its own
            if emit(b, t, row_logits[j]):
                break
        next_pos[b] += n
        return n

    # The prefill carries the first draft after the prompt (right padded to the longest), so a
    # right draft is verified in the prompt's own pass: transcript and tag from one LLM forward.
    drafts = [Draft(d) for d in drafts] if drafts is not None else None
    offers = [d.offer(None, None, max_new_tokens - 1) for d in drafts] if drafts else [[]] * B
    M = max(map(len, offers))
    if M:
        ids = torch.full((B, M), pad_id, dtype=torch.long)
        for b, o in enumerate(offers):
            ids[b, :len(o)] = torch.tensor(o, dtype=torch.long)
            mask[b, P + L:P + L + len(o)] = True
        embeds = llm.model.embed_tokens(ids.to(device)).to(inputs_embeds.dtype)
        inputs_embeds = torch.cat([inputs_embeds, embeds], 1)  # (B, L + M, D)
        position = torch.cat([position, position[:, -1:] + 1 + torch.arange(M, device=device)], 1)

    t0 = time.perf_counter()
    h = llm(inputs_embeds=inputs_embeds, attention_mask=mask[:, :P + L + M] if masked else None,
            position_ids=position[:, P:].clamp(min=0), cache=cache, return_hidden=True)
    logits = llm.lm_head(h[:, L - 1:]).float()  # (B, 1 + M, V): the head only where a token is read
    next_pos = position[:, P + L - 1] + 1  # (B,) where each row's pending token goes
    keep_n = [verify(b, offers[b], logits[b], logits[b].argmax(-1).tolist()) for b in range(B)]
    cache.length = P + L + max(keep_n)  # rejected draft positions past the longest kept prefix go
    for b, n in enumerate(keep_n):
        mask[b, P + L + n:P + L + M] = False
        masked |= n < max(keep_n)  # a hole: this row rejected positions another row kept
    t1 = time.perf_counter()

    while not all(done):
        rows = [b for b in range(B) if not done[b]]
        offers = {b: drafts[b].offer(tokens[b][-2] if len(tokens[b]) > 1 else None, tokens[b][-1],
                                     max_new_tokens - len(tokens[b]) - 1) if drafts else [] for b in rows}
        W = 1 + max(len(o) for o in offers.values())
        ids = torch.full((B, W), pad_id, dtype=torch.long)
        for b in rows:
            ids[b, :1 + len(offers[b])] = torch.tensor([tokens[b][-1], *offers[b]])
        past = cache.length
        mask = _grow(cache, mask, past + W)
        mask[:, past:past + W] = True  # each row's pads and rejections are masked out below
        pos = next_pos[:, None] + torch.arange(W, device=device)  # (B, W)
        h = llm(ids.to(device), attention_mask=mask[:, :past + W] if masked else None, position_ids=pos,
                cache=cache, return_hidden=True)  # (B, W, D)
        logits = llm.lm_head(h[rows]).float()  # (R, W, V): every position of an open row is read
        best = logits.argmax(-1).tolist()
        kept_len = []
        for r, b in enumerate(rows):
            passes[b] += 1
            next_pos[b] += 1  # the pending token stays in the cache, with the accepted ones
            kept_len.append(1 + verify(b, offers[b], logits[r], best[r]))
        keep_n = max(kept_len)
        cache.length = past + keep_n  # the rollback: rejected positions past the longest kept prefix go
        for b, n in zip(rows, kept_len):
            mask[b, past + n:past + W] = False
            masked |= n < keep_n  # a hole: this row rejected positions another row kept
        finished = [b for b in range(B) if b not in rows]
        if finished:  # rows done earlier: their positions of this pass are never attended to
            mask[finished, past:past + W] = False
            masked = True
    t2 = time.perf_counter()

    N = max(len(t) for t in tokens)
    n_keep = len(keep)
    kept_t = torch.full((B, N, n_keep), float("nan"), device=device)
    lse_t = torch.full((B, N), float("nan"), device=device)
    for b in range(B):
        kept_t[b, :len(tokens[b])] = torch.stack(kept[b])
        lse_t[b, :len(tokens[b])] = torch.stack(lse[b])
    accepted = [d.accepted for d in drafts] if drafts else [0] * B
    return Decoded(tokens, kept_t, lse_t, passes, offered, accepted,
                   {"prefill_s": round(t1 - t0, 4), "decode_s": round(t2 - t1, 4)})


# ---------------------------------------------------------------------------------------------
# the Speech-LLM's answer (model: a SpeechLLM)


def choose(model, decoding: str | None, have_drafts: bool) -> str:
    """The decoding predict uses: speculative needs a draft (a CTC head with its SentencePiece
    model, or drafts given), a transcript to draft (not tag_only) and a cache that can be cut back
    (not Qwen3.5); else greedy. decoding None: speculative wherever it can be."""
    if decoding not in (None, "greedy", "speculative"):
        raise ValueError(f"decoding {decoding!r} is not 'greedy' or 'speculative'")
    if decoding == "greedy":
        return decoding
    if not model.can_draft and not have_drafts:
        if decoding == "speculative":
            raise ValueError("speculative decoding drafts with the CTC head, and this Speech-LLM has none "
                             "(config.json has no ctc section) or no SentencePiece model for it")
        return "greedy"
    if not can_rewind(model.llm):
        if decoding == "speculative":
            log.warning("%s has no KV cache that can be rolled back: decoding greedily, without the draft",
                        type(model.llm).__name__)
        return "greedy"
    return "greedy" if model.cfg.prompt.answer_format == "tag_only" else "speculative"


def draft_ids(model, text: str) -> list[int]:
    """A CTC transcript as the LLM would write it, in the format of the training answers
    (answer_ids: the transcript stripped, a space before the tag). Empty for tag_only models."""
    if model.cfg.prompt.answer_format == "tag_only" or not text.strip():
        return []
    ids, at = model.answer_ids(text, TAGS[0])
    special = set(model.tag_ids + model.tokenizer.eos_ids + [model.audio_id])
    return list(itertools.takewhile(lambda t: t not in special, ids[:at]))


def answer(model, audio_embeds, audio_lens, max_new_tokens: int, stop_ids, decoding: str, drafts,
           prompt_cache: bool) -> tuple[Decoded, float]:
    """The greedy answers after the prompt with each clip's audio (B, T', D), (B,) spliced in ->
    (Decoded, prefix_s). With a cache that can be cut back: decode, the drafts verified when
    `decoding` is speculative, and with prompt_cache the text before <audio> taken from the
    model's PrefixCache; else (Qwen3.5) generate(). tag_only models write one token, the tag."""
    B = len(audio_lens)
    n_new = 1 if model.cfg.prompt.answer_format == "tag_only" else max_new_tokens
    prompt, prefix_s = model.prompt_ids(), 0.0
    pad_id = model.tokenizer.pad_id
    if not can_rewind(model.llm):  # no cache to rewind: plain greedy decoding
        inputs, mask, _ = model.splice(audio_embeds, audio_lens, [prompt] * B)
        gen = generate(model.llm, inputs_embeds=inputs, attention_mask=mask, max_new_tokens=n_new,
                       eos_ids=stop_ids, pad_id=pad_id, return_scores=True)
        return from_generation(gen, stop_ids, model.tag_ids), prefix_s
    prefix, rows = None, [prompt] * B
    if prompt_cache:  # the text before <audio> is the same for every clip: its keys and values once
        j = prompt.index(model.audio_id)
        if getattr(model, "_prefix", None) is None:
            model._prefix = PrefixCache()
        *prefix, prefix_s = model._prefix.get(model.llm, prompt[:j])
        rows = [prompt[j:]] * B
    inputs, mask, _ = model.splice(audio_embeds, audio_lens, rows)
    dec = decode(model.llm, inputs, mask, max_new_tokens=n_new, stop_ids=stop_ids, pad_id=pad_id,
                 keep_ids=model.tag_ids, prefix=prefix, drafts=drafts if decoding == "speculative" else None)
    return dec, prefix_s
