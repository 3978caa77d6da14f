"""Quantization from absmax int8 to NF4 with double quantization.

The lessons 6-8 build every piece here step by step; this module is the one source of truth for
the code tables, the packing order and the storage layout.

Notation. A tensor ``x`` is flattened row-major and cut into contiguous blocks of ``B`` elements
(the last block may be shorter). For block ``j`` the *absmax* is ``a_j = max_i |x_i|``.

* Absmax integer quantization with ``b`` bits (QLoRA paper, Eq. 1-2, written correctly)::

      c = (2^(b-1) - 1) / absmax(x)        q = round(c * x)  in [-(2^(b-1)-1), 2^(b-1)-1]
      dequant(c, q) = q / c

* 4-bit code quantization (NF4 / FP4): ``s_i = x_i / a_j`` lies in [-1, 1]; the stored 4-bit
  index is the nearest entry of a 16-value table ``code`` (ties go to the lower value), and
  ``dequant_i = code[q_i] * a_j``. Two indices share a byte: element ``2i`` in the high nibble.
* Double quantization: the absmax values themselves are quantized. Their mean ``m`` is
  subtracted, the centred values are cut into blocks of 256 and quantized with the signed 8-bit
  dynamic map (one float32 scale per 256 absmax values); ``a_j ~ dyn[qa_j] * A_k + m``.

The arithmetic follows bitsandbytes 0.50 (CPU backend) bit for bit, in pure torch ops, so it
runs the same on CPU and CUDA tensors:

* scaling multiplies by the float32 reciprocal ``1 / max(a_j, 1e-38)``, except the trailing
  partial block, which divides; results are clamped to [-1, 1];
* the nearest code is found with ``torch.bucketize`` on the float32 midpoints of the sorted code;
* dequantization multiplies in float32 and casts to the original dtype last.

Two places where bitsandbytes' backends disagree, and what this module does:

* **All-zero block.** bitsandbytes' CUDA kernels compute ``0 * (1/0) = NaN`` and store nibble 0
  (value -1, so the byte is 0x00); its CPU backend clamps the absmax at 1e-38 and stores
  nibble 7 for NF4 (the exact zero, byte 0x77). Here: the CPU convention, on every device; the
  stored absmax is the true 0.0 (bitsandbytes' CPU backend stores the clamped 1e-38 for a
  trailing *partial* all-zero block). Every convention dequantizes to zeros, and states written
  by either backend dequantize correctly here.
* **Second-level rounding.** bitsandbytes' CUDA kernels pick the exact nearest 8-bit code; its
  CPU backend uses a 65,536-entry lookup table that rounds about 0.2 % of the absmax values to a
  neighbouring code. Here ``dq_rounding="nearest"`` (default, identical on CPU and CUDA) or
  ``dq_rounding="cpu_lut"`` (reproduces bitsandbytes' CPU bytes).

Smaller CUDA-kernel differences, not reproduced: bitsandbytes compiles its kernels with fast
math (an approximate reciprocal, so a value within about one ulp of a threshold can take the
neighbouring code), and its FP4 kernel decides on ``|x|`` with truncated decimal thresholds
(negative ties go towards zero). Here the IEEE reciprocal and the float32 midpoints are used on
every device, and the offset (the mean absmax) is always summed on the CPU, so a CUDA tensor
gets exactly the bytes its CPU copy gets.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields, replace
from functools import cache, lru_cache

import numpy as np
import torch

from pedaPEFT.kernels import check_4bit_layout

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DQ_ROUNDINGS = ("nearest", "cpu_lut")
NF4_OFFSET = 0.9677083  # bitsandbytes' create_normal_map(offset=0.9677083, use_extra_value=True)
_TINY = 1e-38  # lower clamp of an absmax before taking its reciprocal (bitsandbytes' CPU backend)
_LUT_SIZE = 65536
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# --------------------------------------------------------------------------- input checks


def _check_float_tensor(x: object, name: str, check_finite: bool = True) -> torch.Tensor:
    """Raise a clear error unless ``x`` is a non-empty (finite) fp32/bf16/fp16 tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have dtype float32, bfloat16 or float16, got {x.dtype} "
            "(integer and boolean tensors cannot be quantized)"
        )
    if x.numel() == 0:
        raise ValueError(f"{name} is empty; quantization needs at least one element")
    if check_finite:
        _check_finite(x, name)
    return x


