"""Planted bugs for lesson 3's exercises: each must be caught by the hint named beside it."""

WEIGHT = {"fp32": 4, "mixed": 2, "bf16": 2}


def _bytes(precision, optimizer, master=True, absmax=True, bf16_moments=True, moments=2):
    weight = gradient = WEIGHT[precision]
    moment = 2 if precision == "bf16" and bf16_moments else 4
    states = {"adamw": moments * moment, "adamw8bit": 2 + (8 / 256 if absmax else 0),
              "sgd": 0}[optimizer]
    copy = 4 if precision == "mixed" and master else 0
    return weight + gradient + states + copy


def bytes_no_master(precision, optimizer):
    return _bytes(precision, optimizer, master=False)


def bytes_no_absmax(precision, optimizer):
    return _bytes(precision, optimizer, absmax=False)


def bytes_float32_moments(precision, optimizer):
    return _bytes(precision, optimizer, bf16_moments=False)


def bytes_one_moment(precision, optimizer):
    return _bytes(precision, optimizer, moments=1)


def count_shared_twice(model):
    every = list(model.named_parameters(remove_duplicate=False))
    return (sum(p.numel() for _, p in every if p.requires_grad), sum(p.numel() for _, p in every))


def count_frozen_as_total(model):
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return trainable, frozen


def count_swapped(model):
    return (sum(p.numel() for p in model.parameters()),
            sum(p.numel() for p in model.parameters() if p.requires_grad))


D, V = 64, 48

BUGS = {
    "03-bytes-per-parameter": [
        (bytes_no_master, "float32 master copy"),
        (bytes_no_absmax, "float32 absmax"),
        (bytes_float32_moments, "in bf16 too"),
        (bytes_one_moment, "*two* moments"),
    ],
    "03-count-parameters": [
        (count_shared_twice, "count it once"),
        (count_frozen_as_total, "trainable ones included"),
        (count_swapped, "wrong order"),
    ],
    "03-top2-trainable": [
        (2 * (12 * D * D + 13 * D) + 2 * D, "the head trains too"),
        (12 * D * D + 13 * D + 2 * D + V * D, "that is one block"),
    ],
}
