"""A QLoRA layer in one autograd Function, with the 4-bit weight dequantized inside the GEMM.

Notation: ``x`` (M, K) the input rows, ``W`` (N, K) the frozen weight stored as blockwise 4-bit
codes (``pedaPEFT.kernels`` gives the dequantization formula: ``w[i] = code[nibble_i] ·
absmax_f32[i // blocksize]``, the absmax itself double-quantized), ``A`` (r, K) and ``B`` (N, r)
the LoRA factors, ``s = α / r``. The layer and its gradients are::

    y   = x · Wᵀ + b + s · (x · Aᵀ) · Bᵀ                 forward
    u   = s · g · B                                       (M, r), g = ∂L/∂y
    ∂L/∂x = g · W + u · A        ∂L/∂A = uᵀ · x        ∂L/∂B = s · gᵀ · (x · Aᵀ)

Two ways to compute ``x · Wᵀ`` and ``g · W`` (kept both, chosen by the number of rows M):

* **fused** (Triton, below): each program owns an output tile and walks the reduction
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

from pedaPEFT import kernels, tuned_launch

try:  # CUDA builds of PyTorch ship Triton; a CPU-only install runs the dequantize path.
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
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


if triton is not None:

    @triton.jit
    def _block_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block, ok,
                      DQ_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
        """absmax_f32[block] (any shape), rebuilt from the nested code when DOUBLE_QUANT."""
        if DOUBLE_QUANT:
            q = tl.load(absmax_ptr + block, mask=ok, other=0).to(tl.int32)
            outer = tl.load(nested_absmax_ptr + block // DQ_BLOCKSIZE, mask=ok, other=0.0)
            # a rounded product, then the sum: never one FMA (kernels' formula, as on the CPU)
            scale = libdevice.mul_rn(tl.load(nested_code_ptr + q), outer) + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + block, mask=ok, other=0.0)
        return scale

    @triton.jit
    def _weight_halves(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr,
                       offset_ptr, rows, n_rows, k0, K, ROWS: tl.constexpr, HALF: tl.constexpr,
                       BLOCKSIZE: tl.constexpr, DQ_BLOCKSIZE: tl.constexpr,
                       DOUBLE_QUANT: tl.constexpr):
        """(W[rows, k0 + 2j], W[rows, k0 + 2j + 1]) for j < HALF, float32, each (ROWS, HALF).

        Byte k0/2 + j of a row holds both weights: its high nibble is the even column, its low
        nibble the odd one. So the tile is read as whole bytes, contiguous along each row (one
        load per byte, coalesced), and split in registers; the caller multiplies the two halves
        with the even and odd columns of the other operand. Needs K % BLOCKSIZE == 0 (rows
        start on a block) and k0 a multiple of 2·HALF: then the HALF bytes of a row span one
        quantization block (2·HALF <= BLOCKSIZE) or whole blocks, so one scale is rebuilt per
        block and broadcast. Finite values (multiplied by zeros later) outside the weight.
        """
        PER_BLOCK: tl.constexpr = BLOCKSIZE // 2  # bytes of one quantization block
        byte_cols = k0 // 2 + tl.arange(0, HALF)
        row_ok = rows < n_rows
        inside = row_ok[:, None] & (byte_cols[None, :] < K // 2)
        byte = tl.load(packed_ptr + rows[:, None] * (K // 2) + byte_cols[None, :], mask=inside,
                       other=0).to(tl.int32)                                    # (ROWS, HALF)
        high = tl.load(code_ptr + (byte >> 4))
        low = tl.load(code_ptr + (byte & 15))
        first = (rows * K + k0) // BLOCKSIZE                                    # (ROWS,)
        if HALF <= PER_BLOCK:
            scale = _block_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                                  first, row_ok, DQ_BLOCKSIZE, DOUBLE_QUANT)
            high = high * scale[:, None]
            low = low * scale[:, None]
        else:
            NB: tl.constexpr = HALF // PER_BLOCK
            nb = tl.arange(0, NB)
            ok = row_ok[:, None] & (k0 + nb[None, :] * BLOCKSIZE < K)
            scale = _block_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                                  first[:, None] + nb[None, :], ok, DQ_BLOCKSIZE,
                                  DOUBLE_QUANT)                                 # (ROWS, NB)
            high = tl.reshape(tl.reshape(high, (ROWS, NB, PER_BLOCK)) * scale[:, :, None],
                              (ROWS, HALF))
            low = tl.reshape(tl.reshape(low, (ROWS, NB, PER_BLOCK)) * scale[:, :, None],
                             (ROWS, HALF))
        return high, low

    @triton.jit
    def _even_odd_columns(ptr, rows, n_rows, k0, K, HALF: tl.constexpr):
        """Columns k0 + 2j and k0 + 2j + 1 (j < HALF) of the row-major (n_rows, K) matrix at
        ``ptr``, for the given rows: the operand that meets the high and low nibbles of W's
        bytes. Zeros outside the matrix (K is even)."""
        even = k0 + 2 * tl.arange(0, HALF)
        mask = (rows[:, None] < n_rows) & (even[None, :] < K)
        at = ptr + rows[:, None] * K + even[None, :]
        return tl.load(at, mask=mask, other=0.0), tl.load(at + 1, mask=mask, other=0.0)

    @triton.jit
    def _rank_rows(ptr, rows, n_rows, rank, RANK_TILE: tl.constexpr):
        """Rows of the (n_rows, rank) LoRA operand ``x·Aᵀ`` or ``B``, zero-padded to RANK_TILE."""
        r = tl.arange(0, RANK_TILE)
        return tl.load(ptr + rows[:, None] * rank + r[None, :],
                       mask=(rows[:, None] < n_rows) & (r[None, :] < rank), other=0.0)

    @triton.jit
    def _store_output(y_ptr, acc, bias_ptr, rows_m, rows_n, M, N, HAS_BIAS: tl.constexpr):
        """y[rows_m, rows_n] = acc (+ bias[rows_n]), rounded once to y's dtype."""
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows_n, mask=rows_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows_m[:, None] * N + rows_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rows_m[:, None] < M) & (rows_n[None, :] < N))

    def _configs(direction):
        """Launch configurations (BLOCK_M x BLOCK_N x BLOCK_K, warps, stages) per direction.

        Up to 64 rows (decoding, small batches) the kernel is a matrix-vector product bound by
        reading the packed weight: few rows per tile, long stretches of each weight row
        (BLOCK_K) and several stages in flight, with enough programs to cover every
        multiprocessor (N / BLOCK_N for the forward, K / BLOCK_K for the input gradient).
        Above 64 rows, square tensor-core tiles."""
        if direction == "forward":
            small = [(16, 256, 4, 4), (32, 128, 4, 4), (32, 256, 4, 3), (64, 128, 4, 3),
                     (16, 512, 4, 3)]
        else:
            small = [(64, 32, 4, 4), (128, 32, 4, 3), (64, 64, 4, 4), (128, 64, 8, 3),
                     (32, 64, 4, 4)]
        large = [(128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (128, 128, 128, 8, 3)]
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k},
                                 num_warps=w, num_stages=st)
                   for m in (16, 32, 64) for n, k, w, st in small]
        configs += [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k},
                                  num_warps=w, num_stages=st) for m, n, k, w, st in large]
        return configs

    def _prune(configs, named_args, **kwargs):
        """Keep the configs made for M: up to 64 rows, those whose row tile is the smallest
        power of two >= M (at least 16); above, the large tiles."""
        m = named_args["M"]
        if m <= 64:
            want = max(16, triton.next_power_of_2(m))
            kept = [c for c in configs if c.kwargs["BLOCK_M"] == want]
        else:
            kept = [c for c in configs if c.kwargs["BLOCK_M"] == 128]
        return kept or configs[:1]

    def _prune_rows(configs, named_args, **kwargs):
        """Keep the configs whose partial sums (rows x weight rows x half tile) fit in
        registers: at most 32 float32 per thread."""
        rows = kwargs.get("BLOCK_M", named_args.get("BLOCK_M", 1))
        return [c for c in configs if rows * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] // 2
                <= 4096 * c.num_warps] or configs[:1]

    @triton.autotune(configs=[triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w,
                                            num_stages=st)
                              for n, k, w, st in ((4, 1024, 4, 3), (8, 512, 4, 3),
                                                  (16, 256, 4, 3), (8, 1024, 4, 2),
                                                  (32, 256, 4, 3), (64, 256, 8, 3))],
                     key=["N", "K", "HAS_LORA", "BLOCK_M"],
                     prune_configs_by={"early_config_prune": _prune_rows})
    @triton.jit(do_not_specialize=["M", "rank"])
    def _forward_rows_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr,
                             nested_code_ptr, offset_ptr, bias_ptr, lora_in_ptr, lora_b_ptr,
                             y_ptr, M, N, K, rank, scaling,
                             BLOCKSIZE: tl.constexpr, DQ_BLOCKSIZE: tl.constexpr,
                             DOUBLE_QUANT: tl.constexpr, HAS_BIAS: tl.constexpr,
                             HAS_LORA: tl.constexpr, RANK_TILE: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr):
        """The forward for M <= BLOCK_M <= 4 rows (decoding) without tensor cores.

        A matrix-vector product: each program owns BLOCK_N weight rows and walks K in long
        stretches; every weight is rounded to the input's dtype (as the dense path does), then
        multiplied and summed in float32. A tensor-core tile would be at least 16 rows of
        which M are used, and it needs the weight tile moved into the operand layout; here
        the tile stays where it was loaded. Each thread keeps its partial sums through the K
        loop; they meet once, after it (a reduction at every step took 1.1-1.2 x the time)."""
        HALF: tl.constexpr = BLOCK_K // 2
        rows_m = tl.arange(0, BLOCK_M)
        rows_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # grid (1, N / BLOCK_N)
        partial = tl.zeros((BLOCK_M, BLOCK_N, HALF), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x_even, x_odd = _even_odd_columns(x_ptr, rows_m, M, k0, K, HALF)
            w_even, w_odd = _weight_halves(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr,
                                           nested_code_ptr, offset_ptr, rows_n, N, k0, K,
                                           BLOCK_N, HALF, BLOCKSIZE, DQ_BLOCKSIZE,
                                           DOUBLE_QUANT)                      # (BLOCK_N, HALF)
            w_even = w_even.to(x_even.dtype).to(tl.float32)[None, :, :]  # as the dense weight
            w_odd = w_odd.to(x_odd.dtype).to(tl.float32)[None, :, :]
            partial += (w_even * x_even.to(tl.float32)[:, None, :]
                        + w_odd * x_odd.to(tl.float32)[:, None, :])
        acc = tl.sum(partial, axis=2)                                          # (BLOCK_M, BLOCK_N)
        if HAS_LORA:
            u = _rank_rows(lora_in_ptr, rows_m, M, rank, RANK_TILE).to(tl.float32)
            b = _rank_rows(lora_b_ptr, rows_n, N, rank, RANK_TILE).to(tl.float32)
            acc += scaling * tl.sum(u[:, None, :] * b[None, :, :], axis=2)
        _store_output(y_ptr, acc, bias_ptr, rows_m, rows_n, M, N, HAS_BIAS)

    @triton.autotune(configs=_configs("forward"),
                     key=["m_bucket", "N", "K", "HAS_LORA"],
                     prune_configs_by={"early_config_prune": _prune})
    @triton.jit(do_not_specialize=["M", "rank", "m_bucket"])
    def _forward_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr,
                        nested_code_ptr, offset_ptr, bias_ptr, lora_in_ptr, lora_b_ptr, y_ptr,
                        M, N, K, rank, scaling, m_bucket,
                        BLOCKSIZE: tl.constexpr, DQ_BLOCKSIZE: tl.constexpr,
                        DOUBLE_QUANT: tl.constexpr, HAS_BIAS: tl.constexpr,
                        HAS_LORA: tl.constexpr, RANK_TILE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """y (M, N) = x (M, K) · Wᵀ + bias + scaling · lora_in (M, rank) · Bᵀ (rank, N).

        Each step of the K loop: x's tile (BLOCK_M, BLOCK_K) loaded whole and split into its
        even and odd columns, W's tile as two (BLOCK_N, BLOCK_K/2) halves, two tensor-core
        products."""
        HALF: tl.constexpr = BLOCK_K // 2
        rows_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rows_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows_m[:, None] * K + cols[None, :],
                        mask=(rows_m[:, None] < M) & (cols[None, :] < K), other=0.0)
            x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, HALF, 2)))
            w_even, w_odd = _weight_halves(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr,
                                           nested_code_ptr, offset_ptr, rows_n, N, k0, K,
                                           BLOCK_N, HALF, BLOCKSIZE, DQ_BLOCKSIZE,
                                           DOUBLE_QUANT)                      # (BLOCK_N, HALF)
            acc = tl.dot(x_even, tl.trans(w_even.to(x_even.dtype)), acc)
            acc = tl.dot(x_odd, tl.trans(w_odd.to(x_odd.dtype)), acc)
        if HAS_LORA:
            u = _rank_rows(lora_in_ptr, rows_m, M, rank, RANK_TILE)
            b = _rank_rows(lora_b_ptr, rows_n, N, rank, RANK_TILE)
            acc += scaling * tl.dot(u, tl.trans(b))
        _store_output(y_ptr, acc, bias_ptr, rows_m, rows_n, M, N, HAS_BIAS)

    @triton.autotune(configs=_configs("input_grad"),
                     key=["m_bucket", "N", "K", "HAS_LORA"],
                     prune_configs_by={"early_config_prune": _prune})
    @triton.jit(do_not_specialize=["M", "rank", "m_bucket"])
    def _input_grad_kernel(g_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr,
                           nested_code_ptr, offset_ptr, lora_in_ptr, lora_a_ptr, out_ptr,
                           M, N, K, rank, scaling, m_bucket,
                           BLOCKSIZE: tl.constexpr, DQ_BLOCKSIZE: tl.constexpr,
                           DOUBLE_QUANT: tl.constexpr, HAS_LORA: tl.constexpr,
                           RANK_TILE: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out (M, K) = g (M, N) · W (N, K) + scaling · lora_in (M, rank) · A (rank, K).

        The even and odd output columns are accumulated apart (one per nibble of W's bytes)
        and interleaved once, at the store."""
        HALF: tl.constexpr = BLOCK_K // 2
        rows_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        k0 = tl.program_id(1) * BLOCK_K
        cols = k0 + tl.arange(0, BLOCK_K)
        acc_even = tl.zeros((BLOCK_M, HALF), dtype=tl.float32)
        acc_odd = tl.zeros((BLOCK_M, HALF), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            rows_n = n0 + tl.arange(0, BLOCK_N)
            g = tl.load(g_ptr + rows_m[:, None] * N + rows_n[None, :],
                        mask=(rows_m[:, None] < M) & (rows_n[None, :] < N), other=0.0)
            w_even, w_odd = _weight_halves(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr,
                                           nested_code_ptr, offset_ptr, rows_n, N, k0, K,
                                           BLOCK_N, HALF, BLOCKSIZE, DQ_BLOCKSIZE,
                                           DOUBLE_QUANT)                      # (BLOCK_N, HALF)
            acc_even = tl.dot(g, w_even.to(g.dtype), acc_even)
            acc_odd = tl.dot(g, w_odd.to(g.dtype), acc_odd)
        if HAS_LORA:
            r = tl.arange(0, RANK_TILE)
            u = _rank_rows(lora_in_ptr, rows_m, M, rank, RANK_TILE)
            a = tl.load(lora_a_ptr + r[:, None] * K + cols[None, :],
                        mask=(r[:, None] < rank) & (cols[None, :] < K), other=0.0)
            a_even, a_odd = tl.split(tl.reshape(a, (RANK_TILE, HALF, 2)))
            acc_even += scaling * tl.dot(u, a_even)
            acc_odd += scaling * tl.dot(u, a_odd)
        out = tl.reshape(tl.join(acc_even, acc_odd), (BLOCK_M, BLOCK_K))
        tl.store(out_ptr + rows_m[:, None] * K + cols[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=(rows_m[:, None] < M) & (cols[None, :] < K))


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
        kernel, tiles = _input_grad_kernel, (M, K, "BLOCK_K")
        args = (a, *tensors, *lora_args, out, M, N, K, rank, float(scaling), m_bucket)
    else:
        common["HAS_BIAS"] = bias is not None
        args = (a, *tensors, bias if bias is not None else a, *lora_args, out, M, N, K, rank,
                float(scaling))
        if M <= ROWS_KERNEL_MAX:
            kernel, tiles = _forward_rows_kernel, (1, N, "BLOCK_N")
            common["BLOCK_M"] = m_bucket
        else:
            kernel, tiles = _forward_kernel, (M, N, "BLOCK_N")
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
