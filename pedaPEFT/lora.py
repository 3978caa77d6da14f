"""LoRA: a frozen linear layer plus a trainable low-rank update, with Hugging Face PEFT's semantics.

For a frozen weight ``W0`` of shape (out, in), LoRA learns ``A`` (r, in) and ``B`` (out, r)::

    h = W0 x + b + s · B (A · dropout(x)),      s = α / r   (α / √r with rsLoRA)
    ΔW = s · B A,  rank(ΔW) ≤ r

``A`` starts as PyTorch's default Linear init (``kaiming_uniform_`` with a = √5, i.e.
U(±1/√in)) and ``B`` as zeros, so ``ΔW = 0`` and the wrapped layer computes exactly what the
base layer computed.  Only ``A`` and ``B`` train: ``r · (in + out)`` parameters per layer.
Merging writes ``W0 + ΔW`` into the base weight, so inference costs nothing extra.

Everything here follows PEFT 0.21 (``peft.tuners.lora``): the same shapes, init, scaling,
dropout placement (LoRA branch only), target matching (exact name or dotted suffix), the
``print_trainable_parameters`` line, and the saved files (``adapter_model.safetensors`` with
keys ``base_model.model.<path>.lora_A.weight`` and ``adapter_config.json``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pedaPEFT.targets import check_targets, find_targets


def _check_rank(r: object) -> int:
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"r must be an int, got {type(r).__name__}")
    if r <= 0:
        raise ValueError(f"r must be a positive integer (r >= 1), got {r}")
    return r


def _check_alpha(alpha: object) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise TypeError(f"alpha must be a number, got {type(alpha).__name__}")
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
    return alpha


def _check_dropout(dropout: object) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, int | float):
        raise TypeError(f"dropout must be a number, got {type(dropout).__name__}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return float(dropout)


def check_flag(value: object, name: str) -> bool:
    """``value`` if it is True or False; a string such as ``"false"`` is refused (it is truthy)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_lora_base(module: nn.Module, name: str = "base") -> None:
    """Refuse a layer LoRA cannot wrap: anything but an ``nn.Linear``, and the output projection
    of ``nn.MultiheadAttention``, which reads ``out_proj.weight`` directly (a wrapper around it
    would never be called)."""
    if isinstance(module, LoRALinear):
        raise ValueError(f"{name} already has LoRA: LoRA cannot be applied twice to one layer")
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        raise TypeError(
            f"{name} is the out_proj of an nn.MultiheadAttention, which uses its weight "
            "directly, so LoRA around it would never run; target separate nn.Linear layers"
        )
    if not isinstance(module, nn.Linear):
        raise TypeError(f"{name} must be a torch.nn.Linear, got {type(module).__name__}")


def lora_scaling(r: int, alpha: float, rslora: bool = False) -> float:
    """``α / r`` (LoRA, PEFT's default) or ``α / √r`` (rsLoRA)."""
    r, alpha = _check_rank(r), _check_alpha(alpha)
    return alpha / math.sqrt(r) if rslora else alpha / r


@dataclass(frozen=True)
class LoRAConfig:
    """What :func:`apply_lora` does: rank ``r``, ``alpha``, branch ``dropout``, which layers.

    ``target_modules`` holds module names; a module is wrapped when its full dotted name equals
    a target or ends with ``"." + target`` (PEFT's rule for a list of targets).

    Introduced in lesson 5, section "5. Merging: zero inference cost"; used again in lesson 9.
    """

    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q", "v")
    rslora: bool = False

    def __post_init__(self) -> None:
        _check_rank(self.r)
        _check_alpha(self.alpha)
        _check_dropout(self.dropout)
        check_flag(self.rslora, "rslora")
        targets = check_targets(self.target_modules, "target_modules", "('q', 'v')")
        object.__setattr__(self, "target_modules", targets)

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.alpha, self.rslora)


