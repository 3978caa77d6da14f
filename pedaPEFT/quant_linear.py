"""A frozen linear layer whose weight is stored only in quantized form: QLoRA's base.

``QuantLinear`` holds the codes and scales of ``pedaPEFT.quant`` as buffers and computes

    y = x · dequant(Q)ᵀ + b

in its compute dtype. No dense copy of the weight is kept: the forward pass dequantizes into a
temporary, multiplies, and frees it; the backward pass dequantizes *again* (the base is frozen,
so the only gradient it passes on is ∂L/∂x = ∂L/∂y · dequant(Q)).

Base formats (``quant_type``): ``"nf4"`` and ``"fp4"`` (blockwise 4-bit, lesson 7, optional
double quantization of the block scales, lesson 8), and ``"int8"`` (row-wise absmax int8,
lesson 6: the vector-wise quantization of LLM.int8 without its outlier decomposition,
``8 + 32 / in`` bits per weight). ``BaseFormat`` records everything needed to rebuild an empty
layer (what loading a file fills in).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pedaPEFT import kernels, quant

BASE_QUANT_TYPES = (*quant.QUANT_TYPES, "int8")  # 4-bit codes, or row-wise absmax int8
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class BaseFormat(NamedTuple):
    """How a frozen base weight is stored; everything needed to rebuild an empty layer.

    Introduced in lesson 9, section "1. One layer, stored in 4 bits".
    """

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
    def from_json(cls, values: object) -> BaseFormat:
        """The format a file recorded, every field checked: ``ValueError`` naming the field.

        The same rules as quantizing: a known ``quant_type``, positive sizes, a blocksize of
        ``quant.BLOCKSIZES`` that divides the weight (4-bit formats), a float weight dtype and
        one of ``COMPUTE_DTYPES``.
        """
        if not isinstance(values, dict) or set(values) != set(cls._fields):
            got = sorted(values) if isinstance(values, dict) else type(values).__name__
            raise ValueError(f"base format must have exactly the fields {list(cls._fields)}, "
                             f"got {got}")
        fmt = cls(**values)
        check_base_quant_type(fmt.quant_type)
        for field in ("out_features", "in_features"):
            value = getattr(fmt, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be an integer >= 1, got {value!r}")
        if not isinstance(fmt.double_quant, bool):
            raise ValueError(f"double_quant must be true or false, got {fmt.double_quant!r}")
        if fmt.quant_type != "int8":
            _check_blocksize(fmt.blocksize, fmt.out_features * fmt.in_features)
            quant.check_blocksize(fmt.dq_blocksize, "dq_blocksize")
        names = [_dtype_name(dtype) for dtype in COMPUTE_DTYPES]
        for field in ("weight_dtype", "compute_dtype"):
            if getattr(fmt, field) not in names:
                raise ValueError(f"{field} must be one of {names}, got {getattr(fmt, field)!r}")
        return fmt


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
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


def check_base_quant_type(quant_type: object) -> str:
    """``quant_type`` if it is a base format (``BASE_QUANT_TYPES``); ``ValueError`` otherwise."""
    if quant_type not in BASE_QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {list(BASE_QUANT_TYPES)}, got {quant_type!r}")
    return quant_type


def _check_blocksize(blocksize: object, numel: int) -> int:
    """``quant.check_blocksize``, and every block full: ``numel`` a multiple of ``blocksize``."""
    quant.check_blocksize(blocksize)
    if numel % blocksize != 0:
        raise ValueError(
            f"weight has {numel} elements, not a multiple of blocksize={blocksize}: every block "
            "must be full (choose a blocksize that divides out_features * in_features)"
        )
    return blocksize


def _dequantize(
    fmt: BaseFormat, tensors: tuple[torch.Tensor | None, ...], dtype: torch.dtype
) -> torch.Tensor:
    """The dense (out, in) weight in ``dtype``, from the stored tensors of a base layer."""
    if fmt.quant_type == "int8":
        qweight, row_absmax = tensors[:2]  # int8 (out, in), float32 (out,)
        shape = torch.Size((fmt.out_features, fmt.in_features))
        return quant.dequantize_int8(quant.Int8State(qweight, row_absmax, shape, dtype, None))
    # the layer's own buffers, shaped when it was built: no per-call check
    flat = kernels.dequantize_4bit_unchecked(  # (out · in,)
        *tensors, fmt.out_features * fmt.in_features, fmt.blocksize, fmt.dq_blocksize, dtype
    )
    return flat.view(fmt.out_features, fmt.in_features)  # (out, in)


class _DequantLinear(torch.autograd.Function):
    """``y = x · dequant(Q)ᵀ + b``; backward recomputes dequant(Q) and returns only ∂L/∂x."""

    @staticmethod
    def forward(ctx, x, bias, fmt, *tensors):
        ctx.fmt = fmt
        ctx.save_for_backward(*tensors)  # the packed codes and scales, never the dense weight
        weight = _dequantize(fmt, tensors, x.dtype)  # (out, in), a temporary
        return F.linear(x, weight, bias)  # (..., in) -> (..., out)

    @staticmethod
    def backward(ctx, grad_y):
        grad_x = None
        if ctx.needs_input_grad[0]:
            # (..., out) @ (out, in) -> (..., in): dequantized again, not saved
            grad_x = grad_y @ _dequantize(ctx.fmt, ctx.saved_tensors, grad_y.dtype)
        return (grad_x, None, None) + (None,) * len(ctx.saved_tensors)


_4BIT_NAMES = ("packed", "absmax", "code", "nested_absmax", "nested_code", "offset")


class QuantLinear(nn.Module):
    """A frozen ``nn.Linear`` whose weight lives only in quantized form (buffers, no parameters).

    Buffers, 4-bit formats: ``packed`` uint8 (n/2,), ``absmax`` (n/blocksize,) float32 or, with
    double quantization, uint8 codes plus ``nested_absmax`` float32 (n/(blocksize·256),),
    ``nested_code`` float32 (256,) and ``offset`` float32 (); ``code`` float32 (16,).
    ``int8``: ``qweight`` int8 (out, in) and ``row_absmax`` float32 (out,). Optional ``bias`` in
    the original weight dtype. Construct with :meth:`from_linear` or :meth:`from_weight`; the
    constructor itself makes an empty layer of the given format (what loading fills in).

    Introduced in lesson 9, section "1. One layer, stored in 4 bits".
    """

    def __init__(self, fmt: BaseFormat, bias: bool, device: torch.device | str | None = None):
        super().__init__()
        self.fmt = fmt
        # a plain attribute, not a property: every forward compares the input's dtype with it
        self.compute_dtype: torch.dtype = dtype_from_name(fmt.compute_dtype)
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
        weight_dtype = dtype_from_name(fmt.weight_dtype)
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
        check_base_quant_type(quant_type)
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
            for name in _4BIT_NAMES:
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
        """The stored weight: ``(qweight, row_absmax)`` for int8, else ``(packed, absmax, code,
        nested_absmax, nested_code, offset)`` with ``None`` for the nested three without double
        quantization. Read from the buffer table directly (called on every forward)."""
        buffers = self._buffers
        if self.fmt.quant_type == "int8":
            return (buffers["qweight"], buffers["row_absmax"])
        return tuple(buffers.get(name) for name in _4BIT_NAMES)

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
            dtype=dtype_from_name(self.fmt.weight_dtype),
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
        x = x.to(self.compute_dtype)  # (..., in)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return _DequantLinear.apply(x, bias, self.fmt, *self.stored_tensors())  # (..., out)

    def extra_repr(self) -> str:
        f = self.fmt
        return (
            f"in_features={f.in_features}, out_features={f.out_features}, "
            f"quant_type={f.quant_type}, double_quant={f.double_quant}, "
            f"compute_dtype={f.compute_dtype}"
        )
