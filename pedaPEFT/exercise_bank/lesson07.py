"""Lesson 7 exercises: the NormalFloat table from the five steps, NF4 quantization and packing.

The table is compared bit for bit with ``quant.nf4_code()`` (and, for other bit widths, with
the same construction at 2, 3 and 5 bits); quantization and dequantization are compared with
``quant.quantize_4bit`` / ``quant.dequantize_4bit`` without double quantization on seeded
random tensors. Known wrong variants are recognised and named.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from pedaPEFT import quant
from pedaPEFT.exercise_bank.base import Exercise, Mistake
from pedaPEFT.exercise_bank.tensor_checks import call, close, finite, pair, seeded, tensor

# --------------------------------------------------------------------------- the table


def normal_float_reference(bits: int, offset: float = quant.NF4_OFFSET,
                           float64_probabilities: bool = False) -> torch.Tensor:
    """The 2^bits-level NormalFloat table built like ``quant.nf4_code()`` (which is bits=4).

    Positive levels: Φ⁻¹ at ``linspace(offset, 0.5, 2^(bits-1) + 1)[:-1]`` (float32
    probabilities); negative levels: −Φ⁻¹ at ``linspace(offset, 0.5, 2^(bits-1))[:-1]``;
    plus 0; float32, sorted, divided by the largest value.
    """
    from scipy.stats import norm

    half = 2 ** (bits - 1)
    if float64_probabilities:
        p_pos, p_neg = np.linspace(offset, 0.5, half + 1)[:-1], np.linspace(offset, 0.5, half)[:-1]
    else:
        p_pos = torch.linspace(offset, 0.5, half + 1)[:-1].numpy()
        p_neg = torch.linspace(offset, 0.5, half)[:-1].numpy()
    values = np.concatenate([norm.ppf(p_pos), [0.0], -norm.ppf(p_neg)]).astype(np.float32)
    values = torch.from_numpy(np.sort(values))
    return values / values.max()


def _as_float_tensor(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value.copy())
    if not isinstance(value, torch.Tensor):
        raise Mistake(f"{name} must be a NumPy array or torch tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise Mistake(f"{name} must hold floats, got {value.dtype}")
    return value.detach().reshape(-1)


def _diagnose_table(table: torch.Tensor, bits: int) -> None:
    levels = 2**bits
    if table.numel() == levels - 1 or not bool((table == 0).any()):
        raise Mistake("zero missing from the table: step 4 puts an exact 0 between the two sets")
    if table.numel() != levels:
        raise Mistake(f"expected 2^bits = {levels} levels for bits={bits}: 2^(bits-1) positive "
                      "(Set I), 2^(bits-1) - 1 negative (Set II) and 0")
    finite(table, "the table", "Φ⁻¹(0.5) = 0 and Φ⁻¹(1) = ∞: the probabilities run from "
                               "0.9677083 towards 0.5 and exclude 0.5")
    if not bool((table[1:] > table[:-1]).all()):
        raise Mistake("sort the levels ascending: the index of a level is its 4-bit code")
    if float(table.min()) == -1.0 and float(table.max()) < 1.0:
        raise Mistake("the negative levels outgrow the positive ones: Set II needs the negated "
                      "z-scores -z, not the inverse -1/z (both sets share the largest |z|)")
    if float(table.abs().max()) != 1.0 or float(table.max()) != 1.0:
        raise Mistake("not normalised: step 5 divides by the largest value, so the ends are "
                      "exactly -1 and 1")
    ref = normal_float_reference(bits).to(table.dtype)
    if torch.equal(table, ref):
        return
    if torch.equal(table.float(), -ref.flip(0)):
        raise Mistake("Set I (2^(bits-1) probabilities) gives the positive levels and Set II "
                      "the negative ones: one more level above zero than below")
    if int((table > 0).sum()) != 2 ** (bits - 1):
        raise Mistake("Set I (2^(bits-1) probabilities) gives the positive levels and Set II "
                      "(2^(bits-1) - 1) the negated ones below zero")
    if torch.equal(table.float(), normal_float_reference(bits, float64_probabilities=True)):
        raise Mistake("the probabilities must be float32, as torch.linspace makes them: float64 "
                      "probabilities move some levels by one unit in the last place")
    if close(table, ref, rtol=1e-6, atol=0):
        raise Mistake("off by about one unit in the last place: use float32 probabilities "
                      "(torch.linspace), cast the z-scores to float32, then divide")
    raise Mistake("the levels differ: both sets start at the probability 0.9677083 and step "
                  "towards 0.5 (excluded); the negative set uses the negated z-scores -Φ⁻¹(p)")


def check_normal_float_code(answer: Callable) -> None:
    """The student's ``normal_float_code(bits)``: bit-exact NF4 at 4 bits, same recipe at 2/3/5."""
    for bits in (4, 3, 2, 5):
        result = call(answer, bits, when_it_fails=f"normal_float_code({bits}) fails: the recipe "
                      "must work for any number of bits, with 2^(bits-1) and 2^(bits-1) - 1 "
                      "probabilities")
        _diagnose_table(_as_float_tensor(result, f"normal_float_code({bits})"), bits)


