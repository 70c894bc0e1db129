"""NeMo-style JSONL manifests: one utterance per line.

    {"audio_filepath": "clips/a.wav", "duration": 2.31, "offset": 0.0, "text": "so I was thinking",
     "label": "INCOMPLETE", "tt_confidence": 0.97, "speakers": [[0.0, 2.3, "A"]]}

`audio_filepath` relative paths are resolved against the manifest's folder. `label` may be written
with or without angle brackets; it is stored as the tag token ("<INCOMPLETE>"). Every problem is
reported with the manifest's path and line number before anything is trained or scored.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path

from .tokenizer import TAGS


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


def normalize_label(label, tags=TAGS) -> str:
    tag = label if str(label).startswith("<") else f"<{str(label).upper()}>"
    if tag not in tags:
        raise ValueError(f"label {label!r} is not one of {[t.strip('<>') for t in tags]}")
    return tag


def read_manifest(path, require_label: bool = False, tags=TAGS) -> list[Utterance]:
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: no such manifest")
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                items.append(parse_line(line, path.parent, n, require_label, tags))
            except (ValueError, TypeError, KeyError) as e:
                raise ManifestError(f"{path}:{n}: {e}") from None
    if not items:
        raise ManifestError(f"{path}: the manifest holds no utterances")
    return items


def parse_line(line: str, root: Path, n: int, require_label: bool, tags) -> Utterance:
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
        label=normalize_label(label, tags) if label is not None else None,
        tt_confidence=float(conf) if conf is not None else None,
        speakers=speakers,
        line=n,
        extra=d,
    )
