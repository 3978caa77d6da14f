"""Where bitsandbytes 0.50.2's CPU backend dequantizes 4-bit weights differently (lesson 12).

A 4-bit weight of shape (m, n) is stored as flat blocks: element ``(i, j)`` sits at flat
position ``p = i·n + j`` and is scaled by ``absmax[p // blocksize]`` (``flat_scale_index``).
That is the definition (lesson 7), what ``quant.dequantize_4bit`` computes and what
bitsandbytes' CUDA kernels compute. bitsandbytes' quantization on the CPU writes the same bytes
and scales. Its CPU *dequantization* has three paths:

* odd ``n``: a PyTorch fallback, flat blocks — right;
* a vectorised AVX-512 loop, taken when the processor has AVX-512F, ``n % 16 == 0``,
  ``16 <= blocksize < 2048`` and the weight is 2-D: it walks row by row and scales element
  ``(i, j)`` by ``absmax[i·(n // blocksize) + j // blocksize]`` (``row_scale_index``). That
  equals the flat index for every element exactly when ``n % blocksize == 0`` (or ``m == 1``);
  otherwise rows after the first take another block's scale (rows narrower than a block all
  take block 0's);
* a scalar loop over flat blocks — right.

``measured_scale_index`` asks the installed bitsandbytes which scale each element gets (codes
all +1, ``absmax[b] = b``), so the map does not depend on reading its source, and
``error_grid`` measures, shape by shape, the dequantization error against this package's.
Only these functions import bitsandbytes, and only when called (the ``reference`` extra).
"""

from __future__ import annotations

import math

import torch

from pedaPEFT.quant import dequantize_4bit, quantize_4bit
from pedaPEFT.quant_absmax import check_blocksize


def _check_shape(shape: object) -> tuple[int, int]:
    """A 2-D weight shape ``(m, n)`` of positive integers; ``ValueError`` otherwise."""
    if not (isinstance(shape, tuple | list | torch.Size) and len(shape) == 2
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)):
        raise ValueError(f"shape must be (rows, columns) of two integers >= 1, got {shape!r}")
    return int(shape[0]), int(shape[1])


def flat_scale_index(shape: tuple[int, int], blocksize: int = 64) -> torch.Tensor:
    """The block of every element of an (m, n) weight: ``(i·n + j) // blocksize`` (int64, (m, n)).

    Introduced in lesson 12, section "8. Where the libraries differ: bitsandbytes on the CPU".
    """
    m, n = _check_shape(shape)
    blocksize = check_blocksize(blocksize)
    return (torch.arange(m * n) // blocksize).reshape(m, n)


def row_scale_index(shape: tuple[int, int], blocksize: int = 64) -> torch.Tensor:
    """The scale bitsandbytes 0.50.2's AVX-512 CPU kernel reads for element ``(i, j)``:
    ``i·(n // blocksize) + j // blocksize`` (int64, (m, n)); right only if ``n % blocksize == 0``.

    Introduced in lesson 12, section "8. Where the libraries differ: bitsandbytes on the CPU".
    """
    m, n = _check_shape(shape)
    blocksize = check_blocksize(blocksize)
    rows = torch.arange(m).unsqueeze(1) * (n // blocksize)
    return rows + (torch.arange(n) // blocksize).unsqueeze(0)


def measured_scale_index(shape: tuple[int, int], blocksize: int = 64) -> torch.Tensor:
    """The scale the installed bitsandbytes reads for every element when it dequantizes an
    (m, n) NF4 weight on the CPU, measured: every code is NF4's +1 and ``absmax[b] = b``, so
    the dequantized element *is* its block number (int64, (m, n)).

    Introduced in lesson 12, section "8. Where the libraries differ: bitsandbytes on the CPU".
    """
    import bitsandbytes.functional as F

    m, n = _check_shape(shape)
    blocksize = check_blocksize(blocksize)
    packed, state = F.quantize_4bit(torch.ones(m, n), blocksize=blocksize, quant_type="nf4",
                                    compress_statistics=False)
    state.absmax = torch.arange(math.ceil(m * n / blocksize), dtype=torch.float32)
    return F.dequantize_4bit(packed, state).reshape(m, n).round().long()


def _weight(shape: tuple[int, int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * 0.02).to(dtype)


def compare_nf4(shape: tuple[int, int], blocksize: int = 64, dtype: torch.dtype = torch.float32,
                seed: int = 0) -> dict[str, object]:
    """Quantize one random (m, n) weight to NF4 with bitsandbytes on the CPU and with
    ``quant.quantize_4bit``; compare the bytes, the scales and the dequantized weights.

    Returns ``shape``, ``blocksize``, ``same_bytes`` (packed codes and absmax equal),
    ``same_weights`` (dequantized weights equal), ``wrong_scales`` (elements whose measured
    scale is not their own block's), ``rms_bnb_cpu`` and ``rms_ours`` (RMS error against the
    weight) and ``ratio`` = ``rms_bnb_cpu / rms_ours``.

    Introduced in lesson 12, section "8. Where the libraries differ: bitsandbytes on the CPU".
    """
    import bitsandbytes.functional as F

    m, n = _check_shape(shape)
    w = _weight((m, n), dtype, seed)
    packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4",
                                    compress_statistics=False)
    ours = quantize_4bit(w, quant_type="nf4", blocksize=blocksize, double_quant=False)
    theirs_w = F.dequantize_4bit(packed, state).reshape(m, n)
    ours_w = dequantize_4bit(ours)
    rms_theirs = float((theirs_w.float() - w.float()).pow(2).mean().sqrt())
    rms_ours = float((ours_w.float() - w.float()).pow(2).mean().sqrt())
    wrong = measured_scale_index((m, n), blocksize) != flat_scale_index((m, n), blocksize)
    return {
        "shape": (m, n),
        "blocksize": blocksize,
        "same_bytes": torch.equal(ours.packed, packed.reshape(-1))
        and torch.equal(ours.absmax, state.absmax),
        "same_weights": torch.equal(ours_w, theirs_w),
        "wrong_scales": int(wrong.sum()),
        "rms_bnb_cpu": rms_theirs,
        "rms_ours": rms_ours,
        "ratio": rms_theirs / rms_ours,
    }


def error_grid(shapes: list[tuple[int, int]], blocksizes: list[int],
               dtype: torch.dtype = torch.float32, seed: int = 0) -> list[dict[str, object]]:
    """``compare_nf4`` for every shape and blocksize, shapes first.

    Introduced in lesson 12, section "8. Where the libraries differ: bitsandbytes on the CPU".
    """
    return [compare_nf4(shape, blocksize, dtype, seed) for shape in shapes
            for blocksize in blocksizes]
