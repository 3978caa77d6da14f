"""The one-node QLoRA autograd Function on the CPU (its dequantize + matmul path)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pedaPEFT import fused_gemm, qlora


def _layer(n_in, n_out, seed, dropout=0.0):
    torch.manual_seed(seed)
    layer = qlora.QLoRALinear.from_linear(nn.Linear(n_in, n_out), r=4, alpha=8, dropout=dropout)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    return layer


@pytest.mark.parametrize("shape", [(3, 64, 32), (5, 130, 96)])  # (tokens, in, out); 130: rows
def test_function_matches_float64_autograd(shape):                # cross quantization blocks
    T, n_in, n_out = shape
    layer = _layer(n_in, n_out, seed=T)
    x = torch.randn(2, T, n_in, requires_grad=True)
    g = torch.randn(2, T, n_out)
    y = layer(x)
    assert type(y.grad_fn).__name__ == "QLoRAFunctionBackward"
    grads = torch.autograd.grad(y, [x, layer.lora_A, layer.lora_B], g)
    w = layer.base_layer.dequantize(torch.float64)
    a, b = (p.detach().double().requires_grad_(True) for p in (layer.lora_A, layer.lora_B))
    xr = x.detach().double().requires_grad_(True)
    yr = F.linear(xr, w, layer.base_layer.bias.double()) + layer.scaling * (xr @ a.T) @ b.T
    ref = torch.autograd.grad(yr, [xr, a, b], g.double())
    torch.testing.assert_close(y.double(), yr, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_function_and_unfused_path_compute_the_same(monkeypatch):
    layer = _layer(64, 48, seed=0)
    x = torch.randn(7, 64)
    fused = layer(x)
    monkeypatch.setattr(fused_gemm, "ENABLED", False)
    unfused = layer(x)
    assert type(unfused.grad_fn).__name__ != "QLoRAFunctionBackward"
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-6)


def test_active_dropout_keeps_the_unfused_path():
    layer = _layer(64, 32, seed=1, dropout=0.1)
    x = torch.randn(4, 64)
    assert not fused_gemm.applies(layer.train(), x)
    assert fused_gemm.applies(layer.eval(), x)


def test_registered_operator_has_a_shape_only_fake():
    layer = _layer(64, 32, seed=2)
    args = layer.base_layer.stored_tensors()
    a = torch.randn(5, 32)
    out = torch.ops.pedapeft.matmul_4bit(a, *args, 32, 64, 64, 256, True, None, None, None, 1.0)
    assert out.shape == (5, 64)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = torch.ops.pedapeft.matmul_4bit(torch.empty(9, 64), *args, 32, 64, 64, 256, False,
                                              None, None, None, 1.0)
    assert fake.shape == (9, 32)
