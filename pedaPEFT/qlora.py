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

Base formats (``quant_type``): ``"nf4"`` and ``"fp4"`` (blockwise 4-bit, optional double
quantization of the block scales), and ``"int8"`` (row-wise absmax int8, the vector-wise
quantization of LLM.int8 without its outlier decomposition, ``8 + 32 / in`` bits per weight).

Compute dtype: ``None`` picks bf16 on a CUDA device that runs it and float32 otherwise (a CPU
runs bf16 matmuls, but without native support they are slow and are not what the GPU computes
with; pass ``torch.bfloat16`` explicitly to get them anyway). The chosen dtype is kept in
``layer.compute_dtype``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from pedaPEFT import kernels, lora, quant
from pedaPEFT.adapters import find_targets

QUANT_TYPES = ("nf4", "fp4", "int8")
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
MODEL_WEIGHTS_NAME = "qlora_model.safetensors"
ADAPTER_WEIGHTS_NAME = "qlora_adapter.safetensors"
FORMAT_KEY = "pedapeft_qlora"


class BaseFormat(NamedTuple):
    """How a frozen base weight is stored; everything needed to rebuild an empty layer."""

    quant_type: str
    out_features: int
    in_features: int
    blocksize: int
    double_quant: bool
    dq_blocksize: int
    weight_dtype: str  # the dtype the dense weight had before quantization, e.g. "float32"
    compute_dtype: str

    def to_json(self) -> dict[str, object]:
        return self._asdict()

    @classmethod
    def from_json(cls, values: dict[str, object]) -> BaseFormat:
        return cls(**values)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype name {name!r}")
    return dtype


def resolve_compute_dtype(
    compute_dtype: torch.dtype | None, device: torch.device | str
) -> torch.dtype:
    """The dtype a QLoRA layer on ``device`` computes in; ``None`` = bf16 on CUDA, else float32.

    Raises ``ValueError`` for a dtype that is not one of float32, bfloat16, float16, and for
    bf16 on a CUDA device that cannot run it.
    """
    device = torch.device(device)
    if compute_dtype is None:
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(
            f"compute_dtype must be one of {[_dtype_name(d) for d in COMPUTE_DTYPES]} or None "
            f"(bf16 on CUDA, float32 elsewhere), got {compute_dtype!r}"
        )
    if compute_dtype == torch.bfloat16 and device.type == "cuda":
        if not torch.cuda.is_bf16_supported():
            raise ValueError(
                f"compute_dtype=bfloat16 is not supported by {torch.cuda.get_device_name(device)};"
                " pass torch.float16 or None"
            )
    return compute_dtype


def _check_quant_type(quant_type: object) -> str:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {list(QUANT_TYPES)}, got {quant_type!r}")
    return quant_type


def _check_blocksize(blocksize: object, numel: int) -> int:
    if isinstance(blocksize, bool) or blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {list(BLOCKSIZES)}, got {blocksize!r}")
    if numel % blocksize != 0:
        raise ValueError(
            f"weight has {numel} elements, not a multiple of blocksize={blocksize}: every block "
            "must be full (choose a blocksize that divides out_features * in_features)"
        )
    return blocksize


def _dequantize(fmt: BaseFormat, tensors: tuple[torch.Tensor | None, ...], dtype: torch.dtype):
    """The dense (out, in) weight in ``dtype``, from the stored tensors of a base layer."""
    if fmt.quant_type == "int8":
        qweight, row_absmax = tensors[:2]
        return (qweight.float() * (row_absmax / 127.0)[:, None]).to(dtype)
    packed, absmax, code, nested_absmax, nested_code, offset = tensors
    # The registered operator keeps torch.compile graphs whole; eager mode skips its dispatch.
    dequantize = (
        kernels.dequantize_4bit if torch.compiler.is_compiling() else kernels.dequantize_4bit_eager
    )
    flat = dequantize(
        packed,
        absmax,
        code,
        nested_absmax,
        nested_code,
        offset,
        fmt.out_features * fmt.in_features,
        fmt.blocksize,
        fmt.dq_blocksize,
        dtype,
    )
    return flat.view(fmt.out_features, fmt.in_features)


