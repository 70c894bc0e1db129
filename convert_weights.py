"""Bring upstream checkpoints into speechllm's format (a directory: config.json + model.safetensors
+ tokenizer files), or look inside one.

    python convert_weights.py nemo parakeet-ctc-0.6b.nemo checkpoints/parakeet          # ASR / diarizer
    python convert_weights.py assemble --encoder parakeet.nemo --llm Qwen2.5-0.5B --out checkpoints/stage1
    python convert_weights.py assemble --encoder whisper-small --llm Qwen3.5-4B --projector causal_transformer --out checkpoints/s004
    python convert_weights.py checkpoint step_3000.pt --base checkpoints/stage1 --config config.yaml --out checkpoints/tt
    python convert_weights.py salm canary-qwen/ --out checkpoints/salm                  # NeMo SALM directory
    python convert_weights.py inspect step_3000.pt

An output directory that already holds a model (config.json or model.safetensors) is refused unless
--force; one that is an input, or would overwrite an input's files, is refused even with --force.
"""
import argparse
import sys

import yaml

import speechllm
from speechllm.convert import ConversionError, inspect, load_checkpoint_into
from speechllm.model import SpeechLLM, assemble
from speechllm.salm import load_salm
from speechllm.sortformer import SortFormer
from speechllm.speaker import SpeakerKernelConfig
from speechllm.tokenizer import TAGS
from speechllm.weights import check_output_dir, yaml_problem

FORMATTER = argparse.ArgumentDefaultsHelpFormatter


def describe(model) -> str:
    enc = model.cfg.encoder
    if isinstance(model, SortFormer):
        return (f"SortFormer diarizer, FastConformer {enc.n_layers} x {enc.d_model}, "
                f"Transformer {model.cfg.transformer.num_layers} layers, {model.cfg.num_spks} speakers")
    if isinstance(model, SpeechLLM):
        return f"Speech-LLM: {model.cfg.describe()}, tags {list(TAGS)}"
    head = f"CTC vocab {model.cfg.vocab_size}+blank" if model.cfg.vocab_size is not None else "no CTC head"
    kernels = f", speaker kernels at layers {list(model.cfg.speaker.layers)}" if model.cfg.speaker else ""
    return f"FastConformer {enc.n_layers} layers x d_model {enc.d_model}{kernels}, {head}"


def run_nemo(args):
    check_output_dir(args.out_dir, [args.nemo_file], args.force)
    model = speechllm.from_nemo(args.nemo_file, legacy_frontend=args.legacy_frontend)
    model.save_pretrained(args.out_dir)
    return model, args.out_dir


def run_assemble(args):
    check_output_dir(args.out, [args.encoder, args.llm], args.force)
    speaker = SpeakerKernelConfig(layers=tuple(args.speaker_kernel_layers)) if args.speaker_kernel_layers else None
    model = assemble(args.encoder, args.llm, {"kind": args.projector}, speaker=speaker, seed=args.seed)
    model.save_pretrained(args.out)
    return model, args.out


