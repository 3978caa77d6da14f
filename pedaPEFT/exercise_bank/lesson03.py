"""Lesson 3's exercises: bytes per parameter, counting trainable parameters, a top-2 count.

``bytes_per_parameter`` is checked against :func:`pedaPEFT.memory.bytes_per_parameter` for
every precision and optimizer; the way its answers are off tells which component is missing.
"""

from __future__ import annotations

from typing import Any

import torch

from pedaPEFT import gpt, lora, memory, train
from pedaPEFT.exercise_bank.base import Exercise, Mistake, as_int, as_real, call

PRECISIONS = ("fp32", "mixed", "bf16")
OPTIMIZERS = ("adamw", "adamw8bit", "sgd")
BLOCK = memory.ADAM8BIT_BLOCK


def _reference(precision: str, optimizer: str) -> float:
    return memory.bytes_per_parameter(precision=precision, optimizer=optimizer)["total"]


def _run_bytes(bytes_per_parameter: Any) -> None:
    answers, offsets = {}, {}
    for precision in PRECISIONS:
        for optimizer in OPTIMIZERS:
            value = call(bytes_per_parameter, precision, optimizer,
                         name=f"bytes_per_parameter({precision!r}, {optimizer!r})")
            answers[precision, optimizer] = as_real(value, "the number of bytes")
            offsets[precision, optimizer] = (answers[precision, optimizer]
                                             - _reference(precision, optimizer))
    wrong = {key for key, offset in offsets.items() if abs(offset) > 1e-9}
    if not wrong:
        return

    def only(keys: set, offset: float) -> bool:
        return wrong == keys and all(abs(offsets[key] - offset) < 1e-9 for key in keys)

    mixed = {("mixed", optimizer) for optimizer in OPTIMIZERS}
    eight_bit = {(precision, "adamw8bit") for precision in PRECISIONS}
    if only(mixed, -4.0):
        raise Mistake("mixed precision also keeps a float32 master copy of the weights "
                      "(4 bytes per parameter) for the optimizer to update.")
    if only(eight_bit, -8 / BLOCK):
        raise Mistake("8-bit AdamW also stores, for each of its two moments, a float32 absmax "
                      f"per block of {BLOCK} values.")
    if only({("bf16", "adamw")}, 4.0):
        raise Mistake("pure bf16 training keeps AdamW's two moments in bf16 too (2 bytes "
                      "each), not in float32.")
    adamw = {(precision, "adamw") for precision in PRECISIONS}
    if wrong == adamw and all(
        abs(offsets[p, "adamw"] + memory.PRECISIONS[p][3]) < 1e-9
        for p in PRECISIONS
    ):
        raise Mistake("AdamW keeps *two* moments per parameter (m and v), not one.")
    precision, optimizer = sorted(wrong)[0]
    raise Mistake(f"wrong for precision={precision!r}, optimizer={optimizer!r}: add the weight, "
                  "its gradient, the optimizer's states and (mixed precision) the master copy.")


def _models() -> list[torch.nn.Module]:
    """A tied tiny GPT, a top-layer one (untied head), and one with LoRA on q and v."""
    torch.manual_seed(0)
    config = gpt.GPTConfig.preset("tiny")
    top = train.prepare_top(gpt.GPT(config), n_blocks=1)
    with_lora = gpt.GPT(config)
    lora.apply_lora(with_lora, lora.LoRAConfig(r=4, target_modules=("q", "v")))
    return [gpt.GPT(config), top, with_lora]


def _run_count(count_parameters: Any) -> None:
    for number, model in enumerate(_models(), start=1):
        result = call(count_parameters, model, name="count_parameters(model)")
        if not (isinstance(result, (tuple, list)) and len(result) == 2):
            raise Mistake("count_parameters must return a pair (trainable, total).")
        trainable, total = as_int(result[0], "trainable"), as_int(result[1], "total")
        right_trainable, right_total = lora.count_parameters(model)
        if (trainable, total) == (right_trainable, right_total):
            continue
        if (trainable, total) == (right_total, right_trainable) and right_total != right_trainable:
            raise Mistake("the pair is in the wrong order: return (trainable, total).")
        every = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
        if total == every and every != right_total:
            raise Mistake("a weight shared by two modules (the token embedding and the tied "
                          "head) is one tensor: count it once, as model.parameters() does.")
        if total == right_total - right_trainable and right_trainable:
            raise Mistake("total counts every parameter, trainable ones included.")
        raise Mistake(f"wrong count on test model {number}: trainable sums p.numel() over "
                      "parameters with requires_grad, total over all of them.")


def _top2_trainable() -> int:
    return lora.count_parameters(train.prepare_top(gpt.GPT(gpt.GPTConfig.preset("tiny")), 2))[0]


def _run_top2(answer: Any) -> None:
    value = as_int(answer, "top2_trainable")
    expected = _top2_trainable()
    if value == expected:
        return
    config = gpt.GPTConfig.preset("tiny")
    V, d = config.vocab_size, config.n_embd
    block = 12 * d * d + 13 * d
    if value == expected - V * d:
        raise Mistake("the head trains too: top-layer fine-tuning unties it, so it adds V d.")
    if value == expected - 2 * d:
        raise Mistake("the final LayerNorm (weight and bias, 2 d) trains too.")
    if value == expected - block:
        raise Mistake("that is one block: the exercise unfreezes the two top blocks.")
    raise Mistake("the count is " + ("too large" if value > expected else "too small") + ": "
                  "two blocks of 12 d^2 + 13 d, the final LayerNorm and the untied head.")


EXERCISES = [
    Exercise("03-bytes-per-parameter", 3, "bytes_per_parameter(precision, optimizer): bytes "
             "per parameter of full fine-tuning", "code", _run_bytes),
    Exercise("03-count-parameters", 3, "count_parameters(model): (trainable, total) as PEFT "
             "counts them", "code", _run_count),
    Exercise("03-top2-trainable", 3, "top2_trainable: parameters that train when the two top "
             "blocks of the tiny GPT are unfrozen", "number", _run_top2,
             lambda: [str(_top2_trainable()), f"{_top2_trainable():,}"]),
]
