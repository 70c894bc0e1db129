"""The synthetic-speech demo model: a Speech-LLM small enough to train from scratch on a laptop CPU.

    python -m speechllm.synth --out data/synth                       # espeak-ng clips + manifests
    python -m speechllm.demo --data data/synth --out runs/demo/init  # this model, untrained
    torchrun --nproc_per_node=2 train.py --config conf/demo.yaml      # train it

Same architecture as the full system, scaled down: a 4-layer FastConformer (d_model 128, 8x
subsampling), the conv_transformer projector (stride 2, one layer), and a 2-layer Qwen2 (hidden
128) whose byte-level BPE tokenizer is trained on the training manifest's transcripts. The answer
format is `tag_only` with a bare `<audio>` prompt: with minutes of CPU there is no time to learn
transcripts, and the tag is the product. About 2.5 M parameters, 5 MB in bf16.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from .audio import PreprocessorConfig
from .fastconformer import FastConformerConfig
from .model import PromptConfig, SpeechLLM, SpeechLLMConfig
from .projector import ProjectorConfig
from .qwen2 import Qwen2Config
from .speaker import init_weights as init_speaker_kernels
from .tokenizer import Tokenizer, train_tokenizer

VOCAB = 512  # BPE pieces, before the special tokens


def demo_config(vocab_size: int) -> SpeechLLMConfig:
    return SpeechLLMConfig(
        preprocessor=PreprocessorConfig(window_size=0.025, window_stride=0.01, n_fft=512, features=80, pad_to=0),
        encoder=FastConformerConfig(feat_in=80, n_layers=4, d_model=128, n_heads=4, subsampling_conv_channels=64),
        projector=ProjectorConfig(in_dim=128, out_dim=128, n_layers=1, n_heads=2, ffn_dim=512),
        llm=Qwen2Config(vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=4096,
                        bos_token_id=None, eos_token_id=None, torch_dtype="float32"),
        prompt=PromptConfig(user="<audio>", answer_format="tag_only"),
    )


def from_scratch(cfg: SpeechLLMConfig, tokenizer: Tokenizer, seed: int = 0) -> SpeechLLM:
    """A Speech-LLM with every weight new, as the demo starts. Encoder: PyTorch's default init, as
    NeMo builds a FastConformer. LLM: N(0, 0.02) for linear and embedding weights, zero biases, unit
    norms (transformers' initializer_range). Projector and speaker kernels: their own init_weights."""
    torch.manual_seed(seed)
    model = SpeechLLM(cfg, tokenizer)
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(std=0.02)
    model.projector.init_weights()
    if model.spk_kernels is not None:
        init_speaker_kernels(model.spk_kernels, model.bg_spk_kernels)
    return model


def build_demo(manifest, seed: int = 0) -> SpeechLLM:
    texts = [json.loads(line)["text"] for line in Path(manifest).read_text().splitlines() if line.strip()]
    tokenizer = train_tokenizer(texts, VOCAB)
    return from_scratch(demo_config(len(tokenizer)), tokenizer, seed=seed)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder written by `python -m speechllm.synth` (reads train.jsonl)")
    p.add_argument("--out", required=True, help="output directory for the untrained model")
    p.add_argument("--seed", type=int, default=0, help="weight init seed (default: %(default)s)")
    args = p.parse_args(argv)
    manifest = Path(args.data) / "train.jsonl"
    if not manifest.is_file():
        print(f"error: {manifest} not found; run `python -m speechllm.synth --out {args.data}` first", file=sys.stderr)
        return 1
    model = build_demo(manifest, args.seed)
    model.save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: untrained demo Speech-LLM, {n / 1e6:.2f} M parameters, vocabulary {len(model.tokenizer)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
