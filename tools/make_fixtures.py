"""Regenerate tests/fixtures/: tiny random-weight checkpoints written by the upstream libraries
themselves (transformers, NeMo) and the outputs those libraries compute from them.

This runs in its own environment, never the project's (transformers and NeMo are not dependencies):

    python3 -m venv /tmp/venv_fx
    /tmp/venv_fx/bin/pip install torch==2.13.0                  # first, so that pip keeps the CPU build
    echo torch==2.13.0 > /tmp/constraints.txt
    /tmp/venv_fx/bin/pip install -c /tmp/constraints.txt transformers==5.23.0 "nemo_toolkit[asr]==3.0.0" \
        peft==0.21.2                                             # peft: SALM imports it
    /tmp/venv_fx/bin/python tools/make_fixtures.py tests/fixtures            # every part
    /tmp/venv_fx/bin/python tools/make_fixtures.py tests/fixtures qwen2 whisper   # some parts

Parts run in dependency order: audio and the tokenizer first (every model uses them), then the
transformers models (tools/fixtures_hf.py), then the NeMo ones (tools/fixtures_nemo.py, then
tools/fixtures_nemo_diar_salm.py: salm needs asr_ctc and qwen2). Everything is seeded; espeak-ng supplies the speech. The file names, formats,
configs and reference keys are the ones tests/conftest.py and the tests read (tests/fixtures/README.md
lists them)."""
import argparse
import json
import platform
import random
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from safetensors.torch import save_file

SR = 16000
# Lengths the tests rely on (encoder frames 30/21 for the CTC model, 119/81 for Whisper, 51 for the mix).
CLIP_SAMPLES = {"audio_0.wav": 37920, "audio_1.wav": 25760}
MIX_SAMPLES = 64927
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 400, 401, 402


# ----------------------------------------------------------------------------------------------
# small shared helpers


def seed_all(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "tokenizers", "safetensors", "sentencepiece", "numpy", "soundfile",
                 "nemo-toolkit", "lightning", "omegaconf", "librosa", "peft"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    espeak = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout
    out["espeak-ng"] = espeak.split("  Data at")[0].strip()
    return out


def save_tensors(path: Path, tensors: dict):
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(path))


def write_json(path: Path, obj):
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def min_margin(logits: torch.Tensor) -> float:
    """Smallest top-1 minus top-2 gap over the rows of logits (..., V): how far a greedy choice is
    from flipping."""
    top = logits.float().topk(2, dim=-1).values
    return (top[..., 0] - top[..., 1]).min().item()


def read_wav(path: Path) -> np.ndarray:
    return sf.read(path, dtype="float32")[0]


# ----------------------------------------------------------------------------------------------
# audio: espeak-ng speech at 16 kHz, cut to the lengths the tests count frames on


