"""Absmax quantization to integers, whole-tensor, blockwise and row-wise int8 (lesson 6).

Absmax integer quantization with ``b`` bits (QLoRA paper, Eq. 1-2, written correctly)::

    c = (2^(b-1) - 1) / absmax(x)        q = round(c * x)  in [-(2^(b-1)-1), 2^(b-1)-1]
    dequant(c, q) = q / c

Blockwise: the flattened tensor is cut into blocks of ``B`` elements, each with its own
``absmax``, so one outlier coarsens only its own block. This module also holds what every
quantizer of the package shares: the input checks, the block constants, the scaling of blocks
into [-1, 1] and the rounding to the nearest level of a table of levels (a code).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TINY = 1e-38  # lower clamp of an absmax before taking its reciprocal (bitsandbytes' CPU backend)


# --------------------------------------------------------------------------- input checks


def check_float_tensor(x: object, name: str, check_finite: bool = True) -> torch.Tensor:
    """Raise a clear error unless ``x`` is a non-empty (finite) fp32/bf16/fp16 tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    check_has_data(x, name)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have dtype float32, bfloat16 or float16, got {x.dtype} "
            "(integer and boolean tensors cannot be quantized)"
        )
    if x.numel() == 0:
        raise ValueError(f"{name} is empty; quantization needs at least one element")
    if check_finite:
        check_all_finite(x, name)
    return x


def check_has_data(x: torch.Tensor, name: str) -> None:
    """Refuse a meta-device tensor: it has a shape but no values to quantize."""
    if x.is_meta:
        raise ValueError(f"{name} is on the meta device (a shape without values); "
                         "materialize it first, e.g. module.to_empty(device='cpu') and load "
                         "its weights")


