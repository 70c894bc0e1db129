"""Synthetic turn-taking data spoken by espeak-ng: COMPLETE, INCOMPLETE and BACKCHANNEL clips.

    python -m speechllm.synth --out data/synth --train 600 --dev 100 --test 150   # per class

- COMPLETE: a whole sentence, spoken with final intonation ("we should call the plumber before friday.").
- INCOMPLETE: the same kind of sentence cut where a speaker would go on: after a function word
  ("we should call the"), mid-clause ("i think we should"), before the object ("my brother bought").
  It is spoken with a trailing comma, which gives espeak-ng's continuation (non-final) contour.
- BACKCHANNEL: a short acknowledgement ("uh-huh", "yeah", "i see", ...).

Sentences are built from templates over word pools (tens of thousands of distinct sentences);
each distinct sentence goes to one split by a hash, and any test or dev text that also occurs in
train (a shared prefix, say) is dropped, so no test text is ever heard in training. The
backchannel pool is small, so its expressions are split too: dev and test use expressions train
never has. Voices, speed and pitch vary per clip. Writes 16 kHz mono WAVs and NeMo-style manifests
(train/dev/test.jsonl) with text, label, duration and tt_confidence (1.0: synthetic labels are
certain). espeak-ng is a Debian package: `apt-get install espeak-ng`.
"""
import argparse
import hashlib
import json
import random
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import soundfile as sf
import torch
from tqdm import tqdm

from .audio import SAMPLE_RATE, resample

SUBJECTS = ["i", "we", "you", "they", "my brother", "my sister", "the manager", "our neighbours", "my friend from work",
            "the kids", "my parents", "the new teacher", "his uncle", "her cousin", "the whole team", "our landlord",
            "the doctor", "my roommate", "the driver", "everyone at the office"]
# Past-tense and modal forms only, so any subject agrees with them.
MODALS = ["should", "could", "will", "might", "wanted to", "needed to", "had to", "were going to", "would like to",
          "tried to", "forgot to", "decided to"]
# (verb, objects): the object's determiner is a natural cut point ("call the").
VERBS = [
    ("call", ["the plumber", "the bank", "a taxi", "my grandmother", "the front desk", "the insurance company"]),
    ("buy", ["a new car", "some bread", "the tickets", "a birthday present", "the groceries", "a bigger table"]),
    ("visit", ["the museum", "my aunt", "the new office", "the old castle", "a friend in boston", "the zoo"]),
    ("fix", ["the kitchen sink", "the broken window", "the bike", "the printer", "the garden fence", "the heater"]),
    ("finish", ["the report", "the painting", "the homework", "the last chapter", "the whole project", "the puzzle"]),
    ("clean", ["the garage", "the windows", "the living room", "the car", "the fridge", "the bathroom"]),
    ("book", ["a table", "the flights", "a hotel room", "the meeting room", "a doctor's appointment", "a haircut"]),
    ("send", ["the invoice", "a letter", "the photos", "the package", "an email to the team", "the documents"]),
    ("cook", ["dinner", "a big breakfast", "the soup", "some pasta", "the chicken", "a curry"]),
    ("move", ["the boxes", "the sofa", "the piano", "the plants", "the desk", "all the chairs"]),
    ("read", ["the contract", "the new book", "the instructions", "the newspaper", "the reviews", "the recipe"]),
    ("watch", ["the game", "a movie", "the news", "the kids", "the sunset", "the last episode"]),
]
TIMES = ["before friday", "after lunch", "next week", "on monday", "this evening", "by the end of the month",
         "tomorrow morning", "at the weekend", "in the afternoon", "before the holidays", "after work", "tonight"]
OPENERS = ["i think", "i guess", "honestly", "to be fair", "you know", "the thing is", "i suppose", "actually"]
LINKERS = ["because", "but", "and then", "so", "although"]
REASONS = ["it was raining", "we ran out of time", "nobody else wanted to", "the price went up", "it was too late",
           "the shop was closed", "she asked nicely", "we had a long day", "the car broke down", "it was cheaper"]
BACKCHANNELS = ["uh-huh", "yeah", "right", "mm-hmm", "okay", "i see", "sure", "yep", "oh okay", "got it", "exactly",
                "true", "oh really", "i know", "that's right", "oh wow", "no way", "makes sense", "fair enough",
                "oh yeah", "totally", "mhm", "wow", "oh i see", "yeah yeah", "of course", "cool", "alright", "hmm",
                "really", "oh no", "nice", "good", "absolutely", "definitely", "oh right", "yes", "indeed"]
VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029"]
VARIANTS = ["", "+f1", "+f2", "+f3", "+f4", "+m1", "+m2", "+m3", "+m4", "+m7"]
TAGS = ("COMPLETE", "INCOMPLETE", "BACKCHANNEL")


