"""The fused 4-bit GEMM computes the CPU reference's function (skipped without CUDA)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pedaPEFT import fused_gemm, gpt, kernels, lora, qlora, quant

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = torch.device("cuda")


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def _quantized(n_out, n_in, quant_type, double_quant, blocksize, seed):
    w = torch.randn(n_out, n_in, generator=torch.Generator().manual_seed(seed)) * 0.05
    st = quant.quantize_4bit(w, quant_type=quant_type, double_quant=double_quant,
                             blocksize=blocksize)
    stored = (st.packed.reshape(-1), st.absmax, st.code, st.nested_absmax, st.nested_code,
              st.offset)
    dense = quant.dequantize_4bit(st).double().view(n_out, n_in)  # the lesson's formula
    return tuple(None if t is None else t.to(CUDA) for t in stored), dense


# (M, N, K, blocksize): M from one row (the matrix-vector kernel, up to 4 rows) to several
# row tiles; K ragged against every tile width (4160, 2112, 320, 640), N not a multiple of any
# tile; and rows that cross quantization blocks (K % blocksize != 0: 200, 130), which the
# fused kernel leaves to the dequantize path.
SHAPES = [(1, 256, 512, 64), (2, 200, 4160, 64), (3, 130, 640, 64), (4, 1000, 2112, 32),
          (7, 96, 200, 64), (33, 1000, 130, 64), (64, 512, 4160, 64), (100, 200, 320, 32),
          (300, 384, 256, 128)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("path", ["fused", "dequantize"])
def test_matmul_4bit_matches_the_cpu_reference(shape, transposed, path, monkeypatch):
    M, N, K, blocksize = shape
    limit = 10**9 if path == "fused" else 0
    monkeypatch.setattr(fused_gemm, "FUSED_MAX_ROWS", {"forward": limit, "input_grad": limit})
    results = []
    for quant_type, double_quant in (("nf4", True), ("fp4", False)):
        stored, dense = _quantized(N, K, quant_type, double_quant, blocksize, seed=M + N + K)
        gen = torch.Generator().manual_seed(M)
        a = torch.randn(M, N if transposed else K, generator=gen).bfloat16()
        r = 16 if M % 2 else 5  # rank padded to the 16-wide tile, or masked
        lora_in = torch.randn(M, r, generator=gen).bfloat16()
        lora_weight = torch.randn(*((r, K) if transposed else (N, r)), generator=gen).bfloat16()
        bias = None if transposed else torch.randn(N, generator=gen).bfloat16()
        got = fused_gemm.matmul_4bit_eager(
            a.to(CUDA), *stored, N, K, blocksize, 256, transposed,
            None if bias is None else bias.to(CUDA), lora_in.to(CUDA), lora_weight.to(CUDA), 0.5)
        want = a.double() @ (dense if transposed else dense.T)
        want += 0.5 * lora_in.double() @ (lora_weight.double() if transposed
                                          else lora_weight.double().T)
        if bias is not None:
            want += bias.double()
        assert got.shape == want.shape and got.dtype == torch.bfloat16
        assert torch.isfinite(got).all()
        results.append(_relative_error(got.cpu(), want))
    assert max(results) < 1e-2, results


@pytest.mark.parametrize("M", [16, 512])
def test_fused_weight_tiles_are_bit_identical_to_the_dequantized_weight(M, monkeypatch):
    """With x = identity rows, x · Wᵀ returns rows of W: the in-kernel tile must be exactly
    the bf16 weight the dequantization kernel writes."""
    monkeypatch.setattr(fused_gemm, "FUSED_MAX_ROWS", {"forward": 10**9, "input_grad": 10**9})
    N, K = 192, M
    stored, _ = _quantized(N, K, "nf4", True, 64, seed=3)
    eye = torch.eye(M, K, device=CUDA, dtype=torch.bfloat16)
    got = fused_gemm.matmul_4bit_eager(eye, *stored, N, K, 64, 256, False, None, None, None,
                                       1.0)
    dense = kernels.dequantize_4bit_eager(*stored, N * K, 64, 256, torch.bfloat16).view(N, K)
    assert torch.equal(got, dense.T[:M])


@pytest.mark.parametrize("T", [3, 24, 700])
@pytest.mark.parametrize("dims", [(1024, 512), (520, 136)])
def test_qlora_layer_gradients_match_dense_autograd(T, dims):
    torch.manual_seed(T)
    n_in, n_out = dims
    layer = qlora.QLoRALinear.from_linear(nn.Linear(n_in, n_out, device=CUDA), r=16, alpha=32)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.05)
    assert fused_gemm.applies(layer, torch.empty(1, n_in, device=CUDA, dtype=torch.bfloat16))
    x = torch.randn(2, T, n_in, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(2, T, n_out, device=CUDA, dtype=torch.bfloat16)
    y = layer(x)
    grads = torch.autograd.grad(y, [x, layer.lora_A, layer.lora_B], g)
    w = layer.base_layer.dequantize(torch.float64)
    a = layer.lora_A.detach().double().requires_grad_(True)
    b = layer.lora_B.detach().double().requires_grad_(True)
    xr = x.detach().double().requires_grad_(True)
    yr = F.linear(xr, w, layer.base_layer.bias.double()) + layer.scaling * ((xr @ a.T) @ b.T)
    ref = torch.autograd.grad(yr, [xr, a, b], g.double())
    assert _relative_error(y, yr) < 1e-2
    for got, want in zip(grads, ref, strict=True):
        assert got.dtype == torch.bfloat16
        assert _relative_error(got, want) < 1e-2


def test_one_autograd_node_per_layer_and_no_dense_weight_saved():
    layer = qlora.QLoRALinear.from_linear(nn.Linear(256, 128, device=CUDA), r=8, alpha=8)
    x = torch.randn(4, 256, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert type(y.grad_fn).__name__ == "QLoRAFunctionBackward"
    saved = y.grad_fn.saved_tensors
    assert all(t is None or t.numel() < 256 * 128 for t in saved)


def _tiny_qlora_model(seed):
    torch.manual_seed(seed)
    model = gpt.GPT(gpt.GPTConfig.preset("tiny")).to(CUDA, torch.bfloat16)
    qlora.quantize_model(model, lora.LoRAConfig(r=8, alpha=16, target_modules=qlora.ALL_LINEAR))
    with torch.no_grad():
        for layer in qlora.qlora_layers(model).values():
            layer.lora_B.normal_(0, 0.02)
    return model


def test_a_whole_training_step_replays_from_a_cuda_graph():
    """Forward, backward and AdamW of the QLoRA tiny GPT captured once, then replayed: the
    same losses as eager steps taken from the same start."""
    batches = [torch.randint(0, 48, (2, 16), device=CUDA) for _ in range(6)]  # M = 32: fused

    def step(model, optimizer, params, idx):
        for p in params:
            p.grad.zero_()
        logits = model(idx)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), idx.view(-1))
        loss.backward()
        optimizer.step()
        return loss

    def losses(graphed):
        model = _tiny_qlora_model(0)
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer = torch.optim.AdamW(params, lr=1e-2, capturable=True)
        static_idx = batches[0].clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # kernels compiled, tuned, optimizer state allocated
            for _ in range(2):
                step(model, optimizer, params, static_idx)
        torch.cuda.current_stream().wait_stream(side)
        if not graphed:
            return [step(model, optimizer, params, idx).item() for idx in batches]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_loss = step(model, optimizer, params, static_idx)
        result = []  # capture executed nothing: the first replay is the first step
        for idx in batches:
            static_idx.copy_(idx)
            graph.replay()
            result.append(static_loss.item())
        return result

    eager, replayed = losses(False), losses(True)
    assert len(set(replayed)) > 1  # the replays trained
    torch.testing.assert_close(torch.tensor(replayed), torch.tensor(eager), rtol=2e-2, atol=2e-2)


def test_compiled_qlora_model_matches_eager_without_graph_breaks():
    model = _tiny_qlora_model(1)
    idx = torch.randint(0, 48, (4, 16), device=CUDA)  # M = 64 rows: the fused kernel
    explanation = torch._dynamo.explain(model)(idx)
    assert explanation.graph_break_count == 0
    torch._dynamo.reset()
    params = [p for p in model.parameters() if p.requires_grad]
    eager = torch.autograd.grad(model(idx).float().square().mean(), params)
    compiled = torch.compile(model, fullgraph=True)
    got = torch.autograd.grad(compiled(idx).float().square().mean(), params)
    for a, b in zip(got, eager, strict=True):
        assert _relative_error(a, b) < 2e-2


@pytest.mark.parametrize("T", [1, 3, 40])
def test_the_no_grad_forward_equals_the_autograd_forward(T, monkeypatch):
    """Inference skips the autograd node (and, for few rows, takes the matrix-vector kernel);
    its output must be the training forward's within bf16 rounding."""
    monkeypatch.setattr(fused_gemm, "FUSED_MAX_ROWS", {"forward": 4, "input_grad": 0})
    torch.manual_seed(T)
    layer = qlora.QLoRALinear.from_linear(nn.Linear(512, 768, device=CUDA), r=8, alpha=16)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.05)
    x = torch.randn(1, T, 512, device=CUDA, dtype=torch.bfloat16)
    with torch.no_grad():
        fast = layer(x)
    monkeypatch.setattr(fused_gemm, "FUSED_MAX_ROWS", {"forward": 0, "input_grad": 0})
    slow = layer(x.requires_grad_(True)).detach()
    assert fast.shape == slow.shape
    assert _relative_error(fast.cpu(), slow.cpu()) < 1e-2


