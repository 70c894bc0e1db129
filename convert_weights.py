"""Import upstream checkpoints into speechllm's format (config.json + model.safetensors + tokenizer).

    python convert_weights.py nemo parakeet-ctc-0.6b.nemo checkpoints/parakeet-ctc-0.6b
"""
import argparse
import sys

from speechllm.convert import ConversionError, convert_nemo_any


def describe(model) -> str:
    from speechllm.sortformer import SortFormer

    enc = model.cfg.encoder
    if isinstance(model, SortFormer):
        return (f"SortFormer diarizer, FastConformer {enc.n_layers} x {enc.d_model}, "
                f"Transformer {model.cfg.transformer.num_layers} layers, {model.cfg.num_spks} speakers")
    head = f"CTC vocab {model.cfg.vocab_size}+blank" if model.cfg.vocab_size is not None else "no CTC head"
    kernels = f", speaker kernels at layers {list(model.cfg.speaker.layers)}" if model.cfg.speaker else ""
    return f"FastConformer {enc.n_layers} layers x d_model {enc.d_model}{kernels}, {head}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")

    p = sub.add_parser("nemo", help="a NeMo .nemo archive: FastConformer CTC (parakeet-ctc-0.6b), multitalker RNNT "
                            "(encoder + speaker kernels) or SortFormer diarizer",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("nemo_file", help="path to the .nemo archive (read in place, never extracted)")
    p.add_argument("out_dir", help="output directory for config.json, model.safetensors and tokenizer.model")
    p.add_argument("--legacy-frontend", action="store_true",
                   help="compute features as NeMo <= 2.4 did (reflect-padded STFT, one more valid frame): "
                        "what parakeet-ctc-0.6b was trained with. Default: NeMo 3.0.0's behaviour")

    args = parser.parse_args(argv)
    try:
        model = convert_nemo_any(args.nemo_file, args.out_dir, legacy_frontend=args.legacy_frontend)
    except (ConversionError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out_dir}: {describe(model)}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
