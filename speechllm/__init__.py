"""speechllm: a pure-PyTorch Speech-LLM for turn-taking (FastConformer -> projector -> Qwen2)."""
from .asr import ASRModel
from .audio import AudioError, LogMelFrontend, PreprocessorConfig, load_audio, resample
from .fastconformer import FastConformer, FastConformerConfig
