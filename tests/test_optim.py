"""Freezing, LoRA, tag rows, schedules and the training config. Run: python -m pytest -q tests/test_optim.py"""
import math
from pathlib import Path

import pytest
import soundfile as sf
import torch
import yaml

from speechllm.audio import pad_batch
from speechllm.config import build
from speechllm.lora import LoRALinear, TaggedEmbedding, TaggedHead, apply_lora, merged_state_dict, train_tag_rows
from speechllm.model import SpeechLLM, assemble
from speechllm.optim import (apply_freeze, build_optimizer, get_lr, set_train_mode, setup_trainable,
                             trainable_table)
from speechllm.speaker import SpeakerKernelConfig
from speechllm.train_config import (LoRAConfig, ModelConfig, OptimConfig, SchedConfig, TrainConfig,
                                    load_config)

TEXTS = ["hello world this is a small test", "speech to text"]
TAGS = ["<COMPLETE>", "<BACKCHANNEL>"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny models; two OpenMP threads on a busy 2-core machine wait on each other


@pytest.fixture(scope="module")
def batch(fixtures):
    return pad_batch([sf.read(fixtures / f"audio_{i}.wav", dtype="float32")[0] for i in (0, 1)])


def tiny(fixtures) -> SpeechLLM:
    return assemble(fixtures / "asr_ctc.nemo", fixtures / "llm_hf", speaker=SpeakerKernelConfig(layers=(0, 1)), seed=0)


def model_config(**kw) -> ModelConfig:
    return ModelConfig(init_from="unused", **kw)


def train_steps(model, batch, steps: int = 2) -> torch.optim.Optimizer:
    set_train_mode(model)
    # Strong weight decay: a frozen tensor that reached AdamW would move even with zero gradient.
    opt = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.5))
    audio, lengths = batch
    s = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])  # speaker activity (left-padded to T by NeMo's rule)
    for _ in range(steps):
        loss, _ = model(audio, lengths, TEXTS, TAGS, s, 1 - s)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt


# What each preset leaves trainable, by top-level component (tag_delta and lora_* live under llm).
TRAINABLE = {
    "all_trainable": {"encoder", "spk_kernels", "bg_spk_kernels", "projector", "llm"},
    "encoder_frozen": {"spk_kernels", "bg_spk_kernels", "projector", "llm"},
    "projector_only": {"projector"},
    "llm_and_projector": {"spk_kernels", "bg_spk_kernels", "llm"},
}


