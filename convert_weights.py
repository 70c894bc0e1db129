"""Import upstream checkpoints into speechllm's format (config.json + model.safetensors + tokenizer).

    python convert_weights.py nemo parakeet-ctc-0.6b.nemo checkpoints/parakeet-ctc-0.6b
"""
import argparse
import sys

from speechllm.convert import ConversionError, convert_nemo


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")

    p = sub.add_parser("nemo", help="a NeMo .nemo archive (FastConformer CTC, e.g. parakeet-ctc-0.6b)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("nemo_file", help="path to the .nemo archive (read in place, never extracted)")
    p.add_argument("out_dir", help="output directory for config.json, model.safetensors and tokenizer.model")
    p.add_argument("--legacy-frontend", action="store_true",
                   help="compute features as NeMo <= 2.4 did (reflect-padded STFT, one more valid frame): "
                        "what parakeet-ctc-0.6b was trained with. Default: NeMo 3.0.0's behaviour")

    args = parser.parse_args(argv)
    try:
        model = convert_nemo(args.nemo_file, args.out_dir, legacy_frontend=args.legacy_frontend)
    except (ConversionError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out_dir}: FastConformer-CTC, {model.cfg.encoder.n_layers} layers, "
          f"d_model {model.cfg.encoder.d_model}, vocab {model.cfg.vocab_size}+blank, {n / 1e6:.1f} M parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
