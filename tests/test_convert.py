"""convert_weights.py: assemble, full checkpoints in several layouts, inspect.
Run: python -m pytest -q tests/test_convert.py"""
import pytest
import torch

import speechllm
from conftest import load_script, run_main
from speechllm.asr import ASRModel
from speechllm.convert import ConversionError, inspect, load_checkpoint_into, read_checkpoint
from speechllm.model import SpeechLLM, assemble
from speechllm.sortformer import SortFormer



@pytest.fixture(scope="module")
def trained(fixtures):
    """Stands in for a trained model: every tensor perturbed, so a mislaid one shows; but the CTC
    draft head, which comes from the encoder archive and is not trained without its loss (the
    components and SALM layouts do not hold it)."""
    model = assemble(fixtures / "asr_ctc.nemo", fixtures / "llm_hf", seed=1)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("ctc."):
                p.add_(0.01 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def base(fixtures):
    return assemble(fixtures / "asr_ctc.nemo", fixtures / "llm_hf", seed=2)


def equal_models(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def layouts(model):
    """Ways training code saves a Speech-LLM, each holding the same weights."""
    sd = {k: v.clone() for k, v in model.state_dict().items() if k != "llm.lm_head.weight"}
    by_part = lambda prefix: {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    asr_style = {**{f"preprocessor.featurizer.{k}": v for k, v in by_part("preprocessor.").items()},
                 **{f"encoder.{k}": v for k, v in by_part("encoder.").items()},
                 "decoder.decoder_layers.0.weight": torch.zeros(97, 64, 1)}  # its CTC head rides along
    return {
        "ddp_model_wrapper": {"model": {f"module.{k}": v for k, v in sd.items()}, "step": 3000,
                              "optimizer": {"state": {}, "param_groups": []}},
        "deepspeed_module": {"module": sd, "global_steps": 3000},
        "components": {"encoder": asr_style, "projector": by_part("projector."), "llm": by_part("llm."),
                       "step": 3000},
        "salm_style": {"state_dict": {**{f"perception.encoder.{k}": v for k, v in by_part("encoder.").items()},
                                      **{f"perception.preprocessor.featurizer.{k}": v for k, v in by_part("preprocessor.").items()},
                                      **{f"projector.{k}": v for k, v in by_part("projector.").items()},
                                      "embed_tokens.weight": sd["llm.model.embed_tokens.weight"],
                                      **{f"llm.{k}": v for k, v in by_part("llm.").items() if "embed_tokens" not in k}}},
    }


@pytest.mark.parametrize("layout", ["ddp_model_wrapper", "deepspeed_module", "components", "salm_style"])
def test_checkpoint_layouts_load_exactly(trained, fixtures, tmp_path, layout):
    torch.save(layouts(trained)[layout], tmp_path / "step_3000.pt")
    model = assemble(fixtures / "asr_ctc.nemo", fixtures / "llm_hf", seed=2)
    assert not equal_models(model, trained)
    report = load_checkpoint_into(model, tmp_path / "step_3000.pt")
    assert equal_models(model, trained), report
    if layout == "components":
        assert any("decoder.decoder_layers.0.weight" in line for line in report)  # dropped, and said so


def test_lora_factors_are_merged(trained, fixtures, tmp_path):
    sd = {k: v.clone() for k, v in trained.state_dict().items() if k != "llm.lm_head.weight"}
    q = "llm.model.layers.0.self_attn.q_proj"
    a, b = torch.randn(4, 64), torch.randn(64, 4)
    peft = {k.replace("llm.", "llm.base_model.model.", 1): v for k, v in sd.items() if k.startswith("llm.")}
    stem = q.replace("llm.", "llm.base_model.model.", 1)
    peft[f"{stem}.base_layer.weight"] = peft.pop(f"{stem}.weight")
    peft[f"{stem}.base_layer.bias"] = peft.pop(f"{stem}.bias")
    peft[f"{stem}.lora_A.default.weight"], peft[f"{stem}.lora_B.default.weight"] = a, b
    rest = {k: v for k, v in sd.items() if not k.startswith("llm.")}
    torch.save({**rest, **peft}, tmp_path / "lora.pt")
    model = assemble(fixtures / "asr_ctc.nemo", fixtures / "llm_hf", seed=2)
    with pytest.raises(ConversionError, match="LoRA"):
        load_checkpoint_into(model, tmp_path / "lora.pt")
    load_checkpoint_into(model, tmp_path / "lora.pt", lora_scaling=32 / 4)
    want = sd[f"{q}.weight"] + 8.0 * (b @ a)
    torch.testing.assert_close(model.state_dict()[f"{q}.weight"], want)
    torch.testing.assert_close(model.state_dict()[f"{q}.bias"], sd[f"{q}.bias"])


def test_missing_and_misshaped_tensors_are_listed(trained, base, tmp_path):
    sd = {k: v for k, v in trained.state_dict().items() if k != "llm.lm_head.weight"}
    del sd["projector.conv.weight"]
    sd["llm.model.norm.weight"] = torch.zeros(5)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(ConversionError) as e:
        load_checkpoint_into(base, tmp_path / "bad.pt")
    assert "projector.conv.weight" in str(e.value) and "llm.model.norm.weight" in str(e.value)


def test_unsafe_checkpoint_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": {"x": torch.zeros(1)}, "evil": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ConversionError, match="weights_only"):
        read_checkpoint(tmp_path / "evil.pt")


def test_inspect_places_every_tensor(fixtures, trained, tmp_path):
    notes, rows = inspect(fixtures / "asr_ctc.nemo")
    assert len(rows) == 96 and all(dest != "UNPLACED" for *_, dest in rows)
    notes, rows = inspect(fixtures / "salm")
    assert {dest.split(".")[0] for *_, dest in rows} == {"llm", "preprocessor", "encoder", "projector"}
    torch.save(layouts(trained)["components"], tmp_path / "step.pt")
    notes, rows = inspect(tmp_path / "step.pt")
    assert any("component" in n for n in notes)
    assert dict((r[0], r[3]) for r in rows)["encoder.decoder.decoder_layers.0.weight"] == "dropped"


def test_load_and_from_nemo_pick_the_class_by_model_type(fixtures, tmp_path):
    diarizer = speechllm.from_nemo(fixtures / "diar_sortformer.nemo")
    asr = speechllm.from_nemo(fixtures / "asr_ctc.nemo")
    assert isinstance(diarizer, SortFormer) and isinstance(asr, ASRModel)
    diarizer.save_pretrained(tmp_path / "diar")
    asr.save_pretrained(tmp_path / "asr")
    assert isinstance(speechllm.load(tmp_path / "diar"), SortFormer)
    half = speechllm.load(tmp_path / "asr", dtype=torch.bfloat16)
    assert half.encoder.pre_encode.out.weight.dtype == torch.bfloat16 and half.preprocessor.fb.dtype == torch.float32
    archive = speechllm.load(fixtures / "asr_ctc.nemo", dtype=torch.bfloat16)
    assert equal_models(archive, half)
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        speechllm.load(tmp_path)


convert_weights = load_script("convert_weights")


def test_cli_assemble_checkpoint_inspect(fixtures, trained, tmp_path, capsys):
    run = lambda *args: run_main(convert_weights.main, args, capsys)
    r = run("assemble", "--encoder", str(fixtures / "asr_ctc.nemo"), "--llm", str(fixtures / "llm_hf"),
            "--out", str(tmp_path / "stage1"), "--speaker-kernel-layers", "0")
    assert r.returncode == 0, r.stderr
    stage1 = SpeechLLM.from_pretrained(tmp_path / "stage1")
    assert stage1.cfg.speaker.layers == (0,) and stage1.spk_kernels is not None
    torch.save(layouts(trained)["deepspeed_module"], tmp_path / "step_3000.pt")
    r = run("checkpoint", str(tmp_path / "step_3000.pt"), "--encoder", str(fixtures / "asr_ctc.nemo"),
            "--llm", str(fixtures / "llm_hf"), "--out", str(tmp_path / "tt"))
    assert r.returncode == 0, r.stderr
    assert equal_models(SpeechLLM.from_pretrained(tmp_path / "tt"), trained)
    r = run("inspect", str(tmp_path / "step_3000.pt"))
    assert r.returncode == 0 and "projector.conv.weight" in r.stdout and "0 unplaced" in r.stdout
    r = run("checkpoint", str(tmp_path / "step_3000.pt"), "--out", str(tmp_path / "x"))
    assert r.returncode == 1 and "--base" in r.stderr
    for cmd in ("nemo", "assemble", "checkpoint", "inspect"):
        assert run(cmd, "--help").returncode == 0