@pytest.mark.parametrize("preset,lora", [(p, False) for p in TRAINABLE] + [("llm_and_projector", True)])
def test_freeze_presets_leave_frozen_tensors_bit_identical(fixtures, batch, preset, lora):
    model = tiny(fixtures)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    setup_trainable(model, model_config(freeze=preset, lora=LoRAConfig(r=4, lora_dropout=0.0) if lora else None))
    opt = train_steps(model, batch)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.split(".")[0] for n in trainable} == TRAINABLE[preset]
    in_optimizer = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}  # only trainable tensors
    if preset == "llm_and_projector":  # only the adapters learn inside the LLM
        assert {n.rsplit(".", 1)[-1] for n in trainable if n.startswith("llm.")} == (
            {"tag_delta", "lora_A", "lora_B"} if lora else {"tag_delta"})
    after = model.state_dict()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(after[name], before[name]), f"{preset}: frozen {name} changed"
    changed = {n.split(".")[0] for n in trainable if n in before and not torch.equal(after[n], before[n])}
    changed |= {"llm"} if any(("tag_delta" in n or "lora_B" in n) and after[n].abs().sum() > 0 for n in trainable) else set()
    assert changed == TRAINABLE[preset]  # and every trainable component did learn

    bn = [m for m in model.encoder.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    encoder_frozen = "encoder" not in TRAINABLE[preset]
    assert all(m.training != encoder_frozen for m in bn)  # frozen BatchNorm stays in eval mode
    stats = [k for k in before if "running_" in k]
    assert all(torch.equal(after[k], before[k]) for k in stats) == encoder_frozen

    # Export: adapters fold into the base weights, and every row but the tag rows is untouched.
    merged = merged_state_dict(model)
    assert not any(k.rsplit(".", 1)[-1] in ("tag_delta", "lora_A", "lora_B") for k in merged)
    if preset == "llm_and_projector":
        emb, emb0 = merged["llm.model.embed_tokens.weight"], before["llm.model.embed_tokens.weight"]
        rows = torch.ones(emb.shape[0], dtype=torch.bool)
        rows[model.tag_ids] = False
        assert torch.equal(emb[rows], emb0[rows]) and not torch.equal(emb[~rows], emb0[~rows])
        q = "llm.model.layers.0.self_attn.q_proj.weight"
        assert torch.equal(after[q], before[q]) and torch.equal(merged[q], before[q]) != lora


def test_adapters_merge_into_a_plain_model_with_the_same_outputs(fixtures, batch):
    model = tiny(fixtures).eval()
    apply_lora(model.llm, r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj", "down_proj"))
    train_tag_rows(model.llm, model.tag_ids)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("lora_B", "tag_delta")):
                p.normal_(std=0.05)  # as if trained: B starts at zero
    assert isinstance(model.llm.model.layers[0].mlp.down_proj, LoRALinear)
    assert model.llm.lm_head.tag_delta is model.llm.model.embed_tokens.tag_delta  # tied head: the same rows
    plain = SpeechLLM(model.cfg, model.tokenizer)
    plain.load_state_dict(merged_state_dict(model), strict=True)
    plain.llm.tie_weights()
    plain.eval()
    audio, lengths = batch
    with torch.no_grad():
        a = model(audio, lengths, TEXTS, TAGS)[0]
        b = plain(audio, lengths, TEXTS, TAGS)[0]
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    pa, pb = model.predict(audio, lengths, 8), plain.predict(audio, lengths, 8)
    for x, y in zip(pa, pb):
        assert x["tag"] == y["tag"] and abs(x["probs"][x["tag"]] - y["probs"][x["tag"]]) < 1e-5


def test_tag_rows_of_an_untied_head_get_their_own_delta():
    emb, head = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False)
    llm = torch.nn.Module()
    llm.model = torch.nn.ModuleDict(dict(embed_tokens=emb))
    llm.lm_head = head
    train_tag_rows(llm, [7, 9])
    e, h = llm.model.embed_tokens, llm.lm_head
    assert isinstance(e, TaggedEmbedding) and isinstance(h, TaggedHead) and e.tag_delta is not h.tag_delta
    with torch.no_grad():
        e.tag_delta.fill_(1.0)
        h.tag_delta.fill_(2.0)
    ids = torch.tensor([[1, 7, 9]])
    assert torch.equal(e(ids), emb.weight[ids] + torch.tensor([0.0, 1.0, 1.0])[None, :, None])
    x = torch.randn(3, 4)
    assert torch.allclose(h(x), x @ h.merged_weight().T)
    assert torch.equal(h.merged_weight()[:7], head.weight[:7])


def test_freeze_patterns_follow_nemo_re_match(fixtures):
    model = tiny(fixtures)
    unmatched = apply_freeze(model, [r"encoder\.layers\.", r"^llm\..+$", r"^nothing\..+$"],
                             [r"^llm\.model\.norm\..+$", r"layers\.1\."])
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "encoder.layers.0.conv.batch_norm.weight" in frozen  # match: anchored at the start only
    assert "encoder.layers.1.conv.batch_norm.weight" in frozen  # 'layers\.1\.' does not match at position 0
    assert "llm.model.norm.weight" not in frozen  # prevented
    assert "encoder.pre_encode.out.weight" not in frozen and "projector.conv.weight" not in frozen
    assert unmatched == [r"^nothing\..+$", r"layers\.1\."]
    table = trainable_table(model)
    assert "encoder" in table and "total" in table


