"""infer.py end to end on a tiny random Speech-LLM. Run: python -m pytest -q tests/test_infer.py"""
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import STREAM_MODEL, load_script, run_main
from speechllm.audio import pad_batch
from speechllm.metrics import classification_report
from speechllm.model import SpeechLLM, assemble
from speechllm.speaker import SpeakerKernelConfig
from speechllm.speculative import draft_ids

TAGS = ["<COMPLETE>", "<INCOMPLETE>", "<BACKCHANNEL>"]


@pytest.fixture(scope="module")
def setup(fixtures, tmp_path_factory):
    """A tiny model whose tag rows differ (so clips get different tags) and six labelled clips."""
    tmp = tmp_path_factory.mktemp("infer")
    model = assemble(fixtures / "asr_ctc.nemo", fixtures / "llm_hf", prompt=None, seed=3)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        w = model.llm.model.embed_tokens.weight
        w[model.tag_ids] += 0.5 * torch.randn(3, w.shape[1], generator=g)
        model.projector.conv.weight.mul_(20)  # make the audio matter to the tag
    model.save_pretrained(tmp / "ckpt")
    base, _ = sf.read(fixtures / "audio_0.wav", dtype="float32")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(6):
        clip = np.roll(base, 1000 * i)[: 16000 + 1500 * i] * (0.3 + 0.1 * i) + 0.01 * rng.standard_normal(16000 + 1500 * i).astype(np.float32)
        sf.write(tmp / f"clip{i}.wav", clip, 16000)
        lines.append(json.dumps({"audio_filepath": f"clip{i}.wav", "duration": len(clip) / 16000, "label": TAGS[i % 3][1:-1]}))
    (tmp / "test.jsonl").write_text("\n".join(lines) + "\n")
    return tmp, SpeechLLM.from_pretrained(tmp / "ckpt")


infer = load_script("infer")


@pytest.fixture
def run(capsys):
    """infer.py's main in this process: run(*argv) -> returncode, stdout, stderr."""
    return lambda *args: run_main(infer.main, args, capsys)


def predictions(model, paths):
    clips = [sf.read(p, dtype="float32")[0] for p in paths]
    return [model.predict(*pad_batch([c]), max_new_tokens=8)[0] for c in clips]


def test_lines_and_json(setup, run):
    tmp, model = setup
    paths = [str(tmp / "clip0.wav"), str(tmp / "clip1.wav")]
    r = run(*paths, "--checkpoint", str(tmp / "ckpt"), "--dtype", "float32", "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    want = predictions(model, paths)
    lines = r.stdout.splitlines()
    assert len(lines) == 2
    for line, path, w in zip(lines, paths, want):
        name, tag_prob, others, *text = line.split("\t")
        assert text == ([repr(w["transcript"])] if w["transcript"] else [])
        tag, prob = tag_prob.split()
        assert name == path and tag == w["tag"] and abs(float(prob) - w["probs"][tag]) < 2e-3
        assert others.startswith("(") and len(others.split(",")) == 2
    r = run(*paths, "--checkpoint", str(tmp / "ckpt"), "--dtype", "float32", "--max-new-tokens", "8", "--json")
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["audio"] for row in rows] == paths
    assert all(set(row["probs"]) == set(TAGS) and abs(sum(row["probs"].values()) - 1) < 1e-5 for row in rows)


