"""The Speech-LLM assembled from the NeMo and transformers fixtures. Run: python -m pytest -q tests/test_model.py"""
import dataclasses

import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from speechllm.asr import ASRModel
from speechllm.audio import pad_batch
from speechllm.model import IGNORE, PromptConfig, SpeechLLM, SpeechLLMConfig, assemble
from speechllm.optim import setup_trainable
from speechllm.qwen2 import Qwen2ForCausalLM
from speechllm.speaker import SpeakerKernelConfig
from speechllm.tokenizer import TAGS
from speechllm.train_config import ModelConfig


@pytest.fixture(scope="module")
def model(fixtures):
    return assemble(fixtures / "asr_ctc.nemo", fixtures / "llm_hf", seed=0)


@pytest.fixture(scope="module")
def batch(fixtures):
    clips = [sf.read(fixtures / f"audio_{i}.wav", dtype="float32")[0] for i in (0, 1)]
    return pad_batch(clips)


def test_assembled_parts_reproduce_the_standalone_models(model, fixtures, batch):
    asr = ASRModel.from_nemo(fixtures / "asr_ctc.nemo")
    audio, lens = batch
    with torch.no_grad():
        want, want_lens = asr.encode(*asr.features(audio, lens))
        got, got_lens = model.encoder(*model.preprocessor(audio, lens))
    assert torch.equal(got_lens, want_lens) and torch.equal(got, want)
    ref = load_file(fixtures / "llm_ref.safetensors")
    with torch.no_grad():
        logits = model.llm(ref["batch.input_ids"], attention_mask=ref["batch.attention_mask"],
                           position_ids=ref["batch.position_ids"])
    valid = ref["batch.attention_mask"].bool()
    n = 403  # columns of the stock vocabulary; rows 403.. now hold our special tokens
    assert (logits[valid][:, :n] - ref["batch.logits"][valid][:, :n]).abs().max() < 1e-4


def test_special_tokens_use_spare_rows_and_start_at_the_mean(model, fixtures):
    stock = Qwen2ForCausalLM.from_pretrained(fixtures / "llm_hf")
    assert model.llm.config.vocab_size == stock.config.vocab_size == 448  # spare rows used, nothing grown
    assert [model.audio_id, *model.tag_ids] == [403, 404, 405, 406]
    w = model.llm.model.embed_tokens.weight
    torch.testing.assert_close(w[404], stock.model.embed_tokens.weight[:403].mean(0))
    assert torch.equal(w[:403], stock.model.embed_tokens.weight[:403])


def test_new_parts_are_seeded_on_their_own(fixtures, model):
    """assemble's projector: fields over the default fitted to the widths; each new part draws from its
    own seed, so new speaker kernels beside it do not change the projector."""
    a = assemble(fixtures / "asr_ctc.nemo", fixtures / "llm_hf", projector={"n_layers": 1}, seed=5)
    assert (a.cfg.projector.n_layers, a.cfg.projector.in_dim, a.cfg.projector.out_dim) == (1, 64, 64)
    b = assemble(fixtures / "asr_ctc.nemo", fixtures / "llm_hf", projector={"n_layers": 1},
                 speaker=SpeakerKernelConfig(layers=(0,)), seed=5)
    pa, pb = a.projector.state_dict(), b.projector.state_dict()
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    assert b.cfg.speaker == SpeakerKernelConfig(layers=(0,)) and b.spk_kernels["0"][3].weight.abs().sum() == 0
    b.new_projector(model.cfg.projector, seed=0)  # what assemble(seed=0) drew
    pm, pb = model.projector.state_dict(), b.projector.state_dict()
    assert b.cfg.projector == model.cfg.projector and all(torch.equal(pm[k], pb[k]) for k in pm)


def test_splice_places_audio_at_the_placeholder_with_left_padding(model):
    emb = model.llm.model.embed_tokens.weight
    audio = torch.randn(3, 5, emb.shape[1])
    lens = torch.tensor([5, 2, 3])
    a = model.audio_id
    rows = [[1, 2, a, 3], [4, a, 5, 6, 7], [a, 8]]
    labels = [[IGNORE, 2, IGNORE, 3], [IGNORE] * 5, [IGNORE, 8]]
    weights = [[0.0, 0.5, 0.0, 2.0], [0.0] * 5, [0.0, 3.0]]
    with torch.no_grad():
        x, mask, pos, target, weight = model.splice(audio, lens, rows, labels, weights)
        *_, default = model.splice(audio, lens, rows, labels)
    width = max(len(r) - 1 + int(n) for r, n in zip(rows, lens))
    assert x.shape == (3, width, emb.shape[1]) and width == 8
    for i, (row, n) in enumerate(zip(rows, lens.tolist())):
        L = len(row) - 1 + n
        pad = width - L
        assert not mask[i, :pad].any() and mask[i, pad:].all()
        assert (x[i, :pad] == 0).all()
        assert pos[i, pad:].tolist() == list(range(L))
        j = row.index(a)
        assert torch.equal(x[i, pad:pad + j], emb[row[:j]])
        assert torch.equal(x[i, pad + j:pad + j + n], audio[i, :n])
        assert torch.equal(x[i, pad + j + n:], emb[row[j + 1:]])
        assert (target[i, pad + j:pad + j + n] == IGNORE).all()
    assert target[0, -1].item() == 3 and target[2, -1].item() == 8
    # each weight stays beside its label, wherever the audio and the padding push it
    assert weight[target == IGNORE].sum() == 0 and weight[0, -1] == 2.0 and weight[2, -1] == 3.0
    assert weight[0, -1 - 1 - 5] == 0.5 and target[0, -1 - 1 - 5].item() == 2  # before 5 audio frames
    assert torch.equal(default, (target != IGNORE).float())
    with pytest.raises(ValueError, match="holds 2"):
        model.splice(audio, lens, [[a, a]])


