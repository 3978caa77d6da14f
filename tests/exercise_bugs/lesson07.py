"""Planted bugs for lesson 7's exercises, each with the hint that must name it.

``SOLUTIONS`` holds a right answer per exercise (the lesson's solution, written again here).
"""

import numpy as np
import torch
from scipy.stats import norm

from pedaPEFT import quant

OFFSET = 0.9677083


def normal_float_code(bits, *, zero=True, normalise=True, float64=False, swap_sets=False,
                      inverse=False, sort=True, lecture_endpoints=False):
    """The solution, with switches that plant the usual mistakes."""
    half = 2 ** (bits - 1)
    if lecture_endpoints:
        p_1, p_2 = np.linspace(0.56, 0.97, half), np.linspace(0.57, 0.97, half - 1)
    elif float64:
        p_1, p_2 = np.linspace(OFFSET, 0.5, half + 1)[:-1], np.linspace(OFFSET, 0.5, half)[:-1]
    else:
        p_1 = torch.linspace(OFFSET, 0.5, half + 1)[:-1].numpy()
        p_2 = torch.linspace(OFFSET, 0.5, half)[:-1].numpy()
    z_1 = norm.ppf(p_1)
    z_2 = -1 / norm.ppf(p_2) if inverse else -norm.ppf(p_2)
    if swap_sets:
        z_1, z_2 = -z_1, -z_2
    parts = [z_1, [0.0], z_2] if zero else [z_1, z_2]
    values = np.concatenate(parts).astype(np.float32)
    if sort:
        values = np.sort(values)
    return values / np.abs(values).max() if normalise else values


def quantize_nf4(x, blocksize, *, whole=False, high_first=True, nearest=True, safe_zero=True):
    """The solution, with switches that plant the usual mistakes."""
    code = quant.nf4_code()
    flat = x.reshape(-1).float()
    blocks = flat.view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    norm_by = flat.abs().max().expand_as(absmax) if whole else absmax
    divisor = norm_by.clamp(min=1e-38) if safe_zero else norm_by
    scaled = (blocks / divisor[:, None]).reshape(-1)
    if nearest:
        indices = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2)
    else:
        indices = torch.bucketize(scaled, code).clamp(max=15)
    indices = indices.to(torch.uint8)
    high, low = (indices[0::2], indices[1::2]) if high_first else (indices[1::2], indices[0::2])
    return (high << 4) | low, absmax


def dequantize_nf4(packed, absmax, blocksize, shape, *, high_first=True, scale=True,
                   cyclic=False):
    """The solution, with switches that plant the usual mistakes."""
    code = quant.nf4_code()
    pairs = (packed >> 4, packed & 15) if high_first else (packed & 15, packed >> 4)
    values = code[torch.stack(pairs, dim=1).reshape(-1).long()]
    n = values.numel()
    index = torch.arange(n) % absmax.numel() if cyclic else torch.arange(n) // blocksize
    if scale:
        values = values * absmax[index]
    return values.reshape(shape)


SOLUTIONS = {
    "07-nf4-table": normal_float_code,
    "07-nf4-quantize": quantize_nf4,
    "07-nf4-dequantize": dequantize_nf4,
}

BUGS = {
    "07-nf4-table": [
        (lambda b: normal_float_code(b, zero=False), "zero missing from the table"),
        (lambda b: normal_float_code(b, normalise=False), "not normalised"),
        (lambda b: normal_float_code(b, float64=True), "must be float32"),
        (lambda b: normal_float_code(b, swap_sets=True), "Set I"),
        (lambda b: normal_float_code(b, inverse=True), "not the inverse -1/z"),
        (lambda b: normal_float_code(b, sort=False), "sort the levels"),
        (lambda b: normal_float_code(b, lecture_endpoints=True), "0.9677083"),
        (lambda b: quant.nf4_code(), "expected 2^bits"),
    ],
    "07-nf4-quantize": [
        (lambda x, s: quantize_nf4(x, s, whole=True), "not normalised by the block's absmax"),
        (lambda x, s: quantize_nf4(x, s, high_first=False), "nibbles packed in the wrong order"),
        (lambda x, s: quantize_nf4(x, s, nearest=False), "not the nearest level"),
        (lambda x, s: quantize_nf4(x, s, safe_zero=False), "all-zero block"),
        (lambda x, s: (quantize_nf4(x, s)[0], quantize_nf4(x, s)[1].max()[None]),
         "not normalised by the block's absmax"),
    ],
    "07-nf4-dequantize": [
        (lambda p, a, s, sh: dequantize_nf4(p, a, s, sh, high_first=False), "wrong order"),
        (lambda p, a, s, sh: dequantize_nf4(p, a, s, sh, scale=False), "multiply each"),
        (lambda p, a, s, sh: dequantize_nf4(p, a, s, sh, cyclic=True), "i // blocksize"),
    ],
}
