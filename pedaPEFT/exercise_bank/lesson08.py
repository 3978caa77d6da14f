"""Lesson 8 exercises: double quantization of the absmax constants, and the bits it stores.

Compared with ``quant.quantize_blockwise_8bit`` (after subtracting the mean, as
``quant.quantize_4bit`` does), ``quant.bits_per_parameter`` and ``quant.dequantize_absmax`` on
seeded random weights; known wrong variants are recognised and named.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import product

import torch

from pedaPEFT import quant
from pedaPEFT.exercise_bank.base import Exercise, Mistake
from pedaPEFT.exercise_bank.tensor_checks import call, close, finite, seeded, tensor

# --------------------------------------------------------------------------- double quantize


def _absmax_cases() -> list[tuple[torch.Tensor, int]]:
    """(first-level absmax, dq_blocksize): full blocks, a partial last block, another size."""
    g = seeded(8)
    absmax = []
    for numel in (512 * 64, 600 * 64, 300 * 64):
        weights = torch.randn(numel, generator=g) * 0.02
        absmax.append(quant.quantize_4bit(weights, double_quant=False).absmax)
    return [(absmax[0], 256), (absmax[1], 256), (absmax[2], 128)]


def _near_tie_only(got: torch.Tensor, ref: torch.Tensor, scaled: torch.Tensor,
                   code: torch.Tensor) -> bool:
    """True when codes differ only for values within a hair of a midpoint between levels."""
    differ = got != ref
    if not bool(differ.any()):
        return True
    midpoints = (code[:-1] + code[1:]) / 2
    distance = (scaled[differ, None] - midpoints[None, :]).abs().amin(dim=1)
    return bool(((got - ref).abs()[differ] <= 1).all()) and bool((distance < 1e-6).all())


def check_double_quantize(answer: Callable) -> None:
    """The student's ``double_quantize(absmax, blocksize) -> (codes, scales, offset)``."""
    code = quant.dynamic_code()
    for absmax, blocksize in _absmax_cases():
        n = absmax.numel()
        result = call(answer, absmax.clone(), blocksize,
                      when_it_fails=f"double_quantize fails for {n} absmax values and blocksize "
                      f"{blocksize}" + ("" if n % blocksize == 0 else
                                        ": the last block of the centred values is shorter"))
        if not isinstance(result, tuple | list) or len(result) != 3:
            raise Mistake("return a tuple (codes, scales, offset) of 3 values")
        codes, scales, offset = result
        codes = tensor(codes, "codes", dtype=torch.uint8,
                       hint="one uint8 index into quant.dynamic_code() per absmax value")
        codes = tensor(codes.reshape(-1), "codes", shape=(n,))
        offset = torch.as_tensor(offset, dtype=torch.float32).reshape(-1)
        if offset.numel() != 1:
            raise Mistake("the offset is one number: the mean of all absmax values")
        ref_offset = absmax.mean()
        ref_codes, ref_scales = quant.quantize_blockwise_8bit(absmax - ref_offset, blocksize)
        if float(offset[0]) == 0.0 or not close(offset[0], ref_offset, rtol=1e-5):
            raise Mistake("the mean was not subtracted: the offset is the mean absmax, and the "
                          "centred values absmax - offset are what is quantized")
        scales = tensor(scales, "scales").reshape(-1).float()
        if scales.numel() == 1 and ref_scales.numel() > 1:
            raise Mistake(f"one float32 scale per block of {blocksize} centred values, not one "
                          "for all of them")
        if scales.numel() != ref_scales.numel():
            raise Mistake(f"one scale per block of {blocksize} centred values: ceil(n / "
                          "blocksize) of them")
        finite(scales, "scales", "a scale is max |centred value| over its block")
        if not close(scales, ref_scales, rtol=1e-5):
            raise Mistake("each scale is max |absmax - offset| over its block of the centred "
                          "values")
        centred = absmax - ref_offset
        scaled = centred / ref_scales.repeat_interleave(blocksize)[:n]
        got, ref = codes.long(), ref_codes.long()
        if torch.equal(got, ref) or _near_tie_only(got, ref, scaled, code):
            continue
        linear = torch.round(scaled * 127).long() + 127
        if torch.equal(got, linear) or torch.equal(got, linear + 1):
            raise Mistake("use the nearest level of the dynamic map quant.dynamic_code() (256 "
                          "levels, fine near 0), not evenly spaced int8 steps")
        raise Mistake("the codes differ from the index of the nearest dynamic-map level of "
                      "each centred value divided by its block's scale")


