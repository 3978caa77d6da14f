"""The Triton kernels of the fused 4-bit GEMM: ``W`` decoded inside the product's K loop.

``fused_gemm`` states the math, chooses between these kernels and dequantize + cuBLAS, and
launches them. Here ``W`` (N, K) is the 4-bit weight (``kernels``' storage format: two codes
per byte, high nibble first, one absmax per ``BLOCKSIZE`` weights, double-quantized when
``DOUBLE_QUANT``), ``x`` (M, K) the input rows and ``g`` (M, N) the output gradient:

* :func:`forward_rows_kernel`: ``y = x · Wᵀ (+ b) (+ s · (x·Aᵀ) · Bᵀ)`` for a few rows, with
  float32 multiply-adds and no tensor cores (a matrix-vector product);
* :func:`forward_kernel`: the same on the tensor cores, for more rows;
* :func:`input_grad_kernel`: ``∂L/∂x = g · W (+ s · u · A)``, on the tensor cores.

Each rebuilds a tile of ``W`` from its packed bytes and block scales in float32 (product, then
sum: never one FMA), rounds it to the input's dtype once, so the tile is bit-identical to the
dequantized weight, and accumulates in float32.
"""

from __future__ import annotations

try:  # CUDA builds of PyTorch ship Triton; without it fused_gemm never launches these
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - depends on the installation
    triton = None


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
    def forward_rows_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr,
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
    def forward_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr,
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
    def input_grad_kernel(g_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr,
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