def _check_finite(x: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf; only finite values can be quantized")


def _is_integer(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _check_bits(bits: object) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 2 to 8, got {bits!r}")
    return bits


def _check_blocksize(blocksize: object, name: str = "blocksize") -> int:
    if isinstance(blocksize, bool) or blocksize not in BLOCKSIZES:
        raise ValueError(f"{name} must be one of {BLOCKSIZES}, got {blocksize!r}")
    return int(blocksize)


def _check_quant_type(quant_type: object) -> str:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    return str(quant_type)


# --------------------------------------------------------------------------- absmax integers


def _absmax_scale(absmax: torch.Tensor, qmax: int) -> torch.Tensor:
    """``qmax / absmax``: 1 for an all-zero block, capped at the largest float32 (tiny absmax)."""
    largest = torch.finfo(torch.float32).max
    scale = (qmax / absmax.clamp(min=_TINY)).clamp(max=largest)
    return torch.where(absmax > 0, scale, torch.ones_like(scale))


def absmax_quantize(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax quantization of a whole tensor to signed ``bits``-bit integers.

    ``c = (2^(bits-1) - 1) / max|x|`` and ``q = round(c * x)`` (round half to even), so that
    ``q`` lies in ``[-(2^(bits-1)-1), 2^(bits-1)-1]`` (for int8: [-127, 127]). An all-zero
    tensor gets ``c = 1`` (any scale reproduces it). Returns ``(q, c)``: ``q`` is int8 with the
    shape of ``x``, ``c`` a float32 scalar tensor. Invert with :func:`absmax_dequantize`.
    """
    _check_float_tensor(x, "x")
    q, scale = blockwise_absmax_quantize(x, bits=bits, blocksize=x.numel())
    return q, scale[0]


def absmax_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`absmax_quantize`: ``q / c`` in float32."""
    if not isinstance(q, torch.Tensor) or not _is_integer(q.dtype):
        raise TypeError("q must be an integer torch.Tensor from absmax_quantize")
    return q.float() / torch.as_tensor(scale, dtype=torch.float32, device=q.device)


def blockwise_absmax_quantize(
    x: torch.Tensor, bits: int = 8, blocksize: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax quantization per block of ``blocksize`` consecutive elements (any bit width 2-8).

    The flattened tensor is cut into ``ceil(n / blocksize)`` blocks (the last may be shorter);
    block ``j`` gets its own ``c_j = (2^(bits-1) - 1) / max|x_block|`` (1 for an all-zero block)
    and ``q = round(c_j * x)``. One outlier then only coarsens its own block. Returns ``(q, c)``:
    int8 codes with the shape of ``x`` and float32 scales of shape ``(n_blocks,)``.
    """
    _check_float_tensor(x, "x")
    bits = _check_bits(bits)
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive integer, got {blocksize!r}")
    qmax = 2 ** (bits - 1) - 1
    flat = x.reshape(-1).float()
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    absmax = padded.abs().amax(dim=1)
    scale = _absmax_scale(absmax, qmax)
    q = torch.round(padded * scale[:, None]).clamp_(-qmax, qmax).to(torch.int8)
    return q.reshape(-1)[:n].reshape(x.shape), scale


def blockwise_absmax_dequantize(
    q: torch.Tensor, scale: torch.Tensor, blocksize: int = 64
) -> torch.Tensor:
    """Inverse of :func:`blockwise_absmax_quantize`: ``q_i / c_j`` in float32, shape of ``q``."""
    if not isinstance(q, torch.Tensor) or not _is_integer(q.dtype):
        raise TypeError("q must be an integer torch.Tensor from blockwise_absmax_quantize")
    n = q.numel()
    n_blocks = -(-n // blocksize)
    if scale.numel() != n_blocks:
        raise ValueError(
            f"scale has {scale.numel()} entries but q with blocksize {blocksize} needs {n_blocks}"
        )
    flat = torch.nn.functional.pad(q.reshape(-1).float(), (0, n_blocks * blocksize - n))
    out = flat.view(n_blocks, blocksize) / scale.float().reshape(-1, 1)
    return out.reshape(-1)[:n].reshape(q.shape)


@dataclass
class Int8State:
    """An int8 weight with absmax scales, row-wise (LLM.int8 style) or per block.

    ``q`` int8 with the weight's shape; ``absmax`` float32, one per row of a 2-D weight
    (``blocksize=None``) or one per block of the flattened weight. Dequantization is
    ``W ~ q * (absmax / 127)``; for row-wise states a linear layer can use
    ``x @ W.T ~ (x @ q.T) * (absmax / 127)``.
    """

    q: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int | None

    def to(self, device: torch.device | str) -> Int8State:
        """Return a copy with every tensor on ``device``."""
        return replace(self, q=self.q.to(device), absmax=self.absmax.to(device))


def quantize_int8(w: torch.Tensor, blocksize: int | None = None) -> Int8State:
    """Absmax int8 quantization for a frozen base weight.

    ``blocksize=None``: one absmax per row of the 2-D weight ``w`` (out_features, in_features),
    ``q = round(w * (127 / absmax_row))``. ``blocksize=B`` (one of ``BLOCKSIZES``): one absmax
    per block of ``B`` elements of the flattened weight, any shape. All-zero rows or blocks
    give ``q = 0`` and ``absmax = 0``.
    """
    _check_float_tensor(w, "w")
    if blocksize is None:
        if w.dim() != 2:
            raise ValueError(
                f"row-wise int8 (blocksize=None) needs a 2-D weight, got shape {tuple(w.shape)}"
            )
        rows = w.float()
    else:
        blocksize = _check_blocksize(blocksize)
        flat = w.reshape(-1).float()
        n_blocks = -(-flat.numel() // blocksize)
        rows = torch.nn.functional.pad(flat, (0, n_blocks * blocksize - flat.numel()))
        rows = rows.view(n_blocks, blocksize)
    absmax = rows.abs().amax(dim=1)
    scale = _absmax_scale(absmax, 127)
    q = torch.round(rows * scale[:, None]).clamp_(-127, 127).to(torch.int8)
    q = q.reshape(-1)[: w.numel()].reshape(w.shape)
    return Int8State(q=q, absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize)


def dequantize_int8(state: Int8State) -> torch.Tensor:
    """``q * (absmax / 127)`` in float32, cast to the original dtype and shape."""
    if state.blocksize is None:
        out = state.q.float() * (state.absmax / 127.0)[:, None]
    else:
        n = state.q.numel()
        n_blocks = state.absmax.numel()
        flat = torch.nn.functional.pad(
            state.q.reshape(-1).float(), (0, n_blocks * state.blocksize - n)
        )
        out = (flat.view(n_blocks, -1) * (state.absmax / 127.0)[:, None]).reshape(-1)[:n]
    return out.reshape(state.shape).to(state.dtype)


# --------------------------------------------------------------------------- code tables


@cache
def _nf4_code_cached() -> torch.Tensor:
    from scipy.stats import norm  # imported here: scipy.stats is slow to import

    # Probabilities are float32, exactly as bitsandbytes computes them with torch.linspace.
    p_pos = torch.linspace(NF4_OFFSET, 0.5, 9)[:-1].numpy()
    p_neg = torch.linspace(NF4_OFFSET, 0.5, 8)[:-1].numpy()
    positive = norm.ppf(p_pos)  # 8 quantiles above the median
    negative = -norm.ppf(p_neg)  # 7 mirrored quantiles below it
    values = np.concatenate([negative, [0.0], positive]).astype(np.float32)
    values = torch.from_numpy(values).sort().values
    return values / values.max()


def nf4_code() -> torch.Tensor:
    """The 16 NF4 levels (float32, ascending; index = 4-bit nibble).

    Built like bitsandbytes' ``create_normal_map(0.9677083, use_extra_value=True)``: standard
    normal quantiles ``Phi^-1(p)`` at 8 evenly spaced float32 probabilities from 0.9677083 down
    to (not including) 0.5, and the negatives of 7 quantiles from 0.9677083 to (not including)
    0.5, plus an exact 0, normalised by the largest value so the ends are exactly -1 and 1.
    """
    return _nf4_code_cached().clone()


def fp4_code() -> torch.Tensor:
    """The 16 FP4 levels (float32) in nibble order, as bitsandbytes stores them.

    Bit 3 is the sign; the 3 low bits index the magnitudes {0, 0.0625, 8, 12, 4, 6, 2, 3}
    (an E2M1-like format with a subnormal 0.0625), divided by 12 so the largest is 1.
    Nibble 8 decodes to -0.0.
    """
    magnitudes = torch.tensor([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0])
    return torch.cat([magnitudes, -magnitudes]) / 12.0


@cache
def _dynamic_code_cached() -> torch.Tensor:
    values: list[float] = [0.0, 1.0]
    for exponent in range(7):
        bounds = torch.linspace(0.1, 1, 2**exponent + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += ((10 ** (exponent - 6)) * means).tolist()
        values += (-(10 ** (exponent - 6)) * means).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_code() -> torch.Tensor:
    """The signed 8-bit dynamic map (256 float32 values, ascending) used for double quantization.

    For ``e = 0..6`` the fraction ``f`` takes ``2^e`` values, the midpoints of
    ``linspace(0.1, 1, 2^e + 1)``, and the level is ``±10^(e-6) * f``; add 0 and 1. That is
    127 negative values (the smallest is -0.99297, there is no -1), 0, and 128 positive values
    up to 1: fine steps near zero, coarse steps near ±1, like a float with a varying exponent.
    """
    return _dynamic_code_cached().clone()


def _code_for(quant_type: str, device: torch.device) -> torch.Tensor:
    return (nf4_code() if quant_type == "nf4" else fp4_code()).to(device)


def nearest_code_index(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of ``code`` for each value (ties go to the lower value).

    Sorts the code, takes the float32 midpoints between neighbours and counts how many
    midpoints lie strictly below each value (``torch.bucketize``), then maps back to the
    code's own order. Returns int64 indices.
    """
    order = torch.argsort(code, stable=True)
    sorted_code = code[order]
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2
    index = torch.bucketize(scaled, midpoints)
    if torch.equal(order, torch.arange(code.numel(), device=code.device)):
        return index  # already sorted (NF4, the dynamic map): skip the remapping pass
    return order[index]


# --------------------------------------------------------------------------- packing


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit indices (0..15) two per byte: element ``2i`` in the high nibble.

    ``codes`` is flattened; an odd count is padded with a 0 nibble. Returns uint8 of shape
    ``(ceil(n/2),)``. :func:`quantize_4bit` pads with the code of 0.0 instead (it appends a
    0.0 before coding), as bitsandbytes does.
    """
    if not isinstance(codes, torch.Tensor) or not _is_integer(codes.dtype):
        raise TypeError("codes must be an integer torch.Tensor of 4-bit indices (0..15)")
    flat = codes.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) > 15):
        raise ValueError("codes must lie in 0..15 to fit in 4 bits")
    flat = flat.to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return (flat[0::2] << 4) | flat[1::2]


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_4bit`: the first ``n`` nibbles as uint8 ``(n,)``, high first."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError("packed must be a uint8 torch.Tensor")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if packed.numel() != (n + 1) // 2:
        raise ValueError(
            f"packed has {packed.numel()} bytes but {n} elements need ceil(n/2) = {(n + 1) // 2}"
        )
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1)[:n]


# --------------------------------------------------------------------------- 8-bit blockwise (DQ)


@cache
def _cpu_lut(code_bytes: bytes) -> torch.Tensor:
    """bitsandbytes' CPU 8-bit quantizer table: bin ``i`` -> count of midpoints below its centre."""
    code = torch.frombuffer(bytearray(code_bytes), dtype=torch.float32)
    midpoints = (0.5 * (code[:-1] + code[1:])).numpy()
    centres = -1.0 + 2.0 * np.arange(_LUT_SIZE, dtype=np.float32) / np.float32(_LUT_SIZE - 1)
    centres = centres.astype(np.float32)
    return torch.from_numpy(np.searchsorted(midpoints, centres, side="left").astype(np.uint8))


def _scale_blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax per block and the values scaled into [-1, 1] (float32, flattened, length n).

    Full blocks multiply by ``1 / max(absmax, 1e-38)``; a trailing partial block divides by it.
    """
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    inverse = 1.0 / absmax.clamp(min=_TINY)
    scaled = (blocks * inverse[:, None]).clamp_(-1, 1).reshape(-1)
    if full < n:
        tail = flat[full:]
        tail_absmax = tail.abs().amax()
        absmax = torch.cat([absmax, tail_absmax[None]])
        scaled = torch.cat([scaled, (tail / tail_absmax.clamp(min=_TINY)).clamp_(-1, 1)])
    return absmax, scaled


def quantize_blockwise_8bit(
    x: torch.Tensor, blocksize: int = 256, rounding: str = "nearest"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization with the signed dynamic map (the second level of DQ).

    Returns ``(codes, absmax)``: uint8 indices into :func:`dynamic_code` (shape of ``x``,
    flattened) and float32 absmax per block. ``rounding="nearest"`` picks the exact nearest
    level; ``"cpu_lut"`` reproduces bitsandbytes' CPU kernel, which looks the value up in a
    65,536-bin table (bin ``round((s + 1) / 2 * 65535)``) instead of searching.
    """
    _check_float_tensor(x, "x", check_finite=False)
    _check_blocksize(blocksize)
    if rounding not in DQ_ROUNDINGS:
        raise ValueError(f"rounding must be one of {DQ_ROUNDINGS}, got {rounding!r}")
    code = dynamic_code().to(x.device)
    absmax, scaled = _scale_blocks(x.reshape(-1).float(), blocksize)
    _check_finite(absmax, "x")  # a block's absmax is NaN or Inf exactly when the block is
    if rounding == "nearest":
        codes = nearest_code_index(scaled, code).to(torch.uint8)
    else:
        lut = _cpu_lut(_dynamic_code_cached().numpy().tobytes()).to(x.device)
        bins = ((scaled + 1.0) * 0.5 * (_LUT_SIZE - 1) + 0.5).to(torch.int64)
        codes = lut[bins]
        zero_blocks = absmax == 0  # the CPU kernel writes code 0 for an all-zero block
        if bool(zero_blocks.any()):
            in_zero_block = zero_blocks.repeat_interleave(blocksize)[: codes.numel()]
            codes = torch.where(in_zero_block, torch.zeros_like(codes), codes)
    return codes, absmax


def dequantize_blockwise_8bit(
    codes: torch.Tensor, absmax: torch.Tensor, blocksize: int = 256
) -> torch.Tensor:
    """``dynamic_code()[codes_i] * absmax_j`` in float32 (flattened)."""
    values = dynamic_code().to(codes.device)[codes.reshape(-1).long()]
    return _times_block_scale(values, absmax, blocksize)


def _times_block_scale(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Multiply element ``i`` of a flat float32 tensor by ``absmax[i // blocksize]`` (in place)."""
    n = values.numel()
    full = n - n % blocksize
    values[:full].view(-1, blocksize).mul_(absmax[: full // blocksize, None])
    if full < n:
        values[full:].mul_(absmax[-1])
    return values


# --------------------------------------------------------------------------- 4-bit


@dataclass
class QuantState:
    """A 4-bit quantized tensor and everything needed to dequantize it.

    Without double quantization ``absmax`` holds one float32 per block. With it, ``absmax`` holds
    uint8 indices into ``nested_code``, and the float32 absmax of block ``j`` is rebuilt as
    ``nested_code[absmax[j]] * nested_absmax[j // dq_blocksize] + offset``.
    """

    packed: torch.Tensor  # uint8, shape (ceil(n/2),): element 2i in the high nibble
    absmax: torch.Tensor  # float32 (n_blocks,), or uint8 (n_blocks,) codes with double quant
    shape: torch.Size  # original shape
    dtype: torch.dtype  # original dtype (fp32, bf16, fp16)
    blocksize: int  # 64 by default
    quant_type: str  # "nf4" | "fp4"
    code: torch.Tensor  # float32 (16,) the 4-bit code table
    offset: torch.Tensor | None = None  # float32 scalar: mean of absmax (double quant only)
    nested_absmax: torch.Tensor | None = None  # float32 (ceil(n_blocks/dq_blocksize),)
    nested_code: torch.Tensor | None = None  # float32 (256,) signed dynamic map
    dq_blocksize: int | None = None  # 256

    @property
    def double_quant(self) -> bool:
        """True when the absmax values are themselves quantized."""
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        """Number of elements of the original tensor."""
        return math.prod(self.shape)

    def to(self, device: torch.device | str) -> QuantState:
        """Return a copy with every tensor on ``device``."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)


def quantize_4bit(
    w: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    dq_blocksize: int = 256,
    dq_rounding: str = "nearest",
) -> QuantState:
    """Quantize a float tensor of any shape to 4-bit NF4 or FP4 codes, blockwise.

    The tensor is flattened row-major into blocks of ``blocksize``; each block is scaled by its
    absmax into [-1, 1] and every value becomes the index of the nearest code entry. With
    ``double_quant`` the absmax values are then quantized to 8 bits (mean subtracted, blocks of
    ``dq_blocksize``, dynamic map, float32 second-level scales); ``dq_rounding`` is described in
    the module docstring. Works on CPU and CUDA tensors, for float32, bfloat16 and float16.
    """
    _check_float_tensor(w, "w", check_finite=False)
    quant_type = _check_quant_type(quant_type)
    blocksize = _check_blocksize(blocksize)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be True or False, got {double_quant!r}")
    if double_quant:
        dq_blocksize = _check_blocksize(dq_blocksize, "dq_blocksize")
        if dq_rounding not in DQ_ROUNDINGS:
            raise ValueError(f"dq_rounding must be one of {DQ_ROUNDINGS}, got {dq_rounding!r}")
    code = _code_for(quant_type, w.device)
    absmax, scaled = _scale_blocks(w.reshape(-1).float(), blocksize)
    _check_finite(absmax, "w")  # a block's absmax is NaN or Inf exactly when the block is
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    indices = nearest_code_index(scaled, code).to(torch.uint8)
    packed = (indices[0::2] << 4) | indices[1::2]
    state = QuantState(
        packed=packed,
        absmax=absmax,
        shape=w.shape,
        dtype=w.dtype,
        blocksize=blocksize,
        quant_type=quant_type,
        code=code,
    )
    if not double_quant:
        return state
    # The mean is taken on the CPU so that CPU and CUDA give the same float32 offset.
    offset = absmax.cpu().mean().to(w.device)
    qabsmax, nested_absmax = quantize_blockwise_8bit(absmax - offset, dq_blocksize, dq_rounding)
    return replace(
        state,
        absmax=qabsmax,
        offset=offset,
        nested_absmax=nested_absmax,
        nested_code=dynamic_code().to(w.device),
        dq_blocksize=dq_blocksize,
    )


def dequantize_absmax(state: QuantState) -> torch.Tensor:
    """The float32 first-level absmax of every block (rebuilt from the 8-bit codes with DQ)."""
    if not state.double_quant:
        return state.absmax.float()
    values = state.nested_code[state.absmax.long()]
    return _times_block_scale(values, state.nested_absmax, state.dq_blocksize) + state.offset


def _check_state(state: QuantState) -> None:
    """Check a QuantState's fields against each other (``kernels.check_4bit_layout``)."""
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a QuantState, got {type(state).__name__}")
    _check_quant_type(state.quant_type)
    _check_blocksize(state.blocksize, "state.blocksize")
    if state.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"state.dtype must be float32, bfloat16 or float16, got {state.dtype}")
    if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in state.shape):
        raise ValueError(f"state.shape must hold integers >= 0, got {tuple(state.shape)}")
    try:
        check_4bit_layout(state.packed.reshape(-1), state.absmax, state.code,
                          state.nested_absmax, state.nested_code, state.offset, state.numel,
                          state.blocksize, state.dq_blocksize)
    except (TypeError, ValueError) as error:
        raise type(error)(f"state: {error}") from None


def check_state_values(state: QuantState, where: str = "state") -> None:
    """Everything ``_check_state`` checks, and the values: code tables, scales and offset
    finite (a NaN code table or scale would make every weight of its block NaN).

    For states read from files; it reads every scale, so the hot path does not call it.
    Raises ``ValueError`` naming ``where`` and the field.
    """
    try:
        _check_state(state)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: {error}") from None
    for name in ("code", "absmax", "nested_code", "nested_absmax", "offset"):
        value = getattr(state, name)
        if value is not None and value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"{where}: {name} holds NaN or inf")


@lru_cache(maxsize=16)
def _two_byte_table(code_bytes: bytes, device: str) -> torch.Tensor:
    """Row ``b0 + 256 * b1`` holds the 4 values coded by bytes b0, b1: (65536, 4) float32."""
    code = torch.frombuffer(bytearray(code_bytes), dtype=torch.float32)
    index = torch.arange(65536)
    low_byte, high_byte = index & 255, index >> 8
    table = torch.stack(
        [code[low_byte >> 4], code[low_byte & 15], code[high_byte >> 4], code[high_byte & 15]], 1
    )
    return table.to(device)


def _decode_4bit(packed: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``code[nibble]`` for every nibble of ``packed``, high nibble first (float32, flat).

    Two bytes at a time are read as one little-endian 16-bit index into the 65,536 x 4
    ``table`` of :func:`_two_byte_table`, so one gather yields four values. On the CPU the
    gather is numpy's ``take`` (several times faster than torch's indexing kernel there);
    elsewhere ``embedding``. Both copy table rows exactly, so every device gives the same bits.
    """
    flat = packed.reshape(-1)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    flat = flat.contiguous()
    return _gather_numpy(flat, table) if flat.device.type == "cpu" else _gather_torch(flat, table)


def _gather_numpy(flat: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    rows = table.numpy().view(np.complex128).reshape(-1)  # one 16-byte item per table row
    index = flat.numpy().view(np.uint16)
    return torch.from_numpy(np.take(rows, index, mode="clip").view(np.float32))


def _gather_torch(flat: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    index = flat.view(torch.int16).int() & 0xFFFF
    return torch.nn.functional.embedding(index, table).reshape(-1)


def dequantize_4bit(state: QuantState) -> torch.Tensor:
    """``code[q_i] * absmax_j`` in float32, cast to the original dtype and reshaped."""
    _check_state(state)
    packed = state.packed.reshape(-1)
    table = _two_byte_table(state.code.float().cpu().numpy().tobytes(), str(packed.device))
    values = _decode_4bit(packed, table)[: state.numel]
    out = _times_block_scale(values, dequantize_absmax(state), state.blocksize)
    return out.to(state.dtype).reshape(state.shape)


FAKE_QUANT_METHODS = ("nf4", "fp4", "int4", "int8")


def fake_quantize(x: torch.Tensor, method: str = "nf4", blocksize: int = 64) -> torch.Tensor:
    """Quantize and dequantize at once: what a weight looks like after a round trip.

    ``"nf4"``/``"fp4"``: :func:`quantize_4bit` without double quantization; ``"int4"``/
    ``"int8"``: :func:`blockwise_absmax_quantize` with 4 or 8 bits (15 or 255 levels). Every
    method uses one float32 absmax per ``blocksize`` elements. Returns float32, shape of ``x``.
    """
    if method not in FAKE_QUANT_METHODS:
        raise ValueError(f"method must be one of {FAKE_QUANT_METHODS}, got {method!r}")
    if method in QUANT_TYPES:
        state = quantize_4bit(x, quant_type=method, blocksize=blocksize, double_quant=False)
        return dequantize_4bit(state).float()
    q, scale = blockwise_absmax_quantize(x, bits=int(method[3:]), blocksize=blocksize)
    return blockwise_absmax_dequantize(q, scale, blocksize)


# --------------------------------------------------------------------------- bit accounting


def bits_per_parameter(
    blocksize: int = 64, double_quant: bool = True, dq_blocksize: int = 256, bits: int = 4
) -> float:
    """Storage per parameter from the formula (asymptotically, tables not counted).

    Without double quantization: ``bits + 32 / blocksize`` (4.5 for 64). With it:
    ``bits + 8 / blocksize + 32 / (blocksize * dq_blocksize)`` (4.126953125 for 64 and 256).
    """
    if double_quant:
        return bits + 8 / blocksize + 32 / (blocksize * dq_blocksize)
    return bits + 32 / blocksize


def storage_bits(state: QuantState) -> dict[str, int]:
    """Bits held by each tensor of the state: ``numel * element size * 8``."""
    counts = {}
    for f in fields(state):
        value = getattr(state, f.name)
        if isinstance(value, torch.Tensor):
            counts[f.name] = value.numel() * value.element_size() * 8
    return counts


def storage_bits_per_parameter(state: QuantState) -> float:
    """All stored bits (packed codes, scales, offset, both code tables) per original element."""
    return sum(storage_bits(state).values()) / state.numel


# --------------------------------------------------------------------------- bitsandbytes interop


def to_bnb_state_dict(state: QuantState, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors a bitsandbytes ``Linear4bit`` stores for its weight, under ``prefix``.

    Keys ``weight`` (uint8, shape (ceil(n/2), 1)), ``weight.absmax``, ``weight.quant_map`` and,
    with double quantization, ``weight.nested_absmax`` and ``weight.nested_quant_map``; the
    non-tensor fields go as JSON bytes under ``weight.quant_state.bitsandbytes__<quant_type>``.
    """
    _check_state(state)
    meta: dict[str, object] = {
        "quant_type": state.quant_type,
        "blocksize": state.blocksize,
        "dtype": _DTYPE_NAMES[state.dtype],
        "shape": list(state.shape),
    }
    sd = {
        f"{prefix}weight": state.packed.reshape(-1, 1),
        f"{prefix}weight.absmax": state.absmax,
        f"{prefix}weight.quant_map": state.code,
    }
    if state.double_quant:
        sd[f"{prefix}weight.nested_absmax"] = state.nested_absmax
        sd[f"{prefix}weight.nested_quant_map"] = state.nested_code.clone()
        meta.update(
            nested_blocksize=state.dq_blocksize,
            nested_dtype="float32",
            nested_offset=state.offset.item(),
        )
    blob = json.dumps(meta).encode("utf-8")
    key = f"{prefix}weight.quant_state.bitsandbytes__{state.quant_type}"
    sd[key] = torch.tensor(list(blob), dtype=torch.uint8)
    return sd


def from_bnb_state_dict(sd: dict[str, torch.Tensor], prefix: str = "") -> QuantState:
    """Read the 4-bit weight of a bitsandbytes ``Linear4bit`` state dict into a QuantState."""
    blob_keys = [k for k in sd if k.startswith(f"{prefix}weight.quant_state.bitsandbytes__")]
    if len(blob_keys) != 1 or f"{prefix}weight" not in sd:
        raise ValueError(
            f"sd must hold '{prefix}weight' and one '{prefix}weight.quant_state.bitsandbytes__"
            "<nf4|fp4>' entry (a bitsandbytes Linear4bit state dict)"
        )
    blob_key = blob_keys[0]
    try:
        meta = json.loads(bytes(sd[blob_key].tolist()).decode("utf-8"))
    except (TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"sd[{blob_key!r}] must hold UTF-8 JSON bytes ({error})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"sd[{blob_key!r}] must hold a JSON object, got {type(meta).__name__}")
    missing = [k for k in ("quant_type", "blocksize", "dtype", "shape") if k not in meta]
    nested = [f"{prefix}weight.nested_absmax", f"{prefix}weight.nested_quant_map"]
    tensors = [f"{prefix}weight.absmax", f"{prefix}weight.quant_map"]
    if "nested_offset" in meta:
        missing += [k for k in ("nested_blocksize",) if k not in meta]
        tensors += nested
    missing += [k for k in tensors if k not in sd]
    if missing:
        raise ValueError(f"sd lacks {missing} (a bitsandbytes Linear4bit state dict has them)")
    dtypes = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
    if meta["dtype"] not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {meta['dtype']!r}")
    shape = meta["shape"]
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ValueError(f"shape must be a list of integers >= 0, got {shape!r}")
    if not all(isinstance(sd[k], torch.Tensor) for k in [f"{prefix}weight", *tensors]):
        raise ValueError(f"sd's entries {[f'{prefix}weight', *tensors]} must be tensors")
    packed = sd[f"{prefix}weight"]
    if packed.dtype != torch.uint8:
        packed = packed.contiguous().view(torch.uint8)
    state = QuantState(
        packed=packed.reshape(-1),
        absmax=sd[f"{prefix}weight.absmax"],
        shape=torch.Size(shape),
        dtype=dtypes[meta["dtype"]],
        blocksize=_check_blocksize(meta["blocksize"]),
        quant_type=_check_quant_type(meta["quant_type"]),
        code=sd[f"{prefix}weight.quant_map"],
    )
    if "nested_offset" in meta:
        offset, dq_blocksize = meta["nested_offset"], meta["nested_blocksize"]
        if isinstance(offset, bool) or not isinstance(offset, int | float):
            raise ValueError(f"nested_offset must be a number, got {offset!r}")
        if isinstance(dq_blocksize, bool) or not isinstance(dq_blocksize, int) or (
            dq_blocksize < 1
        ):
            raise ValueError(f"nested_blocksize must be an integer >= 1, got {dq_blocksize!r}")
        state = replace(
            state,
            offset=torch.tensor(float(offset), dtype=torch.float32, device=packed.device),
            nested_absmax=sd[f"{prefix}weight.nested_absmax"],
            nested_code=sd[f"{prefix}weight.nested_quant_map"],
            dq_blocksize=dq_blocksize,
        )
    check_state_values(state)
    state = replace(state, code=state.code.float())
    if state.double_quant:
        state = replace(state, nested_absmax=state.nested_absmax.float(),
                        nested_code=state.nested_code.float())
    _check_state(state)
    return state
