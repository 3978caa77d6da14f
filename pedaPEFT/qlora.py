"""QLoRA: a frozen base weight stored in 4 bits (or 8) plus a trainable LoRA update.

For a frozen weight ``W`` (out, in) quantized blockwise to ``Q`` (see ``pedaPEFT.quant``), the
QLoRA layer of Dettmers et al. (2023, Eq. 5) computes, in the compute dtype (bf16 on a GPU)::

    y = x · dequant(Q)ᵀ + b + s · B (A · dropout(x)),      s = α / r

with ``A`` (r, in) and ``B`` (out, r) trained exactly as in ``pedaPEFT.lora``. Only ``Q`` and its
quantization state are stored: 4.127 bits per weight with NF4 and double quantization, against
16 for bf16. No dense copy of ``W`` is kept anywhere: the forward pass dequantizes into a
temporary, multiplies, and frees it; the backward pass dequantizes *again* instead of having
saved the dense weight, because the only gradient the base contributes is the one to its input,

    ∂L/∂x = ∂L/∂y · dequant(Q)          (no ∂L/∂W: the base is frozen)

while ``A`` and ``B`` get theirs through ordinary autograd on the LoRA branch.

The frozen base is a ``quant_linear.QuantLinear`` (base formats ``"nf4"``, ``"fp4"``,
``"int8"``); this module adds the LoRA branch, the model surgery and the merge.

Compute dtype: ``None`` picks bf16 on a CUDA device that runs it and float32 otherwise (a CPU
runs bf16 matmuls, but without native support they are slow and are not what the GPU computes
with; pass ``torch.bfloat16`` explicitly to get them anyway). The chosen dtype is kept in
``layer.compute_dtype``.
"""

from __future__ import annotations

import torch
from torch import nn

from pedaPEFT import fused_gemm, lora
from pedaPEFT.gpt import ALL_LINEAR
from pedaPEFT.quant_linear import (
    BASE_QUANT_TYPES,
    BaseFormat,
    QuantLinear,
    check_base_quant_type,
    dtype_from_name,
)
from pedaPEFT.targets import find_targets

__all__ = [  # the base layer's names are re-exported: lesson 9 meets them here
    "ALL_LINEAR", "BASE_QUANT_TYPES", "BaseFormat", "QLoRALinear", "QuantLinear",
    "base_bits_per_parameter", "merge_qlora", "model_bytes", "prepare_qlora", "qlora_layers",
    "quantize_model", "requantization_error",
]


class QLoRALinear(nn.Module):
    """``base_layer(x) + s · B(A(dropout(x)))`` with a quantized, frozen ``base_layer``.

    Attribute names follow ``lora.LoRALinear`` (and PEFT): ``base_layer``, ``lora_A`` (r, in),
    ``lora_B`` (out, r), ``lora_dropout``, ``scaling``. Initialisation, the LoRA branch and
    ``ΔW`` are ``lora.LoRALinear``'s own methods, so the conventions live in one place. ``A`` and
    ``B`` are kept in the base's compute dtype.
    """

    reset_lora_parameters = lora.LoRALinear.reset_lora_parameters
    lora_output = lora.LoRALinear.lora_output
    delta_weight = lora.LoRALinear.delta_weight

    def __init__(
        self,
        base: QuantLinear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(base, QuantLinear):
            raise TypeError(f"base must be a QuantLinear, got {type(base).__name__}")
        self.scaling = lora.lora_scaling(r, alpha, rslora)
        lora.LoRAConfig(r=r, alpha=alpha, dropout=dropout, rslora=rslora)  # validates each
        self.r, self.alpha, self.dropout_p, self.rslora = r, alpha, float(dropout), rslora
        self.base_layer = base
        factory = {"device": base.stored_tensors()[0].device, "dtype": base.compute_dtype}
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, r, **factory))
        self.lora_dropout = nn.Dropout(self.dropout_p) if self.dropout_p > 0 else nn.Identity()
        self.reset_lora_parameters()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        quant_type: str = "nf4",
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        rslora: bool = False,
        blocksize: int = 64,
    ) -> QLoRALinear:
        """Quantize ``linear`` and attach a fresh LoRA adapter (``ΔW = 0`` at the start)."""
        base = QuantLinear.from_linear(
            linear,
            quant_type=quant_type,
            double_quant=double_quant,
            compute_dtype=compute_dtype,
            blocksize=blocksize,
        )
        return cls(base, r, alpha, dropout, rslora)

    in_features = lora.LoRALinear.in_features
    out_features = lora.LoRALinear.out_features

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.base_layer.compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_gemm.applies(self, x):  # one autograd node for base + LoRA (fused_gemm)
            return fused_gemm.qlora_forward(self, x)
        x_c = x.to(self.compute_dtype)  # (..., in)
        return (self.base_layer(x_c) + self.lora_output(x_c)).to(x.dtype)  # (..., out)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``dequant(Q) + s · B A`` in float32, shape (out, in)."""
        return self.base_layer.dequantize(torch.float32) + self.delta_weight().float()

    @torch.no_grad()
    def merge(self, requantize: bool = False) -> nn.Module:
        """A module computing this layer's function without the LoRA branch.

        ``requantize=False``: a dense ``nn.Linear`` holding ``dequant(Q) + ΔW`` in the original
        weight dtype (exact up to that dtype's rounding). ``requantize=True``: a
        :class:`QuantLinear` of the same format holding ``quantize(dequant(Q) + ΔW)`` — small
        again, but quantizing adds a new error (see :func:`requantization_error`).
        """
        weight = self.merged_weight()
        fmt = self.base_layer.fmt
        bias = self.base_layer.bias
        if requantize:
            return QuantLinear.from_weight(
                weight.to(dtype_from_name(fmt.weight_dtype)),
                bias,
                quant_type=fmt.quant_type,
                double_quant=fmt.double_quant,
                compute_dtype=self.compute_dtype,
                blocksize=fmt.blocksize,
                dq_blocksize=fmt.dq_blocksize,
            )
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=bias is not None,
            device=weight.device,
            dtype=dtype_from_name(fmt.weight_dtype),
        )
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
        linear.requires_grad_(False)
        return linear

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout_p}"