# --------------------------------------------------------------------------- bit count


def check_bits_per_parameter(answer: Callable) -> None:
    """The student's ``bits_per_parameter(blocksize, double_quant, dq_blocksize)``."""
    grid = list(product((32, 64, 128, 256), (False, True), (128, 256)))
    for blocksize, double_quant, dq_blocksize in grid:
        got = call(answer, blocksize, double_quant, dq_blocksize,
                   when_it_fails=f"bits_per_parameter({blocksize}, {double_quant}, "
                   f"{dq_blocksize}) fails")
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if isinstance(got, bool) or not isinstance(got, int | float):
            raise Mistake(f"return a number of bits, got {type(got).__name__}")
        ref = quant.bits_per_parameter(blocksize, double_quant, dq_blocksize)
        if abs(got - ref) <= 1e-9 * ref:
            continue
        if abs(got + 4 - ref) <= 1e-9 * ref:
            raise Mistake("the 4 bits of each code are missing: the constants come on top of "
                          "the 4-bit codes")
        if double_quant:
            if abs(got - quant.bits_per_parameter(blocksize, False)) <= 1e-9:
                raise Mistake("with double_quant=True each block stores an 8-bit code, not a "
                              "32-bit absmax")
            if abs(got - (4 + 8 / blocksize + 32 / dq_blocksize)) <= 1e-9:
                raise Mistake("a second-level float32 scale is shared by dq_blocksize blocks, "
                              "that is by blocksize * dq_blocksize parameters")
        elif abs(got - quant.bits_per_parameter(blocksize, True, dq_blocksize)) <= 1e-9:
            raise Mistake("with double_quant=False each block stores a float32 absmax "
                          "(32 bits), and there is no second level")
        raise Mistake(f"wrong count for blocksize={blocksize}, double_quant={double_quant}, "
                      f"dq_blocksize={dq_blocksize}: add up the bits stored per parameter")


# --------------------------------------------------------------------------- rebuild absmax


def _states() -> list[quant.QuantState]:
    g = seeded(80)
    return [
        quant.quantize_4bit(torch.randn(300, 200, generator=g)),
        quant.quantize_4bit(torch.randn(64, 512, generator=g) * 0.02, blocksize=32,
                            dq_blocksize=128),
    ]


def check_rebuild_absmax(answer: Callable) -> None:
    """The student's ``rebuild_absmax(state)``: the float32 absmax of every block."""
    for state in _states():
        result = call(answer, state, when_it_fails="rebuild_absmax fails on a double-quantized "
                      "QuantState (absmax holds uint8 codes)")
        n = state.absmax.numel()
        got = tensor(result, "the rebuilt absmax").reshape(-1)
        got = tensor(got, "the rebuilt absmax", shape=(n,), hint="one absmax per block")
        ref = quant.dequantize_absmax(state)
        if close(got.float(), ref, rtol=1e-6):
            continue
        values = state.nested_code[state.absmax.long()]
        block = torch.arange(n) // state.dq_blocksize
        scales = state.nested_absmax[block]
        if close(got.float(), values * scales, rtol=1e-5):
            raise Mistake("add the offset back: the centred values were absmax - offset")
        cyclic = state.nested_absmax[torch.arange(n) % state.nested_absmax.numel()]
        if close(got.float(), values * cyclic + state.offset, rtol=1e-5):
            raise Mistake("absmax j belongs to second-level block j // dq_blocksize, not "
                          "j % n_blocks")
        if close(got.float(), state.absmax.float() * scales + state.offset, rtol=1e-5):
            raise Mistake("the stored absmax are 8-bit codes: look each up in nested_code first")
        raise Mistake("the values differ from nested_code[code_j] * nested_absmax[j // "
                      "dq_blocksize] + offset")


EXERCISES: list[Exercise] = [
    Exercise(
        id="08-double-quant",
        lesson=8,
        title="double_quantize(absmax, blocksize): 8-bit codes, second-level scales and offset",
        kind="code",
        run=check_double_quantize,
    ),
    Exercise(
        id="08-bits-per-parameter",
        lesson=8,
        title="bits_per_parameter(blocksize, double_quant, dq_blocksize): the stored bit count",
        kind="code",
        run=check_bits_per_parameter,
    ),
    Exercise(
        id="08-rebuild-absmax",
        lesson=8,
        title="rebuild_absmax(state): the first-level absmax from a double-quantized state",
        kind="code",
        run=check_rebuild_absmax,
    ),
]
