"""4-bit NF4 and FP4 codes and blockwise 4-bit quantization (lesson 7).

4-bit code quantization: ``s_i = x_i / a_j`` lies in [-1, 1] (``a_j`` the absmax of ``x_i``'s
block); the stored 4-bit index is the nearest entry of a 16-value table ``code`` (ties go to
the lower value), and ``dequant_i = code[q_i] * a_j``. Two indices share a byte: element ``2i``
in the high nibble.

The arithmetic follows bitsandbytes 0.50 (CPU backend) bit for bit, in pure torch ops, so it
runs the same on CPU and CUDA tensors:

* scaling multiplies by the float32 reciprocal ``1 / max(a_j, 1e-38)``, except the trailing
  partial block, which divides; results are clamped to [-1, 1];
* the nearest code is found with ``torch.bucketize`` on the float32 midpoints of the sorted code;
* dequantization multiplies in float32 and casts to the original dtype last, each element by
  the absmax of its own flat block — as bitsandbytes' CUDA kernels do. Its CPU backend, on a
  processor with AVX-512, reads other blocks' scales for some 2-D shapes (``bnb_cpu``,
  lesson 12), so the tests compare with it only where it reads the flat blocks.

**All-zero block.** bitsandbytes' CUDA kernels compute ``0 * (1/0) = NaN`` and store nibble 0
(value -1, so the byte is 0x00); its CPU backend clamps the absmax at 1e-38 and stores nibble 7
for NF4 (the exact zero, byte 0x77). Here: the CPU convention, on every device; the stored
absmax is the true 0.0 (bitsandbytes' CPU backend stores the clamped 1e-38 for a trailing
*partial* all-zero block). Every convention dequantizes to zeros, and states written by either
backend dequantize correctly here.

Smaller CUDA-kernel differences, not reproduced: bitsandbytes compiles its kernels with fast
math (an approximate reciprocal, so a value within about one ulp of a threshold can take the
neighbouring code), and its FP4 kernel decides on ``|x|`` with truncated decimal thresholds
(negative ties go towards zero). Here the IEEE reciprocal and the float32 midpoints are used on
every device, and the offset (the mean absmax) is always summed on the CPU, so a CUDA tensor
gets exactly the bytes its CPU copy gets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from pedaPEFT.quant_absmax import (
    blockwise_absmax_dequantize,
    blockwise_absmax_quantize,
    check_all_finite,
    check_blocksize,
    check_float_tensor,
    check_has_data,
    is_integer,
    nearest_code_index,
    scale_blocks,
    times_block_scale,
)
from pedaPEFT.quant_double import (
    DQ_ROUNDINGS,
    dequantize_absmax,
    dynamic_code,
    quantize_blockwise_8bit,
)

QUANT_TYPES = ("nf4", "fp4")
NF4_OFFSET = 0.9677083  # bitsandbytes' create_normal_map(offset=0.9677083, use_extra_value=True)


def check_quant_type(quant_type: object) -> str:
    """``quant_type`` if it is a 4-bit code (``QUANT_TYPES``); ``ValueError`` otherwise."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    return str(quant_type)



# --------------------------------------------------------------------------- codes


def nf4_code() -> torch.Tensor:
    """The 16 NF4 levels (float32, ascending; index = 4-bit nibble): lesson 7's five steps.

    Built like bitsandbytes' ``create_normal_map(0.9677083, use_extra_value=True)``; the
    probabilities are float32 (``torch.linspace``), which makes the table equal bitsandbytes'
    bit for bit.

    Introduced in lesson 7, section "2. The lecture's five steps".
    """
    from scipy.stats import norm  # imported here: scipy.stats is slow to import

    # step 1: Set I, 8 probabilities from 0.9677083 down towards 0.5 (excluded)
    set_1 = torch.linspace(NF4_OFFSET, 0.5, 9)[:-1].numpy()
    # step 2: Set II, 7 probabilities from 0.9677083 down towards 0.5 (excluded)
    set_2 = torch.linspace(NF4_OFFSET, 0.5, 8)[:-1].numpy()
    # step 3: the z-scores; Set II's negated, mirrored below zero
    z_1 = norm.ppf(set_1)  # 8 positive levels
    z_2 = -norm.ppf(set_2)  # 7 negative levels
    # step 4: concatenate Set I, a zero and Set II, in ascending order
    values = np.sort(np.concatenate([z_1, [0.0], z_2]).astype(np.float32))
    # step 5: normalize by the absolute maximum, so the ends are exactly -1 and 1
    return torch.from_numpy(values / np.abs(values).max())