def test_schedules():
    cos = SchedConfig(name="cosine", warmup_steps=10, min_lr=1e-6)
    assert get_lr(0, 100, 1e-3, cos) == pytest.approx(1e-4)
    assert get_lr(9, 100, 1e-3, cos) == pytest.approx(1e-3)
    assert get_lr(55, 100, 1e-3, cos) == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6))  # half way down
    assert get_lr(100, 100, 1e-3, cos) == pytest.approx(1e-6)
    lrs = [get_lr(s, 100, 1e-3, cos) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    wsd = SchedConfig(name="wsd", warmup_steps=10, min_lr=0.0, decay_steps=20)
    assert get_lr(50, 100, 1e-3, wsd) == get_lr(79, 100, 1e-3, wsd) == 1e-3
    assert get_lr(89, 100, 1e-3, wsd) == pytest.approx(5e-4) and get_lr(99, 100, 1e-3, wsd) == pytest.approx(0.0)
    const = SchedConfig(name="constant", warmup_steps=2)
    assert [get_lr(s, 100, 1e-3, const) for s in (0, 1, 50)] == [5e-4, 1e-3, 1e-3]
    assert math.isclose(get_lr(94, 100, 1e-3, SchedConfig(name="wsd")), 5e-4)  # default decay: last 10%


def test_config_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  init_from: ckpt\n  lora: null\ndata:\n  train_ds:\n    manifest_filepath: a.jsonl\n"
                    "optim:\n  lr: 2e-5\n")
    cfg = load_config(path, ["trainer.max_steps=1000", "data.train_ds.batch_size=8", "model.lora.r=16",
                             "data.train_ds.bucket_duration_bins=[2, 4.5]", "optim.sched.name=wsd",
                             "model.freeze_params=['^llm\\..+$']", "trainer.gradient_clip_val=1"])
    assert isinstance(cfg, TrainConfig) and cfg.optim.lr == 2e-5  # PyYAML reads 2e-5 as a string
    assert cfg.trainer.max_steps == 1000 and cfg.data.train_ds.batch_size == 8
    assert cfg.model.lora == LoRAConfig(r=16) and cfg.model.lora.target_modules == ("q_proj", "v_proj")
    assert cfg.data.train_ds.bucket_duration_bins == (2.0, 4.5) and cfg.data.train_ds.manifest_filepath == ("a.jsonl",)
    assert cfg.model.freeze_params == (r"^llm\..+$",) and cfg.trainer.gradient_clip_val == 1.0
    assert build(TrainConfig, yaml.safe_load(cfg.to_yaml())) == cfg  # the saved config reloads as it was
    for bad, match in [("trainer.max_stepz=3", "trainer.max_stepz"), ("model.lora.rank=4", "model.lora.rank"),
                       ("trainer.precision=fp16", "trainer.precision"), ("optim.lr=fast", "expected a number"),
                       ("trainer.max_steps", "key=value"), ("data.task=tts", "data.task")]:
        with pytest.raises(ValueError, match=match):
            load_config(path, [bad])
    with pytest.raises(ValueError, match="init_from"):
        build(TrainConfig, {"model": {}, "data": {"train_ds": {"manifest_filepath": "a"}}})


def test_shipped_recipes_are_seed_000s():
    conf = Path(__file__).resolve().parents[1] / "conf"
    for path in sorted(conf.glob("*.yaml")):
        load_config(path)  # every shipped config parses and validates
    s2 = load_config(conf / "stage2_turntaking.yaml")
    assert (s2.optim.lr, s2.optim.weight_decay, s2.optim.sched) == (2e-5, 0.01, SchedConfig("cosine", 1500, 1e-6))
    assert s2.data.train_ds.batch_size * s2.trainer.accumulate_grad_batches * 4 == 512
    # Seed 000 trains in bf16 on GPUs; `auto` is bf16 on any CUDA device that supports it and
    # keeps a CPU without fast bf16 on fp32 (speechllm/precision.py).
    assert (s2.model.tag_loss_weight, s2.model.freeze, s2.trainer.gradient_clip_val, s2.trainer.precision) == (
        5.0, "llm_and_projector", 20.0, "auto")
    ds = s2.data.train_ds
    assert (ds.weighted_sampling, ds.max_weight, ds.tt_confidence_threshold, ds.bc_priority, ds.complete_ratio) == (
        True, 50.0, 0.9, True, 1.0)
    assert s2.data.validation_ds.complete_ratio is None  # downsampling: training split only
    s1 = load_config(conf / "stage1_asr.yaml")
    assert (s1.optim.lr, s1.model.freeze, s1.data.task) == (5e-6, "all_trainable", "asr")