# --------------------------------------------------------------------------- quantize + pack


def _cases() -> list[tuple[torch.Tensor, int]]:
    """(x, blocksize): 1-D, 2-D, a different blocksize, an outlier, an all-zero block."""
    g = seeded(7)
    outlier = torch.randn(16, 64, generator=g) * 0.02
    outlier[3, 5] = 1.0
    zero_block = torch.randn(4, 64, generator=g)
    zero_block[2] = 0.0
    return [
        (torch.randn(1024, generator=g), 64),
        (outlier, 64),
        (torch.randn(12, 32, generator=g), 128),
        (zero_block, 64),
    ]


def _indices(packed: torch.Tensor, high_first: bool = True) -> torch.Tensor:
    packed = packed.reshape(-1).to(torch.uint8)
    pairs = (packed >> 4, packed & 15) if high_first else (packed & 15, packed >> 4)
    return torch.stack(pairs, dim=1).reshape(-1).long()


def _nearest(values: torch.Tensor) -> torch.Tensor:
    return quant.nearest_code_index(values, quant.nf4_code())


def _diagnose_indices(got: torch.Tensor, x: torch.Tensor, blocksize: int) -> None:
    ref_state = quant.quantize_4bit(x, "nf4", blocksize=blocksize, double_quant=False)
    ref = _indices(ref_state.packed)
    if torch.equal(got, ref):
        return
    if torch.equal(got.view(-1, 2).flip(1).reshape(-1), ref):
        raise Mistake("nibbles packed in the wrong order: element 2i goes in the high nibble "
                      "(byte >> 4), element 2i + 1 in the low one")
    flat = x.reshape(-1).float()
    blocks = flat.view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    scaled = (blocks / absmax.clamp(min=1e-38)).reshape(-1)
    code = quant.nf4_code()
    for wrong in (flat / flat.abs().max(), flat):
        if torch.equal(got, _nearest(wrong)):
            raise Mistake("not normalised by the block's absmax: divide each value by max |x| "
                          "of its own block of `blocksize`, so it lies in [-1, 1]")
    if torch.equal(got, torch.bucketize(scaled, code).clamp(max=15)) or torch.equal(
        got, (torch.bucketize(scaled, code, right=True) - 1).clamp(min=0)
    ):
        raise Mistake("not the nearest level: compare with the midpoints between neighbouring "
                      "levels (torch.bucketize on the midpoints)")
    zero_blocks = (absmax.reshape(-1) == 0).repeat_interleave(blocksize)
    if bool((got[zero_blocks] != ref[zero_blocks]).any()):
        raise Mistake("an all-zero block: its values are 0, whose nearest level is NF4's exact "
                      "zero (divide by max(absmax, 1e-38), not by 0)")
    # a value within a hair of a midpoint may round either way; anything else is wrong
    midpoints = (code[:-1] + code[1:]) / 2
    distance = (scaled[:, None] - midpoints[None, :]).abs().amin(dim=1)
    differ = got != ref
    if bool(((got - ref).abs() > 1).any()) or not bool((distance[differ] < 1e-6).all()):
        raise Mistake("the 4-bit codes differ from the nearest NF4 level of x / absmax of its "
                      "block")