def fp4_code() -> torch.Tensor:
    """The 16 FP4 levels (float32) in nibble order, as bitsandbytes stores them (lesson 7).

    Bit 3 is the sign; the 3 low bits index the magnitudes {0, 0.0625, 8, 12, 4, 6, 2, 3}
    (an E2M1-like format with a subnormal 0.0625), divided by 12 so the largest is 1.
    Nibble 8 decodes to -0.0.

    Introduced in lesson 7, section "3. The levels over the normal density".
    """
    magnitudes = torch.tensor([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0])
    return torch.cat([magnitudes, -magnitudes]) / 12.0


def _code_for(quant_type: str, device: torch.device) -> torch.Tensor:
    return (nf4_code() if quant_type == "nf4" else fp4_code()).to(device)



# --------------------------------------------------------------------------- packing


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit indices (0..15) two per byte: element ``2i`` in the high nibble.

    ``codes`` is flattened; an odd count is padded with a 0 nibble. Returns uint8 of shape
    ``(ceil(n/2),)``. (:func:`quantize_4bit` pads its values with a 0.0 before coding, so its
    padding nibble is the code of 0.0, as in bitsandbytes.)
    """
    if not isinstance(codes, torch.Tensor) or not is_integer(codes.dtype):
        raise TypeError("codes must be an integer torch.Tensor of 4-bit indices (0..15)")
    check_has_data(codes, "codes")
    flat = codes.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) > 15):
        raise ValueError("codes must lie in 0..15 to fit in 4 bits")
    flat = flat.to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return (flat[0::2] << 4) | flat[1::2]


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_4bit`: the first ``n`` nibbles as uint8 ``(n,)``, high first."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError("packed must be a uint8 torch.Tensor")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if packed.numel() != (n + 1) // 2:
        raise ValueError(
            f"packed has {packed.numel()} bytes but {n} elements need ceil(n/2) = {(n + 1) // 2}"
        )
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1)[:n]


# --------------------------------------------------------------------------- 4-bit blockwise


@dataclass
class QuantState:
    """A 4-bit quantized tensor and everything needed to dequantize it.

    Without double quantization ``absmax`` holds one float32 per block. With it, ``absmax`` holds
    uint8 indices into ``nested_code``, and the float32 absmax of block ``j`` is rebuilt as
    ``nested_code[absmax[j]] * nested_absmax[j // dq_blocksize] + offset``.

    Introduced in lesson 8, section "2. The second level, step by step"; used again in lesson 9.
    """

    packed: torch.Tensor  # uint8, shape (ceil(n/2),): element 2i in the high nibble
    absmax: torch.Tensor  # float32 (n_blocks,), or uint8 (n_blocks,) codes with double quant
    shape: torch.Size  # original shape
    dtype: torch.dtype  # original dtype (fp32, bf16, fp16)
    blocksize: int  # 64 by default
    quant_type: str  # "nf4" | "fp4"
    code: torch.Tensor  # float32 (16,) the 4-bit code table
    offset: torch.Tensor | None = None  # float32 scalar: mean of absmax (double quant only)
    nested_absmax: torch.Tensor | None = None  # float32 (ceil(n_blocks/dq_blocksize),)
    nested_code: torch.Tensor | None = None  # float32 (256,) signed dynamic map
    dq_blocksize: int | None = None  # 256

    @property
    def double_quant(self) -> bool:
        """True when the absmax values are themselves quantized."""
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        """Number of elements of the original tensor."""
        return math.prod(self.shape)

    def to(self, device: torch.device | str) -> QuantState:
        """Return a copy with every tensor on ``device``."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)


def quantize_4bit(
    w: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    dq_blocksize: int = 256,
    dq_rounding: str = "nearest",
) -> QuantState:
    """Quantize a float tensor of any shape to 4-bit NF4 or FP4 codes, blockwise (lesson 7,
    section "Blockwise 4-bit"; double quantization: lesson 8).

    The tensor is flattened row-major into blocks of ``blocksize``; each block is scaled by its
    absmax into [-1, 1] and every value becomes the index of the nearest code entry. With
    ``double_quant`` the absmax values are then quantized to 8 bits (mean subtracted, blocks of
    ``dq_blocksize``, dynamic map, float32 second-level scales); ``dq_rounding`` is described in
    ``pedaPEFT.quant_double``. Works on CPU and CUDA tensors, for float32, bfloat16 and float16.

    Introduced in lesson 7, section "4. NF4 vs FP4 vs int4: normal data and trained weights";
    used again in lessons 8 and 9.
    """
    check_float_tensor(w, "w", check_finite=False)
    quant_type = check_quant_type(quant_type)
    blocksize = check_blocksize(blocksize)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be True or False, got {double_quant!r}")
    if double_quant:
        dq_blocksize = check_blocksize(dq_blocksize, "dq_blocksize")
        if dq_rounding not in DQ_ROUNDINGS:
            raise ValueError(f"dq_rounding must be one of {DQ_ROUNDINGS}, got {dq_rounding!r}")
    code = _code_for(quant_type, w.device)
    absmax, scaled = scale_blocks(w.reshape(-1).float(), blocksize)
    check_all_finite(absmax, "w")  # a block's absmax is NaN or Inf exactly when the block is
    if scaled.numel() % 2:  # an odd count is padded with the code of 0.0, as bitsandbytes does
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    indices = nearest_code_index(scaled, code)  # (n rounded up to even,) int64 in 0..15
    packed = pack_4bit(indices)  # (ceil(n/2),) uint8
    state = QuantState(
        packed=packed,
        absmax=absmax,
        shape=w.shape,
        dtype=w.dtype,
        blocksize=blocksize,
        quant_type=quant_type,
        code=code,
    )
    if not double_quant:
        return state
    # The mean is taken on the CPU so that CPU and CUDA give the same float32 offset.
    offset = absmax.cpu().mean().to(w.device)
    qabsmax, nested_absmax = quantize_blockwise_8bit(absmax - offset, dq_blocksize, dq_rounding)
    return replace(
        state,
        absmax=qabsmax,
        offset=offset,
        nested_absmax=nested_absmax,
        nested_code=dynamic_code().to(w.device),
        dq_blocksize=dq_blocksize,
    )


def check_4bit_layout(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    n: int,
    blocksize: int,
    dq_blocksize: int,
) -> None:
    """Check that the arguments describe one packed 4-bit tensor of ``n`` elements.

    Only shapes, dtypes and devices are read (no data, no device synchronisation), so the
    check costs microseconds and runs on every call: ``packed`` uint8 with ceil(n/2) bytes,
    ``absmax`` one entry per block (uint8 codes with double quantization, float without),
    a float ``code`` of 16 entries, and with double quantization a 256-entry float
    ``nested_code``, one float ``nested_absmax`` per ``dq_blocksize`` blocks and a one-element
    float ``offset``. Raises ``ValueError`` (``TypeError`` for dtypes) naming the argument.
    """
    for name, value in (("n", n), ("blocksize", blocksize)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8 (two 4-bit codes per byte), got {packed.dtype}")
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"packed has {packed.numel()} bytes, n={n} needs ceil(n/2) = "
                         f"{(n + 1) // 2}")
    n_blocks = -(-n // blocksize)
    if absmax.dim() != 1 or absmax.numel() != n_blocks:
        raise ValueError(f"absmax must be 1-D with one entry per block: n={n} in blocks of "
                         f"{blocksize} needs {n_blocks}, got shape {tuple(absmax.shape)}")
    if not code.is_floating_point() or code.numel() != 16:
        raise ValueError(f"code must be a float table of 16 entries, got {code.numel()} "
                         f"of {code.dtype}")
    nested = (nested_absmax, nested_code, offset)
    double_quant = all(t is not None for t in nested)
    if not double_quant and any(t is not None for t in nested):
        raise ValueError("nested_absmax, nested_code and offset must be given all together "
                         "(double quantization) or all be None")
    if not double_quant:
        if not absmax.is_floating_point():
            raise TypeError(f"absmax must be float without double quantization, got "
                            f"{absmax.dtype}")
    else:
        if absmax.dtype != torch.uint8:
            raise TypeError(f"absmax must be uint8 codes with double quantization, got "
                            f"{absmax.dtype}")
        if isinstance(dq_blocksize, bool) or not isinstance(dq_blocksize, int) or dq_blocksize < 1:
            raise ValueError(f"dq_blocksize must be an integer >= 1, got {dq_blocksize!r}")
        if not nested_code.is_floating_point() or nested_code.numel() != 256:
            raise ValueError(f"nested_code must be a float table of 256 entries, got "
                             f"{nested_code.numel()} of {nested_code.dtype}")
        n_nested = -(-n_blocks // dq_blocksize)
        if not nested_absmax.is_floating_point() or nested_absmax.numel() != n_nested:
            raise ValueError(f"nested_absmax must hold {n_nested} floats ({n_blocks} blocks in "
                             f"groups of {dq_blocksize}), got {nested_absmax.numel()} of "
                             f"{nested_absmax.dtype}")
        if not offset.is_floating_point() or offset.numel() != 1:
            raise ValueError(f"offset must be one float, got {offset.numel()} of {offset.dtype}")
    devices = {t.device for t in (packed, absmax, code, *nested) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"every tensor must be on one device, got {sorted(map(str, devices))}")


def check_state(state: QuantState) -> None:
    """Check a QuantState's fields against each other (``kernels.check_4bit_layout``)."""
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a QuantState, got {type(state).__name__}")
    check_quant_type(state.quant_type)
    check_blocksize(state.blocksize, "state.blocksize")
    if state.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"state.dtype must be float32, bfloat16 or float16, got {state.dtype}")
    if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in state.shape):
        raise ValueError(f"state.shape must hold integers >= 0, got {tuple(state.shape)}")
    try:
        check_4bit_layout(state.packed.reshape(-1), state.absmax, state.code,
                          state.nested_absmax, state.nested_code, state.offset, state.numel,
                          state.blocksize, state.dq_blocksize)
    except (TypeError, ValueError) as error:
        raise type(error)(f"state: {error}") from None


def check_state_values(state: QuantState, where: str = "state") -> None:
    """Everything ``check_state`` checks, and the values: code tables, scales and offset
    finite (a NaN code table or scale would make every weight of its block NaN).

    For states read from files; it reads every scale, so the hot path does not call it.
    Raises ``ValueError`` naming ``where`` and the field.
    """
    try:
        check_state(state)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: {error}") from None
    for name in ("code", "absmax", "nested_code", "nested_absmax", "offset"):
        value = getattr(state, name)
        if value is not None and value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"{where}: {name} holds NaN or inf")