def test_loss_matches_a_hand_computation(model, batch):
    audio, lens = batch
    transcripts, tags = ["hello world this is a small test", "speech"], ["<COMPLETE>", "<BACKCHANNEL>"]
    model.eval()
    with torch.no_grad():
        loss, stats = model(audio, lens, transcripts, tags)
        # By hand: full logits, float64, each row's answer tokens one by one.
        emb, emb_lens = model.embed_audio(audio, lens)
        prompt = model.prompt_ids()
        total, weight, plain, tag_ce = 0.0, 0.0, [], []
        for i in range(2):
            answer, tag_at = model.answer_ids(transcripts[i], tags[i])
            x, mask, pos = model.splice(emb[i:i + 1], emb_lens[i:i + 1], [prompt + answer])
            logits = model.llm(inputs_embeds=x, attention_mask=mask, position_ids=pos)[0].double()
            start = x.shape[1] - len(answer)  # answers end each row
            for k, tok in enumerate(answer):
                ce = -F.log_softmax(logits[start + k - 1], -1)[tok].item()
                w = 5.0 if k == tag_at else 1.0
                total, weight = total + w * ce, weight + w
                plain.append(ce)
                tag_ce += [ce] if k == tag_at else []
    assert abs(loss.item() - total / weight) < 1e-4
    assert abs(stats["token_loss"].item() - sum(plain) / len(plain)) < 1e-4
    assert len(tag_ce) == 2 and abs(stats["tag_loss"].item() - sum(tag_ce) / 2) < 1e-4
    assert stats["weight"].item() == weight  # 1 per answer token, 5 per tag


def ctc_nll_reference(log_probs: torch.Tensor, target: list[int], blank: int) -> float:
    """-log p(target | frames), the CTC forward recursion over the blank-extended target, in float64:
    a state moves on by one, or by two when skipping a blank between two different labels."""
    ext = [blank] + [x for t in target for x in (t, blank)]
    lp = log_probs.double()
    alpha = torch.full((len(ext),), -float("inf"), dtype=torch.float64)
    alpha[0], alpha[1] = lp[0, blank], lp[0, ext[1]]
    for t in range(1, lp.shape[0]):
        prev = alpha.clone()
        for s in range(len(ext)):
            a = prev[s]
            if s >= 1:
                a = torch.logaddexp(a, prev[s - 1])
            if s >= 2 and ext[s] != blank and ext[s] != ext[s - 2]:
                a = torch.logaddexp(a, prev[s - 2])
            alpha[s] = a + lp[t, ext[s]]
    return -torch.logaddexp(alpha[-1], alpha[-2]).item()


def test_auxiliary_ctc_loss_matches_the_forward_recursion(fixtures, batch):
    """loss = (sum(w * ce) + ctc_loss_weight * sum of each clip's CTC NLL) / sum(w); a clip without a
    transcript adds no CTC term; the head and the encoder get its gradient, and the head is frozen
    when the weight is 0 (no loss would reach it)."""
    m = assemble(fixtures / "asr_ctc.nemo", fixtures / "llm_hf", seed=0).double()
    audio, lens = batch
    transcripts, tags = ["Hello, world: this is a small test.", None], ["<COMPLETE>", "<BACKCHANNEL>"]
    m.eval()
    plain, _ = m(audio.double(), lens, transcripts, tags)
    m.cfg = dataclasses.replace(m.cfg, ctc_loss_weight=0.5)
    loss, stats = m(audio.double(), lens, transcripts, tags)
    with torch.no_grad():
        x, xl = m.encode(*m.features(audio.double(), lens))
        lp = F.log_softmax(m.ctc.logits(x[0, :xl[0]]), -1)
        target = m.ctc_tokenizer.encode("hello world this is a small test")
        ref = ctc_nll_reference(lp, target, m.ctc.blank_id)
    w = stats["weight"].item()
    assert abs((loss.item() - plain.item()) * w - 0.5 * ref) < 1e-8 * max(1.0, ref)
    assert abs(stats["ctc_loss"].item() - ref / len(target)) < 1e-8
    loss.backward()
    assert m.ctc.weight.grad.abs().sum() > 0 and m.encoder.layers[-1].feed_forward2.linear2.weight.grad.abs().sum() > 0
    for weight, trainable in ((0.0, False), (0.5, True)):
        m.cfg = dataclasses.replace(m.cfg, ctc_loss_weight=weight)
        setup_trainable(m, ModelConfig(init_from="x"))
        assert m.ctc.weight.requires_grad is trainable
    with pytest.raises(ValueError, match="needs a CTC head"):
        dataclasses.replace(m.cfg, ctc=None, ctc_loss_weight=0.5)


