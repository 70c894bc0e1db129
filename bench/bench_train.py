"""Training speed of train.py on CPU at 1 and 2 processes (gloo); prints JSON.

    python bench/bench_train.py                          # fp32 and bf16, 1 and 2 processes
    python bench/bench_train.py --precision bf16 --steps 12

A small Speech-LLM with random weights (FastConformer d 256 x 4 layers, conv_transformer
projector, Qwen2 d 256 x 4 layers, a byte-level tokenizer) trains on synthetic 2 s clips with
transcripts, everything trainable. The global batch is the same at every process count
(--micro-batch clips per micro-step, accumulated to --global-batch), so s/step compares directly.
Each run is a real `train.py` (torchrun for 2 processes, one thread each; one process gets
--threads); figures are medians over the steps after --warmup, read from its metrics.jsonl.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import yaml

from bench_e2e import byte_tokenizer
from speechllm.audio import PreprocessorConfig
from speechllm.fastconformer import FastConformerConfig
from speechllm.model import SpeechLLM, SpeechLLMConfig
from speechllm.projector import ProjectorConfig
from speechllm.qwen2 import Qwen2Config

ROOT = Path(__file__).resolve().parents[1]
WORDS = "so i was thinking we could go there tomorrow if the weather holds yeah right okay".split()
LABELS = ["COMPLETE", "INCOMPLETE", "BACKCHANNEL"]


def small_model(path: Path) -> None:
    """Write a small random Speech-LLM directory (train.py starts from it with model.init_from)."""
    pre = PreprocessorConfig(window_size=0.025, window_stride=0.01, n_fft=512, features=80, pad_to=0)
    enc = FastConformerConfig(d_model=256, n_layers=4, n_heads=4, subsampling_conv_channels=64)
    proj = ProjectorConfig(in_dim=256, out_dim=256, n_heads=4, ffn_dim=1024)
    llm = Qwen2Config(vocab_size=320, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, torch_dtype="float32")
    torch.manual_seed(0)
    SpeechLLM(SpeechLLMConfig(pre, enc, proj, llm), byte_tokenizer()).save_pretrained(path)


def synthetic_clips(root: Path, n: int, seconds: float) -> Path:
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * 16000)) / 16000
    (root / "clips").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        x = 0.2 * np.sin(2 * np.pi * rng.uniform(100, 3000) * t) + 0.05 * rng.standard_normal(len(t))
        sf.write(root / "clips" / f"{i}.wav", x.astype(np.float32), 16000)
        text = " ".join(rng.choice(WORDS, size=rng.integers(2, 8)))
        rows.append({"audio_filepath": f"clips/{i}.wav", "duration": seconds, "text": text, "label": LABELS[i % 3]})
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "train.jsonl"


def run(args, model_dir: Path, manifest: Path, work: Path, nproc: int, precision: str) -> dict:
    out = work / f"run_{nproc}_{precision}"
    accum = args.global_batch // (args.micro_batch * nproc)
    cfg = {
        "model": {"init_from": str(model_dir), "freeze": "all_trainable"},
        "trainer": {"out_dir": str(out), "max_steps": args.warmup + args.steps, "precision": precision,
                    "accumulate_grad_batches": accum, "log_every_n_steps": 1, "val_check_interval": 0,
                    "save_every_n_steps": 10**6, "progress_bar": False, "tensorboard": False},
        "data": {"task": "turntaking", "train_ds": {"manifest_filepath": str(manifest), "batch_size": args.micro_batch,
                                                     "num_workers": 1, "weighted_sampling": True}},
        "optim": {"lr": 1e-4, "sched": {"name": "constant"}},
    }
    config = work / f"bench_{nproc}_{precision}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads if nproc == 1 else max(1, args.threads // nproc))}
    t0 = time.perf_counter()
    r = subprocess.run([*launcher, str(ROOT / "train.py"), "--config", str(config)], capture_output=True, text=True,
                       cwd=ROOT, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"train.py failed ({nproc} processes, {precision}):\n{r.stderr[-3000:]}")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [rec["s_per_step"] for rec in recs if rec["split"] == "train" and rec["step"] > args.warmup]
    s_per_step = statistics.median(times)
    return {"processes": nproc, "precision": precision, "micro_batch": args.micro_batch, "accumulate": accum,
            "global_batch": args.global_batch, "s_per_step": round(s_per_step, 4),
            "samples_per_s": round(args.global_batch / s_per_step, 2), "steps_timed": len(times),
            "wall_s": round(time.perf_counter() - t0, 1)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    p.add_argument("--micro-batch", type=int, default=4, help="clips per micro-step and process (default: %(default)s)")
    p.add_argument("--global-batch", type=int, default=16, help="clips per optimizer step (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=2.0, help="clip length (default: %(default)s)")
    p.add_argument("--steps", type=int, default=6, help="timed steps (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps (default: %(default)s)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads in all (default: %(default)s)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        small_model(work / "model")
        manifest = synthetic_clips(work / "data", 2 * args.global_batch, args.seconds)
        results = [run(args, work / "model", manifest, work, n, prec) for prec in args.precision for n in args.processes]
    print(json.dumps({"benchmark": "train.py, small random Speech-LLM (encoder d256 x 4, LLM d256 x 4), CPU, gloo",
                      "torch": torch.__version__, "cpu_count": os.cpu_count(), "threads": args.threads,
                      "clip_s": args.seconds, "results": results}, indent=2))


if __name__ == "__main__":
    main()