def test_manifest_metrics_equal_hand_computed(setup, run):
    tmp, model = setup
    r = run("--manifest", str(tmp / "test.jsonl"), "--checkpoint", str(tmp / "ckpt"), "--dtype", "float32",
            "--max-new-tokens", "8", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.splitlines()[-1])
    preds = [p["tag"] for p in predictions(model, [tmp / f"clip{i}.wav" for i in range(6)])]
    labels = [TAGS[i % 3] for i in range(6)]
    assert len(set(preds)) > 1  # the tiny model is not constant, so the metrics mean something
    # By hand, independent of metrics.py.
    acc = sum(p == t for p, t in zip(preds, labels)) / 6
    f1s = []
    for c in TAGS:
        tp = sum(p == c and t == c for p, t in zip(preds, labels))
        prec = tp / max(1, sum(p == c for p in preds))
        rec = tp / sum(t == c for t in labels)
        f1s.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    cutoff = sum(p == "<COMPLETE>" for p, t in zip(preds, labels) if t == "<INCOMPLETE>") / 2
    takeover = sum(p == "<COMPLETE>" for p, t in zip(preds, labels) if t == "<BACKCHANNEL>") / 2
    assert abs(report["accuracy"] - acc) < 1e-9 and abs(report["macro_f1"] - sum(f1s) / 3) < 1e-9
    assert abs(report["false_cutoff_rate"] - cutoff) < 1e-9 and abs(report["backchannel_takeover_rate"] - takeover) < 1e-9
    assert report["confusion"] == classification_report(labels, preds)["confusion"]
    text = run("--manifest", str(tmp / "test.jsonl"), "--checkpoint", str(tmp / "ckpt"), "--dtype", "float32",
               "--max-new-tokens", "8").stdout
    assert "macro-F1" in text and "false cut-off" in text and "confusion" in text


def test_bad_inputs(setup, run):
    tmp, _ = setup
    (tmp / "bad.jsonl").write_text('{"audio_filepath": "clip0.wav", "label": "COMPLETE"}\n{"audio_filepath": \n')
    r = run("--manifest", str(tmp / "bad.jsonl"), "--checkpoint", str(tmp / "ckpt"))
    assert r.returncode == 1 and "bad.jsonl:2" in r.stderr
    (tmp / "label.jsonl").write_text('{"audio_filepath": "clip0.wav", "label": "DONE"}\n')
    r = run("--manifest", str(tmp / "label.jsonl"), "--checkpoint", str(tmp / "ckpt"))
    assert r.returncode == 1 and "label.jsonl:1" in r.stderr and "DONE" in r.stderr
    sf.write(tmp / "long.wav", np.zeros(16000 * 3, dtype=np.float32), 16000)
    r = run(str(tmp / "long.wav"), "--checkpoint", str(tmp / "ckpt"), "--max-seconds", "2")
    assert r.returncode == 1 and "long.wav" in r.stderr and "max-seconds" in r.stderr
    r = run("--checkpoint", str(tmp / "ckpt"))
    assert r.returncode == 2


def test_speaker_kernels_follow_the_hand_computation(fixtures):
    model = assemble(fixtures / "asr_ctc.nemo", fixtures / "llm_hf", speaker=SpeakerKernelConfig(layers=(0, 1)))
    with torch.no_grad():
        for p in list(model.spk_kernels.parameters()) + list(model.bg_spk_kernels.parameters()):
            p.normal_(std=0.1)
    audio, lens = pad_batch([sf.read(fixtures / "audio_1.wav", dtype="float32")[0]])
    s = torch.rand(1, 21)
    g = 1 - s
    with torch.no_grad():
        got, _ = model.embed_audio(audio, lens, s, g)
        enc = model.encoder
        feats, flens = model.preprocessor(audio, lens)
        x, elens = enc.pre_encode(feats, flens)
        x = x * 8.0  # xscale: sqrt(d_model = 64)
        from speechllm.fastconformer import rel_positions
        pos = rel_positions(x.shape[1], 64)
        for i, layer in enumerate(enc.layers):
            k, kb = model.spk_kernels[str(i)], model.bg_spk_kernels[str(i)]
            x = x + k[3](torch.relu(k[0](x * s[..., None])))
            x = x + kb[3](torch.relu(kb[0](x * g[..., None])))
            x = layer(x, pos, None, None)
        want, _ = model.projector(x, elens)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="speaker"):
        assemble(fixtures / "asr_ctc.nemo", fixtures / "llm_hf").embed_audio(audio, lens, s, g)


