"""Weight-only int8 for the LLM's linear layers (`infer.py --quantize int8`), in plain torch.

Decoding reads every weight once per step, so on a CPU it is bound by memory traffic: int8
weights are a quarter of fp32's bytes. Each output row r of a Linear's weight W (N, K) keeps
int8 values q and one scale s_r = max|W_r| / 127 (rounded to bf16 first, and q computed with the
rounded scale, so that q * s is the dequantized weight exactly). The product runs in
torch._weight_int8pack_mm, which takes bf16 activations: the input is rounded to bf16 and the
output cast back to the model's dtype. Where that kernel does not apply (K not a multiple of 16,
not a CPU), the weight is dequantized per call instead.

Quantized: every nn.Linear inside the LLM, the LM head included (a tied head gets its own int8
copy; the embedding stays as it is). It changes the logits (bench/bench_e2e.py and
tests/test_quant.py measure by how much, and the tag agreement), so it is never the default, and
a quantized model is for inference only: it is not saved.
"""
import torch
import torch.nn as nn


class Int8Linear(nn.Module):
    """y = x W^T + b with W held as int8 rows and one bf16 scale per row."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()  # (N, K)
        scale = (w.abs().amax(1) / 127).clamp(min=1e-12).to(torch.bfloat16)  # (N,)
        self.register_buffer("qweight", torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def dequantized(self) -> torch.Tensor:
        """The weight these int8 rows stand for, (N, K) float32."""
        return self.qweight.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if x.device.type == "cpu" and self.in_features % 16 == 0:
            y = torch._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), self.qweight, self.scale).to(x.dtype)
        else:
            y = x2 @ self.dequantized().to(x.dtype).T
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*lead, self.out_features)


def quantize_int8(llm: nn.Module) -> nn.Module:
    """Replace every nn.Linear in `llm` (in place) by its Int8Linear; returns llm. A tied head
    gets its own int8 rows; the embedding keeps its float ones."""
    for _, module in list(llm.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, Int8Linear(child))
    return llm
