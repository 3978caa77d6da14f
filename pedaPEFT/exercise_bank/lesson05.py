"""Lesson 5's exercises: the LoRALinear layer, applying LoRA to the GPT, mt0-large's share.

The layer is checked like the package's :class:`pedaPEFT.lora.LoRALinear`: shapes and
trainability, the output unchanged at initialisation (B = 0, A random), the α/r scaling
(random A and B, compared with ``W0 x + b + (α/r) B A x``), and ``merge()`` (the weight gains
exactly ``(α/r) B A`` and the output does not change).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from pedaPEFT import gpt, lora
from pedaPEFT.exercise_bank.base import Exercise, Mistake, as_real, as_tensor, call

IN, OUT, R, ALPHA = 12, 10, 4, 8.0


def _output(layer: nn.Module, x: torch.Tensor, what: str) -> torch.Tensor:
    out = as_tensor(call(layer, x, name=what), f"the output of {what}")
    if tuple(out.shape) != (x.shape[0], OUT):
        raise Mistake(f"{what} must return shape {(x.shape[0], OUT)}, got {tuple(out.shape)}.")
    return out


def _run_layer(layer_class: Any) -> None:
    base = nn.Linear(IN, OUT)
    W0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    layer = call(layer_class, base, R, ALPHA, name=f"LoRALinear(base, r={R}, alpha={ALPHA})")
    if not isinstance(layer, nn.Module):
        raise Mistake("LoRALinear must be an nn.Module subclass (call super().__init__()).")
    A, B = getattr(layer, "lora_A", None), getattr(layer, "lora_B", None)
    if not (isinstance(A, torch.Tensor) and isinstance(B, torch.Tensor)):
        raise Mistake("store the factors as self.lora_A (r x in_features) and self.lora_B "
                      "(out_features x r).")
    if tuple(A.shape) == (OUT, R) and tuple(B.shape) == (R, IN):
        raise Mistake("A and B swapped: A is (r, in_features) and reads the input; B is "
                      "(out_features, r) and writes the output.")
    if tuple(A.shape) != (R, IN) or tuple(B.shape) != (OUT, R):
        raise Mistake(f"lora_A must have shape (r, in_features) = {(R, IN)} and lora_B "
                      f"(out_features, r) = {(OUT, R)}; got {tuple(A.shape)} and "
                      f"{tuple(B.shape)}.")
    if not (isinstance(A, nn.Parameter) and isinstance(B, nn.Parameter)
            and A.requires_grad and B.requires_grad):
        raise Mistake("lora_A and lora_B must be trainable nn.Parameters.")
    if base.weight.requires_grad or base.bias.requires_grad:
        raise Mistake("the base layer still trains: freeze its weight and bias "
                      "(requires_grad = False).")
    if B.detach().abs().sum() != 0:
        raise Mistake("B is not zero at initialisation: start B at zero so the layer first "
                      "computes exactly what the base layer did.")
    if not A.detach().abs().sum() > 0:
        raise Mistake("A is zero at initialisation too: then B's gradient is zero and nothing "
                      "learns; initialise A randomly (kaiming_uniform_).")
    x = torch.randn(5, IN)
    with torch.no_grad():
        if not torch.allclose(_output(layer, x, "the layer"), x @ W0.T + b0, atol=1e-5):
            raise Mistake("at initialisation the output must equal base(x): the base layer "
                          "plus a branch that is still zero.")
        A.copy_(torch.randn(R, IN))
        B.copy_(torch.randn(OUT, R))
    out_with_grad = _output(layer, x, "the layer")
    out = out_with_grad.detach()

    def with_scale(scale: float) -> torch.Tensor:
        return (x @ W0.T + b0 + scale * (x @ A.T @ B.T)).detach()

    right = ALPHA / R
    if not torch.allclose(out, with_scale(right), atol=1e-4):
        for scale, hint in ((ALPHA, "scaled by α instead of α/r"),
                            (1.0, "the branch is not scaled: multiply it by α/r"),
                            (ALPHA / math.sqrt(R), "α/√r is rsLoRA: plain LoRA scales by α/r"),
                            (R / ALPHA, "scaled by r/α: the scale is α/r")):
            if torch.allclose(out, with_scale(scale), atol=1e-4):
                raise Mistake(hint + ".")
        raise Mistake("with random A and B the output is not base(x) + (α/r) B A x.")
    if not out_with_grad.requires_grad:
        raise Mistake("no gradient reaches lora_A or lora_B: compute the branch from them "
                      "with tensor operations (no .detach(), no torch.no_grad()).")
    out_with_grad.sum().backward()
    if A.grad is None or B.grad is None:
        raise Mistake("no gradient reached lora_A or lora_B: compute the branch from them "
                      "with tensor operations (no .detach(), no torch.no_grad()).")
    merge = getattr(layer, "merge", None)
    if merge is None:
        raise Mistake("write merge(self): add (α/r) B A into the base layer's weight.")
    with torch.no_grad():
        call(merge, name="merge()")
        if not torch.allclose(base.weight, W0 + right * (B @ A), atol=1e-5):
            raise Mistake("after merge() the base weight must be W0 + (α/r) B A (in place, on "
                          "the base layer's weight).")
        merged_out = _output(layer, x, "the merged layer")
    if torch.allclose(merged_out, out, atol=1e-4):
        return
    if torch.allclose(merged_out, out + right * (x @ A.T @ B.T), atol=1e-4):
        raise Mistake("after merge() the update is counted twice: once merged, forward must "
                      "skip the LoRA branch (keep a `merged` flag).")
    raise Mistake("merging changed the layer's output; a merged layer computes the same "
                  "function with one matmul.")


def _tiny_gpt() -> gpt.GPT:
    torch.manual_seed(0)
    return gpt.GPT(gpt.GPTConfig.preset("tiny")).eval()


def _run_apply(apply_lora: Any) -> None:
    for targets in (("q", "v"), ("o",)):
        model, reference = _tiny_gpt(), _tiny_gpt()
        expected = set(lora.apply_lora(reference, lora.LoRAConfig(r=R, alpha=ALPHA,
                                                                  target_modules=targets)))
        tokens = torch.randint(0, model.config.vocab_size, (2, 8))
        with torch.no_grad():
            before = model(tokens)
        call(apply_lora, model, R, ALPHA, targets,
             name=f"apply_lora(model, {R}, {ALPHA}, {targets})")
        wrapped = {name for name, module in model.named_modules()
                   if isinstance(module, lora.LoRALinear)
                   or (hasattr(module, "lora_A") and hasattr(module, "lora_B"))}
        if wrapped - expected:
            raise Mistake(f"layers that are not targets were wrapped (targets {targets}): a "
                          "layer matches when the last part of its name equals a target, not "
                          "when the target appears somewhere in its name.")
        if expected - wrapped:
            raise Mistake(f"{len(expected - wrapped)} target layers have no LoRA (targets "
                          f"{targets}): wrap every matching nn.Linear in every block.")
        with torch.no_grad():
            after = as_tensor(call(model, tokens, name="the model after apply_lora"),
                              "the model's output")
        if not torch.allclose(after, before, atol=1e-5):
            raise Mistake("the model's output changed: freshly applied LoRA must not change it "
                          "(lora.LoRALinear starts with B = 0).")
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        if any("lora_" not in name for name in trainable):
            raise Mistake("parameters outside LoRA still train: freeze everything except "
                          "lora_A and lora_B (PEFT's bias='none').")
        if lora.count_parameters(model)[0] != lora.count_parameters(reference)[0]:
            raise Mistake("some LoRA factors are frozen: lora_A and lora_B must train.")


MT0_BASE, MT0_BLOCKS, MT0_D = 1_229_581_312, 72, 1024


def _mt0_percent() -> float:
    trainable = MT0_BLOCKS * 4 * 16 * (MT0_D + MT0_D)
    return 100 * trainable / (MT0_BASE + trainable)


def _run_mt0(answer: Any) -> None:
    value = as_real(answer, "mt0_qkvo_r16_percent")
    expected = _mt0_percent()
    if abs(value - expected) <= 1e-3 * expected:
        return
    trainable = MT0_BLOCKS * 4 * 16 * (MT0_D + MT0_D)
    if abs(value - 100 * trainable / MT0_BASE) <= 1e-5 * expected:
        raise Mistake("'all params' includes the LoRA parameters: divide by base + trainable.")
    if abs(value - expected / 100) <= 1e-3 * expected / 100:
        raise Mistake("that is a fraction: the exercise asks for a percentage.")
    if abs(value - expected / 2) <= 1e-2 * expected:
        raise Mistake("LoRA on four projections, not two: q, k, v and o.")
    raise Mistake("the percentage is " + ("too large" if value > expected else "too small") +
                  ": 72 attention blocks x 4 projections, each r (1024 + 1024).")


EXERCISES = [
    Exercise("05-lora-layer", 5, "LoRALinear(base, r, alpha): frozen base + (α/r) B A, B = 0 at "
             "init, merge()", "code", _run_layer),
    Exercise("05-apply-lora", 5, "apply_lora(model, r, alpha, targets): wrap the target layers "
             "in lora.LoRALinear and freeze the rest", "code", _run_apply),
    Exercise("05-mt0-percent", 5, "mt0_qkvo_r16_percent: PEFT's trainable% for r = 16 on q, k, "
             "v, o of mt0-large", "number", _run_mt0,
             lambda: [f"{_mt0_percent():.{digits}f}" for digits in (3, 4, 5)]),
]
