"""Dequantization of blockwise 4-bit weights: one function, a CPU path and a fused CUDA kernel.

The stored format is the one ``pedaPEFT.quant.QuantState`` defines. For element ``i`` of the
flattened weight, with ``b = i // blocksize`` its block:

    absmax_f32[b] = nested_code[absmax[b]] * nested_absmax[b // dq_blocksize] + offset   (DQ)
    absmax_f32[b] = absmax[b]                                                            (no DQ)
    w[i]          = code[nibble_i] * absmax_f32[b]

computed in float32 (a product, then a sum, never fused into one rounding) and cast to the
requested dtype once at the end. Element ``2j`` is the high nibble of byte ``j``.

Why a module of its own: the QLoRA layer dequantizes every frozen weight twice per training
step (forward, and again in backward instead of keeping the dense copy). Done with plain
PyTorch ops that is five or six passes over memory; the Triton kernel below reads the packed
bytes and the scales once and writes the bf16 weight once, which is the least traffic the
operation allows (about 2.52 bytes per parameter). Both paths sit behind one registered
operator, ``torch.ops.pedapeft.dequantize_4bit``, so that ``torch.compile`` sees a single opaque
node (no graph break) and the CPU and CUDA paths can be compared element by element.
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs run the PyTorch path.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None


def dequantize_4bit_reference(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    n: int,
    blocksize: int,
    dq_blocksize: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The formula of the module docstring in plain PyTorch ops; returns a flat tensor of ``n``."""
    nibbles = torch.stack((packed >> 4, packed & 15), dim=-1).reshape(-1)[:n].long()
    n_blocks = absmax.numel()
    if nested_absmax is None:
        scale = absmax.float()
    else:
        outer = nested_absmax[torch.arange(n_blocks, device=absmax.device) // dq_blocksize]
        scale = nested_code[absmax.long()] * outer + offset
    block_of = torch.arange(n, device=packed.device) // blocksize
    return (code[nibbles] * scale[block_of]).to(out_dtype)


if triton is not None:

    @triton.jit
    def _dequantize_4bit_kernel(
        packed_ptr,
        absmax_ptr,
        code_ptr,
        nested_absmax_ptr,
        nested_code_ptr,
        offset_ptr,
        out_ptr,
        n,
        n_blocks,
        BYTES_PER_BLOCK: tl.constexpr,
        BLOCKS_PER_PROGRAM: tl.constexpr,
        DQ_BLOCKSIZE: tl.constexpr,
        DOUBLE_QUANT: tl.constexpr,
    ):
        # One program dequantizes BLOCKS_PER_PROGRAM quantization blocks, laid out as a
        # [blocks, bytes] tile: each row shares one scale, each byte yields two outputs.
        blocks = tl.program_id(0) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
        block_ok = blocks < n_blocks
        if DOUBLE_QUANT:
            q = tl.load(absmax_ptr + blocks, mask=block_ok, other=0).to(tl.int32)
            outer = tl.load(nested_absmax_ptr + blocks // DQ_BLOCKSIZE, mask=block_ok, other=0.0)
            scale = tl.load(nested_code_ptr + q) * outer + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + blocks, mask=block_ok, other=0.0)
        byte = blocks[:, None] * BYTES_PER_BLOCK + tl.arange(0, BYTES_PER_BLOCK)[None, :]
        raw = tl.load(packed_ptr + byte, mask=byte < (n + 1) // 2, other=0).to(tl.int32)
        high = tl.load(code_ptr + (raw >> 4)) * scale[:, None]
        low = tl.load(code_ptr + (raw & 15)) * scale[:, None]
        values = tl.reshape(tl.join(high, low), (BLOCKS_PER_PROGRAM, 2 * BYTES_PER_BLOCK))
        out = blocks[:, None] * (2 * BYTES_PER_BLOCK) + tl.arange(0, 2 * BYTES_PER_BLOCK)[None, :]
        tl.store(out_ptr + out, values.to(out_ptr.dtype.element_ty), mask=out < n)


def dequantize_4bit_triton(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    n: int,
    blocksize: int,
    dq_blocksize: int,
    out_dtype: torch.dtype,
    blocks_per_program: int = 32,
    num_warps: int = 4,
) -> torch.Tensor:
    """The same function as ``dequantize_4bit_reference`` as one fused CUDA kernel launch."""
    if triton is None:
        raise RuntimeError("dequantize_4bit_triton needs Triton, which CUDA builds of torch ship")
    out = torch.empty(n, dtype=out_dtype, device=packed.device)
    n_blocks = absmax.numel()
    double_quant = nested_absmax is not None
    dummy = absmax  # never read when double_quant is False
    grid = (triton.cdiv(n_blocks, blocks_per_program),)
    _dequantize_4bit_kernel[grid](
        packed,
        absmax,
        code,
        nested_absmax if double_quant else dummy,
        nested_code if double_quant else dummy,
        offset if double_quant else dummy,
        out,
        n,
        n_blocks,
        BYTES_PER_BLOCK=blocksize // 2,
        BLOCKS_PER_PROGRAM=blocks_per_program,
        DQ_BLOCKSIZE=dq_blocksize,
        DOUBLE_QUANT=double_quant,
        num_warps=num_warps,
        enable_fp_fusion=False,  # product then sum, rounded separately, as on the CPU
    )
    return out


@torch.library.custom_op("pedapeft::dequantize_4bit", mutates_args=())
def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    n: int,
    blocksize: int,
    dq_blocksize: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Dequantize a packed 4-bit weight to a flat tensor of ``n`` elements in ``out_dtype``.

    Runs the fused Triton kernel for CUDA tensors (when Triton is installed) and the plain
    PyTorch formula elsewhere; both compute the formula of this module's docstring.
    """
    args = (packed, absmax, code, nested_absmax, nested_code, offset, n, blocksize, dq_blocksize)
    if packed.is_cuda and triton is not None:
        return dequantize_4bit_triton(*args, out_dtype)
    return dequantize_4bit_reference(*args, out_dtype)


@dequantize_4bit.register_fake
def _(packed, absmax, code, nested_absmax, nested_code, offset, n, blocksize, dq_blocksize,
      out_dtype):
    return packed.new_empty(n, dtype=out_dtype)
