"""Speaker kernels (NeMo's SpeakerKernelMixin): they steer the encoder towards one speaker.

A speaker kernel tells the FastConformer whose speech to follow. At the input of each configured
layer L, with s the target speaker's activity and g everyone else's, one value per encoder frame:

    x = x + spk_kernels[L](x * s)          # (B, T, D)
    x = x + bg_spk_kernels[L](x * g)       # the background kernel sees the updated x

Each kernel is Sequential(Linear(D -> H), ReLU, Dropout(0.5), Linear(H -> D)), so its keys are
`<L>.0.*` and `<L>.3.*`, as in NeMo 3.0.0's EncDecMultiTalkerRNNTBPEModel. NeMo injects them with
forward hooks (a pre-hook on layer 0, output hooks on layer L-1 for L > 0); `kernel_hook` builds the
`layer_hook` that FastConformer.forward runs at those same points.

NeMo's defaults, reproduced because released kernels were trained with them:
- spk_targets None ("single speaker mode"): layer 0 still runs, with s = 1 and g = 0, so x gains
  K_spk(x) plus the constant K_bg(0); kernels at layers > 0 do nothing at all.
- bg_spk_targets None with spk_targets set: g = 0, and every kernel runs.
- a mask shorter than T is left-padded (s with 1, g with 0); a longer one keeps its last T frames.

The masks themselves (from RTTM, segments or a diarizer) are built in activity.py.
"""
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import build
from .fastconformer import FastConformerConfig


@dataclass(frozen=True)
class SpeakerKernelConfig:
    """NeMo SpeakerKernelMixin settings (model-config keys in comments), with its defaults."""

    layers: tuple[int, ...] = (0,)  # spk_kernel_layers: kernels act on the input of these layers
    hidden_size: int | None = None  # None: the encoder's d_model, which is how NeMo sizes it
    background: bool = True  # add_bg_spk_kernel
    dropout: float = 0.5  # fixed in NeMo

    def __post_init__(self):
        layers = self.layers
        if not layers or len(set(layers)) != len(layers) or min(layers) < 0:
            raise ValueError(f"speaker kernel layers={list(layers)} must be distinct layer indices >= 0")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"speaker kernel dropout={self.dropout} must be in [0, 1)")

    @classmethod
    def from_nemo(cls, cfg: dict, encoder: FastConformerConfig) -> "SpeakerKernelConfig | None":
        """From a NeMo model config; None when it has no speaker kernels."""
        kind = cfg.get("spk_kernel_type")
        if kind is None:
            return None
        if kind != "ff":
            raise ValueError(f"spk_kernel_type={kind!r} is not supported (only 'ff', the released kernel)")
        width = (cfg.get("model_defaults") or {}).get("enc_hidden", encoder.d_model)
        if width != encoder.d_model:
            raise ValueError(f"model_defaults.enc_hidden={width} must equal encoder.d_model={encoder.d_model}: "
                             "the kernels act on the encoder's layer inputs")
        return cls(layers=tuple(cfg.get("spk_kernel_layers", [0])), hidden_size=encoder.d_model,
                   background=bool(cfg.get("add_bg_spk_kernel", True)))

    @classmethod
    def from_dict(cls, d: dict) -> "SpeakerKernelConfig":
        return build(cls, d, "speaker_kernels.")

    def to_dict(self) -> dict:
        return {**asdict(self), "layers": list(self.layers)}


def speaker_kernel(d_model: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_model, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, d_model))


def build_kernels(cfg: SpeakerKernelConfig, d_model: int, n_layers: int) -> tuple[nn.ModuleDict, nn.ModuleDict | None]:
    """(spk_kernels, bg_spk_kernels or None), keyed by the layer index as a string, as NeMo keys them."""
    if max(cfg.layers) >= n_layers:
        # NeMo would hook the last layer's output here; our layer_hook only sees layer inputs.
        raise ValueError(f"speaker kernel layers {list(cfg.layers)} must be < the encoder's {n_layers} layers")
    hidden = cfg.hidden_size or d_model

    def kernels():
        return nn.ModuleDict({str(i): speaker_kernel(d_model, hidden, cfg.dropout) for i in cfg.layers})

    return kernels(), kernels() if cfg.background else None


@torch.no_grad()
def init_weights(spk_kernels: nn.ModuleDict, bg_spk_kernels: nn.ModuleDict | None = None) -> None:
    """Initialise kernels that will be trained from scratch on a pretrained encoder.

        parameter      init             why
        <L>.0.weight   N(0, 1/D)        unit-variance hidden units for unit-variance inputs
        <L>.0.bias     0
        <L>.3.weight   0                the kernel adds exactly 0 at step 0, so the pretrained
        <L>.3.bias     0                encoder is untouched until the kernel learns something
    The first layer still learns from step 1 on: the output layer's gradient is ReLU(hidden), not 0.
    """
    for kernels in (spk_kernels, bg_spk_kernels or {}):
        for kernel in kernels.values():
            first, last = kernel[0], kernel[3]
            nn.init.normal_(first.weight, std=first.in_features ** -0.5)
            nn.init.zeros_(first.bias)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)


def fit_mask(mask: torch.Tensor | None, x: torch.Tensor, fill: float) -> torch.Tensor:
    """A (B, T') mask -> (B, T) for x (B, T, D), NeMo's way: None -> all `fill`; shorter -> left-padded
    with `fill`; longer -> its last T frames."""
    b, t, _ = x.shape
    if mask is None:
        return x.new_full((b, t), fill)
    if mask.ndim != 2 or mask.shape[0] != b:
        raise ValueError(f"speaker mask of shape {tuple(mask.shape)} does not fit a batch of {b} (expected (B, T))")
    mask = mask.to(device=x.device, dtype=x.dtype)
    if mask.shape[1] < t:
        mask = F.pad(mask, (t - mask.shape[1], 0), value=fill)
    return mask[:, mask.shape[1] - t:]


def kernel_hook(spk_kernels: nn.ModuleDict | None, bg_spk_kernels: nn.ModuleDict | None,
                spk_targets: torch.Tensor | None = None,
                bg_spk_targets: torch.Tensor | None = None) -> Callable | None:
    """The FastConformer `layer_hook(i, x, lengths) -> x` for masks s = spk_targets, g = bg_spk_targets,
    each (B, T) per encoder frame or None (see the module docstring for NeMo's defaults). A model
    without kernels gets None, and refuses masks it could not use."""
    if spk_kernels is None:
        if spk_targets is not None or bg_spk_targets is not None:
            raise ValueError("this model has no speaker kernels, so it cannot take speaker activity")
        return None

    def hook(i: int, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        key = str(i)
        if key not in spk_kernels or (i > 0 and spk_targets is None):
            return x
        s = fit_mask(spk_targets, x, 1.0)
        x = x + spk_kernels[key](x * s[..., None])  # (B, T, D)
        if bg_spk_kernels is not None:
            g = fit_mask(bg_spk_targets, x, 0.0)
            x = x + bg_spk_kernels[key](x * g[..., None])
        return x

    return hook
