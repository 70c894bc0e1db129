"""Pick the speech encoder for a path: a FastConformer (speechllm.ASRModel) or a Whisper encoder.

    enc = load_encoder("parakeet-ctc-0.6b.nemo")     # or a directory `convert_weights.py nemo` wrote
    enc = load_encoder("whisper-small/")             # a Hugging Face Whisper directory, or ours
    feats, feat_lens = enc.features(audio, lengths)  # audio (B, N) at 16 kHz, lengths in samples
    x, lens = enc.encode(feats, feat_lens)           # (B, T, enc.out_dim), frames per item

Both kinds have the same three members, which is all a Speech-LLM needs from its encoder:
`features` (the log-mel front end, always float32), `encode` and `out_dim`. They differ in what
they expect of the audio: FastConformer takes any length and attends over exactly the clip (80 ms
frames); Whisper always computes a full 30 s window (20 ms frames) and refuses longer clips.
"""
from pathlib import Path

import torch

from .asr import ASRModel
from .weights import read_json
from .whisper import WhisperEncoder

KINDS = ("fastconformer", "whisper")
# config.json model_type -> encoder kind, for directories.
DIRECTORY_TYPES = {"fastconformer_ctc": "fastconformer", "whisper": "whisper", "whisper_encoder": "whisper"}


def load_encoder(path, dtype: torch.dtype | None = None) -> ASRModel | WhisperEncoder:
    """A `.nemo` FastConformer archive (CTC or multitalker RNNT: its encoder and speaker kernels),
    a directory holding one (model_type fastconformer_ctc), or a Hugging Face Whisper directory
    (WhisperModel / WhisperForConditionalGeneration; encoder keys only) or ours (whisper_encoder),
    in eval mode. dtype None keeps the stored dtype; the front end stays float32."""
    path = Path(path)
    if path.suffix == ".nemo":
        model = ASRModel.from_nemo(path)
        return model.to(dtype) if dtype is not None else model
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not an encoder (expected a FastConformer .nemo archive, or a "
                                "directory with a config.json: a converted FastConformer or a Whisper model)")
    model_type = read_json(path / "config.json").get("model_type")
    kind = DIRECTORY_TYPES.get(model_type)
    if kind == "fastconformer":
        return ASRModel.from_pretrained(path, dtype=dtype)
    if kind == "whisper":
        return WhisperEncoder.from_pretrained(path, dtype=dtype)
    raise ValueError(f"{path / 'config.json'}: model_type {model_type!r} is not an encoder we load; "
                     f"supported: {', '.join(DIRECTORY_TYPES)} (or a FastConformer .nemo archive)")


def encoder_kind(encoder) -> str:
    """'whisper' or 'fastconformer' for a loaded encoder."""
    return "whisper" if isinstance(encoder, WhisperEncoder) else "fastconformer"