def sentence(rng: random.Random) -> tuple[list[str], list[int]]:
    """Words of one sentence, and the word counts after which cutting leaves a natural fragment."""
    words, cuts = [], []
    if rng.random() < 0.3:
        words += rng.choice(OPENERS).split()
        cuts.append(len(words))  # "i think"
    words += rng.choice(SUBJECTS).split()
    words += rng.choice(MODALS).split()
    cuts.append(len(words))  # "we should"
    verb, objects = rng.choice(VERBS)
    words.append(verb)
    cuts.append(len(words))  # before the object: "we should call"
    obj = rng.choice(objects).split()
    if obj[0] in ("the", "a", "an", "my", "some", "all"):
        cuts.append(len(words) + 1)  # after the determiner: "we should call the"
    words += obj
    if rng.random() < 0.6:
        time_ = rng.choice(TIMES).split()
        cuts.append(len(words) + 1)  # after the preposition: "... before"
        words += time_
    if rng.random() < 0.3:
        words += rng.choice(LINKERS).split()
        cuts.append(len(words))  # "... because"
        words += rng.choice(REASONS).split()
    return words, [c for c in cuts if c < len(words)]


def split_of(text: str, dev: float = 0.1, test: float = 0.15) -> str:
    h = int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) / 16**8
    return "test" if h < test else "dev" if h < test + dev else "train"


def make_texts(counts: dict, seed: int) -> dict:
    """{split: [(text, label)]} with `counts[split]` items per class, no dev/test text in train."""
    rng = random.Random(seed)
    out = {s: {t: [] for t in TAGS} for s in counts}
    bc = sorted(BACKCHANNELS, key=lambda t: hashlib.sha1(t.encode()).hexdigest())
    bc_pool = {"test": bc[:6], "dev": bc[6:10], "train": bc[10:]}
    seen = {s: set() for s in counts}
    for _ in range(200 * sum(counts.values())):
        if all(len(out[s][t]) >= counts[s] for s in counts for t in TAGS if t != "BACKCHANNEL"):
            break
        words, cuts = sentence(rng)
        full = " ".join(words)
        s = split_of(full)
        if s not in counts:
            continue
        for tag, text in (("COMPLETE", full), ("INCOMPLETE", " ".join(words[: rng.choice(cuts)]))):
            if len(out[s][tag]) < counts[s] and (tag, text) not in seen[s]:
                seen[s].add((tag, text))
                out[s][tag].append(text)
    for s in counts:
        out[s]["BACKCHANNEL"] = [rng.choice(bc_pool[s]) for _ in range(counts[s])]
    train_texts = set(out["train"]["COMPLETE"]) | set(out["train"]["INCOMPLETE"]) if "train" in out else set()
    for s in counts:
        if s != "train":
            for tag in ("COMPLETE", "INCOMPLETE"):
                out[s][tag] = [t for t in out[s][tag] if t not in train_texts]
    return {s: [(text, tag) for tag in TAGS for text in out[s][tag]] for s in counts}


def speak(text: str, tag: str, path: Path, rng: random.Random) -> float:
    """espeak-ng -> 16 kHz mono WAV at `path`; returns the duration in seconds."""
    voice = rng.choice(VOICES) + rng.choice(VARIANTS)
    spoken = text + ("," if tag == "INCOMPLETE" else "." if tag == "COMPLETE" else "")
    with tempfile.NamedTemporaryFile(suffix=".wav") as tmp:
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(rng.randint(130, 200)), "-p", str(rng.randint(30, 70)),
                        "-w", tmp.name, spoken], check=True, capture_output=True)
        x, sr = sf.read(tmp.name, dtype="float32")
    x = resample(torch.from_numpy(x), sr, SAMPLE_RATE).numpy()
    sf.write(path, x, SAMPLE_RATE, subtype="PCM_16")
    return len(x) / SAMPLE_RATE


def synthesize(out: Path, counts: dict, seed: int = 0, workers: int = 4) -> dict:
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed; on Debian/Ubuntu: sudo apt-get install espeak-ng")
    texts = make_texts(counts, seed)
    jobs = [(s, i, text, tag) for s, items in texts.items() for i, (text, tag) in enumerate(items)]
    for s in texts:
        (out / s).mkdir(parents=True, exist_ok=True)

    def job(j):
        s, i, text, tag = j
        rng = random.Random(f"{seed}-{s}-{i}")
        path = out / s / f"{s}_{i:05d}.wav"
        return s, {"audio_filepath": f"{s}/{path.name}", "duration": round(speak(text, tag, path, rng), 3),
                   "text": text, "label": tag, "tt_confidence": 1.0}

    rows = {s: [] for s in texts}
    with ThreadPoolExecutor(workers) as pool:
        for s, row in tqdm(pool.map(job, jobs), total=len(jobs), desc="espeak-ng", unit="clip"):
            rows[s].append(row)
    for s, items in rows.items():
        (out / f"{s}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    return {s: len(items) for s, items in rows.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (WAVs under train/, dev/, test/ and the manifests)")
    p.add_argument("--train", type=int, default=600, help="clips per class in train (default: %(default)s)")
    p.add_argument("--dev", type=int, default=100, help="clips per class in dev (default: %(default)s)")
    p.add_argument("--test", type=int, default=150, help="clips per class in test (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed for texts, voices, speed and pitch (default: %(default)s)")
    p.add_argument("--workers", type=int, default=4, help="parallel espeak-ng processes (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        sizes = synthesize(Path(args.out), {"train": args.train, "dev": args.dev, "test": args.test}, args.seed, args.workers)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: " + ", ".join(f"{s} {n} clips" for s, n in sizes.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
