"""Pick the language-model class for a Hugging Face directory by its config.json `model_type`.

qwen2 and qwen3 share one implementation (speechllm/qwen2.py); qwen3_5 (the multimodal release,
whose text weights sit under model.language_model.*) and qwen3_5_text are speechllm/qwen3_5.py.
"""
from pathlib import Path

import torch

from .qwen2 import Qwen2ForCausalLM, _read_config
from .qwen3_5 import Qwen3_5ForCausalLM

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