def speak(text: str, voice: str, speed: int) -> np.ndarray:
    """espeak-ng's 22.05 kHz output, resampled to 16 kHz by band-limiting in the frequency domain,
    leading and trailing silence removed. float64, peak 1."""
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "x.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(wav), text], check=True)
        x, sr = sf.read(wav, dtype="float64")
    n_out = int(round(len(x) * SR / sr))
    spectrum = np.fft.rfft(x)[: n_out // 2 + 1]
    y = np.fft.irfft(spectrum, n_out) * n_out / len(x)
    loud = np.flatnonzero(np.abs(y) > 0.02 * np.abs(y).max())
    y = y[loud[0]: loud[-1] + 1]
    return y / np.abs(y).max()


def fit_speech(text: str, voice: str, samples: int) -> np.ndarray:
    """The slowest espeak rate from 150 wpm up whose speech fits into samples with 0.08 s of
    lead and 0.1 s of tail."""
    room = samples - int(0.18 * SR)
    for speed in range(150, 400, 10):
        y = speak(text, voice, speed)
        if len(y) <= room:
            return y
    raise RuntimeError(f"{text!r} does not fit into {samples} samples")


def to_int16_grid(x: np.ndarray) -> np.ndarray:
    """float32 = int16 / 32768, as every fixture's audio."""
    return (np.clip(np.round(x * 32768), -32768, 32767) / 32768).astype(np.float32)


def noise_floor(n: int, seed: int) -> np.ndarray:
    """1e-3 rms Gaussian noise: every mel band keeps some energy, so rounding the input (to bf16,
    say) does not dominate the log of an empty band."""
    return 1e-3 * np.random.default_rng(seed).standard_normal(n)


def make_audio(out: Path) -> dict:
    # Sibilants and fricatives put energy above 5 kHz, where the high mel bands would be near empty.
    texts = {"audio_0.wav": "Please switch on the kitchen lights, it's so dark.",
             "audio_1.wav": "She sells sea shells, see?"}
    info = {}
    for k, (name, text) in enumerate(texts.items()):
        y = fit_speech(text, "en-us", CLIP_SAMPLES[name])
        x = noise_floor(CLIP_SAMPLES[name], 100 + k)
        start = int(0.08 * SR)
        x[start:start + len(y)] += 0.5 * y
        sf.write(out / name, to_int16_grid(x), SR, subtype="PCM_16")
        info[name] = {"text": text, "voice": "en-us", "num_samples": len(x),
                      "speech_s": [start / SR, (start + len(y)) / SR]}
    # Two voices that overlap: A from 0.10 s, B starting before A ends.
    a = fit_speech("I think we should leave at nine tomorrow.", "en-us+m3", int(2.3 * SR))
    b = fit_speech("Sure, and bring the map along too.", "en-us+f3", int(2.4 * SR))
    mix = noise_floor(MIX_SAMPLES, 102)
    a0 = int(0.10 * SR)
    b0 = a0 + len(a) - int(0.55 * SR)  # ~0.55 s of overlap
    b0 = min(b0, MIX_SAMPLES - len(b) - int(0.12 * SR))
    mix[a0:a0 + len(a)] += 0.45 * a
    mix[b0:b0 + len(b)] += 0.45 * b
    sf.write(out / "audio_2spk.wav", to_int16_grid(mix), SR, subtype="PCM_16")
    info["audio_2spk.wav"] = {"num_samples": MIX_SAMPLES, "segments": [
        {"speaker": "A", "voice": "en-us+m3", "start": a0 / SR, "end": (a0 + len(a)) / SR},
        {"speaker": "B", "voice": "en-us+f3", "start": b0 / SR, "end": (b0 + len(b)) / SR}]}
    write_json(out / "audio.json", info)
    return info


# ----------------------------------------------------------------------------------------------
# the byte-level BPE shared by the three Qwen fixtures: 256 bytes + 144 merges + 3 special tokens

CORPUS = """\
The small model reads a short sentence about speech, and then it answers the question.
Speech recognition turns sound into text; a language model continues the text it is given.
When the speaker stops talking, the listener decides whether the turn is complete or not.
Short answers such as yes, no, okay and right are often backchannels, not real turns.
There is the weather, the time of day, the name of the street and the colour of the sky.
Each layer has a query, a key and a value; the heads attend to everything that came before.
A linear attention layer keeps a small state and updates it token by token with a gate.
She said that they would meet at the station at seven, and he said that it was fine with him.
What do you think about this? I think that it is good, but we should try it again tomorrow.
"""


def make_tokenizer(directory: Path):
    """Train the merges on CORPUS with the `tokenizers` trainer over Qwen2's own pre-tokenizer, then
    let transformers' Qwen2Tokenizer assemble and save the files (tokenizer.json,
    tokenizer_config.json with the ChatML template). Returns the transformers tokenizer."""
    from tokenizers import pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_vocab = {ch: i for i, ch in enumerate(_byte_order())}
    assert set(byte_vocab) == set(alphabet)
    blank = Qwen2Tokenizer(vocab=dict(byte_vocab), merges=[], unk_token=None)
    raw = blank.backend_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=_byte_order(), special_tokens=[],
                                  show_progress=False)
    raw.train_from_iterator(CORPUS.splitlines(), trainer)
    model = json.loads(raw.to_str())["model"]
    vocab, merges = model["vocab"], [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    assert len(vocab) == 400 and len(merges) == 144, (len(vocab), len(merges))
    assert all(vocab[ch] == i for ch, i in byte_vocab.items())  # bytes keep GPT-2's order, 0..255
    chat = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
            "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
            "{% endif %}")
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token=SPECIALS[0],
                         pad_token=SPECIALS[0], additional_special_tokens=list(SPECIALS[1:]),
                         errors="replace", model_max_length=32768, clean_up_tokenization_spaces=False,
                         split_special_tokens=False, add_bos_token=False, chat_template=chat)
    tok.add_special_tokens({"additional_special_tokens": list(SPECIALS[1:])})
    assert [tok.convert_tokens_to_ids(t) for t in SPECIALS] == [400, 401, 402] and len(tok) == 403
    tok.save_pretrained(directory)
    return tok


