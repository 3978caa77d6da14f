"""Lesson 9 exercises: the QLoRA autograd function, a QLoRA layer, and its stored bits.

The autograd function and the layer are compared with plain autograd through the dense
dequantized weight (``quant.dequantize_4bit``): outputs, ∂L/∂x, ∂L/∂A, ∂L/∂B. Every tensor
autograd saves is recorded with ``torch.autograd.graph.saved_tensors_hooks``, so a dense weight
kept for backward is caught, as is one kept on the module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pedaPEFT import qlora, quant
from pedaPEFT.exercise_bank.base import Exercise, Mistake
from pedaPEFT.exercise_bank.tensor_checks import call, close, seeded, tensor

OUT_FEATURES, IN_FEATURES = 48, 64  # not square: a missing transpose cannot go unnoticed


def _weight(seed: int) -> torch.Tensor:
    return torch.randn(OUT_FEATURES, IN_FEATURES, generator=seeded(seed)) * 0.05


def _record_saved(run: Callable[[], Any]) -> tuple[Any, list[torch.Tensor]]:
    """Run ``run()`` and return its result and every tensor autograd saved meanwhile."""
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        return run(), saved


def _dense(tensors: list[Any], weight_numel: int) -> bool:
    """True if a floating-point tensor as large as the weight is among ``tensors``."""
    return any(isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() >= weight_numel
               for t in tensors)


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


# --------------------------------------------------------------------------- autograd function


def check_dequant_matmul(answer: Any) -> None:
    """The student's ``DequantMatmul``: ``apply(x, state) = x · dequant(state)ᵀ``."""
    if not (isinstance(answer, type) and issubclass(answer, torch.autograd.Function)):
        raise Mistake("DequantMatmul must be a subclass of torch.autograd.Function with static "
                      "forward(ctx, x, state) and backward(ctx, grad_y) methods")
    g = seeded(9)
    for seed, x_shape in ((90, (5, IN_FEATURES)), (91, (2, 3, IN_FEATURES))):
        state = quant.quantize_4bit(_weight(seed))
        weight = quant.dequantize_4bit(state).float()
        x = torch.randn(*x_shape, generator=g, requires_grad=True)
        y, saved = _record_saved(lambda x=x, state=state: call(
            answer.apply, x, state, when_it_fails="forward fails: y = x · dequant(Q)ᵀ with the "
            "dequantized (out, in) weight, for an x of any leading shape"))
        tensor(y, "the output", shape=(*x_shape[:-1], OUT_FEATURES),
               hint="y = x · Wᵀ has out_features columns")
        if not close(y.detach(), F.linear(x.detach(), weight), rtol=1e-5, atol=1e-6):
            raise Mistake("the forward output differs from x · dequant(Q)ᵀ: dequantize the "
                          "state with quant.dequantize_4bit, then multiply")
        kept = list(vars(y.grad_fn).values()) if y.grad_fn is not None else []
        if _dense(saved + kept, weight.numel()):
            raise Mistake("the dense weight was saved for backward (or kept on ctx): save only "
                          "the quantized state and dequantize again in backward")
        if any(_same_storage(t, x) for t in saved + kept if isinstance(t, torch.Tensor)):
            raise Mistake("x was saved for backward: only ∂L/∂x is needed, ∂L/∂y · dequant(Q), "
                          "which does not involve x (the frozen base gets no weight gradient)")
        if y.grad_fn is None:
            raise Mistake("the output has no gradient: return the product from forward (do not "
                          "detach it) so that autograd calls your backward")
        grad_y = torch.randn(y.shape, generator=g)
        call(y.backward, grad_y, when_it_fails="backward fails: return one gradient per forward "
             "input, ∂L/∂x = ∂L/∂y · dequant(Q) for x and None for the state (the frozen base "
             "gets no gradient)")
        if x.grad is None:
            raise Mistake("no gradient reached x: backward must return ∂L/∂y · dequant(Q) first")
        if not close(x.grad, grad_y @ weight, rtol=1e-5, atol=1e-6):
            raise Mistake("∂L/∂x differs from ∂L/∂y · dequant(Q) (shape (..., in_features))")


