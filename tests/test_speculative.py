"""The CTC head as a draft, speculative decoding, the cached prompt prefix: the answer, tag and
probabilities are plain greedy decoding's, in fewer LLM passes. Run: python -m pytest -q tests/test_speculative.py"""
import json

import pytest
import soundfile as sf
import torch

from conftest import STREAM_MODEL, stop_ids
from speechllm.audio import pad_batch
from speechllm.generate import generate
from speechllm.model import SpeechLLM, assemble
from speechllm.optim import FREEZE_PRESETS, setup_trainable
from speechllm.speculative import PrefixCache, decode, draft_ids
from speechllm.tokenizer import TAGS, Tokenizer
from speechllm.train_config import ModelConfig

TOL = 1e-5  # fp32 probabilities, speculative / cached against plain greedy


@pytest.fixture(scope="module")
def batch(fixtures):
    return pad_batch([sf.read(fixtures / f"audio_{i}.wav", dtype="float32")[0] for i in (0, 1)])


@pytest.fixture(scope="module")
def model(fixtures):
    """Assembled from the fixtures, tag rows apart so that the probabilities mean something."""
    m = assemble(fixtures / "asr_ctc.nemo", fixtures / "llm_hf", seed=3)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        w = m.llm.model.embed_tokens.weight
        w[m.tag_ids] += 0.5 * torch.randn(3, w.shape[1], generator=g)
        m.projector.conv.weight.mul_(20)  # make the audio matter
    return m