def test_config_refuses_unknown_keys_and_other_tag_sets(model):
    d = model.cfg.to_dict()
    assert "tags" not in d["prompt"] and SpeechLLMConfig.from_dict(d) == model.cfg
    older = {**d, "prompt": {**d["prompt"], "tags": list(TAGS)}}  # config.json before the tag set was fixed
    assert SpeechLLMConfig.from_dict(older) == model.cfg
    with pytest.raises(ValueError, match="prompt.tags"):
        SpeechLLMConfig.from_dict({**d, "prompt": {**d["prompt"], "tags": ["<YES>", "<NO>"]}})
    with pytest.raises(ValueError, match="prompt.usr"):
        SpeechLLMConfig.from_dict({**d, "prompt": {**d["prompt"], "usr": "<audio>"}})
    with pytest.raises(ValueError, match="tag_los_weight"):
        SpeechLLMConfig.from_dict({**d, "tag_los_weight": 2.0})
    with pytest.raises(ValueError, match="encoder.d_modl"):
        SpeechLLMConfig.from_dict({**d, "encoder": {**d["encoder"], "d_modl": 3}})


def test_answer_formats(model):
    tok = model.tokenizer
    ids, at = model.answer_ids("hello world", "<INCOMPLETE>")
    assert tok.decode(ids) == "hello world <INCOMPLETE><|im_end|>" and ids[at] == model.tag_ids[1]
    ids, at = model.answer_ids("hello world", None)  # Stage 1: transcript only
    assert tok.decode(ids) == "hello world<|im_end|>" and at is None
    with pytest.raises(ValueError, match="unknown tag"):
        model.answer_ids("x", "<DONE>")
    with pytest.raises(ValueError, match="answer_format"):
        PromptConfig(answer_format="json")


def test_predict_probabilities_and_batch_equals_single(model, batch):
    audio, lens = batch
    out = model.predict(audio, lens, max_new_tokens=4)
    for i, o in enumerate(out):
        assert abs(sum(o["probs"].values()) - 1) < 1e-6 and 0 < o["tag_mass"] <= 1
        alone = model.predict(audio[i:i + 1, : lens[i]], lens[i:i + 1], max_new_tokens=4)[0]
        assert alone["transcript"] == o["transcript"]
        for tag in o["probs"]:
            assert abs(alone["probs"][tag] - o["probs"][tag]) < 1e-4


def test_save_load_round_trip_is_bit_exact(model, batch, tmp_path):
    model.save_pretrained(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "encoder_tokenizer.model"} <= names
    again = SpeechLLM.from_pretrained(tmp_path)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.llm.lm_head.weight is again.llm.model.embed_tokens.weight  # still tied
    audio, lens = batch
    assert again.predict(audio, lens, max_new_tokens=3) [0]["probs"] == model.predict(audio, lens, max_new_tokens=3)[0]["probs"]


def test_bf16_checkpoint(model, batch, tmp_path):
    model.save_pretrained(tmp_path)
    half = SpeechLLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.llm.lm_head.weight.dtype == torch.bfloat16 and half.preprocessor.fb.dtype == torch.float32
    assert torch.equal(half.preprocessor.fb, model.preprocessor.fb)  # float32 values, not bf16 ones
    audio, lens = batch
    p16 = half.predict(audio, lens, max_new_tokens=2)[0]["probs"]
    p32 = model.predict(audio, lens, max_new_tokens=2)[0]["probs"]
    assert max(abs(p16[t] - p32[t]) for t in p32) < 0.05


def test_missing_or_mismatched_tensors_are_listed(model, tmp_path):
    from safetensors.torch import save_file
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["projector.conv.weight"]
    state["encoder.layers.0.norm_out.weight"] = torch.zeros(3)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as e:
        SpeechLLM.from_pretrained(tmp_path)
    assert "projector.conv.weight" in str(e.value) and "encoder.layers.0.norm_out.weight" in str(e.value)
