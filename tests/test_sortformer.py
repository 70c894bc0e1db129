"""SortFormer against NeMo 3.0.0 (diar_sortformer.nemo): every stage run by run, segments, RTTM,
checkpoints and bad archives. Run: python -m pytest -q tests/test_sortformer.py"""
import json

import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from conftest import max_valid_diff, rewrite_nemo
from speechllm.activity import probs_to_segments
from speechllm.asr import ASRModel
from speechllm.audio import pad_batch
from speechllm.convert import NEMO_SORTFORMER_KEYS, ConversionError, NemoArchive, dropped_keys
from speechllm.fastconformer import make_pad_mask
from speechllm.sortformer import SortFormer, peak_scale

TOL = 1e-4
RUNS = {"batch": [0, 1], "single0": [0], "single1": [1]}  # indices into the JSON's batch_clips


@pytest.fixture(scope="module")
def ref(fixtures):
    return load_file(fixtures / "diar_sortformer_ref.safetensors")


@pytest.fixture(scope="module")
def ref_json(fixtures):
    return json.loads((fixtures / "diar_sortformer_ref.json").read_text())


def inputs(fixtures, ref_json, run):
    """The fixture's inputs are not stored: the WAVs, right-padded with zeros."""
    clips = [sf.read(fixtures / ref_json["batch_clips"][i], dtype="float32")[0] for i in RUNS[run]]
    return pad_batch(clips)



@pytest.mark.parametrize("run", list(RUNS))
def test_every_stage_matches_nemo(diarizer, ref, ref_json, fixtures, run):
    audio, lengths = inputs(fixtures, ref_json, run)
    assert lengths.tolist() == ref[f"{run}.input_signal_length"].tolist()
    assert peak_scale(audio, diarizer.cfg.eps).item() == ref[f"{run}.peak_scale"].item()
    with torch.no_grad():
        feats, feat_lens = diarizer.features(audio, lengths)
        assert feat_lens.tolist() == ref[f"{run}.features_length"].tolist()
        assert feats.shape[-1] == ref_json["runs"][run]["features_frames_fed_to_encoder"]
        if run == "batch":  # stored for the batch only
            assert max_valid_diff(feats.transpose(1, 2), ref["batch.features"].transpose(1, 2), feat_lens) < TOL
        x, enc_lens = diarizer.encoder(feats, feat_lens)
        assert enc_lens.tolist() == ref[f"{run}.encoded_length"].tolist()
        assert max_valid_diff(x, ref[f"{run}.encoder_output"].transpose(1, 2), enc_lens) < TOL
        x = diarizer.sortformer_modules.encoder_proj(x)
        assert max_valid_diff(x, ref[f"{run}.encoder_proj"], enc_lens) < TOL
        x = diarizer.transformer_encoder(x, ~make_pad_mask(enc_lens, x.shape[1]))
        assert max_valid_diff(x, ref[f"{run}.transformer_output"], enc_lens) < TOL
        logits = diarizer.sortformer_modules.speaker_logits(x)
        assert max_valid_diff(logits, ref[f"{run}.spk_logits"], enc_lens) < TOL
    probs, lens = diarizer.diarize(audio, lengths)
    assert lens.tolist() == ref[f"{run}.encoded_length"].tolist()
    assert probs.shape == ref[f"{run}.preds"].shape
    assert (probs - ref[f"{run}.preds"]).abs().max().item() < TOL  # padded frames included
    for i, n in enumerate(lens.tolist()):
        assert torch.all(probs[i, n:] == 0.0)


def test_batch_peak_scale_couples_items_as_in_nemo(diarizer, ref_json, fixtures):
    """audio_1 alone is scaled by its own peak, in the batch by audio_2spk's: its output moves by
    about what NeMo's moved (the JSON records the upstream difference)."""
    batch, _ = diarizer.diarize(*inputs(fixtures, ref_json, "batch"))
    single, lens = diarizer.diarize(*inputs(fixtures, ref_json, "single1"))
    ours = (batch[1, : lens[0]] - single[0, : lens[0]]).abs().max().item()
    upstream = ref_json["batch_vs_single_upstream"][1]["max_abs_diff_preds"]
    assert ours > 1e-5 and abs(ours - upstream) < TOL


