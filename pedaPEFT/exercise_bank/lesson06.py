"""Lesson 6 exercises: blockwise absmax quantization, its inverse, and its error bound.

The student's functions are compared with ``quant.blockwise_absmax_quantize`` and
``quant.blockwise_absmax_dequantize`` on seeded random tensors (an outlier, a partial last
block, an all-zero block, 2-D shapes); known wrong variants are recognised and named.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pedaPEFT import quant
from pedaPEFT.exercise_bank.base import Exercise, Mistake
from pedaPEFT.exercise_bank.tensor_checks import call, close, finite, pair, seeded, tensor


def _cases() -> list[tuple[torch.Tensor, int, int]]:
    """(x, bits, blocksize): full blocks, a partial last block, 4 bits, 2-D with a zero block."""
    g = seeded(6)
    with_outlier = torch.randn(1000, generator=g) * 0.02
    with_outlier[123] = 1.0
    with_zero_block = torch.randn(3, 100, generator=g)
    with_zero_block.view(-1)[64:128] = 0.0
    return [
        (torch.randn(512, generator=g), 8, 64),
        (with_outlier, 8, 64),
        (with_outlier, 4, 64),
        (with_zero_block, 8, 64),
        (torch.randn(40, 30, generator=g), 8, 128),
    ]


def _block_of_each(n: int, blocksize: int) -> torch.Tensor:
    return torch.arange(n) // blocksize


def _per_element(values: torch.Tensor, n: int, blocksize: int) -> torch.Tensor:
    """Broadcast one value per block to the n elements of the flattened tensor."""
    return values[_block_of_each(n, blocksize)]


# --------------------------------------------------------------------------- quantize


def _diagnose_scale(scale: torch.Tensor, x: torch.Tensor, bits: int, blocksize: int) -> None:
    _, ref = quant.blockwise_absmax_quantize(x, bits=bits, blocksize=blocksize)
    n = x.numel()
    qmax = 2 ** (bits - 1) - 1
    if scale.numel() != ref.numel():
        if scale.numel() == 1:
            raise Mistake("one absmax for the whole tensor, not one per block: cut the flattened "
                          "tensor into blocks of `blocksize` values, each with its own scale")
        if scale.numel() == n // blocksize:
            raise Mistake("the last, shorter block needs its own scale too: there are "
                          "ceil(n / blocksize) blocks")
        if x.dim() == 2 and scale.numel() == x.shape[0] * -(-x.shape[1] // blocksize):
            raise Mistake("blocks run over the flattened tensor (row-major), not row by row")
        raise Mistake("expected one scale per block of `blocksize` consecutive values of the "
                      "flattened tensor")
    scale = scale.reshape(-1).float()
    finite(scale, "scale", "an all-zero block has absmax 0; give it the scale 1 (any scale "
                           "reproduces zeros)")
    if close(scale, ref, rtol=1e-5):
        return
    nonzero = ref != 1
    if close(scale[nonzero], 1 / ref[nonzero], rtol=1e-5):
        raise Mistake("the scale is c = (2^(bits-1) - 1) / absmax, not its inverse absmax / qmax")
    for wrong_qmax in (2**bits - 1, 2 ** (bits - 1), 127):
        if wrong_qmax != qmax and close(scale[nonzero], ref[nonzero] * wrong_qmax / qmax,
                                        rtol=1e-5):
            raise Mistake("the largest code is 2^(bits-1) - 1 (127 for 8 bits, 7 for 4 bits): "
                          "the range is symmetric and follows the `bits` argument")
    whole = quant.absmax_quantize(x, bits=bits)[1]
    if close(scale, whole.expand_as(scale), rtol=1e-5):
        raise Mistake("one absmax for the whole tensor, not one per block")
    raise Mistake("the scales differ from c_j = (2^(bits-1) - 1) / max|x| over block j")


def _diagnose_codes(q: torch.Tensor, x: torch.Tensor, bits: int, blocksize: int) -> None:
    ref_q, ref_scale = quant.blockwise_absmax_quantize(x, bits=bits, blocksize=blocksize)
    qmax = 2 ** (bits - 1) - 1
    q, ref_q = q.reshape(-1).long(), ref_q.reshape(-1).long()
    if int(q.abs().max()) > qmax:
        raise Mistake(f"codes outside [-{qmax}, {qmax}] for bits={bits}: the largest code is "
                      "2^(bits-1) - 1")
    scaled = x.reshape(-1).float() * _per_element(ref_scale, x.numel(), blocksize)
    differ = q != ref_q
    if not bool(differ.any()):
        return
    if torch.equal(q, torch.trunc(scaled).long()):
        raise Mistake("rounded toward zero (truncated) instead of to the nearest integer: "
                      "use torch.round")
    if torch.equal(q, torch.floor(scaled).long()):
        raise Mistake("rounded down (floor) instead of to the nearest integer: use torch.round")
    # a value within a hair of a half-integer may round either way; anything else is wrong
    near_tie = ((scaled - scaled.floor()) - 0.5).abs() < 1e-4
    if bool(((q - ref_q).abs() > 1).any()) or not bool(near_tie[differ].all()):
        raise Mistake("the codes differ from round(c_j * x) with the scale of each value's own "
                      "block j = i // blocksize")


def check_blockwise_quantize(answer: Callable) -> None:
    """The student's ``blockwise_quantize(x, bits, blocksize) -> (q, scale)``."""
    for x, bits, blocksize in _cases():
        result = call(answer, x.clone(), bits, blocksize,
                      when_it_fails=f"blockwise_quantize fails for a tensor of shape "
                      f"{tuple(x.shape)} with bits={bits}, blocksize={blocksize}: the last block "
                      "may be shorter, and a block may be all zeros")
        q, scale = pair(result, "q, scale")
        q = tensor(q, "q", shape=x.shape, hint="q keeps the shape of x")
        if q.is_floating_point():
            raise Mistake("q must hold integers (int8), not floats: round and cast")
        scale = tensor(scale, "scale")
        _diagnose_scale(scale, x, bits, blocksize)
        _diagnose_codes(q, x, bits, blocksize)


