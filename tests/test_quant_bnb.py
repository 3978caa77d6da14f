"""Bit-exactness of pedaPEFT.quant against bitsandbytes 0.50.2 (CPU backend; the reference extra).

Compared bit for bit: the code tables, the packed bytes, the absmax (and with double
quantization the 8-bit absmax codes, the offset and the second-level scales), the dequantized
outputs, and the Linear4bit state dict in both directions. The two documented differences
(second-level rounding, the stored absmax of a trailing all-zero block) are tested explicitly.
"""

import pytest
import torch

from pedaPEFT import quant

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

pytestmark = pytest.mark.reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SHAPES = [(64,), (99,), (37, 113), (256, 512), (3, 5, 7), (4133,), (70001,)]


def weight(shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * 0.02).to(dtype)


def bnb_dequant(packed, state, shape):
    # bitsandbytes' CPU kernel returns a 1-D tensor as (1, n); compare in the original shape.
    return F.dequantize_4bit(packed, state).reshape(shape)


def test_code_tables_equal_bitsandbytes():
    assert torch.equal(quant.nf4_code(), F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(quant.fp4_code(), F.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(quant.dynamic_code(), F.create_dynamic_map(signed=True))
    assert torch.equal(quant.dynamic_code(signed=False), F.create_dynamic_map(signed=False))
    normal_map = F.create_normal_map(offset=quant.NF4_OFFSET, use_extra_value=True)
    assert torch.equal(torch.unique(normal_map), quant.nf4_code())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", quant.QUANT_TYPES)
def test_quantize_without_double_quant_is_bit_exact(quant_type, dtype, shape):
    w = weight(shape, dtype)
    packed, state = F.quantize_4bit(w, quant_type=quant_type, compress_statistics=False)
    ours = quant.quantize_4bit(w, quant_type=quant_type, double_quant=False)
    assert torch.equal(ours.packed, packed.reshape(-1))
    assert torch.equal(ours.absmax, state.absmax)
    assert torch.equal(quant.dequantize_4bit(ours), bnb_dequant(packed, state, shape))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", quant.QUANT_TYPES)
def test_double_quant_with_cpu_lut_is_bit_exact(quant_type, dtype, shape):
    w = weight(shape, dtype, seed=1)
    packed, state = F.quantize_4bit(w, quant_type=quant_type, compress_statistics=True)
    ours = quant.quantize_4bit(w, quant_type=quant_type, dq_rounding="cpu_lut")
    assert torch.equal(ours.packed, packed.reshape(-1))
    assert torch.equal(ours.absmax, state.absmax)  # uint8 codes into the dynamic map
    assert torch.equal(ours.offset, state.offset)
    assert torch.equal(ours.nested_absmax, state.state2.absmax)
    assert torch.equal(ours.nested_code, state.state2.code)
    assert ours.dq_blocksize == state.state2.blocksize == 256
    assert torch.equal(quant.dequantize_4bit(ours), bnb_dequant(packed, state, shape))


@pytest.mark.parametrize("blocksize", [32, 128, 1024])
def test_other_blocksizes_are_bit_exact(blocksize):
    w = weight((96, 200), torch.bfloat16, seed=2)
    packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4",
                                    compress_statistics=True)  # fmt: skip
    ours = quant.quantize_4bit(w, blocksize=blocksize, dq_rounding="cpu_lut")
    assert torch.equal(ours.packed, packed.reshape(-1)) and torch.equal(ours.absmax, state.absmax)
    assert torch.equal(quant.dequantize_4bit(ours), bnb_dequant(packed, state, w.shape))


def test_nearest_dq_rounding_differs_from_the_cpu_lut_by_at_most_one_code():
    # bitsandbytes' CUDA kernels pick the exact nearest 8-bit code; its CPU kernel a 65,536-bin
    # table. Our default is the exact nearest: same first level, same scales, a few codes moved.
    w = weight((1024, 1024), torch.bfloat16, seed=3)
    packed, state = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    ours = quant.quantize_4bit(w)
    assert torch.equal(ours.packed, packed.reshape(-1))
    assert torch.equal(ours.offset, state.offset)
    assert torch.equal(ours.nested_absmax, state.state2.absmax)
    moved = (ours.absmax.int() - state.absmax.int()).abs()
    assert int(moved.max()) == 1 and 0 < int((moved > 0).sum()) < 0.01 * moved.numel()


def test_zero_blocks_follow_the_cpu_convention_with_the_true_absmax_stored():
    w = weight((64 * 4 + 20,), torch.float32, seed=4)
    w[64:128] = 0  # a full all-zero block
    w[-20:] = 0  # a trailing partial all-zero block
    packed, state = F.quantize_4bit(w, quant_type="nf4", compress_statistics=False)
    ours = quant.quantize_4bit(w, double_quant=False)
    assert torch.equal(ours.packed, packed.reshape(-1))
    assert ours.packed[32:64].unique().tolist() == [0x77]  # nibble 7, the exact zero
    assert state.absmax[1] == 0 and ours.absmax[1] == 0
    assert float(state.absmax[-1]) == pytest.approx(1e-38) and ours.absmax[-1] == 0  # differs
    assert torch.equal(ours.absmax[:-1], state.absmax[:-1])
    assert torch.equal(quant.dequantize_4bit(ours), bnb_dequant(packed, state, w.shape))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_we_load_what_linear4bit_writes(dtype, double_quant):
    torch.manual_seed(5)
    layer = bnb.nn.Linear4bit(128, 48, quant_type="nf4", compress_statistics=double_quant)
    layer.weight.data = layer.weight.data.to(dtype)
    layer = layer.to("cpu")  # quantizes
    sd = layer.state_dict(prefix="block.q.")
    state = quant.from_bnb_state_dict(sd, prefix="block.q.")
    assert state.shape == (48, 128) and state.dtype == dtype and state.double_quant == double_quant
    expected = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(quant.dequantize_4bit(state), expected)


@pytest.mark.parametrize("dq_rounding", quant.DQ_ROUNDINGS)
@pytest.mark.parametrize("quant_type", quant.QUANT_TYPES)
def test_linear4bit_loads_what_we_write(quant_type, dq_rounding):
    w = weight((48, 128), torch.bfloat16, seed=6)
    ours = quant.quantize_4bit(w, quant_type=quant_type, dq_rounding=dq_rounding)
    sd = quant.to_bnb_state_dict(ours)
    layer = bnb.nn.Linear4bit(128, 48, bias=False, quant_type=quant_type,
                              compute_dtype=torch.bfloat16)  # fmt: skip
    stats = {k: v for k, v in sd.items() if k.startswith("weight.")}
    layer.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu",
                                                       module=layer)  # fmt: skip
    assert torch.equal(F.dequantize_4bit(layer.weight.data, layer.weight.quant_state),
                       quant.dequantize_4bit(ours))  # fmt: skip
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, quant.dequantize_4bit(ours)))
    assert torch.equal(layer.state_dict()["weight.absmax"], ours.absmax)


def test_state_dict_equals_bitsandbytes_packed_dict():
    w = weight((64, 96), torch.bfloat16, seed=7)
    packed, state = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    ours = quant.to_bnb_state_dict(quant.quantize_4bit(w, dq_rounding="cpu_lut"))
    theirs = {"weight": packed} | {f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_we_load_a_linear4bit_with_bfloat16_storage():
    # quant_storage=torch.bfloat16 (used with FSDP) reinterprets the same bytes as bfloat16.
    torch.manual_seed(8)
    layer = bnb.nn.Linear4bit(128, 48, quant_type="nf4", quant_storage=torch.bfloat16).to("cpu")
    sd = layer.state_dict()
    assert sd["weight"].dtype == torch.bfloat16
    state = quant.from_bnb_state_dict(sd)
    assert state.packed.dtype == torch.uint8 and state.packed.numel() == 48 * 128 // 2
    expected = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(quant.dequantize_4bit(state), expected)