# --------------------------------------------------------------------------- the layer


def _parameters_and_tensors(module: nn.Module) -> list[torch.Tensor]:
    found = list(module.parameters()) + list(module.buffers())
    for sub in module.modules():
        found += [v for v in vars(sub).values() if isinstance(v, torch.Tensor)]
        found += [getattr(v, f) for v in vars(sub).values() if isinstance(v, quant.QuantState)
                  for f in ("packed", "absmax")]
    return found


def check_qlora_layer(answer: Any) -> None:
    """The student's ``QLoRALayer(linear, r, alpha)``: frozen NF4 base plus a LoRA update."""
    if not callable(answer):
        raise Mistake("QLoRALayer must be a torch.nn.Module subclass")
    g = seeded(19)
    for seed, r, alpha in ((92, 4, 8.0), (93, 8, 4.0)):
        linear = nn.Linear(IN_FEATURES, OUT_FEATURES)
        with torch.no_grad():
            linear.weight.copy_(_weight(seed))
            linear.bias.copy_(torch.randn(OUT_FEATURES, generator=g) * 0.1)
        layer = call(answer, linear, r, alpha,
                     when_it_fails="QLoRALayer(linear, r, alpha) fails to build")
        if not isinstance(layer, nn.Module):
            raise Mistake("QLoRALayer must be a torch.nn.Module subclass")
        weight = quant.dequantize_4bit(quant.quantize_4bit(linear.weight.detach())).float()
        n = weight.numel()
        if _dense([t for t in _parameters_and_tensors(layer)
                   if not any(t is p for p in (getattr(layer, "lora_A", None),
                                               getattr(layer, "lora_B", None)))], n):
            raise Mistake("a dense copy of the base weight is kept: store only "
                          "quant.quantize_4bit's state (and the bias)")
        a = tensor(getattr(layer, "lora_A", None), "layer.lora_A", shape=(r, IN_FEATURES),
                   hint="lora_A is (r, in_features), as in lesson 5")
        b = tensor(getattr(layer, "lora_B", None), "layer.lora_B", shape=(OUT_FEATURES, r),
                   hint="lora_B is (out_features, r), as in lesson 5")
        trainable = [p for p in layer.parameters() if p.requires_grad]
        if len(trainable) != 2 or not {id(layer.lora_A), id(layer.lora_B)} == set(
                map(id, trainable)):
            raise Mistake("only lora_A and lora_B are trainable parameters: the base is frozen "
                          "(its bias too)")
        if bool(b.any()):
            raise Mistake("B is not zero at initialisation: the layer must start as the base")
        if not bool(a.any()):
            raise Mistake("A is zero at initialisation: A is random, so B gets a gradient")
        x = torch.randn(6, IN_FEATURES, generator=g)
        y0 = call(layer, x, when_it_fails="the forward pass fails on an input (batch, in)")
        if not close(tensor(y0, "the output").float(), F.linear(x, weight, linear.bias.detach()),
                     rtol=1e-4, atol=1e-5):
            raise Mistake("at initialisation the output must equal the quantized base: "
                          "x · dequant(Q)ᵀ + bias")
        _check_trained(layer, weight, linear.bias.detach(), r, alpha, g)


