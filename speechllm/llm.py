"""Pick the language-model class for a Hugging Face directory by its config.json `model_type`.

qwen2 and qwen3 share one implementation (speechllm/qwen2.py); qwen3_5 (the multimodal release,
whose text weights sit under model.language_model.*) and qwen3_5_text are speechllm/qwen3_5.py.
`llm_config` reads the same config.json dialects into our config dataclass and `build_llm` makes
the (unloaded) model for one: a Speech-LLM's config.json keeps its LLM's config under `llm`.
"""
from pathlib import Path

import torch

from .qwen2 import Qwen2Config, Qwen2ForCausalLM, _read_config
from .qwen3_5 import Qwen3_5Config, Qwen3_5ForCausalLM

QWEN2_TYPES = ("qwen2", "qwen3")  # Qwen2ForCausalLM
QWEN3_5_TYPES = ("qwen3_5", "qwen3_5_text")  # Qwen3_5ForCausalLM
SUPPORTED = QWEN2_TYPES + QWEN3_5_TYPES


def load_llm(path, dtype: torch.dtype | None = None, device="cpu"):
    """The model in `path`, built by the class its model_type names; dtype None keeps the stored
    dtype. Raises ValueError for any other model_type."""
    path = Path(path)
    model_type = _read_config(path).get("model_type")
    if model_type in QWEN2_TYPES:
        return Qwen2ForCausalLM.from_pretrained(path, dtype=dtype, device=device)
    if model_type in QWEN3_5_TYPES:
        return Qwen3_5ForCausalLM.from_pretrained(path, dtype=dtype, device=device)
    raise ValueError(f"{path / 'config.json'}: model_type {model_type!r} is not supported; "
                     f"supported: {', '.join(SUPPORTED)}")


def llm_config(d: dict, where: str = "llm") -> Qwen2Config | Qwen3_5Config:
    """A transformers config dict (what config.json holds) -> Qwen2Config or Qwen3_5Config, by its
    model_type; ValueError naming `where` for any other."""
    model_type = d.get("model_type")
    try:
        if model_type in QWEN2_TYPES:
            return Qwen2Config.from_hf(d)
        if model_type in QWEN3_5_TYPES:
            return Qwen3_5Config.from_hf(d)
    except (ValueError, TypeError) as e:  # TypeError: a value of the wrong type met arithmetic before build checked it
        raise ValueError(f"{where}: {e}") from None
    raise ValueError(f"{where}: model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED)}")


def build_llm(config: Qwen2Config | Qwen3_5Config):
    """A model of this config, weights as the class initialises them (build under the meta device
    and load a state dict, as from_pretrained does)."""
    return (Qwen3_5ForCausalLM if isinstance(config, Qwen3_5Config) else Qwen2ForCausalLM)(config)


def llm_name(config: Qwen2Config | Qwen3_5Config) -> str:
    """'Qwen2', 'Qwen3' or 'Qwen3.5', for messages."""
    return "Qwen3.5" if isinstance(config, Qwen3_5Config) else config.model_type.replace("qwen", "Qwen")
