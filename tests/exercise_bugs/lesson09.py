"""Planted bugs for lesson 9's exercises, each with the hint that must name it.

``SOLUTIONS`` holds a right answer per exercise (the lesson's solution, written again here).
"""

import math

import torch
from torch import nn

from pedaPEFT import quant


class DequantMatmul(torch.autograd.Function):
    """y = x · dequant(Q)ᵀ; backward dequantizes again and returns only ∂L/∂x."""

    @staticmethod
    def forward(ctx, x, state):
        ctx.state = state
        return x @ quant.dequantize_4bit(state).to(x.dtype).T

    @staticmethod
    def backward(ctx, grad_y):
        return grad_y @ quant.dequantize_4bit(ctx.state).to(grad_y.dtype), None


class SavesDenseWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, state):
        weight = quant.dequantize_4bit(state).to(x.dtype)
        ctx.save_for_backward(weight)
        return x @ weight.T

    @staticmethod
    def backward(ctx, grad_y):
        (weight,) = ctx.saved_tensors
        return grad_y @ weight, None


class KeepsDenseWeightOnCtx(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, state):
        ctx.weight = quant.dequantize_4bit(state).to(x.dtype)
        return x @ ctx.weight.T

    @staticmethod
    def backward(ctx, grad_y):
        return grad_y @ ctx.weight, None


class ComputesWeightGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, state):
        ctx.state = state
        ctx.save_for_backward(x)
        return x @ quant.dequantize_4bit(state).to(x.dtype).T

    @staticmethod
    def backward(ctx, grad_y):
        (x,) = ctx.saved_tensors
        ctx.grad_weight = grad_y.reshape(-1, grad_y.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        return grad_y @ quant.dequantize_4bit(ctx.state).to(grad_y.dtype), None


class TransposedBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, state):
        ctx.state = state
        return x @ quant.dequantize_4bit(state).to(x.dtype).T

    @staticmethod
    def backward(ctx, grad_y):
        return grad_y @ quant.dequantize_4bit(ctx.state).to(grad_y.dtype).T, None


class ReturnsGradientForState(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, state):
        ctx.state = state
        return x @ quant.dequantize_4bit(state).to(x.dtype).T

    @staticmethod
    def backward(ctx, grad_y):
        return grad_y @ quant.dequantize_4bit(ctx.state).to(grad_y.dtype)


class QLoRALayer(nn.Module):
    """A frozen NF4 + DQ base (through DequantMatmul) plus s · B(A x), s = α / r."""

    def __init__(self, linear, r, alpha, *, scaling=None, b_init=0.0, keep_dense=False,
                 function=DequantMatmul):
        super().__init__()
        self.state = quant.quantize_4bit(linear.weight.detach())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.dense = linear.weight.detach().clone() if keep_dense else None
        self.lora_A = nn.Parameter(torch.empty(r, linear.in_features))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.full((linear.out_features, r), b_init))
        self.scaling = alpha / r if scaling is None else scaling(alpha, r)
        self.function = function

    def forward(self, x):
        y = self.function.apply(x, self.state)
        if self.bias is not None:
            y = y + self.bias
        return y + self.scaling * (x @ self.lora_A.T) @ self.lora_B.T


class DenseAutogradLayer(QLoRALayer):
    """Dequantizes with plain autograd: the dense weight is saved for backward."""

    def forward(self, x):
        weight = quant.dequantize_4bit(self.state)
        return (torch.nn.functional.linear(x, weight, self.bias)
                + self.scaling * (x @ self.lora_A.T) @ self.lora_B.T)


def bits_4096(*, tables=True, offset=True, in_bytes=False):
    bits = 4 + 8 / 64 + 32 / (64 * 256)
    per_entry = 4 if in_bytes else 32
    entries = (16 + 256 if tables else 0) + (1 if offset else 0)
    return bits + per_entry * entries / 4096**2


SOLUTIONS = {
    "09-dequant-matmul": DequantMatmul,
    "09-qlora-layer": QLoRALayer,
    "09-bits-4096": bits_4096(),
}

BUGS = {
    "09-dequant-matmul": [
        (SavesDenseWeight, "the dense weight was saved for backward"),
        (KeepsDenseWeightOnCtx, "the dense weight was saved for backward"),
        (ComputesWeightGradient, "only ∂L/∂x is needed"),
        (TransposedBackward, "backward fails"),
        (ReturnsGradientForState, "None for the state"),
    ],
    "09-qlora-layer": [
        (lambda lin, r, a: QLoRALayer(lin, r, a, scaling=lambda a, r: a), "scaled by α instead"),
        (lambda lin, r, a: QLoRALayer(lin, r, a, b_init=0.01), "B is not zero"),
        (lambda lin, r, a: QLoRALayer(lin, r, a, keep_dense=True), "dense copy of the base"),
        (lambda lin, r, a: QLoRALayer(lin, r, a, function=SavesDenseWeight),
         "the dense weight was saved for backward"),
        (DenseAutogradLayer, "the dense weight was saved for backward"),
        (lambda lin, r, a: QLoRALayer(lin, r, a, scaling=lambda a, r: r / a), "r/α"),
        (lambda lin, r, a: QLoRALayer(lin, r, a, scaling=lambda a, r: 1.0), "not scaled"),
    ],
    "09-bits-4096": [
        (bits_4096(tables=False, offset=False), "tables"),
        (bits_4096(offset=False), "the offset"),
        (bits_4096(in_bytes=True), "counted in bytes"),
    ],
}