def check_all_finite(x: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf; only finite values can be quantized")


def is_integer(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def check_bits(bits: object) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 2 to 8, got {bits!r}")
    return bits


def check_blocksize(blocksize: object, name: str = "blocksize") -> int:
    if isinstance(blocksize, bool) or blocksize not in BLOCKSIZES:
        raise ValueError(f"{name} must be one of {BLOCKSIZES}, got {blocksize!r}")
    return int(blocksize)


# --------------------------------------------------------------------------- absmax integers


def _absmax_scale(absmax: torch.Tensor, qmax: int) -> torch.Tensor:
    """``qmax / absmax``: 1 for an all-zero block, capped at the largest float32 (tiny absmax)."""
    largest = torch.finfo(torch.float32).max
    scale = (qmax / absmax.clamp(min=TINY)).clamp(max=largest)
    return torch.where(absmax > 0, scale, torch.ones_like(scale))


def absmax_quantize(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax quantization of a whole tensor to signed ``bits``-bit integers (lesson 6, section
    "Absmax quantization": the paper's Eq. 1-2, written correctly).

    ``c = (2^(bits-1) - 1) / max|x|`` and ``q = round(c * x)`` (round half to even), so that
    ``q`` lies in ``[-(2^(bits-1)-1), 2^(bits-1)-1]`` (for int8: [-127, 127]). An all-zero
    tensor gets ``c = 1`` (any scale reproduces it). Returns ``(q, c)``: ``q`` is int8 with the
    shape of ``x``, ``c`` a float32 scalar tensor. Invert with :func:`absmax_dequantize`.
    """
    check_float_tensor(x, "x")
    q, scale = blockwise_absmax_quantize(x, bits=bits, blocksize=x.numel())
    return q, scale[0]


def absmax_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`absmax_quantize`: ``q / c`` in float32.

    Introduced in lesson 6, section "3. What one outlier does".
    """
    if not isinstance(q, torch.Tensor) or not is_integer(q.dtype):
        raise TypeError("q must be an integer torch.Tensor from absmax_quantize")
    return q.float() / torch.as_tensor(scale, dtype=torch.float32, device=q.device)


def _absmax_blocks(
    x: torch.Tensor, bits: int, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The one absmax quantizer: codes (shape of ``x``), scales ``c_j`` and absmax per block.

    The flattened ``x`` is cut into ``ceil(n / blocksize)`` blocks of ``blocksize`` (the last is
    zero-padded); block ``j`` gets ``c_j = qmax / max|x_block|`` with ``qmax = 2^(bits-1) - 1``
    and ``q = round(c_j * x)``, clamped to ``[-qmax, qmax]``.
    """
    qmax = 2 ** (bits - 1) - 1
    flat = x.reshape(-1).float()
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    absmax = padded.abs().amax(dim=1)  # (n_blocks,)
    scale = _absmax_scale(absmax, qmax)  # (n_blocks,)
    q = torch.round(padded * scale[:, None]).clamp_(-qmax, qmax).to(torch.int8)
    return q.reshape(-1)[:n].reshape(x.shape), scale, absmax


def blockwise_absmax_quantize(
    x: torch.Tensor, bits: int = 8, blocksize: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax quantization per block of ``blocksize`` consecutive elements (any bit width 2-8);
    lesson 6, section "Blockwise quantization".

    The flattened tensor is cut into ``ceil(n / blocksize)`` blocks (the last may be shorter);
    block ``j`` gets its own ``c_j = (2^(bits-1) - 1) / max|x_block|`` (1 for an all-zero block)
    and ``q = round(c_j * x)``. One outlier then only coarsens its own block. Returns ``(q, c)``:
    int8 codes with the shape of ``x`` and float32 scales of shape ``(n_blocks,)``.
    """
    check_float_tensor(x, "x")
    bits = check_bits(bits)
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive integer, got {blocksize!r}")
    q, scale, _ = _absmax_blocks(x, bits, blocksize)
    return q, scale


def blockwise_absmax_dequantize(
    q: torch.Tensor, scale: torch.Tensor, blocksize: int = 64
) -> torch.Tensor:
    """Inverse of :func:`blockwise_absmax_quantize`: ``q_i / c_j`` in float32, shape of ``q``.

    Introduced in lesson 6, section "4. Blockwise quantization: a scale per block".
    """
    if not isinstance(q, torch.Tensor) or not is_integer(q.dtype):
        raise TypeError("q must be an integer torch.Tensor from blockwise_absmax_quantize")
    n = q.numel()
    n_blocks = -(-n // blocksize)
    if scale.numel() != n_blocks:
        raise ValueError(
            f"scale has {scale.numel()} entries but q with blocksize {blocksize} needs {n_blocks}"
        )
    flat = torch.nn.functional.pad(q.reshape(-1).float(), (0, n_blocks * blocksize - n))
    out = flat.view(n_blocks, blocksize) / scale.float().reshape(-1, 1)
    return out.reshape(-1)[:n].reshape(q.shape)


@dataclass
class Int8State:
    """An int8 weight with absmax scales, row-wise (LLM.int8 style) or per block.

    ``q`` int8 with the weight's shape; ``absmax`` float32, one per row of a 2-D weight
    (``blocksize=None``) or one per block of the flattened weight. Dequantization is
    ``W ~ q * (absmax / 127)``; for row-wise states a linear layer can use
    ``x @ W.T ~ (x @ q.T) * (absmax / 127)``.
    """

    q: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int | None

    def to(self, device: torch.device | str) -> Int8State:
        """Return a copy with every tensor on ``device``."""
        return replace(self, q=self.q.to(device), absmax=self.absmax.to(device))


def quantize_int8(w: torch.Tensor, blocksize: int | None = None) -> Int8State:
    """Absmax int8 quantization for a frozen base weight (lesson 6; QLoRA's int8 base).

    ``blocksize=None``: one absmax per row of the 2-D weight ``w`` (out_features, in_features),
    ``q = round(w * (127 / absmax_row))``. ``blocksize=B`` (one of ``BLOCKSIZES``): one absmax
    per block of ``B`` elements of the flattened weight, any shape. All-zero rows or blocks
    give ``q = 0`` and ``absmax = 0``.
    """
    check_float_tensor(w, "w")
    if blocksize is None:
        if w.dim() != 2:
            raise ValueError(
                f"row-wise int8 (blocksize=None) needs a 2-D weight, got shape {tuple(w.shape)}"
            )
        block = w.shape[1]  # one block per row of the (out, in) weight
    else:
        block = blocksize = check_blocksize(blocksize)
    q, _, absmax = _absmax_blocks(w, 8, block)
    return Int8State(q=q, absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize)


def dequantize_int8(state: Int8State) -> torch.Tensor:
    """``q * (absmax / 127)`` in float32, cast to the original dtype and shape."""
    if state.blocksize is None:
        out = state.q.float() * (state.absmax / 127.0)[:, None]
    else:
        n = state.q.numel()
        n_blocks = state.absmax.numel()
        flat = torch.nn.functional.pad(
            state.q.reshape(-1).float(), (0, n_blocks * state.blocksize - n)
        )
        out = (flat.view(n_blocks, -1) * (state.absmax / 127.0)[:, None]).reshape(-1)[:n]
    return out.reshape(state.shape).to(state.dtype)


def normal_with_outliers(n: int = 2**20, outlier_every: int = 1000, seed: int = 0) -> torch.Tensor:
    """N(0, 1) samples where every ``outlier_every``-th value (at random places) is scaled ×20:
    lesson 6's test data, on which one outlier spoils a whole block's scale."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=generator)
    where = torch.randperm(n, generator=generator)[: n // outlier_every]
    x[where] *= 20
    return x


# --------------------------------------------------------------------------- shared by the codes


def scale_blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax per block and the values scaled into [-1, 1] (float32, flattened, length n).

    Full blocks multiply by ``1 / max(absmax, 1e-38)``; a trailing partial block divides by it.
    """
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    inverse = 1.0 / absmax.clamp(min=TINY)
    scaled = (blocks * inverse[:, None]).clamp_(-1, 1).reshape(-1)
    if full < n:
        tail = flat[full:]
        tail_absmax = tail.abs().amax()
        absmax = torch.cat([absmax, tail_absmax[None]])
        scaled = torch.cat([scaled, (tail / tail_absmax.clamp(min=TINY)).clamp_(-1, 1)])
    return absmax, scaled


def times_block_scale(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Multiply element ``i`` of a flat float32 tensor by ``absmax[i // blocksize]`` (in place)."""
    n = values.numel()
    full = n - n % blocksize
    values[:full].view(-1, blocksize).mul_(absmax[: full // blocksize, None])
    if full < n:
        values[full:].mul_(absmax[-1])
    return values


def nearest_code_index(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of ``code`` for each value (ties go to the lower value).

    Sorts the code, takes the float32 midpoints between neighbours and counts how many
    midpoints lie strictly below each value (``torch.bucketize``), then maps back to the
    code's own order. Returns int64 indices.

    Introduced in lesson 7, section "5. "Information-theoretically optimal"?".
    """
    order = torch.argsort(code, stable=True)
    sorted_code = code[order]
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2
    index = torch.bucketize(scaled, midpoints)
    if torch.equal(order, torch.arange(code.numel(), device=code.device)):
        return index  # already sorted (NF4, the dynamic map): skip the remapping pass
    return order[index]