class LoRALinear(nn.Module):
    """``base_layer(x) + s · B(A(dropout(x)))`` around a frozen ``nn.Linear``.

    Attributes:
        base_layer: the wrapped ``nn.Linear`` (frozen; PEFT's attribute name).
        lora_A: trainable (r, in), ``kaiming_uniform_(a=√5)``.
        lora_B: trainable (out, r), zeros.
        scaling: ``α / r`` (or ``α / √r`` with ``rslora``).
        merged: whether ``ΔW`` is currently added into ``base_layer.weight``.

    Introduced in lesson 5, section "3. A LoRA layer, step by step".
    """

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
    ) -> None:
        super().__init__()
        check_lora_base(base)
        self.r = _check_rank(r)
        self.alpha = _check_alpha(alpha)
        self.dropout_p = _check_dropout(dropout)
        self.rslora = check_flag(rslora, "rslora")
        self.scaling = lora_scaling(self.r, self.alpha, self.rslora)
        self.base_layer = base
        for param in base.parameters():
            param.requires_grad = False
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(self.r, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, self.r, **factory))
        self.lora_dropout = nn.Dropout(self.dropout_p) if self.dropout_p > 0 else nn.Identity()
        self.merged = False
        self.reset_lora_parameters()

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def reset_lora_parameters(self) -> None:
        """``A ~ U(±1/√in)`` via ``kaiming_uniform_(a=√5)``, ``B = 0`` (PEFT's default init)."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def lora_output(self, x: torch.Tensor) -> torch.Tensor:
        """The low-rank branch ``s · B(A(dropout(x)))``, computed in the adapter's dtype.

        Every call here is paid once per layer per step, so what changes nothing is skipped:
        the ``nn.Identity`` module without dropout, a cast to the dtype ``x`` already has, and
        the product by ``s = 1`` (exact: ``v · 1 = v`` for every float, so the result and its
        gradients are the same bits, with one kernel and one autograd node fewer)."""
        lora_A = self.lora_A  # a parameter lookup goes through nn.Module.__getattr__: once
        if x.dtype != lora_A.dtype:
            x = x.to(lora_A.dtype)  # (..., in)
        if self.dropout_p > 0:
            x = self.lora_dropout(x)
        h = F.linear(F.linear(x, lora_A), self.lora_B)  # (..., r) -> (..., out)
        return h if self.scaling == 1 else h * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # (..., in) -> (..., out)
        if self.merged:
            return result
        out = result + self.lora_output(x)  # (..., out)
        return out if out.dtype == result.dtype else out.to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``ΔW = s · B @ A``, shape (out, in), rank at most ``r``."""
        return (self.lora_B @ self.lora_A) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """``W ← W + ΔW``; the forward pass then costs exactly one matmul, like the base layer."""
        if self.merged:
            raise ValueError("merge: this LoRALinear is already merged (call unmerge() first)")
        weight = self.base_layer.weight
        weight.add_(self.delta_weight().to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """``W ← W − ΔW`` (exact up to float rounding: ``(W + Δ) − Δ`` may differ from ``W``)."""
        if not self.merged:
            raise ValueError("unmerge: this LoRALinear is not merged (call merge() first)")
        weight = self.base_layer.weight
        weight.sub_(self.delta_weight().to(weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout_p}, "
            f"merged={self.merged}"
        )


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every :class:`LoRALinear` in ``model``, by module name.

    Introduced in lesson 5, section "5. Merging: zero inference cost".
    """
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Wrap every ``nn.Linear`` matching ``config.target_modules`` in a :class:`LoRALinear`.

    In place, like PEFT's ``get_peft_model``: afterwards only ``lora_A``/``lora_B`` parameters
    have ``requires_grad`` (PEFT's ``bias="none"``).  Raises ``ValueError`` listing the model's
    Linear names when no module matches, and when a matching layer already has LoRA.
    Returns the wrapped module names in ``model.named_modules()`` order.

    Introduced in lesson 5, section "5. Merging: zero inference cost".
    """
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}")
    targets = config.target_modules
    matches = find_targets(model, targets, "target_modules")
    for name, module in matches:
        if name.endswith(".base_layer"):
            module = model.get_submodule(name.removesuffix(".base_layer"))
        check_lora_base(module, f"target_modules: {name!r}")
    wrapped = []
    for name, module in matches:
        model.set_submodule(
            name, LoRALinear(module, config.r, config.alpha, config.dropout, config.rslora)
        )
        wrapped.append(name)
    for param_name, param in model.named_parameters():
        param.requires_grad = "lora_" in param_name
    return wrapped


def prepare_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16,
    targets: Iterable[str] = ("q", "v"),
    dropout: float = 0.0,
    rslora: bool = False,
) -> nn.Module:
    """Fine-tuning method ``"lora"`` of :func:`pedaPEFT.train.finetune`: LoRA on ``targets``."""
    apply_lora(model, LoRAConfig(r, alpha, dropout, targets, rslora))
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts, summed over ``model.parameters()`` (PEFT's rule).

    Introduced in lesson 4, section "4. Where adapters go"; used again in lessons 5 and 9.
    """
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total


def trainable_parameters_line(model: nn.Module) -> str:
    """PEFT's line: ``trainable params: 16,384 || all params: 816,138 || trainable%: 2.0075``."""
    trainable, total = count_parameters(model)
    if total == 0:
        raise ValueError("model has no parameters")
    return (
        f"trainable params: {trainable:,d} || all params: {total:,d} || "
        f"trainable%: {100 * trainable / total:.4f}"
    )


def print_trainable_parameters(model: nn.Module) -> None:
    """Print :func:`trainable_parameters_line` exactly as PEFT's ``print_trainable_parameters``.

    Introduced in lesson 5, section "5. Merging: zero inference cost".
    """
    print(trainable_parameters_line(model))


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer and put its plain ``nn.Linear`` back (PEFT's ``merge_and_unload``).

    The result has exactly the base model's architecture and parameter count; its outputs equal
    the LoRA model's up to float rounding.  Works in place and returns ``model``.

    Introduced in lesson 5, section "5. Merging: zero inference cost".
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRALinear layers to merge")
    for name, layer in layers.items():
        if not layer.merged:
            layer.merge()
        model.set_submodule(name, layer.base_layer)
    return model