def test_manifest_batches_by_length_and_equals_one_clip_at_a_time(setup, run, monkeypatch):
    """--manifest sorts clips by length into --batch-size batches (a progress bar on stderr) and
    predicts what one clip at a time does: the same tags, transcripts and probabilities."""
    tmp, model = setup
    names = [f"clip{i}" for i in range(6)]
    clips = {n: sf.read(tmp / f"{n}.wav", dtype="float32")[0] for n in names}
    args = infer.parse_args(["x.wav"])
    widths = []
    predict = model.predict
    monkeypatch.setattr(model, "predict", lambda audio, lengths, *a, **k: widths.append(lengths.tolist()) or predict(audio, lengths, *a, **k))
    batched = infer.run(model, clips, 4, 8, "cpu", args)
    assert widths == [sorted((len(c) for c in clips.values()), reverse=True)[:4],
                      sorted((len(c) for c in clips.values()), reverse=True)[4:]]
    alone = infer.run(model, clips, 1, 8, "cpu", args)
    for n in names:
        b, a = batched[n], alone[n]
        assert (b["tag"], b["transcript"], b["ctc_transcript"]) == (a["tag"], a["transcript"], a["ctc_transcript"])
        assert max(abs(b["probs"][t] - a["probs"][t]) for t in TAGS) < 1e-5
    monkeypatch.undo()
    r = run("--manifest", str(tmp / "test.jsonl"), "--checkpoint", str(tmp / "ckpt"), "--dtype", "float32",
            "--max-new-tokens", "8", "--batch-size", "4", "--json")
    one = run("--manifest", str(tmp / "test.jsonl"), "--checkpoint", str(tmp / "ckpt"), "--dtype", "float32",
              "--max-new-tokens", "8", "--batch-size", "1", "--json")
    assert r.returncode == one.returncode == 0 and "6/6" in r.stderr  # tqdm's bar
    report, report_one = json.loads(r.stdout.splitlines()[-1]), json.loads(one.stdout.splitlines()[-1])
    assert report["confusion"] == report_one["confusion"]
    assert report["decoding"]["llm_passes"] == sum(alone[n]["llm_passes"] for n in names)


def test_decoding_choice_and_its_json_fields(setup, run):
    tmp, model = setup
    paths = [str(tmp / "clip0.wav"), str(tmp / "clip1.wav")]
    common = ["--checkpoint", str(tmp / "ckpt"), "--dtype", "float32", "--max-new-tokens", "8", "--json"]
    rows = {d: [json.loads(line) for line in run(*paths, *common, *d).stdout.splitlines()]
            for d in ((), ("--decoding", "greedy"), ("--decoding", "speculative"))}
    spec, greedy = rows[()], rows[("--decoding", "greedy")]
    drop = lambda r: {k: v for k, v in r.items() if k != "timings"}  # noqa: E731
    assert [drop(r) for r in spec] == [drop(r) for r in rows[("--decoding", "speculative")]]
    for s, g in zip(spec, greedy):
        assert s["decoding"] == "speculative" and g["decoding"] == "greedy"  # speculative: the default with a CTC head
        assert (s["tag"], s["transcript"]) == (g["tag"], g["transcript"])
        assert max(abs(s["probs"][t] - g["probs"][t]) for t in TAGS) < 1e-5
        # plain greedy: the prompt's pass writes the first token, then one pass per further token, so
        # any transcript before the tag costs at least one (the tag itself may come first)
        assert g["draft_tokens"] == g["accepted_tokens"] == 0 and g["llm_passes"] >= (1 if g["transcript"] else 0)
        assert s["draft_tokens"] == len(draft_ids(model, s["ctc_transcript"])) and 0 <= s["accepted_tokens"] <= s["draft_tokens"]
    r = run(paths[0], "--checkpoint", str(STREAM_MODEL), "--decoding", "speculative")  # a model without a CTC head
    assert r.returncode == 1 and "CTC head" in r.stderr


def test_quantize_int8(setup, run):
    tmp, _ = setup
    paths = [str(tmp / "clip0.wav"), str(tmp / "clip1.wav")]
    common = ["--checkpoint", str(tmp / "ckpt"), "--dtype", "float32", "--max-new-tokens", "8", "--json"]
    plain = [json.loads(line) for line in run(*paths, *common).stdout.splitlines()]
    r = run(*paths, *common, "--quantize", "int8")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["audio"] for row in rows] == paths and all(abs(sum(row["probs"].values()) - 1) < 1e-5 for row in rows)
    assert any(row["probs"] != p["probs"] for row, p in zip(rows, plain))  # the int8 weights are in use
