"""pedaPEFT's 4-bit dequantization equals bitsandbytes' CUDA kernels bit for bit, on the shapes
where bitsandbytes' CPU backend does not (lesson 12, section 8): rows narrower than a block,
widths that are not a multiple of the block size, several block sizes.

Both quantize the same CUDA weight; the packed bytes, the scales and the dequantized weights are
compared. Needs CUDA and the reference extra.
"""

import pytest
import torch

from pedaPEFT import quant

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.reference,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SHAPES = [(64, 16), (64, 32), (64, 48), (32, 96), (32, 176), (64, 64), (32, 100), (32, 256)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantization_equals_the_cuda_kernels(shape, blocksize, dtype):
    generator = torch.Generator().manual_seed(0)
    w = (torch.randn(shape, generator=generator) * 0.02).to(dtype).cuda()
    packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4",
                                    compress_statistics=False)
    ours = quant.quantize_4bit(w, quant_type="nf4", blocksize=blocksize, double_quant=False)
    assert torch.equal(ours.absmax, state.absmax)
    differing = int((ours.packed != packed.reshape(-1)).sum())
    assert differing <= max(1, ours.packed.numel() // 1000)  # fast-math reciprocal, near a tie
    theirs = F.dequantize_4bit(packed, state).reshape(shape)
    from_their_bytes = quant.dequantize_4bit(
        quant.QuantState(packed=packed.reshape(-1), absmax=state.absmax, shape=torch.Size(shape),
                         dtype=dtype, blocksize=blocksize, quant_type="nf4",
                         code=quant.nf4_code().cuda()))
    assert torch.equal(from_their_bytes, theirs)
