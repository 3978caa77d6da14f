"""bitsandbytes interop: a 4-bit ``QuantState`` as a ``Linear4bit`` state dict, and back.

The tests use it to compare this package's bytes with bitsandbytes' bit for bit.
"""

from __future__ import annotations

import json
from dataclasses import replace

import torch

from pedaPEFT.quant_4bit import QuantState, check_quant_type, check_state, check_state_values
from pedaPEFT.quant_absmax import check_blocksize

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def to_bnb_state_dict(state: QuantState, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors a bitsandbytes ``Linear4bit`` stores for its weight, under ``prefix``.

    Keys ``weight`` (uint8, shape (ceil(n/2), 1)), ``weight.absmax``, ``weight.quant_map`` and,
    with double quantization, ``weight.nested_absmax`` and ``weight.nested_quant_map``; the
    non-tensor fields go as JSON bytes under ``weight.quant_state.bitsandbytes__<quant_type>``.
    """
    check_state(state)
    meta: dict[str, object] = {
        "quant_type": state.quant_type,
        "blocksize": state.blocksize,
        "dtype": _DTYPE_NAMES[state.dtype],
        "shape": list(state.shape),
    }
    sd = {
        f"{prefix}weight": state.packed.reshape(-1, 1),
        f"{prefix}weight.absmax": state.absmax,
        f"{prefix}weight.quant_map": state.code,
    }
    if state.double_quant:
        sd[f"{prefix}weight.nested_absmax"] = state.nested_absmax
        sd[f"{prefix}weight.nested_quant_map"] = state.nested_code.clone()
        meta.update(
            nested_blocksize=state.dq_blocksize,
            nested_dtype="float32",
            nested_offset=state.offset.item(),
        )
    blob = json.dumps(meta).encode("utf-8")
    key = f"{prefix}weight.quant_state.bitsandbytes__{state.quant_type}"
    sd[key] = torch.tensor(list(blob), dtype=torch.uint8)
    return sd


def from_bnb_state_dict(sd: dict[str, torch.Tensor], prefix: str = "") -> QuantState:
    """Read the 4-bit weight of a bitsandbytes ``Linear4bit`` state dict into a QuantState.

    Introduced in lesson 12, section "2. Loading it in 4 bits".
    """
    blob_keys = [k for k in sd if k.startswith(f"{prefix}weight.quant_state.bitsandbytes__")]
    if len(blob_keys) != 1 or f"{prefix}weight" not in sd:
        raise ValueError(
            f"sd must hold '{prefix}weight' and one '{prefix}weight.quant_state.bitsandbytes__"
            "<nf4|fp4>' entry (a bitsandbytes Linear4bit state dict)"
        )
    blob_key = blob_keys[0]
    try:
        meta = json.loads(bytes(sd[blob_key].tolist()).decode("utf-8"))
    except (TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"sd[{blob_key!r}] must hold UTF-8 JSON bytes ({error})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"sd[{blob_key!r}] must hold a JSON object, got {type(meta).__name__}")
    missing = [k for k in ("quant_type", "blocksize", "dtype", "shape") if k not in meta]
    nested = [f"{prefix}weight.nested_absmax", f"{prefix}weight.nested_quant_map"]
    tensors = [f"{prefix}weight.absmax", f"{prefix}weight.quant_map"]
    if "nested_offset" in meta:
        missing += [k for k in ("nested_blocksize",) if k not in meta]
        tensors += nested
    missing += [k for k in tensors if k not in sd]
    if missing:
        raise ValueError(f"sd lacks {missing} (a bitsandbytes Linear4bit state dict has them)")
    dtypes = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
    if meta["dtype"] not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {meta['dtype']!r}")
    shape = meta["shape"]
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ValueError(f"shape must be a list of integers >= 0, got {shape!r}")
    if not all(isinstance(sd[k], torch.Tensor) for k in [f"{prefix}weight", *tensors]):
        raise ValueError(f"sd's entries {[f'{prefix}weight', *tensors]} must be tensors")
    packed = sd[f"{prefix}weight"]
    if packed.dtype != torch.uint8:
        packed = packed.contiguous().view(torch.uint8)
    state = QuantState(
        packed=packed.reshape(-1),
        absmax=sd[f"{prefix}weight.absmax"],
        shape=torch.Size(shape),
        dtype=dtypes[meta["dtype"]],
        blocksize=check_blocksize(meta["blocksize"]),
        quant_type=check_quant_type(meta["quant_type"]),
        code=sd[f"{prefix}weight.quant_map"],
    )
    if "nested_offset" in meta:
        offset, dq_blocksize = meta["nested_offset"], meta["nested_blocksize"]
        if isinstance(offset, bool) or not isinstance(offset, int | float):
            raise ValueError(f"nested_offset must be a number, got {offset!r}")
        if isinstance(dq_blocksize, bool) or not isinstance(dq_blocksize, int) or (
            dq_blocksize < 1
        ):
            raise ValueError(f"nested_blocksize must be an integer >= 1, got {dq_blocksize!r}")
        state = replace(
            state,
            offset=torch.tensor(float(offset), dtype=torch.float32, device=packed.device),
            nested_absmax=sd[f"{prefix}weight.nested_absmax"],
            nested_code=sd[f"{prefix}weight.nested_quant_map"],
            dq_blocksize=dq_blocksize,
        )
    check_state_values(state)
    state = replace(state, code=state.code.float())
    if state.double_quant:
        state = replace(state, nested_absmax=state.nested_absmax.float(),
                        nested_code=state.nested_code.float())
    check_state(state)
    return state