@pytest.fixture(scope="module")
def trained(fixtures, batch):
    """A tiny model taught to answer "<CTC transcript> <TAG>" for the two fixture clips (the LLM
    trained on fixed audio embeddings, with the training objective), so that its drafts are right."""
    m = assemble(fixtures / "asr_ctc.nemo", fixtures / "llm_hf", seed=0)
    audio, lens = batch
    texts = [o["ctc_transcript"] for o in m.predict(audio, lens, 2)]
    with torch.no_grad():
        embeds = m.embed_audio(audio, lens)
    opt = torch.optim.Adam(m.llm.parameters(), lr=1e-2)
    m.embed_audio = lambda *args: embeds  # the encoder and projector stay as they are
    try:
        for _ in range(200):
            loss, _ = m(audio, lens, texts, ["<COMPLETE>", "<INCOMPLETE>"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if loss.item() < 0.02:
                break
    finally:
        del m.embed_audio
    return m.eval()


def reference(model, audio, lens, max_new_tokens):
    """Plain greedy decoding as predict did it before drafts and prompt caching: the whole prompt
    spliced and left-padded, generate() with full-vocabulary scores, the tag read where written."""
    with torch.no_grad():
        embeds, elens = model.embed_audio(audio, lens)
        x, mask, _ = model.splice(embeds, elens, [model.prompt_ids()] * len(elens))
    stop = model.tag_ids + model.tokenizer.eos_ids
    gen = generate(model.llm, inputs_embeds=x, attention_mask=mask, max_new_tokens=max_new_tokens, eos_ids=stop,
                   pad_id=model.tokenizer.pad_id, return_scores=True)
    out = []
    for i in range(len(elens)):
        ids = gen.tokens[i].tolist()
        end = next((k + 1 for k, t in enumerate(ids) if t in stop), len(ids))
        at = next((k for k, t in enumerate(ids) if t in model.tag_ids), end - 1)
        scores = gen.scores[i, at].double()
        out.append({"ids": ids[:end], "text": model.tokenizer.decode(ids[:at], skip_special_tokens=True).strip(),
                    "probs": torch.softmax(scores[model.tag_ids], -1).tolist(),
                    "tag_mass": torch.softmax(scores, -1)[model.tag_ids].sum().item()})
    return out


def same_as_reference(model, got: list[dict], want: list[dict]):
    for g, w in zip(got, want):
        assert g["transcript"] == w["text"]
        assert g["tag"] == TAGS[max(range(3), key=lambda k: w["probs"][k])]
        assert max(abs(g["probs"][t] - p) for t, p in zip(TAGS, w["probs"])) < TOL
        assert abs(g["tag_mass"] - w["tag_mass"]) < TOL


class Counter:
    """LLM forward passes, counted from outside by a hook."""

    def __init__(self, llm):
        self.n = 0
        self.handle = llm.register_forward_pre_hook(self)

    def __call__(self, *_):
        self.n += 1

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.handle.remove()


# ---------------------------------------------------------------------------------------------
# the CTC head travels with the Speech-LLM


def test_ctc_head_is_kept_saved_and_transcribes_as_nemo(model, batch, fixtures, tmp_path):
    ref = json.loads((fixtures / "asr_ctc_ref.json").read_text())["batch"]["greedy_text"]
    audio, lens = batch
    assert model.cfg.ctc.vocab_size == 96 and model.ctc.blank_id == 96
    assert [o["ctc_transcript"] for o in model.predict(audio, lens, 2)] == ref  # NeMo's greedy CTC text
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["ctc"] == {"vocab_size": 96} and written["ctc_loss_weight"] == 0.0
    again = SpeechLLM.from_pretrained(tmp_path)
    assert torch.equal(again.ctc.weight, model.ctc.weight) and torch.equal(again.ctc.bias, model.ctc.bias)
    assert [o["ctc_transcript"] for o in again.predict(audio, lens, 2)] == ref
    for preset in FREEZE_PRESETS:  # without an auxiliary CTC loss, the head is frozen whatever the preset
        setup_trainable(again, ModelConfig(init_from="x", freeze=preset))
        assert not again.ctc.weight.requires_grad and not again.ctc.bias.requires_grad
    (tmp_path / "encoder_tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="encoder_tokenizer.model"):
        SpeechLLM.from_pretrained(tmp_path)


def test_checkpoints_without_a_ctc_head_decode_greedily(batch):
    demo = SpeechLLM.from_pretrained(STREAM_MODEL)  # the earlier demo, written before CTC heads travelled along
    assert demo.cfg.ctc is None and "ctc" not in demo.cfg.to_dict()
    audio, lens = batch
    out = demo.predict(audio, lens)
    assert all(o["decoding"] == "greedy" and "ctc_transcript" not in o for o in out)
    with pytest.raises(ValueError, match="no ctc section"):
        demo.predict(audio, lens, decoding="speculative")


def test_draft_is_the_training_answer_format(model):
    ids, at = model.answer_ids("hello world", "<COMPLETE>")
    assert draft_ids(model, " hello world ") == ids[:at] and draft_ids(model, "  ") == []


# ---------------------------------------------------------------------------------------------
# plain greedy, speculative, cached prefix: one answer


@pytest.mark.parametrize("decoding", ["greedy", "speculative"])
@pytest.mark.parametrize("prompt_cache", [False, True])
def test_every_path_gives_the_plain_greedy_answer(model, trained, batch, decoding, prompt_cache):
    audio, lens = batch
    for m in (model, trained):
        want = reference(m, audio, lens, 12)
        same_as_reference(m, m.predict(audio, lens, 12, decoding=decoding, prompt_cache=prompt_cache), want)
        for i in range(2):  # each clip alone: no padding in the prompt
            alone = m.predict(audio[i:i + 1, :lens[i]], lens[i:i + 1], 12, decoding=decoding, prompt_cache=prompt_cache)
            same_as_reference(m, alone, want[i:i + 1])


def test_a_right_ctc_draft_decides_in_the_prompts_own_pass(trained, batch):
    audio, lens = batch
    want = reference(trained, audio, lens, 32)
    assert [w["ids"][-1] for w in want] == [trained.tag_ids[0], trained.tag_ids[1]]  # it learned to stop
    greedy = trained.predict(audio, lens, 32, decoding="greedy")
    assert [g["llm_passes"] for g in greedy] == [len(w["ids"]) - 1 for w in want]  # one step per token
    for i in range(2):
        with Counter(trained.llm) as c:
            r = trained.predict(audio[i:i + 1, :lens[i]], lens[i:i + 1], 32)[0]
        same_as_reference(trained, [r], want[i:i + 1])
        assert r["decoding"] == "speculative" and r["transcript"] == r["ctc_transcript"]
        assert r["draft_tokens"] == r["accepted_tokens"] == len(want[i]["ids"]) - 1 > 5
        assert r["llm_passes"] == 0 and c.n == 1  # the prefill verifies the draft and reads the tag (prefix cached)


def test_drafts_right_empty_or_wrong_anywhere(trained, fixtures, batch):
    """Perfect, empty, wrong at the first token, wrong in the middle, longer than the answer: the
    plain-greedy output each time, at the counted cost. On the trained model (its answer is the
    clip's CTC transcript, then the tag) and on a freshly assembled one (12 tokens of noise, no tag)."""
    audio, lens = batch
    fresh = assemble(fixtures / "asr_ctc.nemo", fixtures / "llm_hf", seed=0)
    for m, n_new in ((trained, 32), (fresh, 12)):
        want = reference(m, audio, lens, n_new)
        m.predict(audio, lens, 1)  # the prompt prefix's keys and values, once
        for i in range(2):
            a = want[i]["ids"]
            text = a[:-1] if a[-1] in m.tag_ids else a  # the transcript part (the random model writes no tag)
            assert len(text) >= 4  # room for a middle: a mismatch with right tokens on both sides
            mid = len(text) // 2
            x = next(t for t in range(10, 400) if t not in a)  # a token the answer never has
            plain = len(a) - 1
            cases = {  # draft -> the passes it costs at most (exactly, but where noted)
                "perfect": (text, 0),  # verified in the prefill, with the token after it
                "empty": ([], plain),
                "wrong first": ([x] + text[1:], 1),  # the model's token at the mismatch, the draft read on after it
                "wrong middle": (text[:mid] + [x] + text[mid + 1:], 1),
                # one rejected offer after the mismatch, then plain steps (a repetitive answer may line up sooner)
                "garbage from the middle": (text[:mid] + [x] * (len(text) - mid + 1), len(a) - (mid + 1)),
                "longer": (text + [x, x + 1, x], 0),
            }
            for name, (draft, passes) in cases.items():
                with Counter(m.llm) as c:
                    r = m.predict(audio[i:i + 1, :lens[i]], lens[i:i + 1], n_new, drafts=[draft])[0]
                same_as_reference(m, [r], want[i:i + 1])
                assert c.n == 1 + r["llm_passes"] and r["draft_tokens"] == len(draft), name
                assert r["llm_passes"] == passes if name != "garbage from the middle" else r["llm_passes"] <= passes, name
                assert r["accepted_tokens"] == (len(text) if name in ("perfect", "longer") else r["accepted_tokens"])


def test_batched_rows_accept_different_lengths(trained, batch):
    audio, lens = batch
    want = reference(trained, audio, lens, 32)
    drafts = [want[0]["ids"][:-1], want[1]["ids"][:3]]  # row 0 all, row 1 its first three tokens
    with Counter(trained.llm) as c:
        out = trained.predict(audio, lens, 32, drafts=drafts)
    same_as_reference(trained, out, want)
    assert out[0]["llm_passes"] == 0 and out[1]["llm_passes"] == len(want[1]["ids"]) - 4  # 4: 3 drafted + its own
    assert c.n == 1 + max(o["llm_passes"] for o in out)


# ---------------------------------------------------------------------------------------------
# the engine on text, against transformers


def test_decode_matches_transformers_with_a_prefix_and_a_draft(llm, llm_ref, fixtures):
    """speculative.decode on the LLM fixture: transformers' greedy tokens and scores, whether the
    prompt's first tokens come as a cached prefix, and with a perfect or a broken draft."""
    tok = Tokenizer.from_pretrained(fixtures / "llm_hf")
    ids = llm_ref["gen.prompt_ids"]
    new = llm_ref["gen.new_token_ids"].tolist()  # (12,)
    embeds = llm.model.embed_tokens(ids).detach()
    everything = range(llm.config.vocab_size)
    for P in (0, 3):
        prefix = PrefixCache().get(llm, ids[0, :P].tolist())[:2] if P else None
        for draft in (None, new, new[:4] + [5] + new[5:]):
            out = decode(llm, embeds[:, P:], torch.ones(1, ids.shape[1] - P, dtype=torch.bool), max_new_tokens=12,
                         stop_ids=stop_ids(llm, tok), pad_id=0, keep_ids=everything, prefix=prefix,
                         drafts=None if draft is None else [draft])
            assert out.tokens[0] == new
            assert (out.kept[0] - llm_ref["gen.scores"]).abs().max() < 1e-4  # as test_generate
            assert out.passes[0] == (11 if draft is None else 0 if draft == new else 1)


def test_prefix_cache_is_reused_and_follows_the_weights(model, batch):
    audio, lens = batch
    model.predict(audio, lens, 4)
    hits = model._prefix.hits
    first = model.predict(audio, lens, 4)
    assert model._prefix.hits == hits + 1 and first[0]["timings"]["prefix_s"] == 0
    with torch.no_grad():  # weights changed in place: the cached keys and values are stale
        model.llm.model.layers[0].self_attn.k_proj.weight.mul_(1.5)
    try:
        same_as_reference(model, model.predict(audio, lens, 4), reference(model, audio, lens, 4))
        assert model._prefix.hits == hits + 1
    finally:
        with torch.no_grad():
            model.llm.model.layers[0].self_attn.k_proj.weight.div_(1.5)
