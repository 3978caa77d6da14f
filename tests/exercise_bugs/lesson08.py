"""Planted bugs for lesson 8's exercises, each with the hint that must name it.

``SOLUTIONS`` holds a right answer per exercise (the lesson's solution, written again here).
"""

import torch

from pedaPEFT import quant


def double_quantize(absmax, blocksize, *, centre=True, one_scale=False, linear=False):
    """The solution, with switches that plant the usual mistakes."""
    offset = absmax.mean() if centre else torch.tensor(0.0)
    centred = absmax - offset
    n = centred.numel()
    size = n if one_scale else blocksize
    n_blocks = -(-n // size)
    padded = torch.nn.functional.pad(centred, (0, n_blocks * size - n)).view(n_blocks, size)
    scales = padded.abs().amax(dim=1)
    scaled = (padded / scales[:, None]).reshape(-1)[:n]
    if linear:
        codes = torch.round(scaled * 127) + 127
    else:
        code = quant.dynamic_code()
        codes = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2)
    return codes.to(torch.uint8), scales, offset


def bits_per_parameter(blocksize, double_quant, dq_blocksize, *, code_bits=4,
                       second_level_per_block=False, ignore_flag=False):
    """The solution, with switches that plant the usual mistakes."""
    if double_quant or ignore_flag:
        shared_by = dq_blocksize if second_level_per_block else blocksize * dq_blocksize
        return code_bits + 8 / blocksize + 32 / shared_by
    return code_bits + 32 / blocksize


def rebuild_absmax(state, *, offset=True, cyclic=False, lookup=True):
    """The solution, with switches that plant the usual mistakes."""
    n = state.absmax.numel()
    values = state.nested_code[state.absmax.long()] if lookup else state.absmax.float()
    index = torch.arange(n)
    block = index % state.nested_absmax.numel() if cyclic else index // state.dq_blocksize
    rebuilt = values * state.nested_absmax[block]
    return rebuilt + state.offset if offset else rebuilt


SOLUTIONS = {
    "08-double-quant": double_quantize,
    "08-bits-per-parameter": bits_per_parameter,
    "08-rebuild-absmax": rebuild_absmax,
}

BUGS = {
    "08-double-quant": [
        (lambda a, s: double_quantize(a, s, centre=False), "the mean was not subtracted"),
        (lambda a, s: double_quantize(a, s, one_scale=True), "not one for all of them"),
        (lambda a, s: double_quantize(a, s, linear=True), "dynamic map"),
    ],
    "08-bits-per-parameter": [
        (lambda b, d, s: bits_per_parameter(b, d, s, code_bits=0), "the 4 bits of each code"),
        (lambda b, d, s: bits_per_parameter(b, d, s, second_level_per_block=True),
         "shared by dq_blocksize blocks"),
        (lambda b, d, s: bits_per_parameter(b, d, s, ignore_flag=True), "double_quant=False"),
        (lambda b, d, s: bits_per_parameter(b, False, s), "double_quant=True"),
    ],
    "08-rebuild-absmax": [
        (lambda state: rebuild_absmax(state, offset=False), "add the offset back"),
        (lambda state: rebuild_absmax(state, cyclic=True), "j // dq_blocksize"),
        (lambda state: rebuild_absmax(state, lookup=False), "look each up in nested_code"),
    ],
}
