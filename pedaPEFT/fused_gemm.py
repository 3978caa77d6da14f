"""A QLoRA layer in one autograd Function, with the 4-bit weight dequantized inside the GEMM.

Notation: ``x`` (M, K) the input rows, ``W`` (N, K) the frozen weight stored as blockwise 4-bit
codes (``pedaPEFT.kernels`` gives the dequantization formula: ``w[i] = code[nibble_i] ·
absmax_f32[i // blocksize]``, the absmax itself double-quantized), ``A`` (r, K) and ``B`` (N, r)
the LoRA factors, ``s = α / r``. The layer and its gradients are::

    y   = x · Wᵀ + b + s · (x · Aᵀ) · Bᵀ                 forward
    u   = s · g · B                                       (M, r), g = ∂L/∂y
    ∂L/∂x = g · W + u · A        ∂L/∂A = uᵀ · x        ∂L/∂B = s · gᵀ · (x · Aᵀ)

Two ways to compute ``x · Wᵀ`` and ``g · W`` (kept both, chosen by the number of rows M):

* **fused** (Triton, ``fused_kernels``): each program owns an output tile and walks the reduction
  dimension; at every step it loads a tile of packed bytes (half a byte per weight), rebuilds the
  block scales (``nested_code[q] · nested_absmax + offset``, product then sum, no FMA) and the
  weights in float32, rounds them to bf16 once (so the tile is bit-identical to the
  dequantized weight) and feeds the tensor cores (up to ``ROWS_KERNEL_MAX`` rows: float32
  multiply-adds), accumulating in float32. The LoRA term ``s · (x·Aᵀ) · Bᵀ`` (or ``u · A``)
  and the bias join the same accumulator before the one rounding of the output. The dense
  weight never exists in memory: 0.52 bytes per weight are read instead of 2, what small M is
  bound by; as written the kernels are bound by the per-weight decode instead (``FUSED_MAX_ROWS``).
* **dequantize + cuBLAS**: one pass writes the dense bf16 weight, then cuBLAS multiplies. The
  fused kernel redoes the dequantization arithmetic once per row tile of the output, on the
  same cores that must also issue the matrix instructions, so past some M the separate pass
  (paid once) is cheaper. ``FUSED_MAX_ROWS`` holds that crossover, measured on an H200 by
  ``benchmarks/qlora_model_gpu.py``.

Both paths take the same arguments through :func:`matmul_4bit_eager`. Under ``torch.compile``
the second path is traced (the compiler launches the dequantization kernel and the GEMMs, and
fuses what surrounds them) and the first stays one opaque node, the registered operator
``torch.ops.pedapeft.matmul_4bit``. Without CUDA or Triton only the second path exists (the
dequantization is then ``kernels``' PyTorch path), so the autograd Function is the same code on
every device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pedaPEFT import fused_kernels, kernels, tuned_launch

try:  # CUDA builds of PyTorch ship Triton; a CPU-only install runs the dequantize path.
    import triton
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

FUSED_MAX_ROWS = {"forward": 1, "input_grad": 0}
"""Largest M for which the fused kernel runs; above it, dequantize + cuBLAS (see docstring).

