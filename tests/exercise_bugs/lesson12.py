"""Planted bugs for lesson 12's exercises, each with the hint that must name it."""

import torch


def linear_full_names(model, head):
    return sorted(name for name, module in model.named_modules()
                  if isinstance(module, torch.nn.Linear) and name != head)


def linear_keeps_head(model, head):
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear)})


def linear_head_by_short_name(model, head):
    short = head.rsplit(".", 1)[-1]
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] != short})


def linear_every_module(model, head):
    return sorted({name.rsplit(".", 1)[-1] for name, _ in model.named_modules()
                   if name and name != head})


def linear_unsorted(model, head):
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and name != head}
    return sorted(names, reverse=True)


def scale_flat(shape, blocksize):
    m, n = shape
    return (torch.arange(m * n) // blocksize).reshape(m, n)


def scale_ceil(shape, blocksize):
    m, n = shape
    rows = torch.arange(m).unsqueeze(1) * (-(-n // blocksize))
    return rows + (torch.arange(n) // blocksize).unsqueeze(0)


def scale_float(shape, blocksize):
    m, n = shape
    rows = torch.arange(m).unsqueeze(1) * (n // blocksize)
    return (rows + (torch.arange(n) // blocksize).unsqueeze(0)).float()


def scale_transposed(shape, blocksize):
    m, n = shape
    rows = torch.arange(m).unsqueeze(1) * (n // blocksize)
    return (rows + (torch.arange(n) // blocksize).unsqueeze(0)).T


PER_LAYER = (4096 + 4096) * 2 + (4096 + 1024) * 2 + (4096 + 14336) * 3

BUGS = {
    "12-all-linear": [
        (linear_full_names, "give the short names"),
        (linear_keeps_head, "the output head is in the list"),
        (linear_head_by_short_name, "compare full names with head"),
        (linear_every_module, "not nn.Linear"),
        (linear_unsorted, "sort the names"),
    ],
    "12-scale-index": [
        (scale_flat, "is the flat block"),
        (scale_ceil, "rounds down"),
        (scale_float, "must be integers"),
        (scale_transposed, "one index per element"),
    ],
    "12-llama-lora-count": [
        (16 * 32 * ((4096 + 4096) * 4 + (4096 + 14336) * 3), "grouped-query attention"),
        (16 * 32 * ((4096 + 4096) * 2 + (4096 + 1024) * 2), "gate, up and down"),
        (16 * PER_LAYER, "all 32 layers"),
        (32 * PER_LAYER, "rank r = 16"),
    ],
}
