"""Planted bugs for lesson 5's exercises: each must be caught by the hint named beside it."""

import math

import torch
from torch import nn

from pedaPEFT import lora


class _LoRA(nn.Module):
    zero_B, scale_by, swapped, skip_when_merged, freeze = True, "alpha/r", False, True, True

    def __init__(self, base, r, alpha):
        super().__init__()
        self.base_layer = base
        if self.freeze:
            base.requires_grad_(False)
        shape_A, shape_B = (r, base.in_features), (base.out_features, r)
        if self.swapped:
            shape_A, shape_B = shape_B, shape_A
        self.lora_A = nn.Parameter(torch.empty(shape_A))
        self.lora_B = nn.Parameter(torch.zeros(shape_B))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if not self.zero_B:
            nn.init.normal_(self.lora_B)
        self.scaling = {"alpha/r": alpha / r, "alpha": alpha}[self.scale_by]
        self.merged = False

    def forward(self, x):
        out = self.base_layer(x)
        if self.merged and self.skip_when_merged:
            return out
        if self.swapped:
            return out + self.scaling * (x @ self.lora_B.T @ self.lora_A.T)
        return out + self.scaling * (x @ self.lora_A.T @ self.lora_B.T)

    def merge(self):
        with torch.no_grad():
            self.base_layer.weight += self.scaling * (self.lora_B @ self.lora_A)
        self.merged = True


class LoRARandomB(_LoRA):
    zero_B = False


class LoRAScaledByAlpha(_LoRA):
    scale_by = "alpha"


class LoRASwapped(_LoRA):
    swapped = True


class LoRAMergedTwice(_LoRA):
    skip_when_merged = False


class LoRABaseTrains(_LoRA):
    freeze = False


def _apply(model, r, alpha, targets, match="suffix", freeze=True):
    for name, module in list(model.named_modules()):
        last = name.rsplit(".", 1)[-1]
        hit = last in targets if match == "suffix" else any(t in name for t in targets)
        if isinstance(module, nn.Linear) and hit:
            parent = model.get_submodule(name.rpartition(".")[0])
            setattr(parent, last, lora.LoRALinear(module, r, alpha))
    if freeze:
        for param_name, param in model.named_parameters():
            param.requires_grad = "lora_" in param_name


def apply_by_substring(model, r, alpha, targets):
    _apply(model, r, alpha, targets, match="substring")


def apply_without_freezing(model, r, alpha, targets):
    _apply(model, r, alpha, targets, freeze=False)


def apply_first_block_only(model, r, alpha, targets):
    _apply(model.blocks[0], r, alpha, targets, freeze=False)
    for param_name, param in model.named_parameters():
        param.requires_grad = "lora_" in param_name


TRAINABLE = 72 * 4 * 16 * 2048

BUGS = {
    "05-lora-layer": [
        (LoRARandomB, "B is not zero at initialisation"),
        (LoRAScaledByAlpha, "scaled by α instead of α/r"),
        (LoRASwapped, "A and B swapped"),
        (LoRAMergedTwice, "counted twice"),
        (LoRABaseTrains, "the base layer still trains"),
    ],
    "05-apply-lora": [
        (apply_by_substring, "layers that are not targets were wrapped"),
        (apply_without_freezing, "parameters outside LoRA still train"),
        (apply_first_block_only, "target layers have no LoRA"),
    ],
    "05-mt0-percent": [
        (100 * TRAINABLE / 1_229_581_312, "includes the LoRA parameters"),
        (TRAINABLE / (1_229_581_312 + TRAINABLE), "that is a fraction"),
    ],
}
