"""Freezing, the optimizer and the learning-rate schedule.

Freezing follows NeMo SALM's `freeze_params` / `prevent_freeze_params` (spec 8.5): each pattern
is tested with `re.match` on the full parameter name (anchored at the start, not a full match, so
patterns end in `.+$`); a parameter is frozen iff some freeze pattern matches and no prevent
pattern does. The strategies named in seed 000 are preset freeze lists; the config's own lists
are added to them:

    all_trainable       nothing frozen (Stage 1 in seed 000)
    encoder_frozen      the encoder
    projector_only      everything but the projector (seed 004's Stage 1)
    llm_and_projector   LLM, projector and encoder. What still learns: the speaker kernels, the
                        rows of the three tag tokens in the embedding/head (as deltas, lora.py),
                        and LoRA adapters when configured. This is our reading of seed 000's
                        "LLM and projector frozen, encoder frozen" (Stage 2).

LoRA implies a frozen LLM base, as PEFT's get_peft_model freezes it, and then the tag rows train
too; adapter tensors (`lora_A`, `lora_B`, `tag_delta`) are always trainable. Frozen tensors have
requires_grad False and never reach the optimizer. Components with nothing trainable run in eval
mode, as SALM's training_step does, and so does every BatchNorm whose affine parameters are
frozen, so that its running statistics stay what the checkpoint holds. (The log-mel frontend has
buffers only, so no preset needs to name it.)
"""
import math
import re
from collections import defaultdict

import torch
import torch.nn as nn

from .lora import apply_lora, train_tag_rows

FREEZE_PRESETS = {
    "all_trainable": (),
    "encoder_frozen": (r"^encoder\..+$",),
    "projector_only": (r"^encoder\..+$", r"^(bg_)?spk_kernels\..+$", r"^llm\..+$"),
    "llm_and_projector": (r"^encoder\..+$", r"^projector\..+$", r"^llm\..+$"),
}
ADAPTERS = r"^.+\.(lora_A|lora_B|tag_delta)$"


def freeze_patterns(preset: str, freeze_params=(), lora: bool = False) -> list[str]:
    if preset not in FREEZE_PRESETS:
        raise ValueError(f"model.freeze {preset!r} is not one of {list(FREEZE_PRESETS)}")
    return list(FREEZE_PRESETS[preset]) + list(freeze_params) + ([r"^llm\..+$"] if lora else [])


def apply_freeze(model: nn.Module, freeze: list[str], prevent: list[str]) -> list[str]:
    """Set requires_grad per NeMo's rule; return the patterns that matched nothing (NeMo warns)."""
    freeze_re = [re.compile(p) for p in freeze]
    prevent_re = [re.compile(p) for p in [*prevent, ADAPTERS]]
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    for name, p in model.named_parameters():
        frozen = any(r.match(name) for r in freeze_re) and not any(r.match(name) for r in prevent_re)
        p.requires_grad_(not frozen)
    return [r.pattern for r in freeze_re + prevent_re[:-1] if not any(r.match(n) for n in names)]


def setup_trainable(model: nn.Module, mc) -> list[str]:
    """LoRA, tag-row deltas, then freezing, for a SpeechLLM and a train_config.ModelConfig.
    Returns the freeze patterns that matched no parameter."""
    if mc.lora is not None:
        apply_lora(model.llm, mc.lora.r, mc.lora.lora_alpha, mc.lora.lora_dropout, mc.lora.target_modules)
    # Default: wherever the LLM's embedding ends up frozen on purpose for Stage 2 (llm_and_projector,
    # or any preset with LoRA, which freezes the LLM base), the new tags must still learn.
    tag_rows = mc.train_tag_rows if mc.train_tag_rows is not None else (
        mc.freeze == "llm_and_projector" or mc.lora is not None)
    if tag_rows:
        train_tag_rows(model.llm, model.tag_ids)
    unmatched = apply_freeze(model, freeze_patterns(mc.freeze, mc.freeze_params, lora=mc.lora is not None),
                             mc.prevent_freeze_params)
    if model.ctc is not None and model.cfg.ctc_loss_weight == 0:  # no loss reaches the draft head: keep it as it is
        model.ctc.requires_grad_(False)
    if model.cfg.encoder_kind == "whisper":  # a fixed sinusoid table, never trained (transformers freezes it too)
        model.encoder.embed_positions.requires_grad_(False)
    if tag_rows and model.llm.model.embed_tokens.weight.requires_grad:
        raise ValueError("model.train_tag_rows trains the tag rows of a frozen embedding, but the embedding is trainable")
    return unmatched


