"""Bit-exactness of pedaPEFT.quant against bitsandbytes 0.50.2 (CPU backend; the reference extra).

Compared bit for bit: the code tables, the packed bytes, the absmax (and with double
quantization the 8-bit absmax codes, the offset and the second-level scales), the dequantized
outputs, and the Linear4bit state dict in both directions. The two documented differences
(second-level rounding, the stored absmax of a trailing all-zero block) are tested explicitly.

bitsandbytes' CPU *dequantization* is compared only where it is right. On a processor with
AVX-512 it reads row-wise scales for 2-D weights whose width is a multiple of 16 but not of
the block size (``pedaPEFT.bnb_cpu``, lesson 12, section 8); there the packed bytes and scales
are still compared bit for bit, and the tests check that bitsandbytes' output is the row-wise
reading of those same bytes, while pedaPEFT keeps the flat blocks of the definition (and of
bitsandbytes' CUDA kernels: tests/test_quant_bnb_gpu.py).
"""

import pytest
import torch

from pedaPEFT import bnb_cpu, quant

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

pytestmark = pytest.mark.reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SHAPES = [(64,), (99,), (37, 113), (256, 512), (3, 5, 7), (4133,), (70001,), (64, 48), (40, 96)]


def weight(shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * 0.02).to(dtype)


def cpu_reads_flat_blocks(shape, blocksize=64):
    """Whether bitsandbytes' CPU dequantization scales every element by its own block's absmax
    on this machine, measured (a 1-D weight is one row: always flat)."""
    if len(shape) != 2:
        return True
    return torch.equal(bnb_cpu.measured_scale_index(shape, blocksize),
                       bnb_cpu.flat_scale_index(shape, blocksize))


def check_dequant(ours, packed, state, shape, blocksize=64):
    """Ours equals bitsandbytes' CPU dequantization where that reads flat blocks; elsewhere
    bitsandbytes' output is the row-wise reading of the same bytes, and ours is not."""
    theirs = F.dequantize_4bit(packed, state).reshape(shape)  # a 1-D weight comes back (1, n)
    if cpu_reads_flat_blocks(tuple(shape), blocksize):
        assert torch.equal(quant.dequantize_4bit(ours), theirs)
        return
    rows = bnb_cpu.row_scale_index(tuple(shape), blocksize)
    assert torch.equal(bnb_cpu.measured_scale_index(tuple(shape), blocksize), rows)
    scales = state.absmax.float()
    if state.nested:
        scales = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    values = ours.code[quant.unpack_4bit(ours.packed, rows.numel()).long()].reshape(shape)
    expected = (values * scales[rows]).to(theirs.dtype)
    assert torch.equal(theirs, expected)
    assert not torch.equal(quant.dequantize_4bit(ours), theirs)


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
    check_dequant(ours, packed, state, shape)


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
    check_dequant(ours, packed, state, shape)


@pytest.mark.parametrize("blocksize", [32, 128, 1024])
def test_other_blocksizes_are_bit_exact(blocksize):
    w = weight((96, 200), torch.bfloat16, seed=2)
    packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4",
                                    compress_statistics=True)  # fmt: skip
    ours = quant.quantize_4bit(w, blocksize=blocksize, dq_rounding="cpu_lut")
    assert torch.equal(ours.packed, packed.reshape(-1)) and torch.equal(ours.absmax, state.absmax)
    check_dequant(ours, packed, state, w.shape, blocksize)


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
    check_dequant(ours, packed, state, w.shape)


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


# ------------------------------------------------------------------ the CPU map (lesson 12)

AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
MAP_WIDTHS = (16, 40, 48, 64, 96, 100, 176, 256)


@pytest.mark.parametrize("blocksize", [32, 64, 128])
def test_cpu_scale_map_is_the_flat_blocks_or_the_row_reading(blocksize):
    wrong_somewhere = False
    for n in MAP_WIDTHS:
        shape = (5, n)
        measured = bnb_cpu.measured_scale_index(shape, blocksize)
        flat = bnb_cpu.flat_scale_index(shape, blocksize)
        row_wise = bnb_cpu.row_scale_index(shape, blocksize)
        if n % 16 or n % blocksize == 0 or not AVX512:
            assert torch.equal(measured, flat), (shape, blocksize)
        else:
            assert torch.equal(measured, row_wise), (shape, blocksize)
        wrong_somewhere = wrong_somewhere or not torch.equal(measured, flat)
        assert torch.equal(bnb_cpu.measured_scale_index((1, n), blocksize),
                           bnb_cpu.flat_scale_index((1, n), blocksize))  # one row: flat
    assert wrong_somewhere == AVX512


@pytest.mark.skipif(not AVX512, reason="bitsandbytes takes its row-wise loop only with AVX-512")
def test_narrow_rows_dequantize_with_several_times_the_error_on_avx512():
    wrong = bnb_cpu.compare_nf4((32, 48), 64)
    assert wrong["same_bytes"] and not wrong["same_weights"] and wrong["wrong_scales"] > 0
    assert wrong["ratio"] > 2
    right = bnb_cpu.compare_nf4((32, 128), 64)
    assert right["same_bytes"] and right["same_weights"] and right["ratio"] == 1.0


def test_scale_index_rejects_a_shape_that_is_not_two_positive_integers():
    for bad in [(3,), (0, 4), (2, 3.0), "4x4", (True, 4)]:
        with pytest.raises(ValueError, match="shape"):
            bnb_cpu.row_scale_index(bad, 64)


@pytest.mark.skipif(not F.has_avx512bf16(),
                    reason="Linear4bit repacks for inference only on CPUs with AVX-512 BF16")
def test_linear4bit_used_once_for_inference_passes_no_gradient_to_its_input():
    torch.manual_seed(9)
    layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.bfloat16).to("cpu")
    x = torch.randn(4, 64, dtype=torch.bfloat16)

    def input_grad():
        x_train = x.clone().requires_grad_(True)
        layer.train()
        layer(x_train).sum().backward()
        return x_train.grad

    assert input_grad() is not None
    layer.eval()
    with torch.no_grad():
        layer(x)
    with pytest.warns(UserWarning, match="autograd kernel was not registered"):
        assert input_grad() is None
    layer.state_dict()  # saving unpacks the weight again
    assert input_grad() is not None