class _DequantLinear(torch.autograd.Function):
    """``y = x · dequant(Q)ᵀ + b``; backward recomputes dequant(Q) and returns only ∂L/∂x."""

    @staticmethod
    def forward(ctx, x, bias, fmt, *tensors):
        ctx.fmt = fmt
        ctx.save_for_backward(*tensors)  # the packed codes and scales, never the dense weight
        return F.linear(x, _dequantize(fmt, tensors, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_y):
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ _dequantize(ctx.fmt, ctx.saved_tensors, grad_y.dtype)
        return (grad_x, None, None) + (None,) * len(ctx.saved_tensors)


class QuantLinear(nn.Module):
    """A frozen ``nn.Linear`` whose weight lives only in quantized form (buffers, no parameters).

    Buffers, 4-bit formats: ``packed`` uint8 (n/2,), ``absmax`` (n/blocksize,) float32 or, with
    double quantization, uint8 codes plus ``nested_absmax`` float32 (n/(blocksize·256),),
    ``nested_code`` float32 (256,) and ``offset`` float32 (); ``code`` float32 (16,).
    ``int8``: ``qweight`` int8 (out, in) and ``row_absmax`` float32 (out,). Optional ``bias`` in
    the original weight dtype. Construct with :meth:`from_linear` or :meth:`from_weight`; the
    constructor itself makes an empty layer of the given format (what loading fills in).
    """

    def __init__(self, fmt: BaseFormat, bias: bool, device: torch.device | str | None = None):
        super().__init__()
        self.fmt = fmt
        n = fmt.out_features * fmt.in_features
        n_blocks = n // fmt.blocksize
        u8, f32 = torch.uint8, torch.float32
        if fmt.quant_type == "int8":
            shapes = {"qweight": ((fmt.out_features, fmt.in_features), torch.int8),
                      "row_absmax": ((fmt.out_features,), f32)}
        else:
            shapes = {"packed": (((n + 1) // 2,), u8),
                      "absmax": ((n_blocks,), u8 if fmt.double_quant else f32),
                      "code": ((16,), f32)}
            if fmt.double_quant:
                n_outer = -(-n_blocks // fmt.dq_blocksize)
                shapes |= {"nested_absmax": ((n_outer,), f32),
                           "nested_code": ((256,), f32),
                           "offset": ((), f32)}
        for name, (shape, dtype) in shapes.items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device))
        weight_dtype = _dtype_from_name(fmt.weight_dtype)
        self.register_buffer(
            "bias",
            torch.zeros(fmt.out_features, dtype=weight_dtype, device=device) if bias else None,
        )

    @property
    def in_features(self) -> int:
        return self.fmt.in_features

    @property
    def out_features(self) -> int:
        return self.fmt.out_features

    @property
    def compute_dtype(self) -> torch.dtype:
        return _dtype_from_name(self.fmt.compute_dtype)

    @classmethod
    @torch.no_grad()
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        quant_type: str = "nf4",
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        blocksize: int = 64,
        dq_blocksize: int = 256,
    ) -> QuantLinear:
        """Quantize a dense (out, in) ``weight`` on its own device; the dense tensor is not kept."""
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.numel() == 0:
            raise ValueError(
                "weight must be a non-empty 2-D tensor (out_features, in_features), got "
                f"{getattr(weight, 'shape', type(weight).__name__)}"
            )
        if not weight.is_floating_point():
            raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
        _check_quant_type(quant_type)
        if quant_type != "int8":
            _check_blocksize(blocksize, weight.numel())
        out_features, in_features = weight.shape
        fmt = BaseFormat(
            quant_type=quant_type,
            out_features=out_features,
            in_features=in_features,
            blocksize=blocksize if quant_type != "int8" else in_features,
            double_quant=bool(double_quant) and quant_type != "int8",
            dq_blocksize=dq_blocksize,
            weight_dtype=_dtype_name(weight.dtype),
            compute_dtype=_dtype_name(resolve_compute_dtype(compute_dtype, weight.device)),
        )
        layer = cls(fmt, bias is not None, device=weight.device)
        if quant_type == "int8":
            state = quant.quantize_int8(weight, blocksize=None)
            layer.qweight.copy_(state.q)
            layer.row_absmax.copy_(state.absmax)
        else:
            state = quant.quantize_4bit(
                weight,
                quant_type=quant_type,
                blocksize=blocksize,
                double_quant=fmt.double_quant,
                dq_blocksize=dq_blocksize,
            )
            for name in ("packed", "absmax", "code", "nested_absmax", "nested_code", "offset"):
                value = getattr(state, name)
                if value is not None:
                    getattr(layer, name).copy_(value.reshape(getattr(layer, name).shape))
        if bias is not None:
            layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> QuantLinear:
        """Quantize ``linear`` (weight and bias); ``kwargs`` as in :meth:`from_weight`."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        return cls.from_weight(linear.weight.detach(), linear.bias, **kwargs)

    def stored_tensors(self) -> tuple[torch.Tensor | None, ...]:
        if self.fmt.quant_type == "int8":
            return (self.qweight, self.row_absmax)
        return tuple(
            getattr(self, name, None)
            for name in ("packed", "absmax", "code", "nested_absmax", "nested_code", "offset")
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (out, in) weight this layer represents, in ``dtype`` (default: float32)."""
        return _dequantize(self.fmt, self.stored_tensors(), dtype or torch.float32)

    def quant_state(self) -> quant.QuantState:
        """The 4-bit weight as a ``quant.QuantState`` (views of this layer's buffers)."""
        if self.fmt.quant_type == "int8":
            raise ValueError("quant_state: an int8 base has no 4-bit QuantState")
        dq = self.fmt.double_quant
        return quant.QuantState(
            packed=self.packed,
            absmax=self.absmax,
            shape=torch.Size((self.out_features, self.in_features)),
            dtype=_dtype_from_name(self.fmt.weight_dtype),
            blocksize=self.fmt.blocksize,
            quant_type=self.fmt.quant_type,
            code=self.code,
            offset=self.offset if dq else None,
            nested_absmax=self.nested_absmax if dq else None,
            nested_code=self.nested_code if dq else None,
            dq_blocksize=self.fmt.dq_blocksize if dq else None,
        )

    def weight_bytes(self) -> int:
        """Bytes of everything stored for the weight (codes, scales, tables); bias excluded."""
        return sum(t.numel() * t.element_size() for t in self.stored_tensors() if t is not None)

    def bits_per_parameter(self) -> float:
        """Stored weight bits per weight: 4.127 for NF4 + DQ at blocksize 64 on a large layer."""
        return 8 * self.weight_bytes() / (self.out_features * self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return _DequantLinear.apply(x, bias, self.fmt, *self.stored_tensors())

    def extra_repr(self) -> str:
        f = self.fmt
        return (
            f"in_features={f.in_features}, out_features={f.out_features}, "
            f"quant_type={f.quant_type}, double_quant={f.double_quant}, "
            f"compute_dtype={f.compute_dtype}"
        )


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
        lora.LoRAConfig(r=r, alpha=alpha, dropout=dropout)  # validates r, alpha, dropout
        self.r, self.alpha, self.dropout_p, self.rslora = r, alpha, float(dropout), bool(rslora)
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

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.base_layer.compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_c = x.to(self.compute_dtype)
        return (self.base_layer(x_c) + self.lora_output(x_c)).to(x.dtype)

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
                weight.to(_dtype_from_name(fmt.weight_dtype)),
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
            dtype=_dtype_from_name(fmt.weight_dtype),
        )
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
        linear.requires_grad_(False)
        return linear

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout_p}"


