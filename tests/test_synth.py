"""Synthetic turn-taking data. Run: python -m pytest -q tests/test_synth.py

Needs espeak-ng; flite, festival and piper are used when installed (.ci/run installs all four)."""
import json
from collections import Counter

import numpy as np
import pytest
import soundfile as sf

import speechllm.synth as synth
from speechllm.data import read_manifest
from speechllm.sentences import CORE_BACKCHANNELS, complete, incomplete, make_texts, normalize
from speechllm.synth import HELDOUT_VOICES, VOICES, find_engines, main, plan_clip, spoken, synthesize

FOUND = find_engines()
ENGINES = [e for e, v in FOUND.items() if v]
SPLITS = ("train", "dev", "test")

# Words after which a speaker goes on, listed here independently of the grammar's cut marks:
# determiners, prepositions, conjunctions, auxiliaries and modals, subject pronouns, degree
# words, fillers.
GOES_ON = set("the a an my your our his her their this that some all "
              "to in on at for with from about before after by of until near than like "
              "and but or so because although if when since then "
              "am is are was were be do does did have has will would should can could might rather better "
              "i you we they he she it um uh really very pretty quite too think reckon".split())
DETERMINERS = set("the a an my your our his her their this that some two three four five six eight ten twelve "
                  "fifteen twenty".split())


def goes_on(norm: str) -> bool:
    words = norm.split()
    # "... a cheap": an adjective right after a determiner still wants its noun
    return words[-1] in GOES_ON or (len(words) > 1 and words[-2] in DETERMINERS)


def test_normalize_spells_numbers_and_drops_punctuation():
    assert normalize("Yes, it's 20.") == "yes it's twenty"
    assert normalize("Mm-hmm, okay") == "mm hmm okay"
    assert normalize("About 115 minutes, I think?") == "about one hundred fifteen minutes i think"
    assert normalize("Around 6 o'clock.") == "around six o'clock"


def test_grammar_has_thousands_of_sentences():
    import random
    rng = random.Random(5)
    for make in (complete, incomplete):
        assert len({normalize(make(rng)["text"]) for _ in range(4000)}) > 2500, make.__name__


def test_texts_are_balanced_disjoint_and_cut_where_a_speaker_goes_on():
    counts = {"train": 400, "dev": 60, "test": 80, "test_heldout_engine": 80}
    texts = make_texts(counts, seed=3)
    for split, n in counts.items():
        assert Counter(x["label"] for x in texts[split]) == {t: n for t in ("COMPLETE", "INCOMPLETE", "BACKCHANNEL")}
    norms = lambda splits, labels: {x["text_norm"] for s in splits for x in texts[s] if x["label"] in labels}
    words = ("COMPLETE", "INCOMPLETE")
    groups = [("train",), ("dev",), ("test", "test_heldout_engine")]
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            assert not norms(a, words) & norms(b, words), (a, b)
            assert norms(a, ("BACKCHANNEL",)) & norms(b, ("BACKCHANNEL",)) <= set(map(normalize, CORE_BACKCHANNELS))
    labels = {}
    for items in texts.values():
        for x in items:
            assert labels.setdefault(x["text_norm"], x["label"]) == x["label"], x  # one label per text
            assert x["text_norm"] == normalize(x["text"])
    train = texts["train"]
    assert len(norms(("train",), ("COMPLETE",))) > 350 and len(norms(("train",), ("INCOMPLETE",))) > 330
    for x in train:
        if x["label"] == "COMPLETE":
            assert x["text"][-1] in ".?", x
        else:
            assert x["text"][-1] not in ".?!,", x
        if x["label"] == "INCOMPLETE":
            assert goes_on(x["text_norm"]), x
    kinds = lambda label: {x["kind"] for x in train if x["label"] == label}
    assert kinds("COMPLETE") == {"statement", "question", "opinion", "reply"}
    assert kinds("INCOMPLETE") == {"cut", "clause_and", "filler", "backchannel_start", "trail_off"}
    # backchannel words open COMPLETE and INCOMPLETE turns too: "Yeah, I think that's right."
    bc = norms(("train",), ("BACKCHANNEL",))
    for label in words:
        assert any(x["text_norm"].split()[0] in bc for x in train if x["label"] == label), label


def test_most_incomplete_clips_keep_ordinary_prosody():
    items = make_texts({"train": 700}, seed=1)["train"]
    clips = [plan_clip(x, "train", i, ["espeak"], FOUND, 0, 0.2, 0.2) for i, x in enumerate(items)]
    share = lambda label, key, value: np.mean([c[key] == value for c in clips if c["label"] == label])
    assert 0.14 < share("INCOMPLETE", "prosody", "continuation") < 0.26
    assert share("COMPLETE", "prosody", "final") == 1.0
    assert 0.16 < np.mean([c["telephone"] for c in clips]) < 0.24
    c = {**clips[0], "text": "Mm-hmm", "final": ".", "prosody": "continuation"}
    assert spoken(c) == "um-hum," and spoken({**c, "engine": "festival"}) == "Mm-hmm,"


