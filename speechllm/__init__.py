"""speechllm: a pure-PyTorch Speech-LLM for turn-taking (FastConformer -> projector -> Qwen2)."""
from .asr import ASRModel
from .audio import AudioError, LogMelFrontend, PreprocessorConfig, load_audio, resample
from .fastconformer import FastConformer, FastConformerConfig
from .model import PromptConfig, SpeechLLM, SpeechLLMConfig, assemble
from .projector import ProjectorConfig
from .qwen2 import Qwen2Config, Qwen2ForCausalLM
from .salm import load_salm
from .sortformer import SortFormer
from .speaker import SpeakerKernelConfig
from .tokenizer import Tokenizer
from .turn import TurnConfig, TurnDetector