def qlora_layers(model: nn.Module) -> dict[str, QLoRALinear]:
    """Every :class:`QLoRALinear` in ``model``, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QLoRALinear)}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


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
    """
    if not isinstance(config, lora.LoRAConfig):
        raise TypeError(f"config must be a lora.LoRAConfig, got {type(config).__name__}")
    _check_quant_type(quant_type)
    matches = find_targets(model, config.target_modules, "target_modules")
    for name, module in matches:
        if isinstance(module, QLoRALinear | lora.LoRALinear) or name.endswith(".base_layer"):
            raise ValueError(f"target_modules: {name!r} already has an adapter")
        if type(module) is not nn.Linear:
            raise TypeError(
                f"target_modules: {name!r} is a {type(module).__name__}; only torch.nn.Linear "
                "layers can be quantized for QLoRA"
            )
    for param in model.parameters():
        param.requires_grad_(False)
    for name, module in matches:
        _set_submodule(
            model,
            name,
            QLoRALinear.from_linear(
                module,
                config.r,
                config.alpha,
                config.dropout,
                quant_type=quant_type,
                double_quant=double_quant,
                compute_dtype=compute_dtype,
                rslora=config.rslora,
            ),
        )
    return [name for name, _ in matches]


def merge_qlora(model: nn.Module, requantize: bool = False) -> nn.Module:
    """Replace every :class:`QLoRALinear` by :meth:`QLoRALinear.merge`'s module; in place."""
    layers = qlora_layers(model)
    if not layers:
        raise ValueError("model has no QLoRALinear layers to merge")
    for name, layer in layers.items():
        _set_submodule(model, name, layer.merge(requantize=requantize))
    return model