Measured on an H200 (``benchmarks/qlora_model_gpu.md``, 2026-11-30, launches included): for one row
the matrix-vector kernel wins on every LLaMA-8B-width shape (MLP: 57 and 61 against 93 and 93
us); 4 rows lose on two of the three (4096 x 16384: 102 against 93 us); from 16 rows on, and for
the input gradient at every M, dequantize + cuBLAS wins (the tensor-core kernels decode each weight
tile again for every row tile of the output: about 4 % of the GEMM ceiling)."""

ROWS_KERNEL_MAX = 4
"""Forward calls with at most this many rows use the matrix-vector kernel (no tensor cores)."""

ENABLED = True
"""``False`` sends ``QLoRALinear`` back to its unfused path (base Function + LoRA branch)."""


def fused_supported(a: torch.Tensor, out_features: int, in_features: int, blocksize: int) -> bool:
    """Whether the fused kernel can run: CUDA + Triton, bf16/fp16 input, a power-of-two
    blocksize >= 8 that divides K (every row starts on a quantization block, so a row's bytes
    are whole), and every index within 32 bits."""
    return (
        triton is not None
        and a.is_cuda
        and a.dtype in (torch.bfloat16, torch.float16)
        and kernels.triton_supports(blocksize)
        and in_features % blocksize == 0
        and out_features * in_features < 2**31
        and a.numel() // a.shape[-1] * max(out_features, in_features) < 2**31
    )


def _launch(a, stored, out_features, in_features, blocksize, dq_blocksize, transposed, bias,
            lora_in, lora_weight, scaling):
    """The fused kernel: a·Wᵀ (+ bias) (+ s·lora_in·Bᵀ), or a·W (+ s·lora_in·A) if transposed
    (the matrix-vector kernel for a forward of at most ``ROWS_KERNEL_MAX`` rows)."""
    M, N, K = a.shape[0], out_features, in_features
    out = torch.empty(M, K if transposed else N, dtype=a.dtype, device=a.device)
    double_quant = stored[3] is not None  # nested_absmax
    has_lora = lora_in is not None
    rank = lora_in.shape[1] if has_lora else 1
    common = dict(BLOCKSIZE=blocksize, DQ_BLOCKSIZE=dq_blocksize, DOUBLE_QUANT=double_quant,
                  HAS_LORA=has_lora, RANK_TILE=max(16, triton.next_power_of_2(rank)))
    # without double quantization absmax stands in for the nested tensors (never read)
    tensors = stored if double_quant else (*stored[:3], stored[1], stored[1], stored[1])
    lora_args = (lora_in, lora_weight) if has_lora else (a, a)  # never read without LoRA
    m_bucket = min(triton.next_power_of_2(M), 1024)
    if transposed:
        kernel, tiles = fused_kernels.input_grad_kernel, (M, K, "BLOCK_K")
        args = (a, *tensors, *lora_args, out, M, N, K, rank, float(scaling), m_bucket)
    else:
        common["HAS_BIAS"] = bias is not None
        args = (a, *tensors, bias if bias is not None else a, *lora_args, out, M, N, K, rank,
                float(scaling))
        if M <= ROWS_KERNEL_MAX:
            kernel, tiles = fused_kernels.forward_rows_kernel, (1, N, "BLOCK_N")
            common["BLOCK_M"] = m_bucket
        else:
            kernel, tiles = fused_kernels.forward_kernel, (M, N, "BLOCK_N")
            args += (m_bucket,)

    def grid(meta):
        return (triton.cdiv(tiles[0], meta.get("BLOCK_M", tiles[0])),
                triton.cdiv(tiles[1], meta[tiles[2]]))

    key = (kernel, m_bucket, N, K, a.dtype, a.device, *common.items())
    tuned_launch.launch(kernel, grid, args, common, key)
    return out


def _dequantize_then_matmul(a, stored, out_features, in_features, blocksize, dq_blocksize,
                            transposed, bias, lora_in, lora_weight, scaling):
    """The same function through one dequantization pass and cuBLAS (any device); plain
    operations and one Triton kernel, which ``torch.compile`` traces and schedules."""
    dense = kernels.dequantize_4bit_unchecked(*stored, out_features * in_features, blocksize,
                                              dq_blocksize, a.dtype)
    dense = dense.view(out_features, in_features)
    if transposed:
        out = a @ dense
    else:
        out = F.linear(a, dense, None if bias is None else bias.to(a.dtype))
    del dense  # the transient weight goes back to the allocator before the LoRA term
    if lora_in is not None:
        out.addmm_(lora_in, lora_weight if transposed else lora_weight.t(), alpha=scaling)
    return out


def matmul_4bit_eager(a: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                      code: torch.Tensor, nested_absmax: torch.Tensor | None,
                      nested_code: torch.Tensor | None, offset: torch.Tensor | None,
                      out_features: int, in_features: int, blocksize: int, dq_blocksize: int,
                      transposed: bool, bias: torch.Tensor | None, lora_in: torch.Tensor | None,
                      lora_weight: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """``a (M, K) · Wᵀ + bias + scaling · lora_in · lora_weightᵀ`` → (M, N), or with
    ``transposed`` ``a (M, N) · W + scaling · lora_in · lora_weight`` → (M, K); ``W`` (N, K) the
    4-bit weight of the other arguments (``kernels.dequantize_4bit_eager``'s, already checked).
    ``a`` is 2-D, contiguous. The fused kernel runs for M up to ``FUSED_MAX_ROWS``, else
    dequantize + cuBLAS.
    """
    stored = (packed, absmax, code, nested_absmax, nested_code, offset)
    args = (a, stored, out_features, in_features, blocksize, dq_blocksize, transposed, bias,
            lora_in, lora_weight, scaling)
    fused = _takes_fused(a, transposed, out_features, in_features, blocksize)
    return (_launch if fused else _dequantize_then_matmul)(*args)


def _takes_fused(a, transposed, out_features, in_features, blocksize):
    limit = FUSED_MAX_ROWS["input_grad" if transposed else "forward"]
    return a.shape[0] <= limit and fused_supported(a, out_features, in_features, blocksize)


@torch.library.custom_op("pedapeft::matmul_4bit", mutates_args=())
def matmul_4bit(a: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None,
                offset: torch.Tensor | None, out_features: int, in_features: int,
                blocksize: int, dq_blocksize: int, transposed: bool,
                bias: torch.Tensor | None, lora_in: torch.Tensor | None,
                lora_weight: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """:func:`matmul_4bit_eager` as ``torch.ops.pedapeft.matmul_4bit`` (opaque when compiled)."""
    return matmul_4bit_eager(a, packed, absmax, code, nested_absmax, nested_code, offset,
                             out_features, in_features, blocksize, dq_blocksize, transposed,
                             bias, lora_in, lora_weight, scaling)


@matmul_4bit.register_fake
def _(a, packed, absmax, code, nested_absmax, nested_code, offset, out_features, in_features,
      blocksize, dq_blocksize, transposed, bias, lora_in, lora_weight, scaling):
    return a.new_empty(a.shape[0], in_features if transposed else out_features)


def _matmul(a, stored, N, K, blocksize, dq_blocksize, transposed, *rest):
    """:func:`matmul_4bit_eager`, but while compiling the fused kernel runs as the registered
    operator (one opaque node) and dequantize + cuBLAS is traced into the graph, where the
    compiler launches the dequantization kernel and the GEMMs itself."""
    args = (a, *stored, N, K, blocksize, dq_blocksize, transposed, *rest)  # W is (N, K)
    if torch.compiler.is_compiling() and _takes_fused(a, transposed, N, K, blocksize):
        return matmul_4bit(*args)
    return matmul_4bit_eager(*args)


def _forward(x, lora_A, lora_B, bias, scaling, fmt, stored):
    """``(y, x2, x2·Aᵀ)``: the output shaped like ``x`` and the two inputs backward needs."""
    N, K = fmt.out_features, fmt.in_features
    x2 = x.reshape(-1, K).contiguous()                                      # (M, K)
    lora_in = F.linear(x2, lora_A)                                          # (M, r)
    y = _matmul(x2, stored, N, K, fmt.blocksize, fmt.dq_blocksize, False, bias, lora_in,
                lora_B, scaling)                                            # (M, N)
    return y.view(*x.shape[:-1], N), x2, lora_in


class QLoRAFunction(torch.autograd.Function):
    """Base and LoRA branch of a QLoRA layer in one node (math in the module docstring).

    Saves ``x`` (needed for ∂L/∂A, as plain LoRA does), ``x·Aᵀ`` (M, r) and the packed weight;
    never a dense weight, and no (M, N) intermediate beyond the output itself.
    """

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, bias, scaling, fmt, *stored):
        """``y = x·Wᵀ + bias + s·(x·Aᵀ)·Bᵀ`` with ``W`` read from its packed 4-bit storage."""
        y, x2, lora_in = _forward(x, lora_A, lora_B, bias, scaling, fmt, stored)
        ctx.save_for_backward(x2, lora_in, lora_A, lora_B, *stored)
        ctx.fmt, ctx.scaling, ctx.x_shape = fmt, scaling, x.shape
        return y

    @staticmethod
    def backward(ctx, grad_y):
        """``∂x = g·W + s·(g·B)·A``, ``∂A = s·(g·B)ᵀ·x``, ``∂B = s·gᵀ·(x·Aᵀ)``; none for ``W``."""
        x2, lora_in, lora_A, lora_B, *stored = ctx.saved_tensors
        fmt, s = ctx.fmt, ctx.scaling
        g = grad_y.reshape(-1, fmt.out_features).contiguous()               # (M, N)
        # addmm with beta = 0 ignores its first argument (any tensor of the output's shape, no
        # allocation for it): a scaled product in one kernel
        u = torch.addmm(lora_in, g, lora_B, beta=0, alpha=s)                # (M, r)
        grad_A = u.t() @ x2 if ctx.needs_input_grad[1] else None            # (r, K)
        grad_B = (torch.addmm(lora_B, g.t(), lora_in, beta=0, alpha=s)
                  if ctx.needs_input_grad[2] else None)                     # (N, r)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _matmul(g, stored, fmt.out_features, fmt.in_features, fmt.blocksize,
                             fmt.dq_blocksize, True, None, u, lora_A, 1.0).view(ctx.x_shape)
        return (grad_x, grad_A, grad_B, None, None, None) + (None,) * len(stored)


def applies(layer, x: torch.Tensor) -> bool:
    """Whether ``QLoRALinear.forward`` takes :func:`qlora_forward`: a 4-bit base, input already
    in the compute dtype, and no active dropout on the LoRA branch (dropout would need a second
    input to the branch; that case keeps the unfused path)."""
    base = layer.base_layer
    fmt = base.fmt
    return (ENABLED and x.dtype == base.compute_dtype and x.shape[-1] == fmt.in_features
            and fmt.quant_type != "int8" and (not layer.training or layer.dropout_p == 0.0))


def qlora_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """``QLoRALinear``'s function through :class:`QLoRAFunction` (one autograd node); with
    nothing to differentiate (inference, ``torch.no_grad``), the same math without the node."""
    base = layer.base_layer
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return QLoRAFunction.apply(x, layer.lora_A, layer.lora_B, base.bias, layer.scaling,
                                   base.fmt, *base.stored_tensors())
    return _forward(x, layer.lora_A, layer.lora_B, base.bias, layer.scaling, base.fmt,
                    base.stored_tensors())[0]
