"""Manifests, filters, batching and the shared epoch plan. Run: python -m pytest -q tests/test_data.py"""
import json
from collections import Counter

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import load_script
from speechllm.data import (ClipDataset, EpochPlan, ManifestError, class_weights, collate, draw_probabilities,
                            load_split)
from speechllm.train_config import DatasetConfig, load_config


def write(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def clips(tmp_path):
    """Four WAVs in tmp/audio: 0.5, 1.0, 1.5 and 2.0 s of noise."""
    (tmp_path / "audio").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        sf.write(tmp_path / "audio" / f"{i}.wav", 0.1 * rng.standard_normal(8000 * (i + 1)).astype(np.float32), 16000)
    return tmp_path


def row(i, label="COMPLETE", **kw):
    return {"audio_filepath": f"audio/{i}.wav", "text": f"clip {i}", "label": label, **kw}


def test_bad_lines_stop_with_file_and_line(clips):
    cfg = DatasetConfig(manifest_filepath=("x",))
    cases = [
        ([row(0), "{not json"], ":2: not valid JSON"),
        ([row(0), row(1), row(9)], ":3: audio file .*9.wav not found"),
        ([row(0), {"audio_filepath": "audio/1.wav", "text": "no label"}], ":2: missing 'label'"),
        ([row(0, label="MAYBE")], ":1: label 'MAYBE' is not one of"),
        ([row(0), row(1, duration=-1)], ":2: duration must be > 0"),
    ]
    for rows, message in cases:
        path = write(clips / "m.jsonl", rows)
        with pytest.raises(ManifestError, match=f"{path}{message}"):
            load_split([path], "turntaking", cfg, train=True)
    (clips / "audio" / "junk.wav").write_bytes(b"RIFF not really")
    path = write(clips / "m.jsonl", [row(0), {"audio_filepath": "audio/junk.wav", "text": "x", "label": "COMPLETE"}])
    with pytest.raises(ManifestError, match=f"{path}:2: audio file .* not readable"):
        load_split([path], "turntaking", cfg, train=True)
    path = write(clips / "m.jsonl", [row(0), {"audio_filepath": "audio/1.wav", "label": "COMPLETE"}])
    with pytest.raises(ManifestError, match=f"{path}:2: missing 'text'"):
        load_split([path], "asr", cfg, train=True)  # Stage 1 trains on transcripts


def test_transcripts_as_the_ctc_head_writes_them(clips):
    """data.transcript=ctc: the answer text is the CTC form (lowercase, no punctuation but in-word
    apostrophes, numbers spelled out), the line's text_norm where it has one; the default keeps
    `text` as written; any other value is refused."""
    written = ["Yes, it's 20 past 3.", "We'll meet at the Co-op -- OK?", "I was, uh...", "About 115 minutes."]
    rows = [{"audio_filepath": f"audio/{i}.wav", "text": t, "label": "COMPLETE"} for i, t in enumerate(written)]
    rows[3]["text_norm"] = "about  one hundred and fifteen minutes"  # the manifest's own normalisation wins
    path = write(clips / "m.jsonl", rows)
    cfg = DatasetConfig(manifest_filepath=(path,))
    ctc = [u.text for u in load_split([path], "turntaking", cfg, train=False, transcript="ctc").items]
    assert ctc == ["yes it's twenty past three", "we'll meet at the co op ok", "i was uh",
                   "about one hundred and fifteen minutes"]
    assert [u.text for u in load_split([path], "turntaking", cfg, train=False).items] == written
    assert [u.text for u in load_split([path], "asr", cfg, train=False, transcript="as_written").items] == written
    tag_only = write(clips / "t.jsonl", [{"audio_filepath": "audio/0.wav", "label": "COMPLETE"}])
    assert load_split([tag_only], "turntaking", cfg, train=False, transcript="ctc").items[0].text is None
    empty = write(clips / "e.jsonl", [{"audio_filepath": "audio/0.wav", "text": "?!"}])
    with pytest.raises(ManifestError, match=f"{empty}:1: missing 'text'"):  # nothing left to train on
        load_split([empty], "asr", cfg, train=False, transcript="ctc")
    with pytest.raises(ValueError, match="transcript must be one of as_written, ctc, got 'lower'"):
        load_split([path], "asr", cfg, train=False, transcript="lower")

    # the config's data.transcript, default as_written, reaches both splits through train.py
    conf = clips / "c.yaml"
    conf.write_text(f"model:\n  init_from: ckpt\ndata:\n  task: asr\n  train_ds:\n    manifest_filepath: {path}\n"
                    f"  validation_ds:\n    manifest_filepath: {path}\n")
    assert load_config(conf).data.transcript == "as_written"
    with pytest.raises(ValueError, match="data.transcript must be as_written or ctc, got 'CTC'"):
        load_config(conf, ["data.transcript=CTC"])
    train = load_script("train")
    args = type("Args", (), {"resume": None})()
    *_, tr, dev = train.prepare(load_config(conf, ["data.transcript=ctc"]), args)
    assert [u.text for u in tr.items] == [u.text for u in dev.items] == ctc
    *_, tr, dev = train.prepare(load_config(conf), args)
    assert [u.text for u in tr.items] == [u.text for u in dev.items] == written


def test_relative_paths_durations_and_duration_filter(clips):
    (clips / "sub").mkdir()
    path = write(clips / "sub" / "m.jsonl", [{"audio_filepath": "../audio/0.wav", "text": "a"},
                                             {"audio_filepath": str(clips / "audio" / "3.wav"), "text": "b", "offset": 0.5},
                                             {"audio_filepath": "../audio/1.wav", "text": "c", "duration": 0.7}])
    split = load_split([path], "asr", DatasetConfig(manifest_filepath=(path,), min_duration=0.6), train=True)
    assert [u.audio.resolve() for u in split.items] == [(clips / "audio" / f"{i}.wav").resolve() for i in (3, 1)]
    assert [u.duration for u in split.items] == [1.5, 0.7]  # read from the header, minus the offset
    assert split.report["dropped_duration"] == 1 and split.report["kept"] == 2
    assert [u.label for u in split.items] == [None, None]


def test_seed_000_label_filters(clips):
    rows = [row(0, "COMPLETE", tt_confidence=0.95), row(1, "COMPLETE", tt_confidence=0.5),
            row(2, "INCOMPLETE", tt_confidence=0.89), row(3, "BACKCHANNEL", tt_confidence=0.1),
            row(0, "COMPLETE"),  # no confidence: kept
            row(1, "COMPLETE", tt_confidence=0.99, llm_label="BACKCHANNEL", ten_label="COMPLETE"),
            row(2, "INCOMPLETE", tt_confidence=0.99, llm_label="COMPLETE", ten_label="INCOMPLETE"),
            row(3, "INCOMPLETE", tt_confidence=0.99, llm_label="INCOMPLETE", ten_label="<INCOMPLETE>")]
    path = write(clips / "m.jsonl", rows)
    cfg = DatasetConfig(manifest_filepath=(path,), tt_confidence_threshold=0.9, bc_priority=True)
    split = load_split([path], "turntaking", cfg, train=False)
    assert [u.line for u in split.items] == [1, 4, 5, 6, 8]
    assert [u.label for u in split.items] == ["<COMPLETE>", "<BACKCHANNEL>", "<COMPLETE>", "<BACKCHANNEL>",
                                              "<INCOMPLETE>"]  # line 6: BACKCHANNEL wins the conflict
    assert split.report["dropped_confidence"] == 2 and split.report["dropped_conflict"] == 1


def test_complete_downsampling_on_the_training_split_only(clips):
    rows = [row(i % 4, "COMPLETE") for i in range(9)] + [row(i % 4, "INCOMPLETE") for i in range(3)] + [row(0, "BACKCHANNEL")]
    path = write(clips / "m.jsonl", rows)
    cfg = DatasetConfig(manifest_filepath=(path,), complete_ratio=1.0)
    train = load_split([path], "turntaking", cfg, train=True, seed=3)
    assert train.report["labels"] == {"<COMPLETE>": 3, "<INCOMPLETE>": 3, "<BACKCHANNEL>": 1}
    assert train.report["dropped_downsampling"] == 6
    again = load_split([path], "turntaking", cfg, train=True, seed=3)
    assert [u.line for u in again.items] == [u.line for u in train.items]  # seeded
    dev = load_split([path], "turntaking", cfg, train=False)
    assert dev.report["labels"]["<COMPLETE>"] == 9


def test_weighted_sampling_draws_classes_in_proportion_to_their_weights():
    labels = ["C"] * 200 + ["I"] * 80 + ["B"] * 20
    w = class_weights(labels, max_weight=5.0)
    assert set(w[:200].tolist()) == {1.5} and set(w[200:280].tolist()) == {3.75} and set(w[280:].tolist()) == {5.0}
    probs = draw_probabilities(labels, [0] * 300, None, weighted=True, max_weight=5.0)
    plan = EpochPlan([1.0] * 300, probs, batch_size=10, seed=7)
    drawn = Counter(labels[i] for epoch in range(40) for batch in plan.plan(epoch) for i in batch)
    expected = {"C": 3 / 7, "I": 3 / 7, "B": 1 / 7}  # count x weight: 300, 300, 100 (the cap binds for B)
    n = sum(drawn.values())
    chi2 = sum((drawn[c] - n * p) ** 2 / (n * p) for c, p in expected.items())
    assert n == 12000 and chi2 < 13.8  # chi-square, 2 degrees of freedom, p = 0.001
    uncapped = draw_probabilities(labels, [0] * 300, None, weighted=True, max_weight=50.0)
    share = {c: float(sum(p for p, lab in zip(uncapped, labels) if lab == c)) for c in "CIB"}
    assert share == pytest.approx({"C": 1 / 3, "I": 1 / 3, "B": 1 / 3})  # inverse frequency: classes equal
    with pytest.raises(ValueError, match="needs a label"):
        class_weights(["C", None], 50.0)


def test_manifest_mixture_probabilities():
    sources = [0] * 10 + [1] * 90
    probs = draw_probabilities([None] * 100, sources, [0.5, 0.5], weighted=False, max_weight=50.0)
    assert float(probs[:10].sum()) == pytest.approx(0.5) and float(probs[10:].sum()) == pytest.approx(0.5)
    plan = EpochPlan([1.0] * 100, probs, batch_size=4, seed=0)
    drawn = [sources[i] for e in range(20) for b in plan.plan(e) for i in b]
    assert abs(np.mean(drawn) - 0.5) < 0.05  # 2000 draws: sd 0.011


@pytest.mark.parametrize("weighted", [False, True])
def test_ranks_draw_disjoint_shares_of_one_plan(weighted):
    n, world = 103, 3
    probs = draw_probabilities(["C", "I"] * 51 + ["B"], [0] * n, None, weighted, 50.0) if weighted else None
    ranks = [EpochPlan([1.0] * n, probs, batch_size=4, seed=5, rank=r, world=world) for r in range(world)]
    for epoch in (0, 1):
        for p in ranks:
            p.set_epoch(epoch)
        plan = ranks[0].plan(epoch)
        assert all(p.plan(epoch) == plan for p in ranks)  # every rank computes the same plan
        assert len(plan) % world == 0 and len(plan) == 24  # 26 batches cut to a multiple of 3
        shares = [list(p) for p in ranks]
        assert [len(s) for s in shares] == [8, 8, 8]
        assert sorted(b for s in shares for b in s) == sorted(plan)  # together, exactly the plan
        if not weighted:
            seen = [i for s in shares for b in s for i in b]
            assert len(seen) == len(set(seen))  # without replacement: disjoint clips
    assert ranks[0].plan(0) != ranks[0].plan(1)  # reshuffled per epoch
    ranks[1].set_epoch(1, position=5)
    assert list(ranks[1]) == ranks[1].plan(1)[1::world][5:] and len(ranks[1]) == 3  # resume inside an epoch


def test_duration_buckets_and_batch_duration():
    durations = [0.5 + (i % 10) * 0.5 for i in range(200)]  # 0.5 .. 5.0 s
    plan = EpochPlan(durations, None, batch_size=8, batch_duration=6.0, bins=(1.5, 3.0), seed=1)
    batches = plan.plan(0)
    assert sorted(i for b in batches for i in b) == list(range(200))
    for b in batches:
        bucket = {0 if durations[i] <= 1.5 else 1 if durations[i] <= 3.0 else 2 for i in b}
        assert len(bucket) == 1 and len(b) <= 8
        assert sum(durations[i] for i in b) <= 6.0 or len(b) == 1
    fixed = EpochPlan(durations, None, batch_size=8, shuffle=False, even=False, world=3)
    assert fixed.plan(0)[0] == list(range(8)) and len(fixed.plan(0)) == 25  # eval: manifest order, nothing cut


def test_dataset_decodes_and_collate_pads(clips):
    path = write(clips / "m.jsonl", [row(1, offset=0.25, duration=0.5), row(0)])
    split = load_split([path], "turntaking", DatasetConfig(manifest_filepath=(path,)), train=True)
    batch = collate([ClipDataset(split.items)[i] for i in range(2)])
    assert batch["audio"].shape == (2, 8000) and batch["lengths"].tolist() == [8000, 8000]
    want = sf.read(clips / "audio" / "1.wav", dtype="float32")[0][4000:12000]
    assert torch.equal(batch["audio"][0], torch.from_numpy(want))
    assert batch["label"] == ["<COMPLETE>", "<COMPLETE>"] and batch["index"] == [0, 1]
    loader = torch.utils.data.DataLoader(ClipDataset(split.items), batch_size=2, collate_fn=collate, num_workers=1)
    assert torch.equal(next(iter(loader))["audio"], batch["audio"])  # decoded in a worker process