@torch.no_grad()
def requantization_error(layer: QLoRALinear) -> dict[str, float]:
    """What re-quantizing a merged layer costs, relative to the exact merge ``W' = deq(Q) + ΔW``.

    Returns ``rel_error`` = ‖deq(quantize(W')) − W'‖ / ‖W'‖, ``rel_delta`` = ‖ΔW‖ / ‖W'‖ (how
    big the learned update is) and ``delta_lost`` = ‖deq(quantize(W')) − deq(Q) − ΔW‖ / ‖ΔW‖
    (the share of the update the new rounding swamps; above 1 means the noise exceeds it).
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


def _formats(model: nn.Module) -> dict[str, dict[str, object]]:
    layers = qlora_layers(model)
    if not layers:
        raise ValueError("model has no QLoRALinear layers (call quantize_model first)")
    return {
        name: {
            "base": layer.base_layer.fmt.to_json(),
            "bias": layer.base_layer.bias is not None,
            "r": layer.r,
            "alpha": layer.alpha,
            "dropout": layer.dropout_p,
            "rslora": layer.rslora,
        }
        for name, layer in layers.items()
    }


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {"format": "pt", FORMAT_KEY: json.dumps(meta, sort_keys=True)}
    lora._atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _read_meta(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"path: {path} does not exist")
    with safe_open(str(path), framework="pt") as f:
        meta = (f.metadata() or {}).get(FORMAT_KEY)
    if meta is None:
        raise ValueError(f"path: {path} was not written by pedaPEFT.qlora (no {FORMAT_KEY} entry)")
    return json.loads(meta)


def save_quantized(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the whole quantized model with its adapters to ``path/qlora_model.safetensors``.

    Every tensor of ``model.state_dict()`` is saved (packed codes and scales, not dense
    weights, for the quantized layers; tied tensors once) with each QLoRA layer's format, so
    :func:`load_quantized` can rebuild the layers on a freshly built dense model.
    """
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    formats = _formats(model)
    tensors, seen = {}, {}
    for key, value in model.state_dict().items():
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), value.shape)
        if value.numel() and ident in seen:
            continue  # a tied tensor (e.g. the head sharing the embedding) is stored once
        seen[ident] = key
        tensors[key] = value
    file = directory / MODEL_WEIGHTS_NAME
    _write_safetensors(file, tensors, {"layers": formats})
    return file


