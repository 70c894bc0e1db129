"""Trainable deltas over frozen LLM weights: LoRA on linear layers, and the rows of new tokens.

LoRA (HF PEFT's semantics, as NeMo SALM applies it, spec 8.6): a target Linear computes
    y = x W^T + b + (lora_alpha / r) * dropout(x) A^T B^T,   A (r, in), B (out, r)
with A Kaiming-uniform (a = sqrt 5) and B = 0, so training starts from the base model exactly.
The base W and b keep their names (`...q_proj.weight`); the adapter adds `...q_proj.lora_A` and
`...q_proj.lora_B`, which NeMo's pattern `^.+\\.lora_.+$` keeps trainable.

Tag rows: with the embedding frozen, the three tag tokens still have to learn (they start as the
mean row). Training W[ids] in place is not safe: AdamW's decoupled weight decay and the moment
estimates touch every element of a parameter, zero gradient or not, so "frozen" rows would drift.
Instead the frozen W stays as it is and a small trainable `tag_delta` (n_tags, D) is added where
the rows are read: at the embedding lookup and in the output head. With a tied head the two are
the same rows, so they share one delta. Weight decay then pulls the rows towards their starting
value rather than towards zero.

`merged_state_dict` folds both into the base weights: an exported model has the plain keys and
loads anywhere (infer.py, from_pretrained) with no adapter code.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias  # the same Parameters: keys unchanged
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's init_lora_weights=True
        self.scaling = alpha / r
        self.dropout = dropout

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        x = F.dropout(x, self.dropout, self.training)
        return y + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        return self.weight + (self.lora_B @ self.lora_A) * self.scaling


ALL_LINEAR = "all-linear"  # PEFT's name for every Linear layer but the output head


def apply_lora(llm: nn.Module, r: int, alpha: float, dropout: float, target_modules) -> list[str]:
    """Replace every nn.Linear whose own name is in target_modules (PEFT matches the last name
    component) by a LoRALinear; return the replaced names. target_modules ("all-linear",) takes
    every Linear, as PEFT's "all-linear": in Qwen3.5 that includes the DeltaNet projections
    (in_proj_qkv, in_proj_z, in_proj_a, in_proj_b, out_proj), not its depthwise conv1d. The head
    (`lm_head`) is never a target."""
    every = tuple(target_modules) == (ALL_LINEAR,)
    replaced = []
    for name, module in list(llm.named_modules()):
        for child_name, child in list(module.named_children()):
            if module is llm and child_name == "lm_head":
                continue
            if (every or child_name in target_modules) and type(child) is nn.Linear:
                setattr(module, child_name, LoRALinear(child, r, alpha, dropout))
                replaced.append(f"{name}.{child_name}" if name else child_name)
    if not replaced:
        raise ValueError(f"LoRA target_modules {list(target_modules)} match no Linear layer of the LLM")
    return replaced


class TaggedEmbedding(nn.Module):
    """nn.Embedding whose rows `ids` read W[ids] + tag_delta; W itself is never changed."""

    def __init__(self, base: nn.Embedding, ids: list[int], delta: nn.Parameter):
        super().__init__()
        self.weight = base.weight
        self.register_buffer("tag_ids", torch.tensor(ids, device=base.weight.device), persistent=False)
        self.tag_delta = delta  # (n, D)

    def forward(self, input_ids):
        x = F.embedding(input_ids, self.weight)  # (..., D)
        match = input_ids[..., None] == self.tag_ids  # (..., n)
        which = match.long().argmax(-1)  # index into tag_delta where a row matches
        return x + torch.where(match.any(-1, keepdim=True), self.tag_delta[which].to(x.dtype), 0)

    def merged_weight(self) -> torch.Tensor:
        return self.weight.index_add(0, self.tag_ids, self.tag_delta.to(self.weight.dtype))


class TaggedHead(nn.Module):
    """A bias-free output Linear whose columns `ids` use W[ids] + tag_delta."""

    def __init__(self, base: nn.Linear, ids: list[int], delta: nn.Parameter):
        super().__init__()
        self.weight = base.weight
        self.register_buffer("tag_ids", torch.tensor(ids, device=base.weight.device), persistent=False)
        self.tag_delta = delta

    def forward(self, h):
        logits = F.linear(h, self.weight)  # (..., V)
        extra = F.linear(h, self.tag_delta)  # (..., n)
        return logits.index_add(-1, self.tag_ids, extra.to(logits.dtype))

    def merged_weight(self) -> torch.Tensor:
        return self.weight.index_add(0, self.tag_ids, self.tag_delta.to(self.weight.dtype))


def train_tag_rows(llm: nn.Module, ids: list[int]) -> None:
    """Wrap the LLM's embedding (and untied head) so that only the rows `ids` learn, as deltas."""
    emb = llm.model.embed_tokens
    w = emb.weight
    delta = nn.Parameter(torch.zeros(len(ids), w.shape[1], device=w.device, dtype=w.dtype))
    tied = llm.lm_head.weight is w
    llm.model.embed_tokens = TaggedEmbedding(emb, ids, delta)
    head_delta = delta if tied else nn.Parameter(torch.zeros_like(delta))
    llm.lm_head = TaggedHead(llm.lm_head, ids, head_delta)


ADAPTED = (LoRALinear, TaggedEmbedding, TaggedHead)


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every adapter folded into its base weight and the adapter
    tensors dropped: the keys of the plain model, ready for save_pretrained."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, ADAPTED):
            state[f"{name}.weight"] = module.merged_weight().detach()
            for k in ("lora_A", "lora_B", "tag_delta"):
                state.pop(f"{name}.{k}", None)
    return state


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What merged_state_dict cannot give back, and resuming needs: the adapter tensors and the
    base weights under them."""
    return {f"{name}.{k}": v for name, module in model.named_modules() if isinstance(module, ADAPTED)
            for k, v in module.state_dict().items()}


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapter parameters (always trainable, like NeMo's `^.+\\.lora_.+$`)."""
    return [n for n, _ in model.named_parameters(remove_duplicate=False)
            if n.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "tag_delta")]
