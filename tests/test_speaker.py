"""Speaker kernels against NeMo 3.0.0's EncDecMultiTalkerRNNTBPEModel (asr_spk_kernel.nemo) through
ASRModel.encode. Run: python -m pytest -q tests/test_speaker.py"""
import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from conftest import rewrite_nemo
from speechllm.asr import ASRModel
from speechllm.audio import pad_batch
from speechllm.convert import NemoArchive
from speechllm.fastconformer import FastConformerConfig
from speechllm.speaker import SpeakerKernelConfig, build_kernels, fit_mask, init_weights, kernel_hook

TOL = 1e-4


@pytest.fixture(scope="module")
def ref(fixtures):
    return load_file(fixtures / "asr_spk_kernel_ref.safetensors")


@pytest.fixture(scope="module")
def batch(spk_asr, spk_clips):
    with torch.no_grad():
        return spk_asr.features(*pad_batch(spk_clips))


def max_relative_diff(a, b, lengths):
    """Largest error over valid frames, relative where |b| > 1: the kernel-0 input (the subsampling
    output) reaches |x| = 90, where fp32 itself is 8e-6 apart; NeMo's fp32 value there is 1.2e-4
    from a float64 recomputation of ours, on any CPU, so an absolute 1e-4 passed or failed with the
    machine's summation order (1.3e-6 relative)."""
    return max(((a[i, :n] - b[i, :n]).abs() / b[i, :n].abs().clamp(min=1)).max().item()
               for i, n in enumerate(lengths.tolist()))


@pytest.mark.parametrize("case", ["spk", "nospk", "allones", "short"])
def test_encode_matches_nemo(spk_asr, ref, batch, case):
    s, g = ref.get(f"{case}.spk_targets"), ref.get(f"{case}.bg_spk_targets")  # None for nospk
    with torch.no_grad():
        x, lengths = spk_asr.encode(*batch, spk_targets=s, bg_spk_targets=g)
    assert lengths.tolist() == ref["batch.encoded_length"].tolist()
    assert max_relative_diff(x, ref[f"{case}.encoder_output"].transpose(1, 2), lengths) < TOL


@pytest.mark.parametrize("i", [0, 1])
def test_single_clip_matches_nemo(spk_asr, ref, spk_clips, i):
    case = f"single{i}.spk"
    with torch.no_grad():
        feats, feat_lens = spk_asr.features(*pad_batch([spk_clips[i]]))
        x, lengths = spk_asr.encode(feats, feat_lens, ref[f"{case}.spk_targets"], ref[f"{case}.bg_spk_targets"])
    assert lengths.tolist() == ref[f"{case}.encoded_length"].tolist()
    assert max_relative_diff(x, ref[f"{case}.encoder_output"].transpose(1, 2), lengths) < TOL


@pytest.mark.parametrize("case", ["spk", "nospk"])
def test_kernel_inputs_and_outputs_match_nemo(spk_asr, ref, batch, case):
    s, g = ref.get(f"{case}.spk_targets"), ref.get(f"{case}.bg_spk_targets")
    hook, seen = kernel_hook(spk_asr.spk_kernels, spk_asr.bg_spk_kernels, s, g), {}

    def recording_hook(i, x, lengths):
        seen[i] = (x, hook(i, x, lengths))
        return seen[i][1]

    with torch.no_grad():
        _, lengths = spk_asr.encoder(*batch, layer_hook=recording_hook)
    for layer in (0, 1):
        x_in, x_out = seen[layer]
        assert max_relative_diff(x_in, ref[f"{case}.kernel{layer}_in"], lengths) < TOL
        assert max_relative_diff(x_out, ref[f"{case}.kernel{layer}_out"], lengths) < TOL
    if case == "nospk":  # single-speaker mode: layer 0 adds K_spk(x) + K_bg(0), layer 1 nothing
        x_in, x_out = seen[0]
        with torch.no_grad():
            expected = x_in + spk_asr.spk_kernels["0"](x_in) + spk_asr.bg_spk_kernels["0"](torch.zeros_like(x_in))
        assert torch.allclose(x_out, expected, atol=1e-6)
        assert seen[1][0] is seen[1][1]


def test_fit_mask_pads_left_and_keeps_the_end():
    x = torch.zeros(2, 5, 3)
    mask = torch.tensor([[0.25, 0.5], [0.75, 0.125]])
    assert fit_mask(mask, x, 1.0).tolist() == [[1, 1, 1, 0.25, 0.5], [1, 1, 1, 0.75, 0.125]]
    assert fit_mask(mask, x, 0.0)[:, :3].sum() == 0
    long = torch.arange(14.0).view(2, 7)
    assert fit_mask(long, x, 1.0).tolist() == [[2, 3, 4, 5, 6], [9, 10, 11, 12, 13]]
    assert fit_mask(None, x, 0.0).shape == (2, 5) and fit_mask(None, x, 1.0).min() == 1
    with pytest.raises(ValueError, match="does not fit a batch of 2"):
        fit_mask(torch.ones(3, 5), x, 1.0)


# ----------------------------------------------------------------------------------------------
# ASRModel integration