def _check_trained(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor, r: int,
                   alpha: float, g: torch.Generator) -> None:
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    a_ref = layer.lora_A.detach().clone().requires_grad_(True)
    b_ref = layer.lora_B.detach().clone().requires_grad_(True)
    x = torch.randn(6, IN_FEATURES, generator=g, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, saved = _record_saved(lambda: layer(x))
    y_ref = F.linear(x_ref, weight, bias) + (alpha / r) * (x_ref @ a_ref.T) @ b_ref.T
    if not close(y.detach().float(), y_ref.detach(), rtol=1e-4, atol=1e-5):
        branch = (x_ref @ a_ref.T) @ b_ref.T
        base = F.linear(x_ref, weight, bias)
        for wrong, hint in ((alpha, "scaled by α instead of α/r"),
                            (r / alpha, "scaled by r/α instead of α/r"),
                            (1.0, "the LoRA branch is not scaled: multiply it by α/r")):
            if close(y.detach(), (base + wrong * branch).detach(), rtol=1e-4, atol=1e-5):
                raise Mistake(hint)
        raise Mistake("the output differs from x · dequant(Q)ᵀ + bias + (α/r) · B(A x)")
    if _dense(saved, weight.numel()):
        raise Mistake("the dense weight was saved for backward: send the base through your "
                      "DequantMatmul (it saves only the quantized state)")
    grad_y = torch.randn(y.shape, generator=g)
    y.backward(grad_y)
    y_ref.backward(grad_y)
    for name, got, ref in (("lora_A", layer.lora_A.grad, a_ref.grad),
                           ("lora_B", layer.lora_B.grad, b_ref.grad), ("x", x.grad, x_ref.grad)):
        if got is None or not close(got.float(), ref, rtol=1e-4, atol=1e-6):
            raise Mistake(f"the gradient of {name} differs from autograd through the dense "
                          "dequantized weight")


# --------------------------------------------------------------------------- bits of a layer


def _bits_4096() -> float:
    fmt = qlora.BaseFormat("nf4", 4096, 4096, 64, True, 256, "float32", "float32")
    return qlora.QuantLinear(fmt, bias=False, device="meta").bits_per_parameter()


def check_bits_4096(answer: Any) -> None:
    """Bits per weight stored by a 4096 x 4096 NF4 + DQ layer, tables and offset included."""
    if isinstance(answer, torch.Tensor) and answer.numel() == 1:
        answer = answer.item()
    if isinstance(answer, bool) or not isinstance(answer, int | float):
        raise Mistake(f"expected a number of bits per weight, got {type(answer).__name__}")
    expected = _bits_4096()
    if abs(answer - expected) <= 1e-9 * expected:
        return
    n = 4096**2
    formula = quant.bits_per_parameter()
    if abs(answer - formula) <= 1e-9:
        raise Mistake("the two code tables (16 and 256 float32 entries) and the offset are "
                      "stored too")
    if abs(answer - (formula + 32 * (16 + 256) / n)) <= 1e-9:
        raise Mistake("the offset (one float32) is stored too")
    if abs(answer - (formula + 4 * (16 + 256 + 1) / n)) <= 1e-9:
        raise Mistake("the tables were counted in bytes: each float32 entry holds 32 bits")
    raise Mistake("add 4 bits per code, 8 per block of 64, 32 per 256 blocks, and 32 bits for "
                  "every table entry and the offset, divided by 4096²")


def _bits_4096_secrets() -> list[str]:
    value = _bits_4096()
    return [repr(value)] + [f"{value:.{digits}f}" for digits in range(5, 12)]


EXERCISES: list[Exercise] = [
    Exercise(
        id="09-dequant-matmul",
        lesson=9,
        title="DequantMatmul: an autograd.Function that never keeps the dense weight",
        kind="code",
        run=check_dequant_matmul,
    ),
    Exercise(
        id="09-qlora-layer",
        lesson=9,
        title="QLoRALayer(linear, r, alpha): a frozen NF4 base plus a trainable LoRA update",
        kind="code",
        run=check_qlora_layer,
    ),
    Exercise(
        id="09-bits-4096",
        lesson=9,
        title="bits_4096: bits per weight of a 4096 x 4096 NF4 + DQ layer, tables and offset "
              "included",
        kind="number",
        run=check_bits_4096,
        secrets=_bits_4096_secrets,
    ),
]
