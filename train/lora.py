"""LoRA: a low-rank update wrapped around nn.Linear, applied to a model's projections and merged for saving.

`LoRALinear(base, r, alpha)` computes base(x) + (alpha / r) * B(A(x)) with A [r, in] (Kaiming-uniform) and
B [out, r] (zeros), so a freshly wrapped model computes exactly what the base does. `apply_lora` freezes every base
parameter and wraps the Linear layers whose names end with one of `targets`; `merged_state_dict` returns the model's
state dict under the original names with W + (alpha / r) B A folded in, which is what a Hugging Face checkpoint of
the fine-tuned model holds (transformers and prmkern load it with no LoRA code).

It does not: support dropout on the LoRA path (it would break exact resume tests for no gain at our sizes),
quantised bases, or adapters on embeddings.
"""
from __future__ import annotations

import math

import torch
from torch import nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base).__name__}")
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"LoRA rank r={r!r}; accepted: an int >= 1")
        self.base = base
        self.r, self.scale = r, alpha / r
        w = base.weight  # [out, in]
        self.lora_A = nn.Parameter(torch.empty(r, w.shape[1], dtype=w.dtype, device=w.device))  # [r, in]
        self.lora_B = nn.Parameter(torch.zeros(w.shape[0], r, dtype=w.dtype, device=w.device))  # [out, r]
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [..., in] -> [..., out]
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    def merged_weight(self) -> torch.Tensor:
        # [out, in]: W + scale * B @ A, computed in float32 then cast back to W's dtype
        w = self.base.weight
        return (w.float() + self.scale * (self.lora_B.float() @ self.lora_A.float())).to(w.dtype)


def apply_lora(model: nn.Module, r: int, alpha: float, targets: tuple[str, ...] = DEFAULT_TARGETS) -> list[str]:
    """Freezes `model` and wraps the matching Linear layers in place; returns the wrapped module names."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in targets]
    if not names:
        raise ValueError(f"no nn.Linear named like {targets} in {type(model).__name__}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha))
    return names


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict under the base model's names, LoRA updates folded into the weights."""
    sd: dict[str, torch.Tensor] = {}
    lora = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    for key, t in model.state_dict().items():
        owner = next((n for n in lora if key.startswith(n + ".")), None)
        if owner is None:
            sd[key] = t
        elif key == f"{owner}.base.weight":
            sd[f"{owner}.weight"] = lora[owner].merged_weight().detach()
        elif key == f"{owner}.base.bias":
            sd[f"{owner}.bias"] = t
        # lora_A / lora_B are folded in above
    return sd


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA parameters (what a LoRA run's resume state needs beside the frozen base)."""
    return {k: v for k, v in model.state_dict().items() if "lora_A" in k or "lora_B" in k}