def run_lora(config) -> dict | None:
    """model.lora of a run's config.yaml (plain YAML: a tag is refused, never run)."""
    try:
        with open(config, encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{config}: not plain YAML ({yaml_problem(e)})") from None
    lora = ((doc.get("model") or {}) if isinstance(doc, dict) else {}).get("lora")
    if lora and not (isinstance(lora, dict) and "r" in lora and "lora_alpha" in lora):
        raise ValueError(f"{config}: model.lora needs r and lora_alpha, got {lora!r}")
    return lora


def run_checkpoint(args):
    check_output_dir(args.out, [s for s in (args.step_file, args.base, args.encoder, args.llm, args.config) if s], args.force)
    if args.base:
        model = SpeechLLM.from_pretrained(args.base)
    elif args.encoder and args.llm:
        model = assemble(args.encoder, args.llm)
    else:
        raise ValueError("the architecture comes from --base DIR (a Speech-LLM directory, e.g. from `assemble`) "
                         "or from --encoder X.nemo --llm HF_DIR")
    lora = run_lora(args.config) if args.config else None
    scaling = lora["lora_alpha"] / lora["r"] if lora else None
    for line in load_checkpoint_into(model, args.step_file, lora_scaling=scaling):
        print(line, file=sys.stderr)
    model.save_pretrained(args.out)
    return model, args.out


def run_salm(args):
    check_output_dir(args.out, [args.salm_dir], args.force)
    model = load_salm(args.salm_dir, args.prompt)
    model.save_pretrained(args.out)
    return model, args.out


def run_inspect(args):
    notes, rows = inspect(args.path)
    for note in notes:
        print(f"# {note}")
    width = max(len(r[0]) for r in rows)
    for name, shape, dtype, dest in rows:
        print(f"{name:{width}}  {str(list(shape)):>18}  {dtype:>9}  -> {dest}")
    print(f"# {len(rows)} tensors, {sum(r[3] == 'UNPLACED' for r in rows)} unplaced")
    return None, None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="source", required=True, metavar="COMMAND")

    p = sub.add_parser("nemo", formatter_class=FORMATTER,
                       help="a NeMo .nemo archive: FastConformer CTC (parakeet-ctc-0.6b), multitalker RNNT "
                            "(encoder + speaker kernels) or SortFormer diarizer")
    p.add_argument("nemo_file", help="path to the .nemo archive (read in place, never extracted)")
    p.add_argument("out_dir", help="output directory")
    p.add_argument("--legacy-frontend", action="store_true",
                   help="compute features as NeMo <= 2.4 did (reflect-padded STFT, one more valid frame): "
                        "what parakeet-ctc-0.6b was trained with. Default: NeMo 3.0.0's behaviour")
    p.set_defaults(run=run_nemo)

    p = sub.add_parser("assemble", formatter_class=FORMATTER,
                       help="a fresh Speech-LLM (Stage-1 starting point) from an encoder and an LLM directory")
    p.add_argument("--encoder", required=True,
                   help="FastConformer .nemo archive (CTC or multitalker) or its converted directory, or a Hugging "
                        "Face Whisper directory (WhisperModel / WhisperForConditionalGeneration)")
    p.add_argument("--llm", required=True, help="Hugging Face Qwen2 / Qwen2.5, Qwen3 or Qwen3.5 directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--projector", choices=("conv_transformer", "causal_transformer"), default="conv_transformer",
                   help="the new projector; causal_transformer gets seed 004's shape (4 layers, width 512, 8 heads, "
                        "MLP 2048, stride 1)")
    p.add_argument("--speaker-kernel-layers", type=int, nargs="*", default=None,
                   help="add new speaker kernels at these encoder layers (e.g. 0; FastConformer only)")
    p.add_argument("--seed", type=int, default=0, help="seed for the new projector's weights")
    p.set_defaults(run=run_assemble)

    p = sub.add_parser("checkpoint", formatter_class=FORMATTER,
                       help="a full training checkpoint (step_N.pt) into a Speech-LLM directory")
    p.add_argument("step_file", help="torch checkpoint: plain, model/state_dict/module-wrapped, DDP or DeepSpeed prefixes")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--base", help="Speech-LLM directory with the same architecture (e.g. from `assemble`)")
    p.add_argument("--encoder", help="instead of --base: the .nemo the encoder came from")
    p.add_argument("--llm", help="instead of --base: the Qwen2 directory the LLM came from")
    p.add_argument("--config", help="the run's config.yaml (read for model.lora r / lora_alpha to merge LoRA)")
    p.set_defaults(run=run_checkpoint)

    p = sub.add_parser("salm", formatter_class=FORMATTER,
                       help="a NeMo speechlm2 SALM directory (config.json, model.safetensors, tokenizer.json, "
                            "llm_backbone/config.json, as SALM.save_pretrained writes it) into a Speech-LLM directory")
    p.add_argument("salm_dir", help="the SALM directory (read in place)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--prompt", help="the default user prompt, holding the audio tag once "
                                    "(default: 'Transcribe the following: <tag>')")
    p.set_defaults(run=run_salm)

    for p in sub.choices.values():  # every command so far writes a model directory
        p.add_argument("--force", action="store_true",
                       help="replace a model already in the output directory (never one of the inputs)")

    p = sub.add_parser("inspect", formatter_class=FORMATTER,
                       help="list tensors, shapes, dtypes and where each would go, for any file the converter reads")
    p.add_argument("path", help=".nemo, .pt/.ckpt, .safetensors, or a model directory")
    p.set_defaults(run=run_inspect)

    args = parser.parse_args(argv)
    try:
        model, out = args.run(args)
    except (ConversionError, OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if model is not None:
        print(f"wrote {out}: {describe(model)}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