def check_quantize_nf4(answer: Callable) -> None:
    """The student's ``quantize_nf4(x, blocksize) -> (packed, absmax)``."""
    for x, blocksize in _cases():
        n = x.numel()
        result = call(answer, x.clone(), blocksize,
                      when_it_fails=f"quantize_nf4 fails for shape {tuple(x.shape)} and blocksize "
                      f"{blocksize}" + (" (a block is all zeros)" if bool(
                          (x.reshape(-1, blocksize).abs().amax(1) == 0).any()) else ""))
        packed, absmax = pair(result, "packed, absmax")
        packed = tensor(packed, "packed")
        if packed.numel() == n:
            raise Mistake("two 4-bit codes per byte: pack pairs of codes, (codes[0::2] << 4) | "
                          "codes[1::2], to get n / 2 bytes")
        packed = tensor(packed, "packed", shape=(n // 2,), dtype=torch.uint8,
                        hint="packed holds n / 2 bytes, flat")
        absmax = tensor(absmax, "absmax").reshape(-1)
        ref = quant.quantize_4bit(x, "nf4", blocksize=blocksize, double_quant=False)
        if absmax.numel() == 1 and ref.absmax.numel() > 1:
            raise Mistake("not normalised by the block's absmax: one absmax for the whole tensor "
                          "instead of one per block")
        if absmax.numel() != ref.absmax.numel():
            raise Mistake("one absmax per block of `blocksize` consecutive values of the "
                          "flattened tensor")
        if not close(absmax.float(), ref.absmax, rtol=0, atol=0):
            raise Mistake("absmax of a block is max |x| over its values (the largest magnitude, "
                          "sign dropped)")
        _diagnose_indices(_indices(packed), x, blocksize)


# --------------------------------------------------------------------------- dequantize


def check_dequantize_nf4(answer: Callable) -> None:
    """The student's ``dequantize_nf4(packed, absmax, blocksize, shape) -> tensor``."""
    for x, blocksize in _cases():
        state = quant.quantize_4bit(x, "nf4", blocksize=blocksize, double_quant=False)
        result = call(answer, state.packed.clone(), state.absmax.clone(), blocksize, x.shape,
                      when_it_fails=f"dequantize_nf4 fails for shape {tuple(x.shape)} and "
                      f"blocksize {blocksize}")
        out = tensor(result, "the dequantized tensor", shape=x.shape,
                     hint="reshape to the `shape` argument")
        ref = quant.dequantize_4bit(state)
        if close(out.float(), ref, rtol=1e-6, atol=0):
            continue
        code = quant.nf4_code()
        per_element = state.absmax.repeat_interleave(blocksize)
        swapped = code[_indices(state.packed, high_first=False)] * per_element
        if close(out.reshape(-1).float(), swapped, rtol=1e-6):
            raise Mistake("nibbles read in the wrong order: element 2i is the high nibble "
                          "(byte >> 4), element 2i + 1 the low one (byte & 15)")
        if close(out.reshape(-1).float(), code[_indices(state.packed)], rtol=1e-6):
            raise Mistake("the levels are in [-1, 1]: multiply each by the absmax of its block")
        cyclic = state.absmax[torch.arange(x.numel()) % state.absmax.numel()]
        if close(out.reshape(-1).float(), code[_indices(state.packed)] * cyclic, rtol=1e-6):
            raise Mistake("element i belongs to block i // blocksize, not i % n_blocks")
        raise Mistake("the values differ from nf4_code()[code_i] * absmax_j, j = i // blocksize")


EXERCISES: list[Exercise] = [
    Exercise(
        id="07-nf4-table",
        lesson=7,
        title="normal_float_code(bits): the NormalFloat table from the five steps, any bit width",
        kind="code",
        run=check_normal_float_code,
    ),
    Exercise(
        id="07-nf4-quantize",
        lesson=7,
        title="quantize_nf4(x, blocksize): blockwise NF4 codes packed two per byte, and absmax",
        kind="code",
        run=check_quantize_nf4,
    ),
    Exercise(
        id="07-nf4-dequantize",
        lesson=7,
        title="dequantize_nf4(packed, absmax, blocksize, shape): unpack and rescale",
        kind="code",
        run=check_dequantize_nf4,
    ),
]
