"""Weight and activation outlier measurements (pedaPEFT.outliers, lesson 6 §6)."""

import pytest
import torch

from pedaPEFT import gpt, outliers
from pedaPEFT.quant_linear import QuantLinear


def test_kurtosis_is_three_for_normal_data_and_grows_with_an_outlier():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, generator=g)
    assert outliers.kurtosis(x) == pytest.approx(3.0, abs=0.05)
    uniform = torch.rand(200_000, generator=g)
    assert outliers.kurtosis(uniform) == pytest.approx(1.8, abs=0.05)  # 9/5 for a uniform
    x[0] = 200.0
    assert outliers.kurtosis(x) > 10


def test_feature_absmax_and_outlier_features_find_planted_columns():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 32, 64, generator=g)  # (batch, tokens, features)
    assert outliers.outlier_features(x) == []
    x[..., 5] *= 10.0
    x[..., 40] *= 20.0
    peaks = outliers.feature_absmax(x)
    assert peaks.shape == (64,)
    assert float(peaks[7]) == pytest.approx(float(x[..., 7].abs().max()))
    assert outliers.outlier_features(x) == [40, 5]  # largest first


def test_linear_inputs_and_block_outputs_record_the_forward_pass():
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig.preset("tiny")).eval()
    idx = torch.randint(0, model.config.vocab_size, (2, model.config.block_size))
    inputs = outliers.linear_inputs(model, idx)
    assert len(inputs) == 6 * model.config.n_layer and "lm_head" not in inputs
    stream = outliers.block_outputs(model, idx)
    assert len(stream) == model.config.n_layer
    first = model.blocks[0]
    with torch.no_grad():
        embedded = model.wte(idx) + model.wpe(torch.arange(idx.shape[1]))
        expected_q_input = first.ln_1(embedded).reshape(-1, model.config.n_embd)
        expected_stream = first(embedded).reshape(-1, model.config.n_embd)
    assert torch.allclose(inputs["blocks.0.attn.q"], expected_q_input, atol=1e-6)
    assert torch.allclose(stream[0], expected_stream, atol=1e-6)
    assert inputs["blocks.0.mlp.proj"].shape == (idx.numel(), 4 * model.config.n_embd)
    assert not any(module._forward_hooks for module in model.modules())  # hooks removed


def test_weight_only_quantization_leaves_outlier_activations_unquantized():
    # Lesson 6's claim about QLoRA: the 4-bit layer multiplies the compute-dtype input, as is,
    # with the dequantized weight; an input feature 1000x the others passes through unchanged.
    g = torch.Generator().manual_seed(2)
    linear = torch.nn.Linear(128, 32)
    layer = QuantLinear.from_linear(linear, quant_type="nf4", compute_dtype=torch.bfloat16)
    x = torch.randn(5, 128, generator=g)
    x[:, 3] *= 1000.0
    x_bf16 = x.to(torch.bfloat16)
    expected = torch.nn.functional.linear(
        x_bf16, layer.dequantize(torch.bfloat16), linear.bias.detach().to(torch.bfloat16))
    with torch.no_grad():
        assert torch.equal(layer(x_bf16), expected)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: outliers.kurtosis(torch.ones(5)), ValueError, "constant"),
        (lambda: outliers.kurtosis([1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
        (lambda: outliers.feature_absmax(torch.ones(5)), ValueError, "dimension"),
        (lambda: outliers.outlier_features(torch.ones(3, 3), factor=1), ValueError, "factor"),
        (lambda: outliers.block_outputs(torch.nn.Linear(2, 2), torch.ones(1, 2)), ValueError,
         "blocks"),
        (lambda: outliers.pydocs_sample(0), ValueError, "batch_size"),
    ],
)
def test_bad_input_names_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()