def set_train_mode(model: nn.Module) -> None:
    """model.train(), except components with no trainable parameter and BatchNorms whose weights
    are frozen, which run in eval mode (running statistics, no dropout)."""
    model.train()
    for child in model.children():
        if not any(p.requires_grad for p in child.parameters()):
            child.eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()


def trainable_table(model: nn.Module) -> str:
    """Parameters per top-level component: total, trainable, and the trainable share."""
    total, train = defaultdict(int), defaultdict(int)
    for name, p in model.named_parameters():
        part = name.split(".", 1)[0]
        total[part] += p.numel()
        train[part] += p.numel() if p.requires_grad else 0
    rows = [f"{'component':<16}{'parameters':>14}{'trainable':>14}{'share':>8}"]
    for part in total:
        rows.append(f"{part:<16}{total[part]:>14,}{train[part]:>14,}{train[part] / total[part]:>8.1%}")
    t, tr = sum(total.values()), sum(train.values())
    rows.append(f"{'total':<16}{t:>14,}{tr:>14,}{tr / max(t, 1):>8.1%}")
    return "\n".join(rows)


def param_groups(model: nn.Module, weight_decay: float, no_decay_norm_and_bias: bool) -> list[dict]:
    """Trainable parameters only. NeMo decays everything by default; its 3.0.0 option exempts
    names containing 'bias' or 'norm'. Sorted by name: the optimizer state refers to parameters by
    position, and modules added after construction (speaker kernels) register in another order
    than in a model loaded from disk."""
    decay, no_decay = [], []
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            exempt = no_decay_norm_and_bias and ("bias" in name or "norm" in name)
            (no_decay if exempt else decay).append(p)
    if not decay and not no_decay:
        raise ValueError("nothing is trainable: check model.freeze, freeze_params and prevent_freeze_params")
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def build_optimizer(model: nn.Module, cfg, zero: bool = False) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; with zero, its state is sharded across ranks."""
    groups = param_groups(model, cfg.weight_decay, cfg.no_decay_norm_and_bias)
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if zero:
        from torch.distributed.optim import ZeroRedundancyOptimizer
        return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def get_lr(step: int, max_steps: int, lr: float, sched) -> float:
    """Learning rate for optimizer step `step` (0-based).

    cosine: linear warmup over warmup_steps, then half a cosine from lr to min_lr at max_steps.
    wsd (warmup-stable-decay, seed 004): warmup, lr held, then a linear decay to min_lr over the
    last decay_steps (default 10% of max_steps). constant: warmup, then lr."""
    if step < sched.warmup_steps:
        return lr * (step + 1) / sched.warmup_steps
    if sched.name == "constant":
        return lr
    if sched.name == "wsd":
        decay = sched.decay_steps if sched.decay_steps is not None else max(1, max_steps // 10)
        start = max_steps - decay
        if step < start:
            return lr
        return lr + (sched.min_lr - lr) * min(1.0, (step - start + 1) / decay)
    span = max(1, max_steps - sched.warmup_steps)
    progress = min(1.0, (step - sched.warmup_steps) / span)
    return sched.min_lr + 0.5 * (lr - sched.min_lr) * (1 + math.cos(math.pi * progress))