# --------------------------------------------------------------------------- dequantize


def check_blockwise_dequantize(answer: Callable) -> None:
    """The student's ``blockwise_dequantize(q, scale, blocksize) -> x_hat``."""
    for x, bits, blocksize in _cases():
        q, scale = quant.blockwise_absmax_quantize(x, bits=bits, blocksize=blocksize)
        partial = x.numel() % blocksize != 0
        result = call(answer, q.clone(), scale.clone(), blocksize,
                      when_it_fails="blockwise_dequantize fails for a tensor of shape "
                      f"{tuple(x.shape)} and blocksize {blocksize}"
                      + (": the element count is not a multiple of blocksize, so the last block "
                         "is shorter" if partial else ""))
        out = tensor(result, "the dequantized tensor", shape=q.shape,
                     hint="return a tensor of q's shape")
        if not out.is_floating_point():
            raise Mistake("the dequantized tensor must be floating point (float32)")
        ref = quant.blockwise_absmax_dequantize(q, scale, blocksize)
        if close(out.float(), ref, rtol=1e-6, atol=1e-7):
            continue
        n = q.numel()
        flat_q = q.reshape(-1).float()
        if close(out.reshape(-1).float(), flat_q * _per_element(scale, n, blocksize), rtol=1e-5):
            raise Mistake("dequantization divides by the scale, x ≈ q / c: multiplying by c "
                          "scales a second time")
        cyclic = scale[torch.arange(n) % scale.numel()]
        if close(out.reshape(-1).float(), flat_q / cyclic, rtol=1e-5):
            raise Mistake("element i belongs to block i // blocksize (consecutive elements share "
                          "a scale), not i % n_blocks")
        raise Mistake("the values differ from q_i / c_j with j = i // blocksize")


# --------------------------------------------------------------------------- error bound


def _reference_bound(x: torch.Tensor, bits: int, blocksize: int) -> torch.Tensor:
    """absmax_j / (2 (2^(bits-1) - 1)): half a step of the block j of each element."""
    flat = x.reshape(-1).float().abs()
    n_blocks = -(-flat.numel() // blocksize)
    padded = torch.nn.functional.pad(flat, (0, n_blocks * blocksize - flat.numel()))
    absmax = padded.view(n_blocks, blocksize).amax(dim=1)
    half_step = absmax / (2 * (2 ** (bits - 1) - 1))
    return _per_element(half_step, x.numel(), blocksize).reshape(x.shape)


def check_error_bound(answer: Callable) -> None:
    """The student's ``error_bound(x, bits, blocksize)``: the largest possible |x - x_hat|."""
    for x, bits, blocksize in _cases():
        result = call(answer, x.clone(), bits, blocksize,
                      when_it_fails=f"error_bound fails for shape {tuple(x.shape)}, bits={bits}, "
                      f"blocksize={blocksize}")
        bound = tensor(result, "the bound", shape=x.shape,
                       hint="one bound per element, the shape of x")
        ref = _reference_bound(x, bits, blocksize)
        q, scale = quant.blockwise_absmax_quantize(x, bits=bits, blocksize=blocksize)
        actual = (quant.blockwise_absmax_dequantize(q, scale, blocksize) - x).abs()
        if close(bound.float(), ref, rtol=1e-5, atol=1e-9):
            continue
        finite(bound.float(), "the bound", "an all-zero block is stored exactly (bound 0)")
        qmax = 2 ** (bits - 1) - 1
        if close(bound.float(), ref * qmax / (2**bits - 1), rtol=1e-5):
            raise Mistake("the largest code is 2^(bits-1) - 1 (the range is symmetric), so a "
                          "step is absmax / (2^(bits-1) - 1)")
        if close(bound.float(), 2 * ref, rtol=1e-5):
            raise Mistake("a whole step absmax / qmax is too loose: rounding to the nearest code "
                          "moves a value by at most half a step")
        whole = torch.full_like(ref, float(x.abs().max()) / (2 * qmax))
        if close(bound.float(), whole, rtol=1e-5):
            raise Mistake("use the absmax of each element's own block, not of the whole tensor")
        if bool((bound.float() < actual - 1e-7).any()):
            raise Mistake("the bound is smaller than an error the package's round trip actually "
                          "makes: rounding moves a value by up to half a step, absmax / qmax / 2")
        raise Mistake("the bound differs from absmax_j / (2 (2^(bits-1) - 1)) for the block j "
                      "of each element; the largest code is 2^(bits-1) - 1")


EXERCISES: list[Exercise] = [
    Exercise(
        id="06-blockwise-quantize",
        lesson=6,
        title="blockwise_quantize(x, bits, blocksize): int codes and one absmax scale per block",
        kind="code",
        run=check_blockwise_quantize,
    ),
    Exercise(
        id="06-blockwise-dequantize",
        lesson=6,
        title="blockwise_dequantize(q, scale, blocksize): back to floats, block by block",
        kind="code",
        run=check_blockwise_dequantize,
    ),
    Exercise(
        id="06-error-bound",
        lesson=6,
        title="error_bound(x, bits, blocksize): the largest round-trip error of every element",
        kind="code",
        run=check_error_bound,
    ),
]