@pytest.mark.parametrize("run", ["single0", "single1"])
def test_segments_match_nemo_postprocessing(diarizer, ref, ref_json, fixtures, run):
    clip = ref_json["batch_clips"][RUNS[run][0]]
    expected = ref_json["diarize_api"]["segments_default_postprocessing"][clip]
    n = ref[f"{run}.encoded_length"][0]

    def nemo_lines(segments):  # NeMo lists them speaker by speaker
        segments = sorted(segments, key=lambda seg: (seg[2], seg[0]))
        return [f"{start:.3f} {end:.3f} {spk}" for start, end, spk in segments]

    assert nemo_lines(probs_to_segments(ref[f"{run}.preds"][0, :n])) == expected
    probs, lens = diarizer.diarize(*inputs(fixtures, ref_json, run))
    assert nemo_lines(probs_to_segments(probs[0, : lens[0]])) == expected


def test_save_and_load_pretrained_round_trip(diarizer, ref_json, fixtures, tmp_path):
    diarizer.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors"}
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "sortformer"
    again = SortFormer.from_pretrained(tmp_path)
    audio, lengths = inputs(fixtures, ref_json, "batch")
    a, _ = diarizer.diarize(audio, lengths)
    b, _ = again.diarize(audio, lengths)
    assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="config.json"):
        SortFormer.from_pretrained(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------
# bad archives



def test_unused_head_is_dropped_by_name(fixtures):
    assert NEMO_SORTFORMER_KEYS["sortformer_modules.hidden_to_spks."] is None
    sd = NemoArchive(fixtures / "diar_sortformer.nemo").state_dict()
    assert sorted(dropped_keys(NEMO_SORTFORMER_KEYS, sd)) == ["sortformer_modules.hidden_to_spks.bias",
                                                              "sortformer_modules.hidden_to_spks.weight"]


def test_bad_archive_lists_every_tensor(fixtures, tmp_path):
    sd = NemoArchive(fixtures / "diar_sortformer.nemo").state_dict()
    del sd["transformer_encoder.layers.1.first_sub_layer.key_net.weight"]
    sd["sortformer_modules.single_hidden_to_spks.weight"] = torch.zeros(3, 24)
    sd["sortformer_modules.mystery.weight"] = torch.zeros(2)
    bad = rewrite_nemo(fixtures / "diar_sortformer.nemo", tmp_path / "bad.nemo", state=sd)
    with pytest.raises(ConversionError) as e:
        SortFormer.from_nemo(bad)
    for name in ["transformer_encoder.layers.1.first_sub_layer.key_net.weight", "(3, 24)",
                 "sortformer_modules.single_hidden_to_spks.weight", "sortformer_modules.mystery.weight", str(bad)]:
        assert name in str(e.value)


def test_other_models_and_variants_are_refused(fixtures, tmp_path):
    with pytest.raises(ConversionError, match="EncDecCTCModelBPE"):
        SortFormer.from_nemo(fixtures / "asr_ctc.nemo")
    with pytest.raises(ConversionError, match="SortformerEncLabelModel"):
        ASRModel.from_nemo(fixtures / "diar_sortformer.nemo")
    cfg = NemoArchive(fixtures / "diar_sortformer.nemo").config
    streaming = rewrite_nemo(fixtures / "diar_sortformer.nemo", tmp_path / "s.nemo", config={**cfg, "streaming_mode": True})
    with pytest.raises(ValueError, match="streaming_mode"):
        SortFormer.from_nemo(streaming)
    pre_ln = {**cfg, "transformer_encoder": {**cfg["transformer_encoder"], "pre_ln": True}}
    with pytest.raises(ValueError, match="pre_ln"):
        SortFormer.from_nemo(rewrite_nemo(fixtures / "diar_sortformer.nemo", tmp_path / "p.nemo", config=pre_ln))
