"""Training and evaluation data: NeMo-style JSONL manifests, seed 000's label filters, audio
decoding in DataLoader workers, and the epoch plan that every rank shares.

    {"audio_filepath": "clips/a.wav", "duration": 2.31, "offset": 0.0, "text": "so I was thinking",
     "label": "INCOMPLETE", "tt_confidence": 0.97, "speakers": [[0.0, 2.3, "A"]]}

`audio_filepath` relative paths are resolved against the manifest's folder. `label` may be written
with or without angle brackets; it is stored as the tag token ("<INCOMPLETE>"). Optional fields:
`speakers` ([start, end, speaker] in seconds from the clip's start, i.e. after `offset`), or
`rttm_filepath` (an RTTM with the file's turns, as `python -m speechllm.activity` writes them; its
onsets count from the start of the file, and the clip's share becomes `speakers`),
`target_speaker` (whose turn it is, for the speaker kernels; default: the speaker still talking
when talk stops, the same rule as inference's `--target-speaker auto`) and
`llm_label` / `ten_label` (the two annotators, for the BC-priority filter). Every problem is
reported with the manifest's path and line number before anything is trained or scored, including
the audio: every file must exist, be readable and non-empty, and hold [offset, offset + duration]
(read_manifest is the one check, for train.py and infer.py --manifest alike).

Transcripts (load_split's `transcript`, train.py's data.transcript): "as_written" trains on `text`
as the manifest writes it; "ctc" on the form a CTC head emits (parakeet's: lowercase, no
punctuation but in-word apostrophes, numbers spelled out; sentences.normalize), taken from the
line's `text_norm` where it has one (synth.py's manifests do), so that the CTC transcript, the
draft of speculative decoding, is what the model would write itself and is accepted.

Sampling (EpochPlan): one list of batches per epoch, a pure function of (seed, epoch), so every
rank computes the same plan and takes its own disjoint share, and a resumed run can skip exactly
the batches it already used.
"""
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .activity import clip_segments, read_rttm, rttm_file_id
from .audio import AudioError, audio_info, load_audio, pad_batch
from .sentences import normalize
from .tokenizer import TAGS

COMPLETE, INCOMPLETE, BACKCHANNEL = TAGS


class ManifestError(ValueError):
    pass


TRANSCRIPTS = ("as_written", "ctc")  # how the answer's transcript is written: the manifest's text, or a CTC head's
SLACK_S = 0.02  # manifest durations are rounded: offset + duration may pass the file's end by this much


@dataclass
class Utterance:
    audio: Path
    duration: float | None = None
    offset: float = 0.0
    text: str | None = None
    label: str | None = None  # a tag token, e.g. "<COMPLETE>"
    tt_confidence: float | None = None
    speakers: list | None = None  # [[start, end, speaker], ...] in seconds
    rttm: Path | None = None  # rttm_filepath: where `speakers` came from
    line: int = 0
    extra: dict = field(default_factory=dict)


def normalize_label(label) -> str:
    tag = label if str(label).startswith("<") else f"<{str(label).upper()}>"
    if tag not in TAGS:
        raise ValueError(f"label {label!r} is not one of {[t.strip('<>') for t in TAGS]}")
    return tag


