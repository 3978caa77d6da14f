"""Tests for pedaPEFT.quant: code tables, packing, absmax, 4-bit quantization, DQ, bit counts."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pedaPEFT import kernels, quant

# bitsandbytes' NF4 table (functional.get_4bit_type("nf4"), QLoRA paper appendix E).
BNB_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PROPERTY = settings(max_examples=60, deadline=None)


def largest_half_gap(code: torch.Tensor) -> float:
    return float(torch.diff(code.sort().values).max()) / 2


# --------------------------------------------------------------------------- code tables


def test_nf4_code_equals_bitsandbytes_table_bit_for_bit():
    code = quant.nf4_code()
    assert code.dtype == torch.float32 and code.shape == (16,)
    assert torch.equal(code, torch.tensor(BNB_NF4, dtype=torch.float32))
    assert (code[7], code[0], code[15]) == (0.0, -1.0, 1.0)


def test_nf4_code_is_normal_quantiles_normalised():
    from scipy.stats import norm

    code = quant.nf4_code().double()
    top = norm.ppf(np.float32(quant.NF4_OFFSET))
    probs_pos = np.linspace(quant.NF4_OFFSET, 0.5, 9)[:-1]
    np.testing.assert_allclose(code[8:].numpy()[::-1], norm.ppf(probs_pos) / top, rtol=1e-6)
    probs_neg = np.linspace(quant.NF4_OFFSET, 0.5, 8)[:-1]
    np.testing.assert_allclose(code[:7].numpy(), -norm.ppf(probs_neg) / top, rtol=1e-6)


def test_nf4_code_returns_a_copy():
    quant.nf4_code()[0] = 5.0
    assert quant.nf4_code()[0] == -1.0


def test_fp4_code_nibble_order_and_sign_bit():
    code = quant.fp4_code()
    raw = [0, 0.0625, 8, 12, 4, 6, 2, 3]
    assert torch.equal(code[:8], torch.tensor(raw, dtype=torch.float32) / 12)
    assert torch.equal(code[8:], -code[:8])
    assert code[3] == 1.0 and code[1] == pytest.approx(0.0052083334885537624, abs=0)


def test_dynamic_code_structure():
    code = quant.dynamic_code()
    assert code.shape == (256,) and code.dtype == torch.float32
    assert bool((torch.diff(code) > 0).all())
    assert (code < 0).sum() == 127 and code[127] == 0 and code[255] == 1.0
    assert float(code[0]) == pytest.approx(-0.992968738, rel=1e-8)
    assert float(code[128]) == pytest.approx(5.50000038e-07, rel=1e-7)
    assert float(code[201]) == pytest.approx(0.247656241, rel=1e-8)


def test_unsigned_dynamic_code_structure():
    code = quant.dynamic_code(signed=False)
    assert code.shape == (256,) and code.dtype == torch.float32
    assert bool((torch.diff(code) > 0).all())
    assert code[0] == 0 and code[255] == 1.0 and (code > 0).sum() == 255
    # the sign bit becomes a fraction bit: twice the levels per decade of the signed map
    signed = quant.dynamic_code()
    for low, high in ((1e-6, 1e-5), (0.1, 1.0)):
        in_decade = ((code >= low) & (code < high)).sum()
        assert in_decade == 2 * ((signed >= low) & (signed < high)).sum()


def test_nearest_code_index_ties_go_to_the_lower_code():
    code = quant.nf4_code()
    midpoint = (code[7] + code[8]) / 2
    above = torch.nextafter(midpoint, torch.tensor(1.0))
    idx = quant.nearest_code_index(torch.stack([midpoint, above]), code)
    assert idx.tolist() == [7, 8]


def test_nearest_code_index_unsorted_fp4_is_true_nearest():
    code = quant.fp4_code()
    x = torch.linspace(-1, 1, 1001)
    idx = quant.nearest_code_index(x, code)
    brute = (x[:, None] - code[None, :]).abs().min(dim=1).values
    assert torch.equal((x - code[idx]).abs(), brute)


# --------------------------------------------------------------------------- packing


def test_pack_high_nibble_first():
    assert quant.pack_4bit(torch.tensor([15, 0, 1, 2])).tolist() == [0xF0, 0x12]
    assert quant.pack_4bit(torch.tensor([3, 4, 5])).tolist() == [0x34, 0x50]


@PROPERTY
@given(st.lists(st.integers(0, 15), min_size=0, max_size=200))
def test_pack_unpack_bijection(values):
    codes = torch.tensor(values, dtype=torch.uint8)
    packed = quant.pack_4bit(codes)
    assert packed.dtype == torch.uint8 and packed.shape == ((len(values) + 1) // 2,)
    assert torch.equal(quant.unpack_4bit(packed, len(values)), codes)


@PROPERTY
@given(st.lists(st.integers(0, 255), min_size=1, max_size=100))
def test_unpack_pack_bijection_on_bytes(values):
    packed = torch.tensor(values, dtype=torch.uint8)
    assert torch.equal(quant.pack_4bit(quant.unpack_4bit(packed, 2 * len(values))), packed)


def test_pack_and_unpack_reject_bad_input():
    with pytest.raises(ValueError, match="0..15"):
        quant.pack_4bit(torch.tensor([16]))
    with pytest.raises(TypeError, match="integer"):
        quant.pack_4bit(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="ceil"):
        quant.unpack_4bit(torch.zeros(3, dtype=torch.uint8), 8)
    with pytest.raises(TypeError, match="uint8"):
        quant.unpack_4bit(torch.zeros(4, dtype=torch.int32), 8)


# --------------------------------------------------------------------------- absmax integers


def test_absmax_int8_formula_by_hand():
    x = torch.tensor([1.0, -2.0, 0.5, 0.0])
    q, c = quant.absmax_quantize(x)
    assert float(c) == pytest.approx(127 / 2)
    assert q.dtype == torch.int8
    assert q.tolist() == [64, -127, 32, 0]  # round(63.5) = 64 (half to even), round(31.75) = 32
    assert torch.allclose(quant.absmax_dequantize(q, c), q.float() / (127 / 2))


@PROPERTY
@given(
    st.lists(st.floats(-1e4, 1e4, width=32), min_size=1, max_size=300),
    st.integers(2, 8),
)
def test_absmax_round_trip_error_is_half_a_step(values, bits):
    x = torch.tensor(values)
    q, c = quant.absmax_quantize(x, bits=bits)
    qmax = 2 ** (bits - 1) - 1
    assert int(q.abs().max()) <= qmax
    err = (quant.absmax_dequantize(q, c) - x).abs().max()
    assert float(err) <= 0.5 / float(c) * (1 + 1e-5) + 1e-30


def test_absmax_all_zero_tensor_round_trips_to_zero():
    q, c = quant.absmax_quantize(torch.zeros(5))
    assert float(c) == 1.0 and torch.equal(quant.absmax_dequantize(q, c), torch.zeros(5))


def test_blockwise_confines_an_outlier_to_its_block():
    torch.manual_seed(0)
    x = torch.randn(4096) * 0.02
    x[100] = 5.0
    q, c = quant.absmax_quantize(x)
    whole = (quant.absmax_dequantize(q, c) - x).abs().mean()
    qb, cb = quant.blockwise_absmax_quantize(x, bits=8, blocksize=64)
    blockwise = (quant.blockwise_absmax_dequantize(qb, cb, 64) - x).abs().mean()
    assert cb.shape == (64,)
    assert float(blockwise) < float(whole) / 20
    assert int((q == 0).sum()) > 2000  # the outlier squashed most values to zero


@PROPERTY
@given(
    st.lists(st.floats(-100, 100, width=32), min_size=1, max_size=300),
    st.sampled_from([1, 7, 64, 1000]),
    st.integers(2, 8),
)
def test_blockwise_error_bound_per_block(values, blocksize, bits):
    x = torch.tensor(values)
    q, c = quant.blockwise_absmax_quantize(x, bits=bits, blocksize=blocksize)
    out = quant.blockwise_absmax_dequantize(q, c, blocksize)
    per_element_step = (1 / c).repeat_interleave(blocksize)[: x.numel()]
    assert bool(((out - x).abs() <= 0.5 * per_element_step * (1 + 1e-5) + 1e-30).all())


def test_int8_rowwise_and_blockwise():
    torch.manual_seed(1)
    w = torch.randn(8, 40, dtype=torch.bfloat16)
    w[3] = 0
    state = quant.quantize_int8(w)
    assert state.q.dtype == torch.int8 and state.q.shape == w.shape
    assert state.absmax.shape == (8,) and state.absmax[3] == 0
    assert torch.equal(state.absmax, w.float().abs().amax(dim=1))
    out = quant.dequantize_int8(state)
    assert out.dtype == torch.bfloat16 and bool((out[3] == 0).all())
    bound = (state.absmax / 254)[:, None] + w.float().abs() * 2**-8
    assert bool(((out.float() - w.float()).abs() <= bound * 1.001).all())
    blocked = quant.quantize_int8(w.float(), blocksize=32)
    assert blocked.absmax.shape == (10,)
    err = (quant.dequantize_int8(blocked) - w.float()).abs()
    assert float(err.max()) <= float(w.float().abs().max()) / 254 * 1.001
    assert quant.quantize_int8(w).to("cpu").q.device.type == "cpu"
    with pytest.raises(ValueError, match="2-D"):
        quant.quantize_int8(torch.randn(10))
    with pytest.raises(ValueError, match="blocksize"):
        quant.quantize_int8(w, blocksize=10)


# --------------------------------------------------------------------------- 4-bit


def error_bound(state: quant.QuantState, x: torch.Tensor) -> torch.Tensor:
    """Per-element bound: half the largest code gap times the block absmax, plus DQ error."""
    n, b = x.numel(), state.blocksize
    true_absmax = torch.nn.functional.pad(x.reshape(-1).float().abs(), (0, -n % b))
    true_absmax = true_absmax.view(-1, b).amax(dim=1)
    rebuilt = quant.dequantize_absmax(state)
    per_block = largest_half_gap(state.code) * true_absmax + (rebuilt - true_absmax).abs()
    per_block = per_block * (1 + 1e-5) + 1e-30
    bound = per_block.repeat_interleave(b)[:n].reshape(x.shape)
    eps = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[x.dtype]
    return bound + eps * (x.float().abs() + bound)


@PROPERTY
@given(
    st.lists(st.floats(-1e3, 1e3, width=16), min_size=1, max_size=400),
    st.sampled_from(quant.QUANT_TYPES),
    st.sampled_from([32, 64, 128]),
    st.booleans(),
    st.sampled_from(DTYPES),
)
def test_quantize_4bit_properties(values, quant_type, blocksize, double_quant, dtype):
    x = torch.tensor(values, dtype=torch.float32).to(dtype)
    state = quant.quantize_4bit(
        x, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant
    )
    out = quant.dequantize_4bit(state)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert bool(torch.isfinite(out).all())
    assert bool(((out.float() - x.float()).abs() <= error_bound(state, x)).all())
    zero_blocks = (x.float().reshape(-1) == 0).all() if x.numel() <= blocksize else None
    if zero_blocks:
        assert bool((out == 0).all())


@pytest.mark.parametrize("shape", [(64,), (7,), (3, 5, 7), (16, 48), (1, 1)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_4bit_shapes_and_dtypes(shape, dtype):
    torch.manual_seed(0)
    x = torch.randn(shape).to(dtype)
    state = quant.quantize_4bit(x)
    n = math.prod(shape)
    assert state.packed.shape == ((n + 1) // 2,) and state.packed.dtype == torch.uint8
    assert state.absmax.dtype == torch.uint8 and state.absmax.shape == (-(-n // 64),)
    assert state.nested_absmax.dtype == torch.float32 and state.offset.dtype == torch.float32
    assert state.shape == x.shape and state.dtype == dtype and state.nested_code.shape == (256,)
    out = quant.dequantize_4bit(state)
    assert out.shape == x.shape and out.dtype == dtype
    assert bool(((out.float() - x.float()).abs() <= error_bound(state, x)).all())


def test_quantize_4bit_extremes_hit_the_ends_of_the_code():
    x = torch.tensor([1.0, -1.0, 0.0, 0.5] * 16)
    state = quant.quantize_4bit(x, double_quant=False)
    assert state.packed[0] == 0xF0  # +1 -> nibble 15 (high), -1 -> nibble 0 (low)
    assert state.packed[1] >> 4 == 7  # 0 -> the exact zero of NF4
    assert torch.equal(quant.dequantize_4bit(state)[:3], torch.tensor([1.0, -1.0, 0.0]))


def test_odd_length_pads_with_the_code_of_zero():
    x = torch.randn(101)
    assert quant.quantize_4bit(x, "nf4").packed[-1] & 15 == 7
    assert quant.quantize_4bit(x, "fp4").packed[-1] & 15 == 0


@pytest.mark.parametrize("quant_type", quant.QUANT_TYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_all_zero_blocks_are_zero_not_nan(quant_type, double_quant):
    x = torch.randn(64 * 5 + 10)
    x[64:128] = 0  # a full all-zero block
    x[-10:] = 0  # a partial all-zero block
    state = quant.quantize_4bit(x, quant_type=quant_type, double_quant=double_quant)
    out = quant.dequantize_4bit(state)
    assert bool(torch.isfinite(out).all())
    assert bool((out[64:128] == 0).all()) and bool((out[-10:] == 0).all())
    zero_nibble = 7 if quant_type == "nf4" else 0
    assert set(quant.unpack_4bit(state.packed, x.numel())[64:128].tolist()) == {zero_nibble}
    if not double_quant:
        assert state.absmax[1] == 0 and state.absmax[-1] == 0  # the true absmax is stored


def test_all_zero_tensor():
    for double_quant in (False, True):
        state = quant.quantize_4bit(torch.zeros(300), double_quant=double_quant)
        assert torch.equal(quant.dequantize_4bit(state), torch.zeros(300))


def test_cuda_convention_zero_block_dequantizes_to_zero():
    # bitsandbytes' CUDA kernels store nibble 0 (value -1) with absmax 0 for an all-zero block.
    state = quant.quantize_4bit(torch.randn(128), double_quant=False)
    state.packed[:32] = 0x00
    state.absmax[0] = 0.0
    out = quant.dequantize_4bit(state)
    assert bool((out[:64] == 0).all())


def test_double_quant_reconstructs_absmax_closely_and_uses_the_mean():
    torch.manual_seed(0)
    w = torch.randn(256, 512) * 0.02
    plain = quant.quantize_4bit(w, double_quant=False)
    dq = quant.quantize_4bit(w)
    assert torch.equal(dq.packed, plain.packed)  # the 4-bit codes do not change
    assert float(dq.offset) == pytest.approx(float(plain.absmax.mean()), rel=1e-6)
    rel = ((quant.dequantize_absmax(dq) - plain.absmax) / plain.absmax).abs().max()
    assert 0 < float(rel) < 0.01
    assert dq.nested_absmax.shape == (-(-plain.absmax.numel() // 256),)


def test_dq_rounding_nearest_is_never_worse_than_the_cpu_lut():
    torch.manual_seed(0)
    w = torch.randn(1024, 1024) * 0.02
    near = quant.quantize_4bit(w, dq_rounding="nearest")
    lut = quant.quantize_4bit(w, dq_rounding="cpu_lut")
    assert torch.equal(near.packed, lut.packed) and torch.equal(near.offset, lut.offset)
    assert torch.equal(near.nested_absmax, lut.nested_absmax)
    differ = near.absmax != lut.absmax
    assert 0 < int(differ.sum()) < 0.01 * differ.numel()
    step = (near.absmax.int() - lut.absmax.int()).abs()
    assert int(step.max()) == 1
    true_absmax = quant.quantize_4bit(w, double_quant=False).absmax
    err_near = (quant.dequantize_absmax(near) - true_absmax).abs()
    err_lut = (quant.dequantize_absmax(lut) - true_absmax).abs()
    assert bool((err_near <= err_lut).all())


def test_blockwise_8bit_round_trip():
    x = torch.randn(1000)
    codes, absmax = quant.quantize_blockwise_8bit(x, blocksize=256)
    assert codes.dtype == torch.uint8 and absmax.shape == (4,)
    out = quant.dequantize_blockwise_8bit(codes, absmax, 256)
    assert float(((out - x).abs() / x.abs().max()).max()) < 0.01


def test_quant_state_to_device_copies_every_tensor():
    state = quant.quantize_4bit(torch.randn(100))
    moved = state.to("cpu")
    assert moved is not state
    for name in ("packed", "absmax", "code", "offset", "nested_absmax", "nested_code"):
        assert torch.equal(getattr(moved, name), getattr(state, name))


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"w": torch.tensor([1, 2, 3])}, TypeError, "dtype"),
        ({"w": torch.tensor([True, False])}, TypeError, "boolean"),
        ({"w": [1.0, 2.0]}, TypeError, "torch.Tensor"),
        ({"w": torch.tensor([1.0, float("nan")])}, ValueError, "NaN or Inf"),
        ({"w": torch.tensor([1.0, float("inf")], dtype=torch.bfloat16)}, ValueError, "NaN"),
        ({"w": torch.zeros(0)}, ValueError, "empty"),
        ({"blocksize": 48}, ValueError, "blocksize must be one of"),
        ({"blocksize": True}, ValueError, "blocksize"),
        ({"quant_type": "int4"}, ValueError, "quant_type must be one of"),
        ({"dq_blocksize": 100}, ValueError, "dq_blocksize"),
        ({"dq_rounding": "fast"}, ValueError, "dq_rounding"),
        ({"double_quant": "yes"}, TypeError, "double_quant"),
    ],
)
def test_quantize_4bit_rejects_bad_input(kwargs, error, match):
    args = {"w": torch.randn(128)} | kwargs
    with pytest.raises(error, match=match):
        quant.quantize_4bit(**args)


def test_nan_in_a_partial_block_is_caught():
    x = torch.randn(70)
    x[69] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        quant.quantize_4bit(x)


def test_dequantize_rejects_inconsistent_state():
    state = quant.quantize_4bit(torch.randn(10, 10))
    with pytest.raises(ValueError, match="packed"):
        quant.dequantize_4bit(quant.QuantState(**{**vars(state), "packed": state.packed[:-1]}))
    with pytest.raises(ValueError, match="absmax"):
        quant.dequantize_4bit(quant.QuantState(**{**vars(state), "absmax": state.absmax[:1]}))
    with pytest.raises(TypeError, match="QuantState"):
        quant.dequantize_4bit(state.packed)


def test_absmax_rejects_bad_bits_and_blocksize():
    with pytest.raises(ValueError, match="bits"):
        quant.absmax_quantize(torch.randn(4), bits=9)
    with pytest.raises(ValueError, match="blocksize"):
        quant.blockwise_absmax_quantize(torch.randn(4), blocksize=0)
    with pytest.raises(TypeError, match="integer"):
        quant.absmax_dequantize(torch.randn(4), torch.tensor(1.0))


# --------------------------------------------------------------------------- bit accounting


def test_bits_per_parameter_formula():
    assert quant.bits_per_parameter(double_quant=False) == 4.5
    assert quant.bits_per_parameter() == 4 + 8 / 64 + 32 / (64 * 256)
    assert round(quant.bits_per_parameter(), 3) == 4.127


@pytest.mark.parametrize(("double_quant", "expected"), [(True, 4.127), (False, 4.5)])
def test_storage_bits_measured_on_a_4096_square_weight(double_quant, expected):
    w = torch.randn(4096, 4096, dtype=torch.bfloat16)
    state = quant.quantize_4bit(w, double_quant=double_quant)
    assert quant.storage_bits_per_parameter(state) == pytest.approx(expected, abs=1e-3)
    parts = quant.storage_bits(state)
    assert parts["packed"] == 4 * 4096 * 4096
    assert parts["absmax"] == (8 if double_quant else 32) * 4096 * 4096 // 64


# --------------------------------------------------------------------------- state dicts


@pytest.mark.parametrize("double_quant", [False, True])
def test_bnb_state_dict_round_trip_without_bitsandbytes(double_quant):
    state = quant.quantize_4bit(torch.randn(12, 33, dtype=torch.float16), "fp4",
                                double_quant=double_quant)  # fmt: skip
    sd = quant.to_bnb_state_dict(state, prefix="layer.")
    assert sd["layer.weight"].shape == (state.packed.numel(), 1)
    back = quant.from_bnb_state_dict(sd, prefix="layer.")
    assert back.shape == state.shape and back.dtype == torch.float16
    assert torch.equal(quant.dequantize_4bit(back), quant.dequantize_4bit(state))
    with pytest.raises(ValueError, match="Linear4bit"):
        quant.from_bnb_state_dict(sd, prefix="other.")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", quant.QUANT_TYPES)
def test_cuda_matches_cpu_bit_for_bit(dtype, quant_type):
    torch.manual_seed(0)
    w = (torch.randn(300, 257) * 0.02).to(dtype)
    w[0, :128] = 0
    cpu = quant.quantize_4bit(w, quant_type=quant_type)
    gpu = quant.quantize_4bit(w.cuda(), quant_type=quant_type)
    for name in ("packed", "absmax", "offset", "nested_absmax"):
        assert torch.equal(getattr(gpu, name).cpu(), getattr(cpu, name)), name
    assert torch.equal(quant.dequantize_4bit(gpu).cpu(), quant.dequantize_4bit(cpu))
    assert torch.equal(quant.dequantize_4bit(cpu.to("cuda")).cpu(), quant.dequantize_4bit(cpu))


@pytest.mark.parametrize("method", quant.FAKE_QUANT_METHODS)
def test_fake_quantize_matches_the_round_trips(method):
    x = torch.randn(3, 100)
    out = quant.fake_quantize(x, method)
    assert out.shape == x.shape and out.dtype == torch.float32
    if method in quant.QUANT_TYPES:
        state = quant.quantize_4bit(x, method, double_quant=False)
        assert torch.equal(out, quant.dequantize_4bit(state))
    else:
        q, c = quant.blockwise_absmax_quantize(x, bits=int(method[3:]), blocksize=64)
        assert torch.equal(out, quant.blockwise_absmax_dequantize(q, c, 64))
    with pytest.raises(ValueError, match="method"):
        quant.fake_quantize(x, "nf3")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_kernels_cpu_path_equals_the_lessons_formula(quant_type, double_quant):
    # kernels' byte-table path (what the QLoRA layer runs) against dequantize_4bit's formula.
    w = torch.randn(3 * 64 * 7 + 5, generator=torch.Generator().manual_seed(1))
    state = quant.quantize_4bit(w, quant_type, 64, double_quant=double_quant)
    fast = kernels.dequantize_4bit_torch(
        state.packed, state.absmax, state.code, state.nested_absmax, state.nested_code,
        state.offset, state.numel, state.blocksize, state.dq_blocksize or 256, torch.float32,
    )
    assert torch.equal(fast, quant.dequantize_4bit(state))


def test_absmax_scales_stay_finite_for_tiny_and_zero_blocks():
    x = torch.tensor([1e-40, -3e-41, 0.0, 0.0, 0.0, 0.0, 1e-3, -2e-3])
    q, c = quant.blockwise_absmax_quantize(x, bits=8, blocksize=2)
    assert bool(torch.isfinite(c).all()) and c[1] == 1.0
    out = quant.blockwise_absmax_dequantize(q, c, 2)
    assert bool(torch.isfinite(out).all()) and torch.equal(out[2:6], torch.zeros(4))
    state = quant.quantize_int8(x.reshape(4, 2))
    assert torch.equal(state.q[1:3], torch.zeros(2, 2, dtype=torch.int8))
    assert bool(torch.isfinite(quant.dequantize_int8(state)).all())


def test_a_bound_dequantization_launch_serves_only_its_own_tensors_and_dies_with_them():
    """``kernels._BOUND`` keeps a compiled launch per stored weight, recognised by identity:
    any other tensor object (or size) is not served, and the entry goes with the weight."""
    import gc

    packed, absmax = torch.zeros(32, dtype=torch.uint8), torch.ones(1)
    scales = (absmax, quant.nf4_code(), absmax, absmax, absmax)
    kernels._bind(packed, scales, 64, torch.bfloat16, launcher=print)
    key = (id(packed), torch.bfloat16)
    bound = kernels._BOUND[key]
    assert bound.serves(packed, scales, 64)
    assert not bound.serves(packed, scales, 62)
    assert not bound.serves(packed.clone(), scales, 64)
    assert not bound.serves(packed, (absmax.clone(), *scales[1:]), 64)
    kernels._bind(packed, (absmax.clone(), *scales[1:]), 64, torch.bfloat16, launcher=print)
    assert not kernels._BOUND[key].serves(packed, scales, 64)  # rebound to the new object
    del packed, bound
    gc.collect()
    assert key not in kernels._BOUND
