"""The synthetic-speech demo model: a Speech-LLM small enough to train from scratch on a laptop CPU.

    python -m speechllm.synth --out data/synth                       # multi-engine clips + manifests
    python -m speechllm.demo --data data/synth --out runs/demo/init  # this model, untrained
    torchrun --nproc_per_node=2 train.py --config conf/demo.yaml      # train it

Same architecture as the full system, scaled down: a FastConformer (8x subsampling, 80 ms frames)
with a CTC head, the conv_transformer projector (stride 2, one layer), and a 2-layer Qwen2. The
model built here answers as the full system does, `transcript <TAG>` (lowercase, unpunctuated:
the manifests' `text_norm`, data.transcript ctc), with an auxiliary CTC loss on the same
transcripts (conf/demo.yaml, model.ctc_loss_weight). The bundled checkpoint then takes a second
stage, conf/demo_tag.yaml, that answers `<TAG>` alone: its own transcripts were guesses, and so
were the tags that followed them (README, "The demo model"). Both tokenizers are trained here on
the training manifest's normalised transcripts: a byte-level BPE for the LLM, a SentencePiece
unigram model for the CTC head. `--evaluate` scores a trained model per engine.
"""
import argparse
import json
import sys
from pathlib import Path

import sentencepiece
import torch
from tqdm import tqdm

from .audio import PreprocessorConfig, load_audio, pad_batch
from .data import ctc_text, read_manifest
from .fastconformer import FastConformerConfig
from .metrics import classification_report, wer
from .model import CTCConfig, PromptConfig, SpeechLLM, SpeechLLMConfig
from .projector import ProjectorConfig
from .qwen2 import Qwen2Config
from .speaker import init_weights as init_speaker_kernels
from .tokenizer import Tokenizer, train_sentencepiece, train_tokenizer

VOCAB = 512  # LLM BPE pieces, before the special tokens
CTC_VOCAB = 512  # CTC SentencePiece pieces: about one per word here, few enough per second for 80 ms frames
WIDTH, LAYERS = 144, 6  # the encoder's d_model and depth


def demo_config(vocab_size: int, ctc_vocab: int = CTC_VOCAB) -> SpeechLLMConfig:
    return SpeechLLMConfig(
        preprocessor=PreprocessorConfig(window_size=0.025, window_stride=0.01, n_fft=512, features=80, pad_to=0),
        encoder=FastConformerConfig(feat_in=80, n_layers=LAYERS, d_model=WIDTH, n_heads=4, subsampling_conv_channels=64),
        projector=ProjectorConfig(in_dim=WIDTH, out_dim=128, n_layers=1, n_heads=2, ffn_dim=512),
        llm=Qwen2Config(vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=4096,
                        bos_token_id=None, eos_token_id=None, torch_dtype="float32"),
        prompt=PromptConfig(user="<audio>", answer_format="transcript_tag"),
        ctc=CTCConfig(ctc_vocab),
        ctc_loss_weight=0.5,
    )


def from_scratch(cfg: SpeechLLMConfig, tokenizer: Tokenizer, seed: int = 0, encoder_tokenizer: bytes | None = None) -> SpeechLLM:
    """A Speech-LLM with every weight new, as the demo starts. Encoder: PyTorch's default init, as
    NeMo builds a FastConformer; the CTC head as PyTorch initialises the Conv1d it stands for
    (U(+-1/sqrt(D_enc))). LLM: N(0, 0.02) for linear and embedding weights, zero biases, unit norms
    (transformers' initializer_range). Projector and speaker kernels: their own init_weights.
    encoder_tokenizer: the CTC head's SentencePiece model."""
    torch.manual_seed(seed)
    model = SpeechLLM(cfg, tokenizer, encoder_tokenizer)
    with torch.no_grad():
        if model.ctc is not None:
            bound = model.ctc.weight.shape[1] ** -0.5
            model.ctc.weight.uniform_(-bound, bound)
            model.ctc.bias.uniform_(-bound, bound)
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
    """The untrained demo for the transcripts of `manifest` (in the form the model writes them, ctc_text)."""
    texts = [t for t in (ctc_text(u) for u in read_manifest(manifest)) if t]
    if not texts:
        raise ValueError(f"{manifest}: no transcripts to train the tokenizers on")
    tokenizer = train_tokenizer(texts, VOCAB)
    spm = train_sentencepiece(texts, CTC_VOCAB)
    ctc_vocab = sentencepiece.SentencePieceProcessor(model_proto=spm).get_piece_size()
    return from_scratch(demo_config(len(tokenizer), ctc_vocab), tokenizer, seed, spm)