def test_engines_are_reported_and_a_missing_one_is_refused(tmp_path, capsys, monkeypatch):
    assert "espeak" in ENGINES, "espeak-ng must be installed (apt-get install espeak-ng)"
    assert main(["--list-engines"]) == 0
    report = capsys.readouterr().out
    for e in VOICES:
        line = next(line for line in report.splitlines() if line.split()[0] == e)
        assert ("voices" in line) == bool(FOUND[e]) and ("not installed" in line) != bool(FOUND[e])
    assert main(["--out", str(tmp_path / "a"), "--engines", "espeak,rhvoice", "--per-class", "1"]) == 1
    assert "unknown engine(s) rhvoice" in capsys.readouterr().err
    monkeypatch.setattr(synth, "find_engines", lambda: {**FOUND, "piper": []})
    assert main(["--out", str(tmp_path / "b"), "--engines", "espeak,piper", "--per-class", "1"]) == 1
    err = capsys.readouterr().err
    assert "not installed: piper (install: pip install piper-tts" in err
    assert not (tmp_path / "b" / "train.jsonl").exists()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    heldout = "piper" if FOUND["piper"] else ENGINES[-1] if len(ENGINES) > 1 else None
    summary = synthesize(out, {"train": 4, "dev": 2, "test": 3}, ENGINES, heldout, seed=0, workers=2,
                         telephone=0.5, continuation=0.5, progress=False)
    rows = {s: [json.loads(line) for line in (out / f"{s}.jsonl").read_text().splitlines()]
            for s in summary["splits"]}
    return out, summary, rows, heldout


def test_manifests_parse_and_are_balanced(data):
    out, summary, rows, heldout = data
    sizes = {"train": 4, "dev": 2, "test": 3, "test_heldout_engine": 3}
    assert set(rows) == set(SPLITS) | ({"test_heldout_engine"} if heldout else set())
    for split in rows:
        utts = read_manifest(out / f"{split}.jsonl", require_label=True)
        tags = ("<COMPLETE>", "<INCOMPLETE>", "<BACKCHANNEL>")
        assert Counter(u.label for u in utts) == {t: sizes[split] for t in tags}
        for u, r in zip(utts, rows[split]):
            assert u.text == r["text"] and u.extra["text_norm"] == normalize(r["text"]) and u.tt_confidence == 1.0
            assert r["engine"] in ENGINES and r["voice"] in FOUND[r["engine"]]
            x, sr = sf.read(u.audio)
            assert sr == 16000 and x.ndim == 1 and abs(len(x) / sr - u.duration) < 1e-3 and 0.5 < u.duration < 12
            assert 1e-3 < np.abs(x).max() < 1.0


def test_heldout_engine_and_voices_never_in_training(data):
    out, summary, rows, heldout = data
    assert HELDOUT_VOICES["espeak"] and HELDOUT_VOICES["flite"] and HELDOUT_VOICES["festival"]
    for split in ("train", "dev"):
        for r in rows[split]:
            assert r["engine"] != heldout and r["voice"] not in HELDOUT_VOICES[r["engine"]] and not r["voice_heldout"]
    if heldout:
        assert {r["engine"] for r in rows["test_heldout_engine"]} == {heldout}
        assert all(r["engine"] != heldout for r in rows["test"])
    norms = {s: {r["text_norm"] for r in rows[s] if r["label"] != "BACKCHANNEL"} for s in rows}
    assert not norms["train"] & (norms["dev"] | norms["test"] | norms.get("test_heldout_engine", set()))


def frames_db(x):
    n = len(x) // 160
    rms = np.sqrt((x[: n * 160].reshape(n, 160) ** 2).mean(axis=1) + 1e-20)
    return 20 * np.log10(rms / rms.max())


def high_band_share(x):
    power = np.abs(np.fft.rfft(x)) ** 2
    return power[np.fft.rfftfreq(len(x), 1 / 16000) > 4100].sum() / power.sum()


def test_trailing_silence_and_telephone_band_measured_from_audio(data):
    out, summary, rows, heldout = data
    all_rows = [r for s in rows for r in rows[s]]
    assert {True, False} <= {r["telephone"] for r in all_rows}
    wide_share = []
    for r in all_rows:
        x, _ = sf.read(out / r["audio_filepath"])
        db = frames_db(x)
        end = (np.flatnonzero(db > -40)[-1] + 1) / 100  # the last 10 ms within 40 dB of the loudest
        trailing = len(x) / 16000 - end
        # A band-limited clip can lose a word-final fricative above 4 kHz, so its audible end moves earlier.
        assert 0.19 <= trailing <= (0.8 if not r["telephone"] else 1.0), (r, trailing)
        if not r["telephone"]:
            assert abs(end - r["speech_end"]) < 0.07, (r, end)
        share = high_band_share(x)
        if r["telephone"]:
            assert share < 1e-5, (r, share)
        elif r["voice"] != "kal":  # flite's kal speaks at 8 kHz itself
            wide_share.append(share)
    assert max(wide_share) > 1e-3  # the measure sees wide-band speech when it is there