def read_manifest(path, require_label: bool = False) -> list[Utterance]:
    """Every utterance of a manifest, checked line by line: the fields, the audio (check_audio) and
    an rttm_filepath's turns (read into `speakers`). The first problem stops it as a ManifestError
    naming path:line."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: no such manifest")
    items, files = [], {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                u = parse_line(line, path.parent, n, require_label)
                check_audio(u, files)
                if u.rttm is not None:
                    u.speakers = rttm_speakers(u)
                items.append(u)
            except (ValueError, TypeError, KeyError) as e:
                raise ManifestError(f"{path}:{n}: {e}") from None
    if not items:
        raise ManifestError(f"{path}: the manifest holds no utterances")
    return items


def parse_line(line: str, root: Path, n: int, require_label: bool) -> Utterance:
    try:
        d = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(d, dict):
        raise ValueError("each line must be a JSON object")
    if "audio_filepath" not in d:
        raise ValueError("missing 'audio_filepath'")
    audio = Path(d.pop("audio_filepath"))
    duration = d.pop("duration", None)
    offset = float(d.pop("offset", 0.0) or 0.0)
    # JSON lets NaN and Infinity through, and every comparison with NaN is False.
    if duration is not None and not math.isfinite(float(duration)):
        raise ValueError(f"duration must be a finite number of seconds, got {duration}")
    if not math.isfinite(offset):
        raise ValueError(f"offset must be a finite number of seconds, got {offset}")
    if duration is not None and float(duration) <= 0:
        raise ValueError(f"duration must be > 0, got {duration}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    label = d.pop("label", None)
    if label is None and require_label:
        raise ValueError("missing 'label' (COMPLETE, INCOMPLETE or BACKCHANNEL)")
    speakers = d.pop("speakers", None)
    if speakers is not None and not all(isinstance(s, (list, tuple)) and len(s) == 3 for s in speakers):
        raise ValueError("'speakers' must be a list of [start, end, speaker]")
    rttm = d.pop("rttm_filepath", None)
    if rttm is not None and speakers is not None:
        raise ValueError("give 'speakers' or 'rttm_filepath', not both")
    rttm = Path(rttm) if rttm is not None else None
    conf = d.pop("tt_confidence", None)
    return Utterance(
        audio=audio if audio.is_absolute() else root / audio,
        duration=float(duration) if duration is not None else None,
        offset=offset,
        text=d.pop("text", None),
        label=normalize_label(label) if label is not None else None,
        tt_confidence=float(conf) if conf is not None else None,
        speakers=speakers,
        rttm=None if rttm is None else rttm if rttm.is_absolute() else root / rttm,
        line=n,
        extra=d,
    )


def check_audio(u: Utterance, files: dict) -> None:
    """u's audio file exists, is non-empty and readable, and holds [offset, offset + duration]
    (SLACK_S of rounding allowed); a missing duration is read from the file's header. files: path ->
    seconds held, so a long file that many lines cut up is opened once."""
    if u.audio not in files:
        if not u.audio.is_file():
            raise ValueError(f"audio file {u.audio} not found")
        if u.audio.stat().st_size == 0:
            raise ValueError(f"audio file {u.audio} is empty (0 bytes)")
        try:
            files[u.audio] = audio_info(u.audio)[0]
        except AudioError as e:
            raise ValueError(f"audio file {u.audio} is not readable: {e}") from None
    held = files[u.audio]
    if u.offset >= held:
        raise ValueError(f"offset {u.offset:g} s is past the end of {u.audio} ({held:.3f} s)")
    if u.duration is None:
        u.duration = held - u.offset
    elif u.offset + u.duration > held + SLACK_S:
        raise ValueError(f"offset + duration = {u.offset + u.duration:.3f} s runs past the end of {u.audio}, "
                         f"which holds {held:.3f} s")


def rttm_speakers(u: Utterance) -> list:
    """The clip's turns from its rttm_filepath: [[start, end, speaker]] in seconds from the clip's
    start. The file id is the audio file's (rttm_file_id), or the RTTM's only one."""
    if not u.rttm.is_file():
        raise ValueError(f"rttm_filepath {u.rttm} not found")
    turns = read_rttm(u.rttm)
    if not turns:
        return []  # nobody talks in it
    file_id = rttm_file_id(u.audio)
    if file_id not in turns and len(turns) == 1:
        file_id = next(iter(turns))
    try:
        return [list(s) for s in clip_segments(turns, file_id, u.offset, u.duration)]
    except ValueError as e:
        raise ValueError(f"{u.rttm}: {e}") from None


# -----------------------------------------------------------------------------
# splits: manifests -> checked, filtered utterances


@dataclass
class Split:
    items: list[Utterance]
    sources: list[int]  # which manifest each item came from
    report: dict  # what the filters kept and dropped


def load_split(paths, task: str, cfg, train: bool, seed: int = 0, transcript: str = "as_written") -> Split:
    """Read and check every manifest, then apply seed 000's filters (DatasetConfig fields). Any bad
    line (bad JSON or field, missing, unreadable or too short audio, a missing transcript or label
    the task needs) stops here with the file and line, before training starts. transcript: one of
    TRANSCRIPTS, the form of each utterance's `text` (ctc_text)."""
    if transcript not in TRANSCRIPTS:
        raise ValueError(f"transcript must be one of {', '.join(TRANSCRIPTS)}, got {transcript!r}")
    items, sources = [], []
    for s, path in enumerate(paths):
        for u in read_manifest(path, require_label=task == "turntaking"):
            try:
                if transcript == "ctc":
                    u.text = ctc_text(u)
                check_item(u, task)
            except ValueError as e:
                raise ManifestError(f"{path}:{u.line}: {e}") from None
            items.append(u)
            sources.append(s)
    report = {"read": len(items)}
    keep = [i for i, u in enumerate(items) if cfg.min_duration <= u.duration <= cfg.max_duration]
    report["dropped_duration"] = len(items) - len(keep)
    if task == "turntaking":
        keep, report["dropped_confidence"], report["dropped_conflict"] = filter_labels(
            items, keep, cfg.tt_confidence_threshold, cfg.bc_priority)
        if train and cfg.complete_ratio is not None:
            before = len(keep)
            keep = downsample_complete(items, keep, cfg.complete_ratio, seed)
            report["dropped_downsampling"] = before - len(keep)
    if not keep:
        raise ManifestError(f"{', '.join(map(str, paths))}: no utterance is left after filtering ({report})")
    report["kept"] = len(keep)
    report["labels"] = {t: sum(items[i].label == t for i in keep) for t in TAGS}
    return Split([items[i] for i in keep], [sources[i] for i in keep], report)