@pytest.mark.parametrize("M", [1, 40])
def test_repeated_launches_and_a_misaligned_input_keep_the_result(M, monkeypatch):
    """The first launch tunes, the second compiles, later ones launch the compiled kernel
    (``tuned_launch``); an input 2 bytes off 16-byte alignment needs its own binary."""
    monkeypatch.setattr(fused_gemm, "FUSED_MAX_ROWS", {"forward": 10**9, "input_grad": 10**9})
    N, K = 256, 512
    stored, dense = _quantized(N, K, "nf4", True, 64, seed=3)
    storage = torch.randn(M * K + 1, device=CUDA, dtype=torch.bfloat16)
    for a in [storage[: M * K].view(M, K)] * 3 + [storage[1:].view(M, K)] * 3:
        got = fused_gemm.matmul_4bit_eager(a, *stored, N, K, 64, 256, False, None, None, None,
                                           1.0)
        assert _relative_error(got.cpu(), a.double().cpu() @ dense.T) < 1e-2
    want = dense.float().bfloat16().view(-1)  # the float32 reference, rounded once
    for _ in range(3):
        got = kernels.dequantize_4bit_eager(*stored, N * K, 64, 256, torch.bfloat16)
        assert torch.equal(got.cpu(), want)


def test_a_bound_dequantization_follows_new_buffers_and_new_values():
    """From the third call on, a weight dequantized before is launched straight from its bound
    binary (``kernels._BOUND``). Buffers changed in place, a replaced scale tensor and a
    same-sized other weight must all give their own result, never a stale one."""
    N, K = 256, 512
    stored, dense = _quantized(N, K, "nf4", True, 64, seed=5)

    def dequantized(tensors):
        return kernels.dequantize_4bit_eager(*tensors, N * K, 64, 256, torch.bfloat16).cpu()

    want = dense.float().bfloat16().view(-1)
    for _ in range(3):
        assert torch.equal(dequantized(stored), want)
    assert (id(stored[0]), torch.bfloat16) in kernels._BOUND
    stored[0].bitwise_xor_(0x11)  # every nibble moves, in place: the same tensor object
    flipped = dequantized(stored)
    stored[0].bitwise_xor_(0x11)
    assert not torch.equal(flipped, want)
    assert torch.equal(dequantized(stored), want)
    # absmax = nested_code[q]·nested_absmax + offset: halving both halves it exactly
    halved = (*stored[:3], stored[3] / 2, stored[4], stored[5] / 2)  # new objects
    assert torch.equal(dequantized(halved), (dense.float() / 2).bfloat16().view(-1))
    other, other_dense = _quantized(N, K, "nf4", True, 64, seed=6)
    for _ in range(3):
        assert torch.equal(dequantized(other), other_dense.float().bfloat16().view(-1))
