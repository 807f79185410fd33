"""A kohya-style LoRA network for the fake trainer: its own modules, patched into the UNet's
attention projections (kohya's ``networks.lora`` replaces ``forward`` the same way), saved as
a flat safetensors file with metadata."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from safetensors.torch import save_file

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class LoRAModule(torch.nn.Module):
    def __init__(self, name: str, org: torch.nn.Linear, dim: int, alpha: float) -> None:
        super().__init__()
        self.lora_name = name
        self.lora_down = torch.nn.Linear(org.in_features, dim, bias=False)
        self.lora_up = torch.nn.Linear(dim, org.out_features, bias=False)
        torch.nn.init.kaiming_uniform_(self.lora_down.weight, a=5**0.5)
        torch.nn.init.zeros_(self.lora_up.weight)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.scale = alpha / dim
        self.multiplier = 1.0
        self.org_forward = org.forward
        self.org_module = [org]  # not a submodule: the UNet's weights are not the network's

    def apply_to(self) -> None:
        self.org_module[0].forward = self.forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.org_forward(x) + self.lora_up(self.lora_down(x)) * self.multiplier * self.scale


class LoRANetwork(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module, dim: int, alpha: float) -> None:
        super().__init__()
        modules = []
        for name, module in unet.named_modules():
            if isinstance(module, torch.nn.Linear) and any(name.endswith(t) for t in TARGETS):
                modules.append(LoRAModule("lora_unet_" + name.replace(".", "_"), module, dim, alpha))
        for lora in modules:  # kohya's key names: lora_unet_<path>.lora_down.weight
            self.add_module(lora.lora_name, lora)
        self.unet_loras = modules

    def apply_to(self, text_encoder: Any, unet: Any, apply_text_encoder: bool, apply_unet: bool) -> None:
        for lora in self.unet_loras:
            lora.apply_to()

    def prepare_optimizer_params(self, text_encoder_lr: Optional[float], unet_lr: Optional[float], default_lr: float):
        return [{"params": list(self.parameters()), "lr": unet_lr or default_lr}]

    def get_trainable_params(self) -> List[torch.nn.Parameter]:
        return list(self.parameters())

    def prepare_grad_etc(self, text_encoder: Any, unet: Any) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder: Any, unet: Any) -> None:
        self.train()

    def set_multiplier(self, multiplier: float) -> None:
        for lora in self.unet_loras:
            lora.multiplier = multiplier

    def apply_max_norm_regularization(self, max_norm: float, device: Any):
        """kohya's rescaling of each LoRA pair whose product exceeds ``max_norm``."""
        scaled, norms = 0, []
        for lora in self.unet_loras:
            norm = (lora.lora_up.weight @ lora.lora_down.weight).norm() * lora.scale
            ratio = torch.clamp(norm, max=max_norm) / norm
            scaled += int(ratio.item() < 1.0)
            with torch.no_grad():
                lora.lora_down.weight.mul_(ratio.sqrt())
                lora.lora_up.weight.mul_(ratio.sqrt())
            norms.append(float(norm))
        return scaled, sum(norms) / len(norms), max(norms)

    def save_weights(self, file: str, dtype: torch.dtype, metadata: Optional[Dict[str, str]]) -> None:
        state = {k: v.detach().clone().to("cpu", dtype or v.dtype) for k, v in self.state_dict().items()}
        save_file(state, file, metadata=metadata)


def create_network(multiplier: float, network_dim: Optional[int], network_alpha: Optional[float], vae: Any,
                   text_encoder: Any, unet: Any, **kwargs: Any) -> LoRANetwork:
    return LoRANetwork(unet, network_dim or 4, network_alpha or 1.0)
