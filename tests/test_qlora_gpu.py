"""The CUDA path of the QLoRA layer computes the CPU path's function (skipped without CUDA)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pedaPEFT import gpt, kernels, lora, qlora, quant

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = torch.device("cuda")
TINY = gpt.GPTConfig.preset("tiny")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("n", [64, 64 * 257, 64 * 256 * 3 + 64 * 5, 1001])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_triton_dequantization_is_bit_exact_with_the_cpu(quant_type, double_quant, n, out_dtype):
    w = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 0.03
    state = quant.quantize_4bit(w, quant_type=quant_type, double_quant=double_quant)
    args = (state.packed, state.absmax, state.code, state.nested_absmax, state.nested_code,
            state.offset)
    cpu = kernels.dequantize_4bit_torch(*args, n, 64, 256, out_dtype)
    gpu_args = tuple(None if a is None else a.to(CUDA) for a in args)
    gpu = kernels.dequantize_4bit_triton(*gpu_args, n, 64, 256, out_dtype)
    assert not gpu.isnan().any()
    assert torch.equal(gpu.cpu(), cpu)
    assert torch.equal(cpu, quant.dequantize_4bit(state).to(out_dtype))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int8"])
def test_layer_on_gpu_matches_the_cpu_layer(quant_type):
    torch.manual_seed(0)
    linear = nn.Linear(512, 256)
    cpu = qlora.QLoRALinear.from_linear(linear, r=8, alpha=16, quant_type=quant_type)
    with torch.no_grad():
        cpu.lora_B.normal_(0, 0.05)
    gpu = qlora.QLoRALinear.from_linear(linear.to(CUDA), r=8, alpha=16, quant_type=quant_type)
    assert gpu.compute_dtype == torch.bfloat16
    with torch.no_grad():
        gpu.lora_A.copy_(cpu.lora_A)
        gpu.lora_B.copy_(cpu.lora_B)
    w_gpu, w_cpu = gpu.base_layer.dequantize().cpu(), cpu.base_layer.dequantize()
    if quant_type == "int8":
        # Same codes; the scale absmax / 127 may differ in the last bit (the CPU divides by a
        # scalar through its reciprocal), so the values agree to float32 rounding.
        assert torch.equal(gpu.base_layer.qweight.cpu(), cpu.base_layer.qweight)
        torch.testing.assert_close(w_gpu, w_cpu, rtol=1e-6, atol=0)
    else:
        assert torch.equal(w_gpu, w_cpu)
    x = torch.randn(16, 512)
    y_cpu, y_gpu = cpu(x), gpu(x.to(CUDA)).cpu()
    assert (y_gpu - y_cpu).norm() / y_cpu.norm() < 1e-2


def test_gpu_gradients_match_autograd_through_the_dense_weight():
    torch.manual_seed(1)
    layer = qlora.QLoRALinear.from_linear(nn.Linear(1024, 512, device=CUDA), r=16, alpha=16)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.05)
    x = torch.randn(64, 1024, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(64, 512, device=CUDA, dtype=torch.bfloat16)
    grads = torch.autograd.grad(layer(x), [x, layer.lora_A, layer.lora_B], g)
    w = layer.base_layer.dequantize(torch.bfloat16)
    a = layer.lora_A.detach().requires_grad_(True)
    b = layer.lora_B.detach().requires_grad_(True)
    xr = x.detach().requires_grad_(True)
    yr = F.linear(xr, w, layer.base_layer.bias.to(torch.bfloat16)) + layer.scaling * (
        (xr @ a.T) @ b.T)
    ref = torch.autograd.grad(yr, [xr, a, b], g)
    for got, want in zip(grads, ref, strict=True):
        assert (got.float() - want.float()).norm() / want.float().norm() < 1e-2


def test_compiled_qlora_gpt_on_gpu_has_no_graph_break():
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig.preset("tiny")).to(CUDA, torch.bfloat16)
    qlora.quantize_model(model, lora.LoRAConfig(r=4, alpha=8, target_modules=(
        "q", "k", "v", "o", "fc", "proj")))
    idx = torch.randint(0, TINY.vocab_size, (4, TINY.block_size), device=CUDA)
    assert torch._dynamo.explain(model)(idx).graph_break_count == 0
    compiled = torch.compile(model, fullgraph=True)
    eager, fused = model(idx), compiled(idx)
    assert (fused - eager).norm() / eager.norm() < 2e-2  # bf16 matmuls, fused differently
    logits = compiled(idx)
    F.cross_entropy(logits.view(-1, TINY.vocab_size).float(), idx.view(-1)).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.isfinite().all() for g in grads)
