"""Seed 004's system with the same commands as every other: `convert_weights.py assemble` (Whisper
encoder, causal Transformer projector, Qwen3.5), `train.py` (LoRA r=32, alpha=64 on every linear
layer of the LLM, the encoder frozen) and `infer.py`; FastConformer + Qwen3 through the same path.
Run: python -m pytest -q tests/test_seed004.py"""
import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn as nn

from conftest import ROOT, load_script, run_main
from speechllm.config import build
from speechllm.model import SpeechLLM, assemble
from speechllm.optim import setup_trainable
from speechllm.train_config import ModelConfig, load_config
from test_train import records, run, speech_clips, write_config

convert_weights = load_script("convert_weights")
infer = load_script("infer")

LORA = {"r": 32, "lora_alpha": 64, "lora_dropout": 0.0, "target_modules": "all-linear"}
SMALL_CAUSAL = {"kind": "causal_transformer", "hidden": 64, "n_heads": 4, "ffn_dim": 128, "n_layers": 2, "dropout": 0.0}


def test_assemble_builds_seed004s_layout(fixtures, tmp_path, capsys):
    out = tmp_path / "s004"
    r = run_main(convert_weights.main, ["assemble", "--encoder", fixtures / "whisper_hf", "--llm",
                                        fixtures / "qwen3_5_hf", "--projector", "causal_transformer", "--out", out], capsys)
    assert r.returncode == 0, r.stderr
    assert "Whisper encoder 2 x 64, causal_transformer projector, Qwen3.5 4 x 64" in r.stdout
    model = SpeechLLM.from_pretrained(out)
    p = model.cfg.projector  # seed 004: 4 layers, hidden 512, 8 heads, FFN 2048, one position per frame
    assert (p.kind, p.n_layers, p.hidden, p.n_heads, p.ffn_dim, p.stride, p.in_dim, p.out_dim) == \
        ("causal_transformer", 4, 512, 8, 2048, 1, 64, 64)
    d, f = 512, 2048  # per layer: q, k, v, o (d x d), SwiGLU (3 x d x f), two RMSNorm weights
    want = (64 * d + d) + 4 * (4 * d * d + 3 * d * f + 2 * d) + d + (d * 64 + 64)
    assert sum(x.numel() for x in model.projector.parameters()) == want  # ~17 M; 18 M at Qwen3.5-4B's width
    assert not (out / "encoder_tokenizer.model").exists()  # Whisper brings no SentencePiece model
    r = run_main(convert_weights.main, ["assemble", "--encoder", fixtures / "whisper_hf", "--llm", fixtures / "qwen3_5_hf",
                                        "--speaker-kernel-layers", "0", "--out", tmp_path / "spk"], capsys)
    assert r.returncode == 1 and "error: speaker kernels are FastConformer-only" in r.stderr
    r = run_main(convert_weights.main, ["assemble", "--encoder", fixtures / "qwen3_hf", "--llm", fixtures / "qwen3_5_hf",
                                        "--out", tmp_path / "bad"], capsys)
    assert r.returncode == 1 and "model_type 'qwen3' is not an encoder" in r.stderr


@pytest.mark.parametrize("encoder, llm", [("whisper_hf", "qwen3_5_hf"), ("asr_ctc.nemo", "qwen3_hf")])
def test_lora_on_every_llm_linear_with_the_encoder_frozen(fixtures, encoder, llm):
    """The trainable set: the projector whole, LoRA A/B beside every Linear of the LLM (Qwen3.5's
    DeltaNet projections too, not its depthwise conv, not the head), and the tag rows' delta."""
    model = assemble(fixtures / encoder, fixtures / llm, SMALL_CAUSAL)
    linears = [n for n, m in model.llm.named_modules() if type(m) is nn.Linear and n != "lm_head"]
    mc = build(ModelConfig, {"init_from": "x", "freeze": "encoder_frozen", "lora": LORA}, "model.")  # as YAML gives it
    assert mc.lora.target_modules == ("all-linear",)
    setup_trainable(model, mc)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    want = ({f"projector.{n}" for n, _ in model.projector.named_parameters()}
            | {f"llm.{n}.lora_{x}" for n in linears for x in "AB"} | {"llm.model.embed_tokens.tag_delta"})
    assert trainable == want
    names = {n.rsplit(".", 1)[-1] for n in linears}
    if llm == "qwen3_5_hf":
        assert {"in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj", "q_proj", "o_proj"} <= names
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= names
    lora = model.llm.model.layers[0].mlp.down_proj
    assert lora.lora_A.shape[0] == 32 and lora.scaling == 2.0