def qlora_layers(model: nn.Module) -> dict[str, QLoRALinear]:
    """Every :class:`QLoRALinear` in ``model``, by module name.

    Introduced in lesson 9, section "8. Merging for inference".
    """
    return {name: m for name, m in model.named_modules() if isinstance(m, QLoRALinear)}


def quantize_model(
    model: nn.Module,
    config: lora.LoRAConfig,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> list[str]:
    """Turn every ``nn.Linear`` matching ``config.target_modules`` into a :class:`QLoRALinear`.

    In place. Everything else is frozen, so only ``lora_A``/``lora_B`` train. Target matching
    is PEFT's (exact name or dotted suffix), as in ``lora.apply_lora``. Raises ``ValueError``
    listing the model's Linear names when nothing matches. Returns the converted names.

    Introduced in lesson 9, section "3. The tiny GPT before and after quantization".
    """
    if not isinstance(config, lora.LoRAConfig):
        raise TypeError(f"config must be a lora.LoRAConfig, got {type(config).__name__}")
    check_base_quant_type(quant_type)
    matches = find_targets(model, config.target_modules, "target_modules")
    for name, module in matches:
        if isinstance(module, QLoRALinear | lora.LoRALinear) or name.endswith(".base_layer"):
            raise ValueError(f"target_modules: {name!r} already has an adapter")
        if type(module) is not nn.Linear:
            raise TypeError(
                f"target_modules: {name!r} is a {type(module).__name__}; only torch.nn.Linear "
                "layers can be quantized for QLoRA"
            )
    # All or nothing: every layer is quantized before the model changes, so a layer that
    # cannot be quantized (say, a blocksize that does not divide it) leaves the model as it was.
    quantized = [
        QLoRALinear.from_linear(
            module,
            config.r,
            config.alpha,
            config.dropout,
            quant_type=quant_type,
            double_quant=double_quant,
            compute_dtype=compute_dtype,
            rslora=config.rslora,
        )
        for _, module in matches
    ]
    for param in model.parameters():
        param.requires_grad_(False)
    for (name, _), layer in zip(matches, quantized, strict=True):
        model.set_submodule(name, layer)
    return [name for name, _ in matches]


def merge_qlora(model: nn.Module, requantize: bool = False) -> nn.Module:
    """Replace every :class:`QLoRALinear` by :meth:`QLoRALinear.merge`'s module; in place.

    Introduced in lesson 9, section "8. Merging for inference".
    """
    layers = qlora_layers(model)
    if not layers:
        raise ValueError("model has no QLoRALinear layers to merge")
    for name, layer in layers.items():
        model.set_submodule(name, layer.merge(requantize=requantize))
    return model


@torch.no_grad()
def requantization_error(layer: QLoRALinear) -> dict[str, float]:
    """What re-quantizing a merged layer costs, relative to the exact merge ``W' = deq(Q) + ΔW``.

    Returns ``rel_error`` = ‖deq(quantize(W')) − W'‖ / ‖W'‖, ``rel_delta`` = ‖ΔW‖ / ‖W'‖ (how
    big the learned update is) and ``delta_lost`` = ‖deq(quantize(W')) − deq(Q) − ΔW‖ / ‖ΔW‖
    (the share of the update the new rounding swamps; above 1 means the noise exceeds it).

    Introduced in lesson 9, section "8. Merging for inference".
    """
    exact = layer.merged_weight()
    requantized = layer.merge(requantize=True).dequantize(torch.float32)
    delta = layer.delta_weight().float()
    error = (requantized - exact).norm()
    return {
        "rel_error": float(error / exact.norm()),
        "rel_delta": float(delta.norm() / exact.norm()),
        "delta_lost": float(error / delta.norm()) if delta.norm() > 0 else float("inf"),
    }


# --------------------------------------------------------------------------- fine-tuning method

def prepare_qlora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16,
    targets: tuple[str, ...] = ALL_LINEAR,
    dropout: float = 0.0,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Fine-tuning method ``"qlora"`` of ``train.finetune``: quantize ``targets``, add LoRA.

    Introduced in lesson 9, section "4. Fine-tuning it".
    """
    config = lora.LoRAConfig(r=r, alpha=alpha, dropout=dropout, target_modules=targets)
    quantize_model(model, config, quant_type, double_quant, compute_dtype)
    return model


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer ``model`` stores (a tied tensor counted once).

    Introduced in lesson 9, section "3. The tiny GPT before and after quantization".
    """
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def base_bits_per_parameter(model: nn.Module) -> float:
    """Stored bits per weight over all quantized base layers of ``model``.

    Introduced in lesson 9, section "3. The tiny GPT before and after quantization".
    """
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not layers:
        raise ValueError("model has no quantized layers")
    weights = sum(m.in_features * m.out_features for m in layers)
    return 8 * sum(m.weight_bytes() for m in layers) / weights
