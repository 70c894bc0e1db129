"""Synthetic turn-taking data. Run: python -m pytest -q tests/test_synth.py (needs espeak-ng)"""
import json
import random

import soundfile as sf

from speechllm.data import read_manifest
from speechllm.synth import BACKCHANNELS, make_texts, sentence, synthesize


def test_texts_are_balanced_and_test_never_seen_in_training():
    texts = make_texts({"train": 300, "dev": 40, "test": 60}, seed=1)
    train = {t for t, _ in texts["train"]}
    for split in ("dev", "test"):
        assert not train & {t for t, _ in texts[split]}, split
    labels = [lab for _, lab in texts["train"]]
    assert all(labels.count(c) == 300 for c in ("COMPLETE", "INCOMPLETE", "BACKCHANNEL"))
    bc = lambda split: {t for t, lab in texts[split] if lab == "BACKCHANNEL"}
    assert bc("test") <= set(BACKCHANNELS) and not bc("test") & bc("train")


def test_incomplete_cuts_leave_words_to_come():
    rng = random.Random(0)
    for _ in range(200):
        words, cuts = sentence(rng)
        assert cuts and all(0 < c < len(words) for c in cuts)


def test_synthesize_writes_16k_clips_and_manifests(tmp_path):
    sizes = synthesize(tmp_path, {"train": 3, "dev": 1, "test": 2}, seed=0, workers=2)
    assert sizes == {"train": 9, "dev": 3, "test": 6}
    utts = read_manifest(tmp_path / "train.jsonl", require_label=True)
    assert sorted(u.label for u in utts) == sorted(["<COMPLETE>", "<INCOMPLETE>", "<BACKCHANNEL>"] * 3)
    for u in utts:
        x, sr = sf.read(u.audio)
        assert sr == 16000 and x.ndim == 1 and abs(len(x) / sr - u.duration) < 1e-3 and abs(x).max() > 0.01
        assert u.tt_confidence == 1.0 and u.text
    row = json.loads((tmp_path / "test.jsonl").read_text().splitlines()[0])
    assert set(row) == {"audio_filepath", "duration", "text", "label", "tt_confidence"}