@pytest.mark.parametrize("encoder, llm", [("whisper_hf", "qwen3_5_hf"), ("asr_ctc.nemo", "qwen3_hf")])
def test_train_then_infer(fixtures, tmp_path, capsys, encoder, llm):
    """A few steps on one batch of eight clips: every loss finite and the last below the first; the
    exported step loads in infer.py and tags each clip."""
    manifest = speech_clips(tmp_path, fixtures)
    config = write_config(tmp_path / "c.yaml", fixtures, manifest, tmp_path / "run",
                          model={"pretrained_asr": str(fixtures / encoder), "pretrained_llm": str(fixtures / llm),
                                 "projector": SMALL_CAUSAL, "freeze": "encoder_frozen", "lora": LORA},
                          trainer={"precision": "fp32", "max_steps": 5, "save_every_n_steps": 5},
                          data={"task": "turntaking", "train_ds": {"manifest_filepath": str(manifest), "batch_size": 8,
                                                                   "num_workers": 0, "shuffle": False}})
    assert run("--config", config) == 0
    losses = [r["loss"] for r in records(tmp_path / "run", "train")]
    with capsys.disabled():
        print(f"\n{encoder} + {llm}: losses {[round(x, 4) for x in losses]}")
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    out = tmp_path / "run" / "step_5"
    clips = sorted((tmp_path / "clips").glob("s*.wav"))[:3]
    r = run_main(infer.main, [*clips, "--checkpoint", out, "--json", "--dtype", "float32"], capsys)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["audio"] for x in lines] == [str(c) for c in clips]
    assert all(x["tag"] in ("<COMPLETE>", "<INCOMPLETE>", "<BACKCHANNEL>") for x in lines)
    # the exported weights are the trained ones: LoRA merged, the encoder untouched
    model, base = SpeechLLM.from_pretrained(out), assemble(fixtures / encoder, fixtures / llm, SMALL_CAUSAL)
    a, b = model.state_dict(), base.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("encoder."))
    assert not torch.equal(a["llm.model.layers.0.mlp.down_proj.weight"], b["llm.model.layers.0.mlp.down_proj.weight"])


def test_whisper_refusals_in_train_and_infer(fixtures, tmp_path, capsys):
    manifest = speech_clips(tmp_path, fixtures)
    common = {"pretrained_asr": str(fixtures / "whisper_hf"), "pretrained_llm": str(fixtures / "qwen3_5_hf"),
              "projector": SMALL_CAUSAL}
    config = write_config(tmp_path / "spk.yaml", fixtures, manifest, tmp_path / "spk",
                          model={**common, "speaker_kernels": {"layers": [0]}})
    assert run("--config", config) == 1
    assert "error: speaker kernels are FastConformer-only" in capsys.readouterr().err
    config = write_config(tmp_path / "long.yaml", fixtures, manifest, tmp_path / "long", model=common,
                          data={"task": "turntaking", "train_ds": {"manifest_filepath": str(manifest), "max_duration": 40.0,
                                                                   "num_workers": 0}})
    assert run("--config", config) == 1
    assert "data.train_ds.max_duration 40 s is longer than the Whisper encoder's 30 s window" in capsys.readouterr().err
    # infer.py: a clip past the window is reported and skipped; --diarizer / --rttm are refused
    model = assemble(fixtures / "whisper_hf", fixtures / "qwen3_5_hf", SMALL_CAUSAL)
    model.save_pretrained(tmp_path / "m")
    sf.write(tmp_path / "long.wav", np.zeros(31 * 16000, np.float32), 16000)
    short = tmp_path / "clips" / "s0.wav"
    r = run_main(infer.main, [tmp_path / "long.wav", short, "--checkpoint", tmp_path / "m"], capsys)
    assert r.returncode == 1 and "31.0 s is longer than the Whisper encoder's 30 s window" in r.stderr
    assert r.stdout.startswith(str(short))
    r = run_main(infer.main, [short, "--checkpoint", tmp_path / "m", "--rttm", tmp_path / "x.rttm"], capsys)
    assert r.returncode == 1 and "FastConformer-only" in r.stderr


def test_shipped_seed004_recipes():
    s1, s2 = (load_config(ROOT / "conf" / f"seed004_stage{i}.yaml") for i in (1, 2))
    assert (s1.model.freeze, s1.model.projector, s1.optim.lr, s1.optim.sched.name, s1.optim.sched.warmup_steps) == (
        "projector_only", {"kind": "causal_transformer"}, 2e-4, "wsd", 1000)
    assert s1.data.train_ds.batch_size * 4 == 32 and s1.data.train_ds.max_duration == 30.0
    lora = s2.model.lora
    assert (lora.r, lora.lora_alpha, lora.target_modules, s2.model.freeze, s2.optim.lr) == (
        32, 64.0, ("all-linear",), "encoder_frozen", 2e-5)
