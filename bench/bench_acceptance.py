"""Draft acceptance of speculative decoding against the transcript format a model was trained on;
prints JSON. Needs the upstream fixtures ($SPEECHLLM_FIXTURES).

    python bench/bench_acceptance.py

A tiny Speech-LLM assembled from the fixtures (asr_ctc.nemo + llm_hf) is taught, as
tests/test_speculative.py's `trained` model is (the LLM trained on the two fixture clips' fixed
audio embeddings with the training objective), to answer a cased, punctuated transcript with
digits, read from a manifest through data.load_split with data.transcript = as_written, and again
with = ctc. Both are then decoded with the draft a CTC head that heard the clip right writes
(parakeet's format: sentences.normalize of the text). The fixture head's own greedy output is
random pieces, so that draft is given (predict's drafts=). Also reported: the test's own setup,
a model trained on the fixture head's CTC transcript and drafted with it.

acceptance = accepted_tokens / draft_tokens, summed over the two clips; llm_passes are LLM
forward passes after the prompt (greedy decoding needs one per answer token).
"""
import json
import os
import sys
import tempfile
from pathlib import Path

import soundfile as sf
import torch

from speechllm.audio import pad_batch
from speechllm.data import load_split
from speechllm.model import assemble
from speechllm.sentences import normalize
from speechllm.speculative import draft_ids
from speechllm.train_config import DatasetConfig

WRITTEN = ["Yes, it's 20 past 3.", "We should call the Co-op, OK?"]
TAGS = ["<COMPLETE>", "<INCOMPLETE>"]


def teach(fixtures, audio, lens, texts):
    """A fresh model whose LLM learned to answer texts[i] <TAGS[i]> for clip i."""
    torch.manual_seed(0)
    m = assemble(fixtures / "asr_ctc.nemo", fixtures / "llm_hf", seed=0)
    with torch.no_grad():
        embeds = m.embed_audio(audio, lens)
    opt = torch.optim.Adam(m.llm.parameters(), lr=1e-2)
    m.embed_audio = lambda *args: embeds  # the encoder and projector stay as they are
    steps = 0
    for steps in range(1, 401):
        loss, _ = m(audio, lens, texts, TAGS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.02:
            break
    del m.embed_audio
    return m.eval(), steps, round(loss.item(), 4)


def measure(m, audio, lens, drafts):
    rows = [m.predict(audio[i:i + 1, :lens[i]], lens[i:i + 1], 32, drafts=[drafts[i]])[0] for i in range(2)]
    greedy = [m.predict(audio[i:i + 1, :lens[i]], lens[i:i + 1], 32, decoding="greedy")[0] for i in range(2)]
    assert [r["transcript"] for r in rows] == [g["transcript"] for g in greedy]  # lossless
    acc, n = sum(r["accepted_tokens"] for r in rows), sum(r["draft_tokens"] for r in rows)
    return {"acceptance": round(acc / n, 3), "accepted_tokens": acc, "draft_tokens": n,
            "llm_passes": [r["llm_passes"] for r in rows], "greedy_llm_passes": [g["llm_passes"] for g in greedy],
            "transcripts": [r["transcript"] for r in rows]}


def main():
    fixtures = Path(os.environ.get("SPEECHLLM_FIXTURES", "tests/fixtures")).resolve()  # the manifest lives elsewhere
    torch.set_num_threads(2)
    audio, lens = pad_batch([sf.read(fixtures / f"audio_{i}.wav", dtype="float32")[0] for i in (0, 1)])
    out = {"written": WRITTEN, "ctc_draft": [normalize(t) for t in WRITTEN]}
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "m.jsonl"
        manifest.write_text("".join(json.dumps({"audio_filepath": str(fixtures / f"audio_{i}.wav"), "text": t,
                                                "label": TAGS[i].strip("<>")}) + "\n" for i, t in enumerate(WRITTEN)))
        for transcript in ("as_written", "ctc"):
            split = load_split([manifest], "turntaking", DatasetConfig(manifest_filepath=(str(manifest),)),
                               train=False, transcript=transcript)
            texts = [u.text for u in split.items]
            m, steps, loss = teach(fixtures, audio, lens, texts)
            drafts = [draft_ids(m, normalize(t)) for t in WRITTEN]
            out[f"trained_{transcript}"] = {"answer_text": texts, "steps": steps, "loss": loss,
                                            **measure(m, audio, lens, drafts)}
    m0 = assemble(fixtures / "asr_ctc.nemo", fixtures / "llm_hf", seed=0)
    ctc = [o["ctc_transcript"] for o in m0.predict(audio, lens, 2)]
    m, steps, loss = teach(fixtures, audio, lens, ctc)
    out["test_speculative_trained"] = {"answer_text": ctc, "steps": steps, "loss": loss,
                                       **measure(m, audio, lens, [draft_ids(m, t) for t in ctc])}
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