def evaluate(model: SpeechLLM, manifest, batch_size: int = 32, max_new_tokens: int = 40, progress: bool = True) -> dict:
    """Score `model` on a synth.py manifest, over all, per engine and on the voices held out of
    training: accuracy, macro-F1, per-class recall and F1, false cut-off and backchannel take-over
    rates (metrics.classification_report), and the transcript WER against `text_norm`, of the
    LLM's transcript and of the CTC head's."""
    utts = sorted(read_manifest(manifest, require_label=True), key=lambda u: u.duration)
    rows = []
    for i in tqdm(range(0, len(utts), batch_size), desc=Path(manifest).stem, disable=not progress):
        batch = utts[i:i + batch_size]
        with torch.inference_mode():
            outs = model.predict(*pad_batch([load_audio(u.audio, offset=u.offset, duration=u.duration) for u in batch]),
                                 max_new_tokens=max_new_tokens)
        rows += [(u, o) for u, o in zip(batch, outs)]
    groups = {"all": rows}
    for u, o in rows:
        groups.setdefault(u.extra.get("engine", "?"), []).append((u, o))
        if u.extra.get("voice_heldout"):  # voices of the training engines that training never heard
            groups.setdefault("heldout_voices", []).append((u, o))
    report = {}
    for name, group in groups.items():
        r = classification_report([u.label for u, _ in group], [o["tag"] for _, o in group])
        refs = [ctc_text(u) or "" for u, _ in group]
        report[name] = {"clips": r["n"], "accuracy": r["accuracy"], "macro_f1": r["macro_f1"],
                        **{f"{k}_{t.strip('<>').lower()}": v[k] for t, v in r["per_class"].items() for k in ("recall", "f1")},
                        "false_cutoff_rate": r["false_cutoff_rate"],
                        "backchannel_takeover_rate": r["backchannel_takeover_rate"],
                        "wer": wer(refs, [o["transcript"] for _, o in group]),
                        **({"ctc_wer": wer(refs, [o["ctc_transcript"] for _, o in group])}
                           if "ctc_transcript" in group[0][1] else {})}
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder written by `python -m speechllm.synth` (reads train.jsonl)")
    p.add_argument("--out", help="output directory for the untrained model")
    p.add_argument("--seed", type=int, default=0, help="weight init seed (default: %(default)s)")
    p.add_argument("--evaluate", metavar="CHECKPOINT",
                   help="instead: score this trained model on --data's held-out splits (--splits), per engine; prints JSON")
    p.add_argument("--splits", default="test,test_heldout_engine", help="comma-separated manifests of --data to score")
    args = p.parse_args(argv)
    if args.evaluate:
        model = SpeechLLM.from_pretrained(args.evaluate, torch.float32)
        manifests = [Path(args.data) / f"{s}.jsonl" for s in args.splits.split(",")]
        missing = [str(m) for m in manifests if not m.is_file()]
        if missing:
            print(f"error: {', '.join(missing)} not found", file=sys.stderr)
            return 1
        print(json.dumps({"checkpoint": args.evaluate, **{m.stem: evaluate(model, m) for m in manifests}}, indent=1))
        return 0
    if not args.out:
        p.error("--out is required (or --evaluate)")
    manifest = Path(args.data) / "train.jsonl"
    if not manifest.is_file():
        print(f"error: {manifest} not found; run `python -m speechllm.synth --out {args.data}` first", file=sys.stderr)
        return 1
    model = build_demo(manifest, args.seed)
    model.save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: untrained demo Speech-LLM, {n / 1e6:.2f} M parameters, vocabulary {len(model.tokenizer)}, "
          f"CTC pieces {model.cfg.ctc.vocab_size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