def test_multitalker_import_reports_rnnt_and_has_no_ctc_head(fixtures, caplog):
    with caplog.at_level(logging.WARNING, logger="speechllm.asr"):
        model = ASRModel.from_nemo(fixtures / "asr_spk_kernel.nemo")
    for name in ("decoder.prediction.embed.weight", "decoder.prediction.dec_rnn.lstm.weight_ih_l0",
                 "joint.enc.weight", "joint.joint_net.2.bias"):
        assert name in caplog.text
    assert model.decoder is None and model.cfg.vocab_size is None
    assert model.cfg.speaker == SpeakerKernelConfig(layers=(0, 1), hidden_size=32, background=True)
    with pytest.raises(RuntimeError, match="no CTC decoder"):
        model(torch.zeros(1, 16000), torch.tensor([16000]))
    with pytest.raises(RuntimeError, match="no CTC decoder"):
        model.transcribe(torch.zeros(16000))


def test_save_and_load_pretrained_keeps_kernels(spk_asr, ref, batch, tmp_path):
    spk_asr.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["vocab_size"] is None
    assert cfg["speaker_kernels"] == {"layers": [0, 1], "hidden_size": 32, "background": True, "dropout": 0.5}
    assert "bg_spk_kernels.1.3.weight" in load_file(tmp_path / "model.safetensors")
    again = ASRModel.from_pretrained(tmp_path)
    s, g = ref["spk.spk_targets"], ref["spk.bg_spk_targets"]
    with torch.no_grad():
        assert torch.equal(spk_asr.encode(*batch, s, g)[0], again.encode(*batch, s, g)[0])


def test_plain_ctc_model_has_no_kernels(asr, batch):
    model = asr
    assert "speaker_kernels" not in model.cfg.to_dict()
    assert not any("spk_kernels" in k for k in model.state_dict())
    with pytest.raises(ValueError, match="no speaker kernels"):
        model.encode(*batch, spk_targets=torch.ones(2, 51))


def test_ctc_archive_with_kernels_imports_them(fixtures, asr, batch, tmp_path):
    """A CTC model carrying kernels (the project's own checkpoints may): kernel at layer 1 only, no
    background kernel. With no targets it does nothing, as NeMo's hooks for layers > 0."""
    src = NemoArchive(fixtures / "asr_ctc.nemo")
    cfg = {**src.config, "spk_kernel_type": "ff", "spk_kernel_layers": [1], "add_bg_spk_kernel": False}
    kernels = {"spk_kernels.1.0.weight": torch.randn(64, 64) * 0.1, "spk_kernels.1.0.bias": torch.randn(64),
               "spk_kernels.1.3.weight": torch.randn(64, 64) * 0.1, "spk_kernels.1.3.bias": torch.randn(64)}
    dst = rewrite_nemo(fixtures / "asr_ctc.nemo", tmp_path / "ctc_spk.nemo", cfg, {**src.state_dict(), **kernels})
    model = ASRModel.from_nemo(dst)
    plain = asr
    assert model.bg_spk_kernels is None
    assert torch.equal(model.state_dict()["spk_kernels.1.3.bias"], kernels["spk_kernels.1.3.bias"])
    feats, lens = batch[0][:, :80], batch[1]  # asr_ctc.nemo has 80 mels too
    with torch.no_grad():
        assert torch.equal(model.encode(feats, lens)[0], plain.encode(feats, lens)[0])
        s = torch.ones(2, 51)
        assert not torch.allclose(model.encode(feats, lens, s)[0], plain.encode(feats, lens)[0])


def test_init_weights_starts_as_identity_and_learns():
    cfg = SpeakerKernelConfig(layers=(0, 2), hidden_size=48)
    spk, bg = build_kernels(cfg, 32, 3)
    init_weights(spk, bg)
    assert spk["2"][0].weight.shape == (48, 32) and spk["2"][3].weight.shape == (32, 48)
    assert abs(spk["0"][0].weight.std().item() - 32 ** -0.5) < 0.02
    x = torch.randn(2, 7, 32)
    s, g = torch.rand(2, 7), torch.rand(2, 7)
    hook = kernel_hook(spk, bg, s, g)
    for i in (0, 2):
        assert torch.equal(hook(i, x, None), x)
    hook(0, x, None).pow(2).sum().backward()
    assert spk["0"][3].weight.grad.abs().sum() > 0


def test_speaker_kernel_config_checks():
    enc = FastConformerConfig.from_nemo({"feat_in": 80, "n_layers": 2, "d_model": 32, "subsampling_factor": 8,
                                         "subsampling": "dw_striding", "subsampling_conv_channels": 16})
    assert SpeakerKernelConfig.from_nemo({}, enc) is None
    assert SpeakerKernelConfig.from_nemo({"spk_kernel_type": "ff"}, enc) == SpeakerKernelConfig((0,), 32, True, 0.5)
    with pytest.raises(ValueError, match="spk_kernel_type='mask'"):
        SpeakerKernelConfig.from_nemo({"spk_kernel_type": "mask"}, enc)
    with pytest.raises(ValueError, match="layers"):
        SpeakerKernelConfig(layers=(1, 1))
    with pytest.raises(ValueError, match="< the encoder's 2 layers"):
        build_kernels(SpeakerKernelConfig(layers=(0, 2)), 32, 2)
    cfg = SpeakerKernelConfig(layers=(3, 5), background=False)
    assert SpeakerKernelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
