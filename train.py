"""Train a Speech-LLM: Stage 1 (transcripts) or Stage 2 (transcript + turn-taking tag).

    torchrun --nproc_per_node=4 train.py --config conf/stage2_turntaking.yaml
    torchrun --nproc_per_node=2 train.py --config conf/stage1_asr.yaml trainer.max_steps=100 data.train_ds.batch_size=8
    python train.py --config ... --resume auto       # one process; continue from the newest checkpoint
    python train.py --nproc-per-node 2 --config ...  # torchrun --standalone's launch, a failure ends quietly

One process per GPU (nccl), or per CPU worker (gloo), with the same code. Each optimizer step:
lr from get_lr(step); `accumulate_grad_batches` micro-batches, gradients synchronised by DDP only
on the last (no_sync on the others); clip by global norm; step, unless the loss or the gradient is
not finite; zero_grad; log on rank 0; evaluate and checkpoint every N steps.

Writes to trainer.out_dir: step_N/ (a model directory `infer.py --checkpoint` loads as it is, plus
the training state), metrics.jsonl, best.json and, when installed, TensorBoard events.

The loss is the token mean of the whole global batch, as NeMo SALM's is per batch: each
micro-batch backpropagates its weighted token sum (model.forward's mean times its answer-token
weight), and once the weights of every micro-batch of every rank are summed, the gradients are
divided by that total, so 1 process x batch 4, 2 x 2 accumulated and 2 processes x 2 take the same
step.
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from speechllm import checkpoint, dist
from speechllm.activity import encoder_frames, grid_of, rttm_masks
from speechllm.audio import SAMPLE_RATE
from speechllm.precision import fast_dtype
from speechllm.data import ClipDataset, EpochPlan, collate, draw_probabilities, load_split
from speechllm.lora import adapter_names, adapter_state, merged_state_dict
from speechllm.metrics import classification_report, wer
from speechllm.model import PromptConfig, SpeechLLM, assemble
from speechllm.optim import build_optimizer, get_lr, set_train_mode, setup_trainable, trainable_table
from speechllm.speaker import SpeakerKernelConfig
from speechllm.train_config import load_config
from speechllm.weights import write_json

print0 = dist.print0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML with model, trainer, data and optim sections (see conf/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, parsed as YAML: trainer.max_steps=1000 data.train_ds.batch_size=8")
    p.add_argument("--resume", default=None, metavar="auto|DIR",
                   help="auto: continue from the newest complete step_N in trainer.out_dir (start fresh if none); "
                        "DIR: from that checkpoint. Without it, an out_dir holding checkpoints is refused.")
    p.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                   help="start N processes on this machine, as `torchrun --standalone --nproc_per_node N "
                        "train.py ...` does, but a failed run ends with the workers' own error and status "
                        "instead of torchrun's ChildFailedError summary")
    args = p.parse_args(argv)
    if args.nproc_per_node is not None and args.nproc_per_node < 1:
        p.error(f"--nproc-per-node must be at least 1, got {args.nproc_per_node}")
    return args


# -----------------------------------------------------------------------------
# model


def build_model(mc, resume: Path | None, seed: int) -> SpeechLLM:
    """The starting weights: a checkpoint being resumed, an init_from directory, or a fresh model
    assembled from an encoder (.nemo, or a FastConformer or Whisper directory) and a Hugging Face
    Qwen2 / Qwen3 / Qwen3.5 directory (new parts seeded)."""
    if resume is not None:
        model = SpeechLLM.from_pretrained(resume)
    elif mc.init_from:
        model = SpeechLLM.from_pretrained(mc.init_from)
        if mc.prompt:  # fields over the checkpoint's own prompt, e.g. a new answer_format for a next stage
            fields = {**dataclasses.asdict(model.cfg.prompt), **mc.prompt}
            if fields["audio_token"] != model.cfg.prompt.audio_token:
                raise ValueError("model.prompt.audio_token: the checkpoint's own placeholder token cannot change")
            model.cfg = dataclasses.replace(model.cfg, prompt=PromptConfig.from_dict(fields, "model.prompt."))
    else:  # model.projector: fields over assemble's projector, which fits the encoder and LLM widths
        model = assemble(mc.pretrained_asr, mc.pretrained_llm, mc.projector, PromptConfig.from_dict(mc.prompt, "model.prompt."),
                         seed=seed)
    if mc.speaker_kernels is not None and resume is None:
        sc = SpeakerKernelConfig.from_dict(mc.speaker_kernels)
        if model.cfg.speaker is None:
            model.new_speaker_kernels(sc, seed)
        elif model.cfg.speaker != sc:
            raise ValueError(f"the model already has speaker kernels {model.cfg.speaker}, not {sc}")
    if mc.tag_loss_weight is not None:
        model.cfg = dataclasses.replace(model.cfg, tag_loss_weight=mc.tag_loss_weight)
    if mc.ctc_loss_weight is not None:
        model.cfg = dataclasses.replace(model.cfg, ctc_loss_weight=mc.ctc_loss_weight)  # refuses > 0 without a head
    return model


def check_window(model: SpeechLLM, data) -> None:
    """A Whisper encoder hears at most 30 s: refuse a data.*.max_duration that lets longer clips in."""
    if model.max_samples is None:
        return
    window = model.max_samples / SAMPLE_RATE
    for name in ("train_ds", "validation_ds"):
        ds = getattr(data, name)
        if ds is not None and ds.max_duration > window:
            raise ValueError(f"data.{name}.max_duration {ds.max_duration:g} s is longer than the Whisper encoder's "
                             f"{window:g} s window; set it to at most {window:g}")


# -----------------------------------------------------------------------------
# data


def make_loader(split, ds, train: bool, seed: int, d: dist.Dist):
    probs = None
    if train:
        mixture = list(ds.probabilities) if ds.probabilities is not None else None
        probs = draw_probabilities([u.label for u in split.items], split.sources, mixture, ds.weighted_sampling, ds.max_weight)
    plan = EpochPlan([u.duration for u in split.items], probs, ds.batch_size, ds.batch_duration, ds.bucket_duration_bins,
                     shuffle=ds.shuffle and train, seed=seed, rank=d.rank, world=d.world_size, even=train)
    loader = torch.utils.data.DataLoader(
        ClipDataset(split.items), batch_sampler=plan, collate_fn=collate, num_workers=ds.num_workers,
        pin_memory=d.device.type == "cuda",
        generator=torch.Generator())  # its own seed source: the global RNG (dropout) stays untouched
    return loader, plan


def endless(loader, plan: EpochPlan, pos: dict):
    """Batches forever; pos = {"epoch", "position"} names the next one (saved in checkpoints)."""
    while True:
        plan.set_epoch(pos["epoch"], pos["position"])
        for batch in loader:
            pos["position"] += 1
            yield batch
        pos["epoch"], pos["position"] = pos["epoch"] + 1, 0


def targets(batch: dict, task: str):
    """(transcripts, tags): Stage 1 (asr) has no tags."""
    return batch["text"], (batch["label"] if task == "turntaking" else [None] * len(batch["text"]))


def speaker_masks(model: SpeechLLM, batch: dict, device):
    """(s, g) per encoder frame from the clips' speaker segments, or (None, None) when the model
    has no kernels or no clip has segments. A clip without segments is all target speaker."""
    if model.spk_kernels is None or not any(batch["speakers"]):
        return None, None
    frames = encoder_frames(model, batch["lengths"]).tolist()
    segments = [[tuple(s) for s in segs] if segs else [(0.0, dur, "target")]
                for segs, dur in zip(batch["speakers"], batch["duration"])]
    # No target_speaker: the one talking when talk stops, infer.py's --target-speaker auto.
    targets = [t if t is not None else "auto" for t in batch["target_speaker"]]
    s, g, _ = rttm_masks(segments, frames, list(batch["duration"]), targets, grid_of(model.cfg))
    return s.to(device), g.to(device)


def clip_ids(batch: dict, split) -> list[str]:
    return [f"{split.items[i].audio}:{split.items[i].line}" for i in batch["index"]]


# -----------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate(model: SpeechLLM, loader, ctx, task: str, max_new_tokens: int, d: dist.Dist) -> dict | None:
    """Dev loss (the training objective), tag accuracy, macro/per-class F1, confusion matrix, WER
    and, with a CTC head, the head's WER over this rank's share; rank 0 merges all shares and
    returns the metrics."""
    model.eval()
    rows, loss_sum, weight = [], 0.0, 0.0
    for batch in loader:
        audio, lengths = batch["audio"].to(d.device), batch["lengths"].to(d.device)
        transcripts, tags = targets(batch, task)
        s, g = speaker_masks(model, batch, d.device)
        with ctx:
            loss, stats = model(audio, lengths, transcripts, tags, s, g)
            out = model.predict(audio, lengths, max_new_tokens, s, g)
        w = float(stats["weight"])
        loss_sum, weight = loss_sum + float(loss) * w, weight + w
        rows += [(tag, o["tag"], o.get("ctc_transcript"), text, o["transcript"])
                 for tag, text, o in zip(batch["label"], transcripts, out)]
    shares = dist.gather_to_master((rows, loss_sum, weight), d)
    if not d.is_master:
        return None
    rows = [r for share in shares for r in share[0]]
    metrics = {"loss": sum(s[1] for s in shares) / max(sum(s[2] for s in shares), 1e-12), "n": len(rows)}
    if task == "turntaking":
        r = classification_report([t for t, *_ in rows], [p for _, p, *_ in rows])
        metrics.update(tag_accuracy=r["accuracy"], macro_f1=r["macro_f1"],
                       f1={c.strip("<>"): v["f1"] for c, v in r["per_class"].items()},
                       confusion=r["confusion"], false_cutoff_rate=r.get("false_cutoff_rate"),
                       backchannel_takeover_rate=r.get("backchannel_takeover_rate"))
    scored = [(ref, hyp) for *_, ref, hyp in rows if ref]
    if scored and model.cfg.prompt.answer_format == "transcript_tag":
        metrics["wer"] = wer([r for r, _ in scored], [h for _, h in scored])
    drafted = [(ref, ctc) for _, _, ctc, ref, _ in rows if ref and ctc is not None]
    if drafted:  # the CTC head's greedy transcript, whatever the answer format: what the encoder hears
        metrics["ctc_wer"] = wer([r for r, _ in drafted], [h for _, h in drafted])
    return metrics


# -----------------------------------------------------------------------------
# checkpoints


def save_checkpoint(model: SpeechLLM, optimizer, cfg, d: dist.Dist, loop: dict) -> None:
    """Every rank takes part (optimizer shards, RNG states); rank 0 writes."""
    if cfg.trainer.zero_optimizer:
        optimizer.consolidate_state_dict(to=0)
    rngs = dist.gather_to_master(checkpoint.rng_state(d.device), d)
    if d.is_master:
        merged = merged_state_dict(model)  # the export; its adapter-free weights are the model's own tensors
        extra = {k: v.cpu() for k, v in adapter_state(model).items()}  # LoRA/tag deltas and the bases under them
        state = {**loop, "world_size": d.world_size, "optimizer": optimizer.state_dict(), "rng": rngs,
                 "model_extra": extra, "config": cfg.to_dict()}
        out = Path(cfg.trainer.out_dir)
        checkpoint.save(out, loop["step"], lambda p: checkpoint.export(model, merged, p), state, cfg.to_yaml())
        checkpoint.prune(out, cfg.trainer.keep_last, (loop["best"] or {}).get("step"))
    dist.barrier()


def better(metrics: dict, best: dict | None, monitor: str) -> bool:
    value = metrics.get(monitor)
    if value is None:
        return False
    lower = monitor in ("loss", "wer")
    return best is None or (value < best["value"] if lower else value > best["value"])


class Logger:
    """Rank 0's output: a tqdm bar, log lines, metrics.jsonl and TensorBoard (when installed)."""

    def __init__(self, tc, d: dist.Dist, step: int):
        self.on = d.is_master
        self.bar = tqdm(total=tc.max_steps, initial=step, disable=not (self.on and tc.progress_bar), dynamic_ncols=True)
        self.file = open(Path(tc.out_dir) / "metrics.jsonl", "a") if self.on else None
        self.tb = None
        if self.on and tc.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(Path(tc.out_dir) / "tensorboard")
            except ImportError:
                pass

    def line(self, text: str) -> None:
        if self.on:
            (self.bar.write if not self.bar.disable else print)(text)
            sys.stdout.flush()

    def record(self, step: int, split: str, metrics: dict) -> None:
        if not self.on:
            return
        self.file.write(json.dumps({"step": step, "split": split, **metrics}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        self.bar.close()
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


# -----------------------------------------------------------------------------
# main


def main(argv=None) -> int:
    """Every rank checks the inputs (config, device, manifests, the state to resume) before any
    model exists; then the process group starts and the ranks agree: one error line (the first
    failing rank's) and every rank leaves with the worst status. Agreeing before leaving matters:
    torchrun kills the other ranks as soon as one exits, which could cut rank 0 off mid-message."""
    args = parse_args(argv)
    if args.nproc_per_node is not None and "LOCAL_RANK" not in os.environ:  # the launcher, not a worker
        return dist.launch(args.nproc_per_node, __file__, sys.argv[1:] if argv is None else list(argv))
    cfg = inputs = error = None
    device, code = torch.device("cpu"), 0  # a config that does not load still joins a CPU (gloo) group
    try:
        cfg = load_config(args.config, args.overrides)
        device = dist.check_device(cfg.trainer.device, "trainer.device")
    except (OSError, ValueError) as e:
        code, error = 2, e
    if code == 0:
        try:
            inputs = prepare(cfg, args)
        except (OSError, ValueError) as e:  # data.ManifestError too
            code, error = 1, e
    d = dist.init(device)
    try:
        code = dist.report_first_error(code, error and f"error: {error}", d)
        if code == 0:
            try:
                code, error = train(cfg, args, d, *inputs), None  # a non-zero return has said why itself
            except (OSError, ValueError) as e:  # ConversionError too
                code, error = 1, e
            code = dist.report_first_error(code, error and f"error: {error}", d)
        return code
    finally:
        dist.cleanup()


def prepare(cfg, args):
    """What can be checked before any process group or model exists: the checkpoint to resume and
    its training state, and every manifest line with its audio. -> (resume, state, train, dev)."""
    resume = checkpoint.resume_dir(args.resume, Path(cfg.trainer.out_dir))
    state = checkpoint.load_state(resume) if resume is not None else None
    ds, task, seed = cfg.data, cfg.data.task, cfg.trainer.seed
    train_split = load_split(ds.train_ds.manifest_filepath, task, ds.train_ds, train=True, seed=seed,
                             transcript=ds.transcript)
    val_split = load_split(ds.validation_ds.manifest_filepath, task, ds.validation_ds, train=False,
                           transcript=ds.transcript) if ds.validation_ds is not None else None
    return resume, state, train_split, val_split


def train(cfg, args, d: dist.Dist, resume, state, train_split, val_split) -> int:
    tc, task = cfg.trainer, cfg.data.task
    out = Path(tc.out_dir)
    precision = tc.precision
    if precision == "auto":  # rank 0 measures, every rank follows: one choice for the whole run
        precision = dist.broadcast("bf16" if fast_dtype(d.device) == torch.bfloat16 else "fp32", d)
    how = " (auto: bf16 is faster here)" if tc.precision == "auto" and precision == "bf16" else \
        " (auto: bf16 is not faster here)" if tc.precision == "auto" else ""
    print0(f"# resolved config\n{cfg.to_yaml()}# {d.world_size} process(es), device {d.device}, "
           f"precision {precision}{how}")
    print0(f"train: {train_split.report}" + (f"\ndev: {val_split.report}" if val_split else ""))

    t0 = time.perf_counter()
    torch.manual_seed(tc.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_model(cfg.model, resume, tc.seed)
    check_window(model, cfg.data)
    unmatched = setup_trainable(model, cfg.model)
    if unmatched:
        print0(f"warning: freeze patterns matching no parameter: {unmatched}")
    model.to(d.device, torch.float64 if precision == "fp64" else torch.float32)  # fp32 master weights
    if state is not None:
        loaded = model.load_state_dict(state["model_extra"], strict=False)
        if loaded.unexpected_keys:
            raise ValueError(f"{resume}: adapter tensors do not fit this config: {loaded.unexpected_keys[:10]}")
    set_train_mode(model)
    print0(f"model ready in {time.perf_counter() - t0:.1f} s; adapters: {len(adapter_names(model))} tensors\n"
           f"{trainable_table(model)}")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, cfg.optim, tc.zero_optimizer)
    ddp = None
    if d.world_size > 1:
        # Buffers need broadcasting only while some BatchNorm updates its running statistics.
        bn_training = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())
        ddp = DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                  forward_sync_buffers=bn_training, find_unused_parameters=tc.find_unused_parameters)
    ctx = torch.autocast(d.device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    loop = {"step": 0, "epoch": 0, "position": 0, "skipped": 0, "bad_in_a_row": 0, "best": None}
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        loop.update({k: state[k] for k in loop})
        # The plan is global; convert the position if the number of processes changed.
        loop["position"] = state["position"] * state["world_size"] // d.world_size
        if state["world_size"] == d.world_size:
            checkpoint.set_rng_state(state["rng"][d.rank], d.device)  # every rank reads the checkpoint
        else:
            print0(f"note: resuming {state['world_size']}-process state on {d.world_size}: dropout RNG reseeded")
            torch.manual_seed(tc.seed + 7919 * loop["step"] + d.rank)
        print0(f"resumed from {resume} at step {loop['step']}")
    else:
        torch.manual_seed(tc.seed + d.rank)  # dropout differs per rank, as different data would
    if d.is_master:
        out.mkdir(parents=True, exist_ok=True)
        for name in checkpoint.remove_partial(out):
            print0(f"removed the partial checkpoint {name} of an interrupted run")
    dist.barrier()

    train_loader, train_plan = make_loader(train_split, cfg.data.train_ds, True, tc.seed, d)
    val_loader = make_loader(val_split, cfg.data.validation_ds, False, tc.seed, d)[0] if val_split else None
    batches = endless(train_loader, train_plan, loop)
    log = Logger(tc, d, loop["step"])
    accum, world = tc.accumulate_grad_batches, d.world_size
    forward = ddp or model
    t_last, timed_steps, samples_seen = time.perf_counter(), 0, 0
    # The logged losses are means over the log interval (the global token mean, and rank 0's tag
    # and CTC losses): one step's value swings with its batch's duration bucket.
    window, tag_losses, ctc_losses = [0.0, 0.0], [], []

    while loop["step"] < tc.max_steps:
        step = loop["step"]
        lr = get_lr(step, tc.max_steps, cfg.optim.lr, cfg.optim.sched)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = [next(batches) for _ in range(accum)]
        sums = torch.zeros(3, dtype=torch.float64, device=d.device)  # loss x weight, weight, clips
        for i, batch in enumerate(micro):
            audio, lengths = batch["audio"].to(d.device, non_blocking=True), batch["lengths"].to(d.device)
            s, g = speaker_masks(model, batch, d.device)
            try:
                with ddp.no_sync() if ddp is not None and i < accum - 1 else nullcontext():
                    with ctx:
                        loss, stats = forward(audio, lengths, *targets(batch, task), s, g)
                    # This micro-batch's weighted token sum; divided by the global weight below.
                    (loss * stats["weight"]).backward()
            except Exception:
                print(f"rank {d.rank}: step {step} failed on {clip_ids(batch, train_split)}", file=sys.stderr)
                raise
            w = stats["weight"].double()
            sums += torch.stack([loss.detach().double() * w, w, w.new_tensor(len(batch["index"]))])
            if stats["tag_loss"] is not None:
                tag_losses.append(float(stats["tag_loss"]))
            if "ctc_loss" in stats:
                ctc_losses.append(float(stats["ctc_loss"]))
        loss_sum, total_weight, n_samples = dist.all_reduce_sum(sums).tolist()
        train_loss = loss_sum / total_weight
        window[0] += loss_sum
        window[1] += total_weight
        for p in params:  # the global token mean's gradient; DDP averaged over ranks, hence * world
            if p.grad is not None:
                p.grad.mul_(world / total_weight)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, tc.gradient_clip_val or math.inf))
        if math.isfinite(train_loss) and math.isfinite(grad_norm):
            optimizer.step()
            loop["bad_in_a_row"] = 0
        else:  # every rank sees the same reduced loss and norm, so all skip together
            loop["skipped"] += 1
            loop["bad_in_a_row"] += 1
            log.line(f"step {step}: non-finite loss {train_loss} or grad norm {grad_norm}: step skipped "
                     f"({loop['bad_in_a_row']} in a row); rank 0's clips: {[c for b in micro for c in clip_ids(b, train_split)]}")
            if loop["bad_in_a_row"] >= tc.max_bad_steps:
                log.close()
                print0(f"error: stopping: {loop['bad_in_a_row']} steps in a row had a non-finite loss or gradient "
                       f"(trainer.max_bad_steps={tc.max_bad_steps}); the last checkpoint holds the last good weights",
                       file=sys.stderr)
                return 3
        optimizer.zero_grad(set_to_none=True)
        loop["step"] = step = step + 1

        timed_steps, samples_seen = timed_steps + 1, samples_seen + n_samples
        log.bar.update(1)
        log.bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", sps=f"{samples_seen / (time.perf_counter() - t_last):.1f}")
        if step % tc.log_every_n_steps == 0 or step == tc.max_steps:
            dt = (time.perf_counter() - t_last) / timed_steps
            rec = {"loss": window[0] / window[1], "tag_loss": sum(tag_losses) / len(tag_losses) if tag_losses else None,
                   "lr": lr, "grad_norm": grad_norm, "skipped": loop["skipped"], "epoch": loop["epoch"],
                   "s_per_step": dt, "samples_per_s": samples_seen / (dt * timed_steps)}
            if ctc_losses:
                rec["ctc_loss"] = sum(ctc_losses) / len(ctc_losses)
            log.line(f"step {step:6d} | loss {rec['loss']:.4f} | tag loss {rec['tag_loss'] or float('nan'):.4f} | "
                     + (f"ctc loss {rec['ctc_loss']:.4f} | " if ctc_losses else "") +
                     f"lr {lr:.2e} | grad norm {grad_norm:.3f} | {dt * 1000:.0f} ms/step | "
                     f"{rec['samples_per_s']:.1f} samples/s | eta {dt * (tc.max_steps - step) / 60:.1f} min")
            log.record(step, "train", rec)
            t_last, timed_steps, samples_seen = time.perf_counter(), 0, 0
            window, tag_losses, ctc_losses = [0.0, 0.0], [], []

        last = step == tc.max_steps
        if val_loader is not None and ((tc.val_check_interval and step % tc.val_check_interval == 0) or last):
            metrics = evaluate(model, val_loader, ctx, task, tc.max_new_tokens, d)
            set_train_mode(model)
            if d.is_master:
                log.line(f"step {step:6d} | dev " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                             if isinstance(v, float)))
                log.record(step, "dev", metrics)
                if better(metrics, loop["best"], tc.monitor):
                    loop["best"] = {"step": step, "monitor": tc.monitor, "value": metrics[tc.monitor]}
                    write_json(out / "best.json", loop["best"])
            loop["best"] = dist.broadcast(loop["best"], d)
            t_last, timed_steps, samples_seen = time.perf_counter(), 0, 0  # eval time is not training speed
        if step % tc.save_every_n_steps == 0 or last:
            save_checkpoint(model, optimizer, cfg, d, loop)
            log.line(f"step {step:6d} | saved {out / f'step_{step}'}")
    log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
