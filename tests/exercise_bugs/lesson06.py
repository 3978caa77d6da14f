"""Planted bugs for lesson 6's exercises, each with the hint that must name it.

``SOLUTIONS`` holds a right answer per exercise (the lesson's own solution, written again
here so that the exercise bank can be tested without running the notebook).
"""

import torch


def blockwise_quantize(x, bits, blocksize, *, qmax=None, whole=False, rounding=torch.round,
                       invert=False, zero_scale=1.0, drop_tail=False):
    """The solution, with switches that plant the usual mistakes."""
    qmax = 2 ** (bits - 1) - 1 if qmax is None else qmax
    flat = x.reshape(-1).float()
    n = flat.numel()
    size = n if whole else blocksize
    n_blocks = n // size if drop_tail else -(-n // size)
    padded = torch.nn.functional.pad(flat, (0, max(n_blocks * size - n, 0)))[: n_blocks * size]
    blocks = padded.view(n_blocks, size)
    absmax = blocks.abs().amax(dim=1)
    scale = torch.where(absmax > 0, qmax / absmax, torch.full_like(absmax, zero_scale))
    if invert:
        scale = 1 / scale
        q = rounding(blocks / scale[:, None])
    else:
        q = rounding(blocks * scale[:, None])
    q = q.clamp(-qmax, qmax).to(torch.int8).reshape(-1)
    if q.numel() < n:
        q = torch.cat([q, torch.zeros(n - q.numel(), dtype=torch.int8)])
    return q[:n].reshape(x.shape), scale


def blockwise_dequantize(q, scale, blocksize, *, multiply=False, cyclic=False):
    """The solution, with switches that plant the usual mistakes."""
    n = q.numel()
    index = torch.arange(n) % scale.numel() if cyclic else torch.arange(n) // blocksize
    per_element = scale[index]
    flat = q.reshape(-1).float()
    out = flat * per_element if multiply else flat / per_element
    return out.reshape(q.shape)


def blockwise_dequantize_full_blocks_only(q, scale, blocksize):
    return (q.reshape(-1, blocksize).float() / scale[:, None]).reshape(q.shape)


def error_bound(x, bits, blocksize, *, steps=0.5, whole=False, qmax=None):
    """The solution, with switches that plant the usual mistakes."""
    qmax = 2 ** (bits - 1) - 1 if qmax is None else qmax
    flat = x.reshape(-1).float().abs()
    n = flat.numel()
    if whole:
        return torch.full(x.shape, float(flat.max()) * steps / qmax)
    n_blocks = -(-n // blocksize)
    absmax = torch.nn.functional.pad(flat, (0, n_blocks * blocksize - n)).view(n_blocks, -1)
    absmax = absmax.amax(dim=1)
    return (absmax[torch.arange(n) // blocksize] * steps / qmax).reshape(x.shape)


SOLUTIONS = {
    "06-blockwise-quantize": blockwise_quantize,
    "06-blockwise-dequantize": blockwise_dequantize,
    "06-error-bound": error_bound,
}

BUGS = {
    "06-blockwise-quantize": [
        (lambda x, b, s: blockwise_quantize(x, b, s, whole=True), "whole tensor"),
        (lambda x, b, s: blockwise_quantize(x, b, s, qmax=2**b - 1), "2^(bits-1) - 1"),
        (lambda x, b, s: blockwise_quantize(x, b, s, qmax=127), "2^(bits-1) - 1"),
        (lambda x, b, s: blockwise_quantize(x, b, s, rounding=torch.trunc), "truncated"),
        (lambda x, b, s: blockwise_quantize(x, b, s, invert=True), "not its inverse"),
        (lambda x, b, s: blockwise_quantize(x, b, s, zero_scale=float("inf")), "all-zero block"),
        (lambda x, b, s: blockwise_quantize(x, b, s, drop_tail=True), "last, shorter block"),
    ],
    "06-blockwise-dequantize": [
        (lambda q, c, s: blockwise_dequantize(q, c, s, multiply=True), "divides by the scale"),
        (lambda q, c, s: blockwise_dequantize(q, c, s, cyclic=True), "i // blocksize"),
        (blockwise_dequantize_full_blocks_only, "last block is shorter"),
    ],
    "06-error-bound": [
        (lambda x, b, s: error_bound(x, b, s, steps=1.0), "half a step"),
        (lambda x, b, s: error_bound(x, b, s, whole=True), "own block"),
        (lambda x, b, s: error_bound(x, b, s, steps=0.25), "smaller than an error"),
        (lambda x, b, s: error_bound(x, b, s, qmax=2**b - 1), "2^(bits-1) - 1"),
    ],
}