def dequantize_4bit(state: QuantState) -> torch.Tensor:
    """``dequant_i = code[q_i] * absmax_j`` (lesson 7), in float32, cast to the original dtype
    and shape; ``absmax_j`` rebuilt first when it is double-quantized (lesson 8).

    The formula as written, for reading and testing; ``pedaPEFT.kernels`` computes the same
    values fast (a CPU byte table, a fused CUDA kernel) for the QLoRA layer.

    Introduced in lesson 8, section "5. What DQ costs in accuracy"; used again in lesson 9.
    """
    check_state(state)
    nibbles = unpack_4bit(state.packed.reshape(-1), state.numel)  # (n,) uint8, 0..15
    values = state.code.float()[nibbles.long()]  # (n,) float32: code[q_i]
    absmax = dequantize_absmax(state)  # (n_blocks,) float32
    out = times_block_scale(values, absmax, state.blocksize)  # (n,) code[q_i] * absmax_j
    return out.to(state.dtype).reshape(state.shape)


FAKE_QUANT_METHODS = ("nf4", "fp4", "int4", "int8")


def fake_quantize(x: torch.Tensor, method: str = "nf4", blocksize: int = 64) -> torch.Tensor:
    """Quantize and dequantize at once: what a weight looks like after a round trip (lesson 7).

    ``"nf4"``/``"fp4"``: :func:`quantize_4bit` without double quantization; ``"int4"``/
    ``"int8"``: :func:`blockwise_absmax_quantize` with 4 or 8 bits (15 or 255 levels). Every
    method uses one float32 absmax per ``blocksize`` elements. Returns float32, shape of ``x``.

    Introduced in lesson 7, section "4. NF4 vs FP4 vs int4: normal data and trained weights".
    """
    if method not in FAKE_QUANT_METHODS:
        raise ValueError(f"method must be one of {FAKE_QUANT_METHODS}, got {method!r}")
    if method in QUANT_TYPES:
        state = quantize_4bit(x, quant_type=method, blocksize=blocksize, double_quant=False)
        return dequantize_4bit(state).float()
    q, scale = blockwise_absmax_quantize(x, bits=int(method[3:]), blocksize=blocksize)
    return blockwise_absmax_dequantize(q, scale, blocksize)




def four_bit_errors(weights: dict, blocksize: int = 64) -> dict:
    """Relative RMS round-trip error (%) of NF4, FP4 and int4 on each named list of tensors.

    Introduced in lesson 7, section "4. NF4 vs FP4 vs int4: normal data and trained weights".
    """
    errors = {}
    for name, tensors in weights.items():
        errors[name] = {}
        total = sum(float((t.float() ** 2).sum()) for t in tensors)
        for method in ("nf4", "fp4", "int4"):
            squared = sum(float(((fake_quantize(t, method, blocksize) - t) ** 2).sum())
                          for t in tensors)
            errors[name][method] = 100 * (squared / total) ** 0.5
    return errors