def load_quantized(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Rebuild a model saved by :func:`save_quantized` on ``model``, a dense model of the same
    architecture (e.g. a fresh ``gpt.GPT(config)``). In place; returns ``model``.

    Raises ``ValueError`` when the file's layers do not exist in ``model`` or its tensors do
    not match the rebuilt model (missing or unexpected keys, wrong shapes).
    """
    file = Path(path) / MODEL_WEIGHTS_NAME
    meta = _read_meta(file)
    device = next(iter(model.parameters())).device
    for name, spec in meta["layers"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"path: layer {name!r} of {file} does not exist in model") from None
        if type(module) is not nn.Linear:
            raise ValueError(f"path: layer {name!r} of the model is a {type(module).__name__}, "
                             "not the nn.Linear the file quantized")
        base = QuantLinear(BaseFormat.from_json(spec["base"]), spec["bias"], device=device)
        _set_submodule(
            model, name, QLoRALinear(base, spec["r"], spec["alpha"], spec["dropout"],
                                     spec["rslora"])
        )
    for param in model.parameters():
        param.requires_grad_(False)
    for layer in qlora_layers(model).values():
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    state = load_file(str(file), device=str(device))
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not _is_tied(model, k, state)]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f"path: {file} does not match the model; missing keys: {missing[:6]}; "
            f"unexpected keys: {unexpected[:6]}; wrong shapes: {wrong[:6]}"
        )
    model.load_state_dict(state, strict=False)
    return model


def _is_tied(model: nn.Module, key: str, state: dict[str, torch.Tensor]) -> bool:
    """Whether ``key`` names a tensor that shares storage with one present in ``state``."""
    own = model.state_dict()
    target = own[key]
    return any(
        k in state and v.data_ptr() == target.data_ptr() and v.shape == target.shape
        for k, v in own.items()
        if k != key
    )


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write only the LoRA tensors (``<name>.lora_A``/``lora_B``) and each base's format."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    formats = _formats(model)
    tensors = {}
    for name, layer in qlora_layers(model).items():
        tensors[f"{name}.lora_A"] = layer.lora_A
        tensors[f"{name}.lora_B"] = layer.lora_B
    file = directory / ADAPTER_WEIGHTS_NAME
    _write_safetensors(file, tensors, {"layers": formats})
    return file


def load_adapter(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load an adapter written by :func:`save_adapter` into a model already quantized.

    The adapter must have been trained on a base of the same format: a different
    ``quant_type``, blocksize, double quantization or shape raises ``ValueError`` (the LoRA
    update learned the errors of one quantization and does not transfer to another), as do
    layers missing on either side and a different ``r``.
    """
    file = Path(path) / ADAPTER_WEIGHTS_NAME
    meta = _read_meta(file)["layers"]
    layers = qlora_layers(model)
    if set(meta) != set(layers):
        raise ValueError(
            f"path: adapter layers {sorted(meta)[:6]} do not match the model's QLoRA layers "
            f"{sorted(layers)[:6]}"
        )
    for name, layer in layers.items():
        saved = BaseFormat.from_json(meta[name]["base"])
        ours = layer.base_layer.fmt
        for field in ("quant_type", "blocksize", "double_quant", "out_features", "in_features"):
            if getattr(saved, field) != getattr(ours, field):
                raise ValueError(
                    f"path: adapter for {name!r} was trained on a base with {field}="
                    f"{getattr(saved, field)!r}, but the model's base has {field}="
                    f"{getattr(ours, field)!r}; quantize the model the same way first"
                )
        if meta[name]["r"] != layer.r:
            raise ValueError(
                f"path: adapter for {name!r} has r={meta[name]['r']}, the model's has r={layer.r}"
            )
    state = load_file(str(file))
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_A.copy_(state[f"{name}.lora_A"])
            layer.lora_B.copy_(state[f"{name}.lora_B"])
    return list(layers)


# --------------------------------------------------------------------------- fine-tuning method

ALL_LINEAR = ("q", "k", "v", "o", "fc", "proj")


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
    """Fine-tuning method ``"qlora"`` of ``train.finetune``: quantize ``targets``, add LoRA."""
    config = lora.LoRAConfig(r=r, alpha=alpha, dropout=dropout, target_modules=tuple(targets))
    quantize_model(model, config, quant_type, double_quant, compute_dtype)
    return model


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer ``model`` stores (a tied tensor counted once)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def base_bits_per_parameter(model: nn.Module) -> float:
    """Stored bits per weight over all quantized base layers of ``model``."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not layers:
        raise ValueError("model has no quantized layers")
    weights = sum(m.in_features * m.out_features for m in layers)
    return 8 * sum(m.weight_bytes() for m in layers) / weights


def demo(task: str = "shift", out_dir: str | os.PathLike = "runs", progress: bool = True,
         steps: int | None = None) -> dict:
    """The course in one run: the shipped tiny GPT base, quantized to NF4 with double
    quantization, fine-tuned with QLoRA (r = 8, α = 16, all linear layers) on ``task``.

    Prints a table (trainable parameters and share, storage bits per weight, memory,
    exact-match accuracy before and after), writes ``<out_dir>/qlora_demo.png`` and returns the
    numbers. Uses the GPU when there is one (bf16 compute), float32 on a CPU.
    """
    from pedaPEFT import data, figures, gpt, memory, train

    if task not in data.TASKS:
        raise ValueError(f"task must be one of {sorted(data.TASKS)}, got {task!r}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = gpt.load_pretrained("tiny").to(device)
    n_base = gpt.count_parameters(model.config)
    dense_bytes = model_bytes(model)
    config = dataclasses.replace(train.FINETUNE_CONFIG, progress=progress)
    if steps is not None:
        config = dataclasses.replace(config, steps=steps)
    result = train.finetune(model, task, "qlora", config, method_options={"r": 8, "alpha": 16})
    quant_bytes = model_bytes(model)
    # Only the Linear weights are quantized; embeddings, LayerNorms and biases keep fp32.
    quantized = sum(m.in_features * m.out_features for m in model.modules()
                    if isinstance(m, QuantLinear))
    predicted = memory.finetune_memory(
        n_base, "qlora", trainable=result.trainable, quantized=quantized,
        base_bits=base_bits_per_parameter(model),
    )
    compute_dtype = next(iter(qlora_layers(model).values())).compute_dtype
    rows = [
        ("device, compute dtype", f"{device.type}, {_dtype_name(compute_dtype)}"),
        ("trainable parameters", f"{result.trainable:,} of {result.total:,} "
                                 f"({100 * result.trainable_fraction:.2f}%, as PEFT counts)"),
        ("storage of quantized weights", f"{base_bits_per_parameter(model):.3f} bits per weight"),
        ("model memory, dense fp32 -> QLoRA", f"{dense_bytes / 2**20:.2f} MiB -> "
                                              f"{quant_bytes / 2**20:.2f} MiB"),
        ("training memory predicted (memory.py)", f"{predicted.static / 2**20:.2f} MiB without "
                                                  "activations"),
        (f"exact match on '{task}', before", f"{result.accuracy_before:.3f}"),
        (f"exact match on '{task}', after QLoRA", f"{result.accuracy:.3f}"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figure = figures.qlora_demo(result.run.losses, result.accuracy_before, result.accuracy, task)
    figure_path = out / "qlora_demo.png"
    figures.save_figure(figure, figure_path)
    print(f"wrote {figure_path}")
    return {"rows": dict(rows), "result": result, "figure": figure_path}


TABLE3_SETTINGS: tuple[tuple[str, str, dict], ...] = (
    ("full fine-tuning (fp32)", "full", {}),
    ("LoRA, fp32 base, all linear", "lora", {"r": 8, "alpha": 16, "targets": ALL_LINEAR}),
    ("QLoRA int8, all linear", "qlora", {"quant_type": "int8"}),
    ("QLoRA FP4, all linear", "qlora", {"quant_type": "fp4", "double_quant": False}),
    ("QLoRA NF4 + DQ, all linear", "qlora", {"quant_type": "nf4"}),
    ("LoRA, fp32 base, q and v", "lora", {"r": 8, "alpha": 16, "targets": ("q", "v")}),
    ("QLoRA NF4 + DQ, q and v", "qlora", {"targets": ("q", "v")}),
)
"""The QLoRA paper's table 3 in miniature: (label, method, options); r = 8, α = 16."""

TABLE3_LR = {"full": 1e-3, "lora": 4e-3, "qlora": 4e-3}
"""Peak learning rates: ``experiments.LR``'s values, the same for LoRA and QLoRA."""


def table3_run(label: str, method: str, options: dict, task: str, seed: int, scale) -> dict:
    """Fine-tune a fresh copy of the shipped tiny base once; return counts and test accuracy.

    ``scale`` is an ``experiments.Scale``. The seed sets LoRA's initialisation and the batch
    order; the quantized base is the same for every seed (quantization is deterministic).
    """
    from pedaPEFT import data, gpt, train

    torch.manual_seed(seed)
    model = gpt.load_pretrained("tiny")
    n_base = gpt.count_parameters(model.config)
    dense_bytes = model_bytes(model)
    block = model.config.block_size
    train_set = data.task_data(task, "train", scale.n_train, block)
    test_set = data.task_data(task, "test", scale.n_test, block)
    prepare = {"full": train.prepare_full, "lora": lora.prepare_lora, "qlora": prepare_qlora}
    model = prepare[method](model, **options)
    trainable, _ = lora.count_parameters(model)
    config = train.TrainConfig(
        steps=scale.steps, batch_size=scale.batch_size, lr=TABLE3_LR[method],
        warmup_steps=max(1, scale.steps // 10), weight_decay=0.0, progress=False,
    )
    run = train.train(model, lambda step: train_set.batch(step, scale.batch_size, seed=seed),
                      config)
    return {
        "label": label, "method": method, "options": {k: list(v) if isinstance(v, tuple) else v
                                                      for k, v in options.items()},
        "seed": seed, "trainable": trainable, "base_parameters": n_base,
        "model_bytes_before": dense_bytes, "model_bytes_after": model_bytes(model),
        "loss_first": run.losses[0], "loss_last": run.losses[-1],
        "accuracy": data.exact_match(model, test_set),
    }


def table3_experiment(scale_name: str = "small", task: str = "reverse", log=None,
                      settings: tuple[int, ...] | None = None) -> dict:
    """``TABLE3_SETTINGS`` (all, or the entries numbered ``settings``) for every seed of
    ``experiments.SCALES[scale_name]`` ("small": seconds, for CI; "full": 300 steps of 64
    examples, three seeds)."""
    from pedaPEFT import experiments

    if scale_name not in experiments.SCALES:
        raise ValueError(f"scale must be one of {sorted(experiments.SCALES)}, got {scale_name!r}")
    scale = experiments.SCALES[scale_name]
    chosen = range(len(TABLE3_SETTINGS)) if settings is None else settings
    rows = []
    for label, method, options in (TABLE3_SETTINGS[i] for i in chosen):
        for seed in scale.seeds:
            rows.append(table3_run(label, method, options, task, seed, scale))
            if log is not None:
                log(f"{label}, seed {seed}: accuracy {rows[-1]['accuracy']:.3f}")
    import hashlib

    from pedaPEFT import gpt

    weights, _ = gpt.pretrained_paths("tiny")
    return {"experiment": "qlora_table3", "task": task, "scale": scale_name,
            "base_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
            "config": dataclasses.asdict(scale), "lr": TABLE3_LR, "torch": torch.__version__,
            "runs": rows}


def table3_summary(results: dict) -> list[dict]:
    """Mean and sample standard deviation of accuracy over seeds, per setting, in table order."""
    import statistics

    summary = []
    for label, method, _ in TABLE3_SETTINGS:
        runs = [r for r in results["runs"] if r["label"] == label]
        if not runs:
            continue
        accuracies = [r["accuracy"] for r in runs]
        summary.append({
            "label": label, "method": method, "trainable": runs[0]["trainable"],
            "base_parameters": runs[0]["base_parameters"],
            "model_bytes_after": runs[0]["model_bytes_after"], "n": len(runs),
            "mean": statistics.fmean(accuracies),
            "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
        })
    return summary


def table3_results_filename(task: str = "reverse") -> str:
    """``qlora_table3_<task>.json``: the file name of the full-scale results for ``task``."""
    return f"qlora_table3_{task}.json"


def table3_results_path(task: str = "reverse") -> Traversable:
    """The committed full-scale results for ``task`` (package data: ``pedaPEFT/results/``)."""
    from pedaPEFT import course_files

    return course_files.shipped_results(table3_results_filename(task))


def _register() -> None:
    from pedaPEFT import train

    train.register_method("qlora", prepare_qlora)


_register()