def ctc_text(u: Utterance) -> str | None:
    """u's transcript as a CTC head writes it: the line's `text_norm` if it has one (kept as it
    is: whoever wrote it knew the head), else `text` normalised (sentences.normalize); None
    without either."""
    norm = u.extra.get("text_norm")
    if norm is not None:
        if not isinstance(norm, str):
            raise ValueError(f"'text_norm' must be a string, got {type(norm).__name__}")
        return " ".join(norm.split())
    return normalize(u.text) if u.text is not None else None


def check_item(u: Utterance, task: str) -> None:
    """What the task needs beyond read_manifest's checks: a transcript for ASR."""
    if task == "asr" and not (u.text or "").strip():
        raise ValueError("missing 'text' (Stage 1 trains on transcripts)")


def filter_labels(items: list[Utterance], index: list[int], threshold: float | None,
                  bc_priority: bool) -> tuple[list[int], int, int]:
    """Seed 000's label filters over items[index] -> (kept indices, dropped for low confidence,
    dropped as conflicts).

    threshold: COMPLETE and INCOMPLETE need tt_confidence >= threshold (the TEN agreement); clips
    without a confidence are kept, BACKCHANNEL is never filtered. bc_priority: where the manifest
    has both `llm_label` and `ten_label` and they disagree, a BACKCHANNEL from either wins (the
    label becomes BACKCHANNEL); a COMPLETE/INCOMPLETE disagreement is dropped."""
    kept, low, conflict = [], 0, 0
    for i in index:
        u = items[i]
        llm, ten = u.extra.get("llm_label"), u.extra.get("ten_label")
        if bc_priority and llm is not None and ten is not None and normalize_label(llm) != normalize_label(ten):
            if BACKCHANNEL not in (normalize_label(llm), normalize_label(ten)):
                conflict += 1
                continue
            u.label = BACKCHANNEL
        if (threshold is not None and u.label in (COMPLETE, INCOMPLETE) and u.tt_confidence is not None
                and u.tt_confidence < threshold):
            low += 1
            continue
        kept.append(i)
    return kept, low, conflict


def downsample_complete(items: list[Utterance], index: list[int], ratio: float, seed: int) -> list[int]:
    """Keep a seeded random min(#COMPLETE, ratio x #INCOMPLETE) of the COMPLETE clips (seed 000:
    ratio 1.0, training split only); everything else and the order are kept."""
    complete = [i for i in index if items[i].label == COMPLETE]
    n_incomplete = sum(items[i].label == INCOMPLETE for i in index)
    n = min(len(complete), int(round(ratio * n_incomplete)))
    g = torch.Generator().manual_seed(seed)
    chosen = {complete[j] for j in torch.randperm(len(complete), generator=g)[:n].tolist()}
    return [i for i in index if items[i].label != COMPLETE or i in chosen]


# -----------------------------------------------------------------------------
# audio decoding (in DataLoader workers) and batching


class ClipDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[Utterance]):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        u = self.items[i]
        return {"index": i, "audio": load_audio(u.audio, offset=u.offset, duration=u.duration),
                "text": u.text, "label": u.label, "speakers": u.speakers,
                "target_speaker": u.extra.get("target_speaker"), "duration": u.duration}


def collate(batch: list[dict]) -> dict:
    """Right-pad the clips: audio (B, N) float32 and lengths (B,); other fields as lists."""
    audio, lengths = pad_batch([b["audio"] for b in batch])
    out = {k: [b[k] for b in batch] for k in batch[0] if k != "audio"}
    return {**out, "audio": audio, "lengths": lengths}


