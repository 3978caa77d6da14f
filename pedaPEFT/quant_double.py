"""Double quantization and bit accounting (lesson 8).

Double quantization quantizes the 4-bit blocks' absmax values themselves: their mean ``m`` is
subtracted, the centred values are cut into blocks of 256 and quantized with the signed 8-bit
dynamic map (one float32 scale per 256 absmax values); ``a_j ~ dyn[qa_j] * A_k + m``. With
blocksize 64 this stores ``4 + 8/64 + 32/(64·256) = 4.127`` bits per weight instead of 4.5.

Second-level rounding: bitsandbytes' CUDA kernels pick the exact nearest 8-bit code; its CPU
backend uses a 65,536-entry lookup table that rounds about 0.2 % of the values to a
neighbouring code. Here ``rounding="nearest"`` (default, identical on CPU and CUDA) or
``rounding="cpu_lut"`` (reproduces bitsandbytes' CPU bytes).
"""

from __future__ import annotations

from dataclasses import fields
from functools import cache
from typing import TYPE_CHECKING

import numpy as np
import torch

from pedaPEFT.quant_absmax import (
    check_all_finite,
    check_blocksize,
    check_float_tensor,
    nearest_code_index,
    scale_blocks,
    times_block_scale,
)

if TYPE_CHECKING:
    from pedaPEFT.quant_4bit import QuantState

DQ_ROUNDINGS = ("nearest", "cpu_lut")
_LUT_SIZE = 65536


def dynamic_code(signed: bool = True) -> torch.Tensor:
    """The 8-bit dynamic map (256 float32 values, ascending): signed for double quantization
    and the first moment of 8-bit optimizers, unsigned for their second moment; lesson 8,
    section 2.

    A small floating-point format with a decimal exponent: for ``e = 0..6`` there are ``2^e``
    levels ``±10^(e-6) f`` (``2^(e+1)`` levels ``10^(e-6) f`` when unsigned, the sign bit
    becoming one more fraction bit), the fraction ``f`` taking the midpoints of
    ``linspace(0.1, 1, levels + 1)`` (float32, evenly spaced in (0.1, 1)); add 0 and 1.
    Signed: 127 negative values (the smallest is -0.99297, there is no -1), 0, and 128
    positive values up to 1. Unsigned: 0 and 255 positive values. Fine steps near zero,
    coarse steps near 1.

    Introduced in lesson 8, section "2. The second level, step by step".
    """
    levels: list[float] = [0.0, 1.0]
    for e in range(7):
        n_fractions = 2**e if signed else 2 ** (e + 1)
        edges = torch.linspace(0.1, 1, n_fractions + 1, dtype=torch.float32)
        f = (edges[:-1] + edges[1:]) / 2.0
        levels += ((10 ** (e - 6)) * f).tolist()  # positive levels of exponent e
        if signed:
            levels += (-(10 ** (e - 6)) * f).tolist()  # and their negatives
    return torch.tensor(sorted(levels), dtype=torch.float32)


@cache
def _cpu_lut(code_bytes: bytes) -> torch.Tensor:
    """bitsandbytes' CPU 8-bit quantizer table: bin ``i`` -> count of midpoints below its centre."""
    code = torch.frombuffer(bytearray(code_bytes), dtype=torch.float32)
    midpoints = (0.5 * (code[:-1] + code[1:])).numpy()
    centres = -1.0 + 2.0 * np.arange(_LUT_SIZE, dtype=np.float32) / np.float32(_LUT_SIZE - 1)
    centres = centres.astype(np.float32)
    return torch.from_numpy(np.searchsorted(midpoints, centres, side="left").astype(np.uint8))


def quantize_blockwise_8bit(
    x: torch.Tensor, blocksize: int = 256, rounding: str = "nearest"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization with the signed dynamic map (the second level of DQ;
    lesson 8, section 2).

    Returns ``(codes, absmax)``: uint8 indices into :func:`dynamic_code` (shape of ``x``,
    flattened) and float32 absmax per block. ``rounding="nearest"`` picks the exact nearest
    level; ``"cpu_lut"`` reproduces bitsandbytes' CPU kernel, which looks the value up in a
    65,536-bin table (bin ``round((s + 1) / 2 * 65535)``) instead of searching.

    Introduced in lesson 8, section "2. The second level, step by step".
    """
    check_float_tensor(x, "x", check_finite=False)
    check_blocksize(blocksize)
    if rounding not in DQ_ROUNDINGS:
        raise ValueError(f"rounding must be one of {DQ_ROUNDINGS}, got {rounding!r}")
    code = dynamic_code().to(x.device)
    absmax, scaled = scale_blocks(x.reshape(-1).float(), blocksize)
    check_all_finite(absmax, "x")  # a block's absmax is NaN or Inf exactly when the block is
    if rounding == "nearest":
        codes = nearest_code_index(scaled, code).to(torch.uint8)
    else:
        lut = _cpu_lut(dynamic_code().numpy().tobytes()).to(x.device)
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
    """``dynamic_code()[codes_i] * absmax_j`` in float32 (flattened).

    Introduced in lesson 8, section "2. The second level, step by step".
    """
    values = dynamic_code().to(codes.device)[codes.reshape(-1).long()]
    return times_block_scale(values, absmax, blocksize)


def dequantize_absmax(state: QuantState) -> torch.Tensor:
    """The float32 first-level absmax of every block (rebuilt from the 8-bit codes with DQ):
    ``nested_code[absmax_j] * nested_absmax[j // dq_blocksize] + offset``.

    Introduced in lesson 8, section "2. The second level, step by step".
    """
    if not state.double_quant:
        return state.absmax.float()
    values = state.nested_code[state.absmax.long()]
    return times_block_scale(values, state.nested_absmax, state.dq_blocksize) + state.offset




# --------------------------------------------------------------------------- bit accounting


def bits_per_parameter(
    blocksize: int = 64, double_quant: bool = True, dq_blocksize: int = 256, bits: int = 4
) -> float:
    """Storage per parameter from the formula (asymptotically, tables not counted); lesson 8,
    section 3.

    Without double quantization: ``bits + 32 / blocksize`` (4.5 for 64). With it:
    ``bits + 8 / blocksize + 32 / (blocksize * dq_blocksize)`` (4.126953125 for 64 and 256).

    Introduced in lesson 8, section "1. The arithmetic on the slide";
    used again in lessons 9 and 10.
    """
    if double_quant:
        return bits + 8 / blocksize + 32 / (blocksize * dq_blocksize)
    return bits + 32 / blocksize


def storage_bits(state: QuantState) -> dict[str, int]:
    """Bits held by each tensor of the state: ``numel * element size * 8``.

    Introduced in lesson 8, section "3. Bits counted on the stored tensors".
    """
    counts = {}
    for f in fields(state):
        value = getattr(state, f.name)
        if isinstance(value, torch.Tensor):
            counts[f.name] = value.numel() * value.element_size() * 8
    return counts


def storage_bits_per_parameter(state: QuantState) -> float:
    """All stored bits (packed codes, scales, offset, both code tables) per original element.

    Introduced in lesson 8, section "3. Bits counted on the stored tensors".
    """
    return sum(storage_bits(state).values()) / state.numel
