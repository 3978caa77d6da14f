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
operation allows (about 2.52 bytes per parameter). Both paths are plain functions that
``torch.compile`` traces: the PyTorch path as ordinary operations, the Triton kernel as a
user-defined kernel that the compiled graph launches itself (tuned at compile time).
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch

from pedaPEFT import tuned_launch
from pedaPEFT.quant_4bit import check_4bit_layout

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs run the PyTorch path.
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - depends on the installation
    triton = None


def dequantize_4bit_torch(
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
    """The formula of the module docstring in plain PyTorch ops; returns a flat tensor of ``n``.

    ``quant.dequantize_4bit`` is the same formula written as lesson 7 derives it; this path is
    the fast one. Each byte is decoded at once through a 256 x 2 table of its (high, low) code
    values, and every block is scaled as one row of a (n_blocks, blocksize) view: few, large
    operations, which is what a CPU wants.
    """
    n_blocks = absmax.numel()
    if nested_absmax is None:
        scale = absmax.float()  # (n_blocks,)
    else:
        outer = nested_absmax.repeat_interleave(dq_blocksize)[:n_blocks]  # (n_blocks,)
        scale = nested_code[absmax.long()] * outer + offset  # (n_blocks,)
    pairs = torch.stack((code.repeat_interleave(16), code.repeat(16)), dim=1)  # (256, 2)
    values = pairs[packed.reshape(-1).long()].reshape(-1)  # (2 * n_bytes,) code[nibble]
    padded = n_blocks * blocksize
    if values.numel() != padded:  # odd n or a partial last block
        values = torch.nn.functional.pad(values[:n], (0, padded - n))  # (n_blocks · blocksize,)
    out = (values.view(n_blocks, blocksize) * scale[:, None]).reshape(-1)  # (n_blocks · blocksize,)
    return (out if padded == n else out[:n]).to(out_dtype)  # (n,)


if triton is not None:

    @triton.autotune(
        configs=[
            triton.Config({"BLOCKS_PER_PROGRAM": bpp}, num_warps=warps)
            for bpp, warps in ((16, 4), (32, 4), (64, 4), (64, 8), (128, 8), (256, 8))
        ],
        key=["n_blocks", "WORDS_PER_BLOCK"],
    )
    @triton.jit
    def _dequantize_4bit_kernel(
        words_ptr,
        absmax_ptr,
        code_ptr,
        nested_absmax_ptr,
        nested_code_ptr,
        offset_ptr,
        out_ptr,
        n,
        n_blocks,
        WORDS_PER_BLOCK: tl.constexpr,
        DQ_BLOCKSIZE: tl.constexpr,
        DOUBLE_QUANT: tl.constexpr,
        BLOCKS_PER_PROGRAM: tl.constexpr,
    ):
        # One program dequantizes BLOCKS_PER_PROGRAM quantization blocks as a tile
        # [blocks, 32-bit words, 8 nibbles]: every row shares one scale; each word is read
        # once and yields 8 consecutive outputs, so loads and stores are both contiguous.
        blocks = tl.program_id(0) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
        block_ok = blocks < n_blocks
        if DOUBLE_QUANT:
            q = tl.load(absmax_ptr + blocks, mask=block_ok, other=0).to(tl.int32)
            outer = tl.load(nested_absmax_ptr + blocks // DQ_BLOCKSIZE, mask=block_ok, other=0.0)
            # mul_rn: a rounded product, never fused with the sum into one FMA (as on the CPU)
            scale = libdevice.mul_rn(tl.load(nested_code_ptr + q), outer) + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + blocks, mask=block_ok, other=0.0)  # [blocks]
        word = blocks[:, None] * WORDS_PER_BLOCK + tl.arange(0, WORDS_PER_BLOCK)[None, :]
        raw = tl.load(words_ptr + word, mask=block_ok[:, None], other=0)  # [blocks, words]
        # Little-endian words: byte k sits at bits 8k..8k+7, its high nibble comes first.
        lane = tl.arange(0, 8)
        shift = 8 * (lane // 2) + 4 * (1 - lane % 2)
        nibble = (raw[:, :, None] >> shift[None, None, :]) & 15  # [blocks, words, 8]
        values = tl.load(code_ptr + nibble) * scale[:, None, None]  # [blocks, words, 8]
        values = tl.reshape(values, (BLOCKS_PER_PROGRAM, WORDS_PER_BLOCK * 8))  # [blocks, 8·words]
        out = blocks[:, None] * (WORDS_PER_BLOCK * 8) + tl.arange(0, WORDS_PER_BLOCK * 8)[None, :]
        tl.store(out_ptr + out, values.to(out_ptr.dtype.element_ty), mask=out < n)


def triton_supports(blocksize: int) -> bool:
    """The kernel reads whole 32-bit words per block: blocksize a power of two, at least 8."""
    return triton is not None and blocksize >= 8 and blocksize & (blocksize - 1) == 0


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
) -> torch.Tensor:
    """The same function as ``dequantize_4bit_torch`` as one fused CUDA kernel launch.

    The first call per shape times the autotuner's configurations; later calls launch the
    chosen binary directly (``tuned_launch``), and a weight dequantized before (the same tensor
    objects: a layer's buffers) skips even that lookup (:data:`_BOUND`). Under
    ``torch.compile`` the autotuned kernel is traced instead, and tuned by the compiler.
    """
    if not triton_supports(blocksize):
        raise RuntimeError(
            f"dequantize_4bit_triton needs Triton and a power-of-two blocksize >= 8, "
            f"got blocksize={blocksize}"
        )
    # without double quantization absmax stands in for the nested tensors (never read)
    scales = ((absmax, code, nested_absmax, nested_code, offset) if nested_absmax is not None
              else (absmax, code, absmax, absmax, absmax))
    n_blocks = absmax.numel()
    compiling = torch.compiler.is_compiling()
    if not compiling:
        bound = _BOUND.get((id(packed), out_dtype))
        if bound is not None and bound.serves(packed, scales, n):
            out = torch.empty(n, dtype=out_dtype, device=packed.device)  # (n,)
            # The compiled binary takes addresses only: the byte tensor's is its words' address.
            bound.launcher(packed, *scales, out, n, n_blocks)
            return out
    padded_bytes = n_blocks * blocksize // 2
    whole = packed.numel() == padded_bytes and (compiling or packed.data_ptr() % 4 == 0)
    words = packed if whole else torch.nn.functional.pad(  # a partial last block, or a
        packed.reshape(-1), (0, padded_bytes - packed.numel()))  # misaligned view: copy
    out = torch.empty(n, dtype=out_dtype, device=packed.device)  # (n,)
    args = (words.view(torch.int32), *scales, out, n, n_blocks)
    constants = dict(WORDS_PER_BLOCK=blocksize // 8, DQ_BLOCKSIZE=dq_blocksize,
                     DOUBLE_QUANT=nested_absmax is not None)
    if compiling:  # traced: the compiled graph launches the kernel, tuned at compile time
        _dequantize_4bit_kernel[_grid_over(n_blocks)](*args, **constants)
        return out
    key = (_dequantize_4bit_kernel, n, n_blocks, blocksize, dq_blocksize,
           nested_absmax is not None, out_dtype, packed.device)
    launcher = tuned_launch.launch(_dequantize_4bit_kernel, _grid_over(n_blocks), args,
                                   constants, key)
    if launcher is not None and whole:
        _bind(packed, scales, n, out_dtype, launcher)
    return out


class _Bound(NamedTuple):
    """A compiled dequantization launch kept for one stored weight (see :data:`_BOUND`)."""

    packed: weakref.ref
    scales: tuple[torch.Tensor, ...]
    n: int
    launcher: tuned_launch.Launcher

    def serves(self, packed: torch.Tensor, scales: tuple[torch.Tensor, ...], n: int) -> bool:
        """The same tensor objects (a layer's buffers keep their dtype and address) and size."""
        return (self.packed() is packed and n == self.n
                and all(mine is theirs for mine, theirs in zip(self.scales, scales, strict=True)))


_BOUND: dict[tuple[int, torch.dtype], _Bound] = {}
"""Per packed weight (by ``id``) and output dtype: the launcher ``tuned_launch`` compiled for it,
with the scale tensors it was launched with. A QLoRA layer dequantizes the same buffers twice
per training step; recognising them by identity costs less than working out their
specialization again. An entry lives as long as its packed tensor (a weak reference, and a
finalizer that removes it); a tensor that is moved or replaced is a new object, so it is tuned
and bound anew."""


def _bind(packed: torch.Tensor, scales: tuple[torch.Tensor, ...], n: int,
          out_dtype: torch.dtype, launcher: tuned_launch.Launcher) -> None:
    key = (id(packed), out_dtype)
    old = _BOUND.get(key)
    if old is None or old.packed() is not packed:  # one finalizer per packed tensor and dtype
        weakref.finalize(packed, _BOUND.pop, key, None)
    _BOUND[key] = _Bound(weakref.ref(packed), scales, n, launcher)


def _grid_over(n_blocks: int):
    return lambda meta: (triton.cdiv(n_blocks, meta["BLOCKS_PER_PROGRAM"]),)


def dequantize_4bit_eager(
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

    Checks the arguments (``quant_4bit.check_4bit_layout``: shapes, dtypes, no data read),
    then runs :func:`dequantize_4bit_unchecked`.
    """
    args = (packed, absmax, code, nested_absmax, nested_code, offset, n, blocksize, dq_blocksize)
    check_4bit_layout(*args)
    return dequantize_4bit_unchecked(*args, out_dtype)


def dequantize_4bit_unchecked(
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
    """:func:`dequantize_4bit_eager` without the check, for tensors known to be well formed (a
    ``QuantLinear``'s buffers, shaped when the layer was built): the fused Triton kernel for
    CUDA tensors (when Triton is installed), the plain PyTorch formula elsewhere. A QLoRA
    training step calls it twice per layer, so the microseconds of the check count there."""
    args = (packed, absmax, code, nested_absmax, nested_code, offset, n, blocksize, dq_blocksize)
    if packed.is_cuda and triton_supports(blocksize):
        return dequantize_4bit_triton(*args, out_dtype)
    return dequantize_4bit_torch(*args, out_dtype)
