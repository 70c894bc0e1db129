"""speechllm: a pure-PyTorch Speech-LLM for turn-taking (FastConformer or Whisper -> projector -> Qwen LLM).

    model = speechllm.load("checkpoints/tt")          # any directory convert_weights.py or train.py wrote
    model = speechllm.from_nemo("parakeet.nemo")       # or a NeMo archive, read in place
    speechllm.check_runnable(model, path)              # a model that answers, with finite weights
    encoder = speechllm.load_encoder("whisper-small/") # FastConformer (.nemo or directory) or Whisper
    llm = speechllm.load_llm("Qwen3.5-0.8B/")          # Qwen2 / Qwen2.5, Qwen3, Qwen3.5
"""
from pathlib import Path

import torch

from .asr import ASRModel
from .audio import AudioError, LogMelFrontend, PreprocessorConfig, load_audio, resample
from .convert import NemoArchive, nemo_model
from .encoders import DIRECTORY_TYPES as ENCODER_TYPES
from .encoders import load_encoder
from .fastconformer import FastConformer, FastConformerConfig
from .llm import SUPPORTED as LLM_TYPES
from .llm import load_llm
from .model import PromptConfig, SpeechLLM, SpeechLLMConfig, assemble
from .projector import ProjectorConfig
from .qwen2 import Qwen2Config, Qwen2ForCausalLM
from .qwen3_5 import Qwen3_5Config, Qwen3_5ForCausalLM
from .salm import load_salm
from .sortformer import SortFormer
from .speaker import SpeakerKernelConfig
from .tokenizer import Tokenizer
from .turn import TurnConfig, TurnDetector
from .weights import nonfinite, read_json, short
from .whisper import WhisperEncoder, WhisperEncoderConfig


def load(path, dtype: torch.dtype | None = None, device="cpu"):
    """A model directory (its config.json's model_type names the class) or a .nemo archive -> the
    model in eval mode on `device`. dtype: the weights of an ASR model or Speech-LLM (None keeps the
    stored dtype; the log-mel frontend stays float32); a SortFormer keeps its stored dtype."""
    path = Path(path)
    if path.suffix == ".nemo":
        model = from_nemo(path)
        return (model.to(dtype) if dtype is not None and isinstance(model, ASRModel) else model).to(device)
    config = path / "config.json"
    kind = read_json(config).get("model_type") if config.is_file() else None
    if kind in ENCODER_TYPES:  # a converted FastConformer, a Hugging Face Whisper directory, or ours
        return load_encoder(path, dtype=dtype).to(device)
    if kind == "speechllm":
        return SpeechLLM.from_pretrained(path, dtype=dtype).to(device)
    if kind == "sortformer":
        return SortFormer.from_pretrained(path).to(device)
    if kind in LLM_TYPES:
        return load_llm(path, dtype=dtype, device=device)
    raise FileNotFoundError(f"{path}: not a checkpoint directory (config.json missing, or model_type {kind!r} unknown)")


def check_runnable(model, path) -> None:
    """Refuse (ValueError naming `path`) a model that cannot answer on its own, which is what
    infer.py runs: an encoder without a CTC decoder (NeMo's multitalker RNNT model), an ASR model
    without its tokenizer, an LLM or Whisper encoder alone; and any model whose weights hold NaN or
    infinities (a diverged or damaged checkpoint would answer NaN)."""
    runs = "infer.py runs Speech-LLM, CTC ASR and SortFormer checkpoints"
    if isinstance(model, ASRModel) and model.decoder is None:
        raise ValueError(f"{path}: an encoder without a CTC decoder (e.g. NeMo's multitalker RNNT model, whose "
                         f"RNNT decoder is not imported): it can encode but not transcribe; {runs}")
    if isinstance(model, ASRModel) and model.tokenizer is None:
        raise ValueError(f"{path}: an ASR checkpoint without its tokenizer.model: it cannot write text")
    if not isinstance(model, (SpeechLLM, ASRModel, SortFormer)):
        raise ValueError(f"{path}: a {type(model).__name__} checkpoint, which neither transcribes nor tags; {runs}")
    if bad := nonfinite(model.state_dict()):
        raise ValueError(f"{path}: {len(bad)} weight tensor(s) hold NaN or infinite values ({short(bad, 5)}): "
                         "a diverged or damaged checkpoint")


def from_nemo(path, legacy_frontend: bool = False):
    """A NeMo .nemo archive -> ASRModel or SortFormer, by its model class (convert.NEMO_MODELS);
    ASRModel.from_nemo refuses the classes nobody imports."""
    archive = NemoArchive(path)
    kind, _ = nemo_model(archive.target)
    archive.close()
    if kind == "sortformer":
        return SortFormer.from_nemo(path, legacy_frontend=legacy_frontend)
    return ASRModel.from_nemo(path, legacy_frontend=legacy_frontend)
