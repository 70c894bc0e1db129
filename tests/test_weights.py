"""Model directories: the atomic writer, the reader's misfit report and broken files.
Run: python -m pytest -q tests/test_weights.py"""
import json
import os

import pytest
import torch

import speechllm
from speechllm import weights
from speechllm.asr import ASRConfig, ASRModel
from speechllm.audio import PreprocessorConfig
from speechllm.fastconformer import FastConformerConfig
from speechllm.weights import ConversionError, check_fit, read_state


@pytest.fixture
def saved(tmp_path):
    """A tiny random ASR model directory (no tokenizer)."""
    enc = FastConformerConfig(feat_in=64, n_layers=1, d_model=16, n_heads=2, subsampling_conv_channels=4)
    model = ASRModel(ASRConfig(PreprocessorConfig(), enc, vocab_size=5)).eval()
    model.save_pretrained(tmp_path / "asr")
    return model, tmp_path / "asr"


def test_round_trip_and_no_temporary_files(saved):
    model, path = saved
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    again = speechllm.load(path)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())


def test_a_failed_write_leaves_the_old_file(saved, monkeypatch):
    model, path = saved
    before = (path / "model.safetensors").read_bytes()

    def dying_save(state, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(weights, "save_file", dying_save)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(path)
    assert (path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("damage", ["truncated", "header", "empty", "config"])
def test_broken_files_are_value_errors_naming_the_file(saved, damage):
    _, path = saved
    file = path / ("config.json" if damage == "config" else "model.safetensors")
    data = file.read_bytes()
    file.write_bytes({"truncated": data[: len(data) // 2], "header": data[:8] + b"{not json" + data[17:],
                      "empty": b"", "config": b'{"model_type": "fastconformer_ctc",'}[damage])
    with pytest.raises(ValueError, match=str(file)):
        speechllm.load(path)


def test_misfit_report_lists_every_problem(saved):
    model, path = saved
    expected = dict(model.state_dict())
    del expected["decoder.decoder_layers.0.bias"]  # in the file, not in the "model"
    expected["encoder.extra.weight"] = torch.zeros(2)  # in the "model", not in the file
    expected["decoder.decoder_layers.0.weight"] = torch.zeros(6, 17, 1)
    with pytest.raises(ConversionError) as e:
        read_state(path, expected)
    message = str(e.value)
    assert message.startswith(f"{path}: the weights do not fit the model")
    for line in ("1 tensors the model does not have: decoder.decoder_layers.0.bias",
                 "1 model tensors missing from the checkpoint: encoder.extra.weight",
                 "1 shape mismatches: decoder.decoder_layers.0.weight: checkpoint (6, 16, 1) vs model (6, 17, 1)"):
        assert line in message
    tolerated = read_state(path, {k: v for k, v in model.state_dict().items() if "decoder" not in k},
                           ignore=("decoder.decoder_layers.0.weight", "decoder.decoder_layers.0.bias"))
    assert not any("decoder" in k for k in tolerated)
    # strict=False (full training checkpoints): unplaced and unexpected tensors pass, missing ones do not
    check_fit({"a": (1,), "b": (2,)}, {"a": (1,)}, "x", unplaced=["c"], strict=False)
    with pytest.raises(ConversionError, match="1 tensors nothing maps: c"):
        check_fit({"a": (1,)}, {"a": (1,)}, "x", unplaced=["c"])
    with pytest.raises(ConversionError, match="missing from the checkpoint: a"):
        check_fit({}, {"a": (1,)}, "x", strict=False)


def test_write_json_replaces_atomically(tmp_path):
    weights.write_json(tmp_path / "best.json", {"step": 1})
    weights.write_json(tmp_path / "best.json", {"step": 2})
    assert json.loads((tmp_path / "best.json").read_text()) == {"step": 2}
    assert os.listdir(tmp_path) == ["best.json"]