def class_weights(labels: list[str | None], max_weight: float) -> torch.Tensor:
    """Per-item weight N / count(label), capped at max_weight (seed 000's weighted sampling): each
    class is drawn equally often unless its cap binds."""
    if any(lab is None for lab in labels):
        raise ValueError("weighted sampling needs a label on every utterance")
    counts = Counter(labels)
    n = len(labels)
    return torch.tensor([min(n / counts[lab], max_weight) for lab in labels], dtype=torch.float64)


class EpochPlan(torch.utils.data.Sampler):
    """The batches of one epoch, computed identically on every rank from (seed, epoch); rank r
    takes batches r, r + world, ... A DataLoader batch_sampler.

    The order is a permutation (shuffle), the manifest order (no shuffle), or, with per-item
    probabilities (weighted sampling and/or a manifest mixture), N draws with replacement.
    Batches hold batch_size clips, or, with batch_duration, as many clips of one duration bucket
    as fit in batch_duration seconds (at most batch_size), in a shuffled order. For training
    (`even`) the plan is cut to a multiple of world so that every rank steps in lockstep.
    `set_epoch(epoch, position)` starts an epoch after `position` of this rank's batches: resume."""

    def __init__(self, durations: list[float], probs: torch.Tensor | None, batch_size: int,
                 batch_duration: float | None = None, bins=None, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world: int = 1, even: bool = True):
        self.durations, self.probs = durations, probs
        self.batch_size, self.batch_duration, self.bins = batch_size, batch_duration, bins
        self.shuffle, self.seed, self.rank, self.world, self.even = shuffle, seed, rank, world, even
        self.epoch, self.position, self._cache = 0, 0, None

    def set_epoch(self, epoch: int, position: int = 0) -> None:
        self.epoch, self.position = epoch, position

    def plan(self, epoch: int) -> list[list[int]]:
        """The global list of batches of `epoch` (every rank's share together)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        n = len(self.durations)
        if self.probs is not None:
            order = torch.multinomial(self.probs, n, replacement=True, generator=g).tolist()
        else:
            order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        batches = self.by_duration(order, g) if self.batch_duration else \
            [order[i:i + self.batch_size] for i in range(0, n, self.batch_size)]
        if self.even:
            batches = batches[: len(batches) // self.world * self.world]
            if not batches:
                raise ValueError(f"{n} clips make fewer batches than the {self.world} processes")
        self._cache = (epoch, batches)
        return batches

    def by_duration(self, order: list[int], g: torch.Generator) -> list[list[int]]:
        bins = list(self.bins or [])
        buckets: dict[int, list[list[int]]] = {}
        for i in order:
            b = next((k for k, edge in enumerate(bins) if self.durations[i] <= edge), len(bins))
            batch = buckets.setdefault(b, [[]])[-1]
            total = sum(self.durations[j] for j in batch)
            if batch and (len(batch) >= self.batch_size or total + self.durations[i] > self.batch_duration):
                batch = []
                buckets[b].append(batch)
            batch.append(i)
        batches = [batch for b in sorted(buckets) for batch in buckets[b]]
        if self.shuffle:
            batches = [batches[k] for k in torch.randperm(len(batches), generator=g).tolist()]
        return batches

    def share(self) -> list[list[int]]:
        return self.plan(self.epoch)[self.rank::self.world][self.position:]

    def __iter__(self):
        return iter(self.share())

    def __len__(self):
        return len(self.share())


def draw_probabilities(labels: list[str | None], sources: list[int], mixture: list[float] | None,
                       weighted: bool, max_weight: float) -> torch.Tensor | None:
    """Per-item probabilities of one draw, or None for plain (permutation) sampling.

    weighted: class weights (class_weights). mixture (seed 004): manifest s is drawn with
    probability mixture[s], and within it items in proportion to their weight."""
    if not weighted and mixture is None:
        return None
    w = class_weights(labels, max_weight) if weighted else torch.ones(len(labels), dtype=torch.float64)
    if mixture is None:
        return w / w.sum()
    src = torch.tensor(sources)
    p = torch.tensor(mixture, dtype=torch.float64) / sum(mixture)
    per_source = torch.zeros(len(mixture), dtype=torch.float64).index_add_(0, src, w)
    if (per_source == 0).any():
        raise ValueError(f"manifest {int((per_source == 0).nonzero()[0])} of the mixture has no utterance left")
    return p[src] * w / per_source[src]
