"""NeMo speechlm2 SALM checkpoints as a SpeechLLM.

    SALM_DIR/config.json             the SALM cfg (perception: preprocessor, encoder, modality_adapter)
    SALM_DIR/model.safetensors       the LightningModule state dict (SALM.save_pretrained)
    SALM_DIR/llm_backbone/config.json   the Qwen2 config
    SALM_DIR/tokenizer.json          the LLM tokenizer with the audio tag added

`load_salm` maps this into our SpeechLLM with the "salm" projector. Run the way SALM runs it
(tests/test_salm.py: its prompts, splicing, SALM.forward and SALM.generate), the result matches
NeMo 3.0.0 + transformers 5.23 to float32 rounding.

Quirks of SALM (the ones the import and the tests carry over):
- The LLM's input embedding lives outside the LLM (`embed_tokens.weight`); the tied head is not in
  the file, only an alias to it in the safetensors metadata, which we follow.
- The audio tag (e.g. <|audio|>, <|audioplaceholder|>) is a special token appended to the
  tokenizer; the embedding is not resized (Qwen's spare rows hold it).
- Prompts are the "qwen" formatter: user turns and the assistant prefix in ChatML, no system turn,
  no BOS/EOS; each tag stands for one whole clip, replaced by its valid audio frames.
- SALM.forward passes no position ids, so HF counts 0..L-1 across the left padding. RoPE only sees
  differences of positions, so valid rows agree with splice's cumsum positions to float rounding.
- Splicing strips leading pad ids; NeMo also masks any later pad id inside a prompt, which a
  well-formed qwen prompt never holds, and we do not copy that. One tag per row here (SALM allows
  several, consumed in order).

SALM has no turn-taking tags, but our PromptConfig and SpeechLLM need them: they are added as
special tokens after the audio tag, on spare embedding rows (404.. in the fixture, 151666.. for
Qwen2.5), and those rows keep whatever the checkpoint holds there, untrained. Fine-tuning for
turn-taking should start them from the mean row (qwen2.init_token_rows) first.
"""
from pathlib import Path

import torch

from .audio import PreprocessorConfig
from .convert import SALM_KEYS, ConversionError, remap
from .fastconformer import FastConformerConfig
from .model import PromptConfig, SpeechLLM, SpeechLLMConfig
from .projector import ProjectorConfig
from .qwen2 import Qwen2Config
from .tokenizer import TAGS, Tokenizer
from .weights import open_safetensors, read_json, require

PROMPT_FORMATS = ("qwen",)  # NeMo PromptFormatter names we reproduce


def read_config(path: Path) -> dict:
    require(path, ("config.json", "model.safetensors", "tokenizer.json", "llm_backbone/config.json"),
            "a SALM checkpoint directory")
    cfg = read_json(path / "config.json")
    if cfg.get("prompt_format") not in PROMPT_FORMATS:
        raise ConversionError(f"{path}: prompt_format {cfg.get('prompt_format')!r} is not supported "
                              f"(only {', '.join(PROMPT_FORMATS)})")
    perception = cfg.get("perception") or {}
    for key in ("preprocessor", "encoder", "modality_adapter"):
        if key not in perception:
            raise ConversionError(f"{path}: config.json has no perception.{key}")
    adapter = perception["modality_adapter"].get("_target_", "")
    if not adapter.endswith("ConformerEncoder"):
        raise ConversionError(f"{path}: modality adapter {adapter!r} is not supported (only ConformerEncoder)")
    if cfg.get("lora"):
        raise ConversionError(f"{path}: LoRA adapters are not supported; merge them into the LLM first")
    return cfg


def salm_config(cfg: dict, llm: Qwen2Config, user_prompt: str) -> SpeechLLMConfig:
    p = cfg["perception"]
    encoder = FastConformerConfig.from_nemo(p["encoder"])
    adapter = FastConformerConfig.from_nemo(p["modality_adapter"])
    projector = ProjectorConfig(kind="salm", in_dim=encoder.out_dim, out_dim=p.get("output_dim", llm.hidden_size),
                                adapter=adapter.to_dict())
    prompt = PromptConfig(user=user_prompt, audio_token=cfg["audio_locator_tag"])
    return SpeechLLMConfig(PreprocessorConfig.from_nemo(p["preprocessor"]), encoder, projector, llm, prompt)


def load_state(path: Path) -> dict:
    """model.safetensors -> {key: tensor}, with tensors that safetensors dropped as duplicates
    (metadata {alias: key}, e.g. llm.lm_head.weight -> embed_tokens.weight) put back."""
    state = {}
    with open_safetensors(path) as f:
        for key in f.keys():
            state[key] = f.get_tensor(key)
        for alias, key in (f.metadata() or {}).items():
            if key in state and alias not in state:
                state[alias] = state[key]
    return state


def load_salm(path, user_prompt: str | None = None) -> SpeechLLM:
    """A SALM checkpoint directory -> SpeechLLM (eval mode, the stored dtype).

    user_prompt: the default prompt of `predict`, holding the audio tag once; SALM has none of its
    own (prompts come with each call), so by default it is Canary-Qwen's "Transcribe the
    following: <tag>"."""
    path = Path(path)
    cfg = read_config(path)
    tag = cfg["audio_locator_tag"]
    llm = Qwen2Config.from_hf(read_json(path / "llm_backbone" / "config.json"))
    config = salm_config(cfg, llm, user_prompt or f"Transcribe the following: {tag}")
    tokenizer = Tokenizer.from_pretrained(path, extra_special_tokens=(tag, *TAGS))
    with torch.device("meta"):
        model = SpeechLLM(config, tokenizer)
    state = remap(SALM_KEYS, load_state(path / "model.safetensors"), model.state_dict(), f"{path} (SALM)")
    model.load_state_dict(state, strict=True, assign=True)
    if llm.tie_word_embeddings:
        model.llm.tie_weights()  # assign=True gave the head its own Parameter
    return model.eval()