def _byte_order() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in its id order: the printable bytes first,
    the rest mapped from U+0100 on."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in keep] + [chars[b] for b in range(256) if b not in keep]


PROBES = ["hello world", "The quick brown fox, 1234 times!", "  leading spaces and trailing   ",
          "line one\nline two\n\n", "café naïve — über", "<|im_start|>user\nhi<|im_end|>",
          "it's what they'll do, isn't it?"]


def probes(tok) -> dict:
    return {text: tok(text, add_special_tokens=False)["input_ids"] for text in PROBES}


def text_of_length(tok, text: str, n: int) -> str:
    """text cut or extended (with words of CORPUS) so that it encodes to exactly n tokens; the
    tests count positions on these rows."""
    words = text.split(" ")
    pool = CORPUS.split()
    count = lambda t: len(tok(t, add_special_tokens=False)["input_ids"])
    out = words[:]
    i = 0
    while count(" ".join(out)) < n:
        out.append(pool[i % len(pool)].strip(",.;?"))
        i += 1
    while count(" ".join(out)) > n and len(out) > 1:
        out.pop()
    t = " ".join(out)
    for filler in ("!", "?", ".", ",", " a", " I"):
        while count(t + filler) <= n and count(t) < n:
            t += filler
        if count(t) == n:
            return t
    raise RuntimeError(f"no text of {n} tokens from {text!r}")


# ----------------------------------------------------------------------------------------------


PARTS = ("audio", "tokenizer", "qwen2", "qwen3", "qwen3_5", "whisper", "asr_ctc", "asr_spk_kernel",
         "diar_sortformer", "salm")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("parts", nargs="*", help=f"any of {', '.join(PARTS)} (default: all)")
    args = parser.parse_args(argv)
    parts = args.parts or list(PARTS)
    if set(parts) - set(PARTS):
        parser.error(f"unknown part(s): {', '.join(sorted(set(parts) - set(PARTS)))}")
    out = args.out.resolve()  # SALM runs with the fixture folder as its working directory
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    tok_dir = out / "llm_hf"
    if "audio" in parts:
        make_audio(out)
    if "tokenizer" in parts:
        make_tokenizer(tok_dir)
    hf = [p for p in parts if p in ("qwen2", "qwen3", "qwen3_5", "whisper")]
    if hf:
        import fixtures_hf
        for part in hf:
            getattr(fixtures_hf, f"make_{part}")(out)
    for part in [p for p in parts if p in ("asr_ctc", "asr_spk_kernel")]:
        import fixtures_nemo
        getattr(fixtures_nemo, f"make_{part}")(out)
    for part in [p for p in parts if p in ("diar_sortformer", "salm")]:
        import fixtures_nemo_diar_salm
        getattr(fixtures_nemo_diar_salm, f"make_{part}")(out)
    write_manifest(out)


def write_manifest(out: Path):
    """MANIFEST.json: the library versions and every generated file with its size (README.md is
    written by hand)."""
    files = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*"))
             if p.is_file() and str(p.relative_to(out)) not in ("MANIFEST.json", "README.md")}
    write_json(out / "MANIFEST.json", {"versions": versions(), "files": files})


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
