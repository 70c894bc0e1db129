"""speechllm: a pure-PyTorch Speech-LLM for turn-taking (FastConformer -> projector -> Qwen LLM)."""
from .asr import ASRModel
from .audio import AudioError, LogMelFrontend, PreprocessorConfig, load_audio, resample
from .fastconformer import FastConformer, FastConformerConfig
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
from .whisper import WhisperEncoder, WhisperEncoderConfig
