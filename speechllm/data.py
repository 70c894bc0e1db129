"""Training and evaluation data: NeMo-style JSONL manifests, seed 000's label filters, audio
decoding in DataLoader workers, and the epoch plan that every rank shares.

    {"audio_filepath": "clips/a.wav", "duration": 2.31, "offset": 0.0, "text": "so I was thinking",
     "label": "INCOMPLETE", "tt_confidence": 0.97, "speakers": [[0.0, 2.3, "A"]]}

`audio_filepath` relative paths are resolved against the manifest's folder. `label` may be written
with or without angle brackets; it is stored as the tag token ("<INCOMPLETE>"). Optional fields:
`speakers` ([start, end, speaker] in seconds from the clip's start, i.e. after `offset`),
`target_speaker` (whose turn it is, for the speaker kernels; default: the speaker still talking
when talk stops, the same rule as inference's `--target-speaker auto`) and
`llm_label` / `ten_label` (the two annotators, for the BC-priority filter). Every problem is
reported with the manifest's path and line number before anything is trained or scored.

Sampling (EpochPlan): one list of batches per epoch, a pure function of (seed, epoch), so every
rank computes the same plan and takes its own disjoint share, and a resumed run can skip exactly
the batches it already used.
"""
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import soundfile as sf
import torch

from .audio import load_audio, pad_batch
from .tokenizer import TAGS

COMPLETE, INCOMPLETE, BACKCHANNEL = TAGS


class ManifestError(ValueError):
    pass


@dataclass
class Utterance:
    audio: Path
    duration: float | None = None
    offset: float = 0.0
    text: str | None = None
    label: str | None = None  # a tag token, e.g. "<COMPLETE>"
    tt_confidence: float | None = None
    speakers: list | None = None  # [[start, end, speaker], ...] in seconds
    line: int = 0
    extra: dict = field(default_factory=dict)


def normalize_label(label) -> str:
    tag = label if str(label).startswith("<") else f"<{str(label).upper()}>"
    if tag not in TAGS:
        raise ValueError(f"label {label!r} is not one of {[t.strip('<>') for t in TAGS]}")
    return tag


def read_manifest(path, require_label: bool = False) -> list[Utterance]:
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: no such manifest")
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                items.append(parse_line(line, path.parent, n, require_label))
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
    conf = d.pop("tt_confidence", None)
    return Utterance(
        audio=audio if audio.is_absolute() else root / audio,
        duration=float(duration) if duration is not None else None,
        offset=offset,
        text=d.pop("text", None),
        label=normalize_label(label) if label is not None else None,
        tt_confidence=float(conf) if conf is not None else None,
        speakers=speakers,
        line=n,
        extra=d,
    )


# -----------------------------------------------------------------------------
# splits: manifests -> checked, filtered utterances


@dataclass
class Split:
    items: list[Utterance]
    sources: list[int]  # which manifest each item came from
    report: dict  # what the filters kept and dropped


def load_split(paths, task: str, cfg, train: bool, seed: int = 0) -> Split:
    """Read and check every manifest, then apply seed 000's filters (DatasetConfig fields). Any bad
    line (bad JSON or field, missing or unreadable audio, a missing transcript or label the task
    needs) stops here with the file and line, before training starts."""
    items, sources = [], []
    for s, path in enumerate(paths):
        for u in read_manifest(path, require_label=task == "turntaking"):
            try:
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


def check_item(u: Utterance, task: str) -> None:
    """The audio exists and is readable (its duration is read from the header when the manifest
    has none); a transcript is there for ASR."""
    if not u.audio.is_file():
        raise ValueError(f"audio file {u.audio} not found")
    if u.duration is None:
        try:
            u.duration = sf.info(str(u.audio)).duration - u.offset
        except RuntimeError as e:  # soundfile's error for an unreadable file
            raise ValueError(f"audio file {u.audio} is not readable: {e}") from None
        if u.duration <= 0:
            raise ValueError(f"offset {u.offset} s is past the end of {u.audio}")
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
