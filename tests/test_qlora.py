"""QLoRA layer: storage, the function it computes, its gradients, model surgery, merge, files."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pedaPEFT import demo, experiments, gpt, kernels, lora, qlora, quant, quant_linear
from pedaPEFT import serialization as files_io

ALL_LINEAR = ("q", "k", "v", "o", "fc", "proj")
TINY = gpt.GPTConfig.preset("tiny")


def _linear(out_features=128, in_features=256, seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


def _with_random_b(layer, seed=1):
    """LoRA starts with B = 0; give B values so that the adapter branch is really exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    return layer


def _tiny_qlora(quant_type="nf4", seed=0, targets=ALL_LINEAR):
    torch.manual_seed(seed)
    model = gpt.GPT(gpt.GPTConfig.preset("tiny"))
    qlora.quantize_model(model, lora.LoRAConfig(r=4, alpha=8, target_modules=targets), quant_type)
    for i, layer in enumerate(qlora.qlora_layers(model).values()):
        _with_random_b(layer, seed=100 + i)
    return model


# --------------------------------------------------------------------------- dequantization


@settings(max_examples=25, deadline=None)
@given(
    n_blocks=st.integers(1, 700),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    double_quant=st.booleans(),
    blocksize=st.sampled_from([32, 64, 128]),
    out_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_dequantize_function_equals_quant_module(n_blocks, quant_type, double_quant, blocksize,
                                                 out_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_blocks * blocksize, generator=g) * 0.05
    state = quant.quantize_4bit(w, quant_type=quant_type, blocksize=blocksize,
                                double_quant=double_quant)
    ours = kernels.dequantize_4bit_eager(
        state.packed, state.absmax, state.code, state.nested_absmax, state.nested_code,
        state.offset, w.numel(), blocksize, state.dq_blocksize or 256, out_dtype,
    )
    assert torch.equal(ours, quant.dequantize_4bit(state).to(out_dtype))


def test_dequantize_reference_handles_odd_length_and_partial_block():
    w = torch.randn(1001) * 0.1
    state = quant.quantize_4bit(w, quant_type="nf4", double_quant=True)
    ours = kernels.dequantize_4bit_torch(
        state.packed, state.absmax, state.code, state.nested_absmax, state.nested_code,
        state.offset, w.numel(), 64, 256, torch.float32,
    )
    assert torch.equal(ours, quant.dequantize_4bit(state))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_layer_dequantizes_to_what_quant_module_gives(quant_type, double_quant):
    linear = _linear()
    layer = qlora.QuantLinear.from_linear(linear, quant_type=quant_type, double_quant=double_quant)
    w = linear.weight.detach()
    if quant_type == "int8":
        expected = quant.dequantize_int8(quant.quantize_int8(w))
    else:
        expected = quant.dequantize_4bit(
            quant.quantize_4bit(w, quant_type=quant_type, double_quant=double_quant)
        )
        assert torch.equal(quant.dequantize_4bit(layer.quant_state()), expected)
    assert torch.equal(layer.dequantize(), expected)


# --------------------------------------------------------------------------- storage


def _stored(module):
    return list(module.parameters()) + [b for b in module.buffers() if b is not None]


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("nf4", False),
                                                     ("fp4", True), ("int8", False)])
def test_no_dense_weight_is_stored(quant_type, double_quant):
    out_f, in_f, r = 256, 512, 8
    layer = qlora.QLoRALinear.from_linear(_linear(out_f, in_f), r=r, alpha=16,
                                          quant_type=quant_type, double_quant=double_quant)
    n = out_f * in_f
    n_blocks = n // 64
    if quant_type == "int8":
        weight_bytes = n + 4 * out_f
    elif double_quant:
        weight_bytes = n // 2 + n_blocks + 4 * math.ceil(n_blocks / 256) + 4 * 16 + 4 * 256 + 4
    else:
        weight_bytes = n // 2 + 4 * n_blocks + 4 * 16
    lora_bytes = r * (in_f + out_f) * 4  # float32 compute dtype on the CPU
    bias_bytes = 4 * out_f
    stored = sum(t.numel() * t.element_size() for t in _stored(layer))
    assert layer.base_layer.weight_bytes() == weight_bytes
    assert stored == weight_bytes + lora_bytes + bias_bytes
    assert not any(t.is_floating_point() and t.numel() >= n for t in _stored(layer))


def test_bits_per_parameter_approaches_the_formula_on_a_large_layer():
    layer = qlora.QuantLinear.from_linear(_linear(1024, 1024))
    bits = layer.bits_per_parameter()
    tables = 8 * (16 + 256 + 1) * 4 / 1024**2
    assert bits == pytest.approx(quant.bits_per_parameter() + tables, abs=1e-9)
    assert quant.bits_per_parameter() == pytest.approx(4 + 8 / 64 + 32 / (64 * 256))


# --------------------------------------------------------------------------- function and grads


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int8"])
def test_forward_and_grads_match_autograd_through_the_dense_weight(quant_type):
    torch.manual_seed(3)
    layer = _with_random_b(
        qlora.QLoRALinear.from_linear(_linear(), r=4, alpha=8, quant_type=quant_type)
    )
    x = torch.randn(2, 7, 256, requires_grad=True)
    y = layer(x)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)

    w = layer.base_layer.dequantize().clone()
    a = layer.lora_A.detach().clone().requires_grad_(True)
    b = layer.lora_B.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = F.linear(x_ref, w, layer.base_layer.bias) + layer.scaling * (x_ref @ a.T) @ b.T
    y_ref.backward(grad_out)

    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A.grad, a.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.grad, b.grad, rtol=1e-5, atol=1e-5)
    assert not any(t.requires_grad for t in layer.base_layer.buffers() if t is not None)


def test_backward_saves_no_dense_weight():
    out_f, in_f = 128, 256
    layer = _with_random_b(qlora.QLoRALinear.from_linear(_linear(out_f, in_f), r=4, alpha=8))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(3, in_f, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.sum().backward()
    assert saved, "the hook saw nothing: the test would pass vacuously"
    assert not any(t.is_floating_point() and t.numel() >= out_f * in_f for t in saved)


def test_first_forward_equals_the_quantized_base_alone():
    linear = _linear()
    layer = qlora.QLoRALinear.from_linear(linear, r=8, alpha=16)
    x = torch.randn(4, 256)
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)


def test_bf16_compute_dtype_keeps_adapters_in_bf16_and_returns_input_dtype():
    layer = qlora.QLoRALinear.from_linear(_linear(), r=4, alpha=8, compute_dtype=torch.bfloat16)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.bfloat16
    x = torch.randn(5, 256)
    y = layer(x)
    assert y.dtype == torch.float32
    ref = F.linear(x, layer.base_layer.dequantize(), layer.base_layer.bias)
    assert (y - ref).norm() / ref.norm() < 1e-2


# --------------------------------------------------------------------------- model surgery


def test_quantize_model_converts_targets_and_freezes_the_rest():
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig.preset("tiny"))
    names = qlora.quantize_model(model, lora.LoRAConfig(r=4, alpha=8, target_modules=("q", "v")))
    assert names and all(n.endswith((".q", ".v")) for n in names)
    assert set(names) == set(qlora.qlora_layers(model))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    assert len(trainable) == 2 * len(names)


def test_quantized_gpt_trains_only_its_adapters():
    model = _tiny_qlora()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    idx = torch.randint(0, TINY.vocab_size, (4, TINY.block_size))
    logits = model(idx)
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), idx.view(-1))
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    changed = {n for n in after if not torch.equal(after[n], before[n])}
    assert changed and all("lora_" in n for n in changed)


def test_quantize_model_bad_input():
    model = gpt.GPT(gpt.GPTConfig.preset("tiny"))
    with pytest.raises(ValueError, match="matched no module.*Available nn.Linear"):
        qlora.quantize_model(model, lora.LoRAConfig(target_modules=("nope",)))
    with pytest.raises(ValueError, match="quant_type must be one of"):
        qlora.quantize_model(model, lora.LoRAConfig(), quant_type="nf3")
    with pytest.raises(TypeError, match="config must be a lora.LoRAConfig"):
        qlora.quantize_model(model, {"r": 8})
    with pytest.raises(TypeError, match="only torch.nn.Linear"):
        qlora.quantize_model(model, lora.LoRAConfig(target_modules=("ln_1",)))
    qlora.quantize_model(model, lora.LoRAConfig(target_modules=("q",)))
    with pytest.raises(ValueError, match="already has an adapter"):
        qlora.quantize_model(model, lora.LoRAConfig(target_modules=("q",)))


def test_bad_shapes_and_dtypes_are_refused():
    with pytest.raises(ValueError, match="not a multiple of blocksize=64"):
        qlora.QLoRALinear.from_linear(nn.Linear(3, 5), r=2, alpha=2)
    with pytest.raises(ValueError, match="blocksize must be one of"):
        qlora.QuantLinear.from_linear(_linear(), blocksize=48)
    with pytest.raises(ValueError, match="compute_dtype must be one of"):
        qlora.QLoRALinear.from_linear(_linear(), r=2, alpha=2, compute_dtype=torch.int8)
    with pytest.raises(TypeError, match="linear must be a torch.nn.Linear"):
        qlora.QLoRALinear.from_linear(nn.Conv1d(4, 4, 1), r=2, alpha=2)
    with pytest.raises(ValueError, match="r must be a positive integer"):
        qlora.QLoRALinear.from_linear(_linear(), r=0, alpha=2)


def test_compute_dtype_default_is_float32_on_cpu():
    assert quant_linear.resolve_compute_dtype(None, "cpu") == torch.float32
    assert quant_linear.resolve_compute_dtype(torch.bfloat16, "cpu") == torch.bfloat16


# --------------------------------------------------------------------------- merge


def test_merge_gives_a_plain_linear_with_the_same_function():
    model = _tiny_qlora()
    idx = torch.randint(0, TINY.vocab_size, (2, TINY.block_size))
    with torch.no_grad():
        expected = model(idx)
        qlora.merge_qlora(model)
        merged = model(idx)
    assert not qlora.qlora_layers(model)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith(".q"))
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-4)


def test_requantized_merge_stays_small_and_its_error_is_measured():
    layer = _with_random_b(qlora.QLoRALinear.from_linear(_linear(), r=4, alpha=8), seed=5)
    requantized = layer.merge(requantize=True)
    assert isinstance(requantized, qlora.QuantLinear)
    assert requantized.weight_bytes() == layer.base_layer.weight_bytes()
    report = qlora.requantization_error(layer)
    exact = layer.merged_weight()
    error = (requantized.dequantize() - exact).norm() / exact.norm()
    assert report["rel_error"] == pytest.approx(float(error), rel=1e-6)
    assert 0 < report["rel_error"] < 0.2
    assert report["delta_lost"] > 0


# --------------------------------------------------------------------------- files


def test_save_and_load_quantized_model_round_trip(tmp_path):
    model = _tiny_qlora(quant_type="nf4")
    idx = torch.randint(0, TINY.vocab_size, (2, TINY.block_size))
    with torch.no_grad():
        expected = model(idx)
    file = files_io.save_quantized(model, tmp_path / "ckpt")
    assert file.stat().st_size < 0.5 * 4 * gpt.parameter_count(model.config)
    torch.manual_seed(123)  # a different dense init: everything must come from the file
    fresh = gpt.GPT(gpt.GPTConfig.preset("tiny"))
    files_io.load_quantized(fresh, tmp_path / "ckpt")
    with torch.no_grad():
        got = fresh(idx)
    assert torch.equal(got, expected)
    trainable = [n for n, p in fresh.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_adapter_round_trip_and_format_mismatch(tmp_path):
    model = _tiny_qlora(quant_type="nf4")
    files_io.save_qlora_adapter(model, tmp_path / "adapter")
    same = _tiny_qlora(quant_type="nf4", seed=0)
    for layer in qlora.qlora_layers(same).values():
        layer.reset_lora_parameters()
    files_io.load_qlora_adapter(same, tmp_path / "adapter")
    idx = torch.randint(0, TINY.vocab_size, (2, TINY.block_size))
    with torch.no_grad():
        assert torch.equal(same(idx), model(idx))
    other = _tiny_qlora(quant_type="fp4")
    with pytest.raises(ValueError, match="quant_type='nf4'.*quant_type='fp4'"):
        files_io.load_qlora_adapter(other, tmp_path / "adapter")
    with pytest.raises(ValueError, match="does not exist"):
        files_io.load_qlora_adapter(same, tmp_path / "missing")


# --------------------------------------------------------------------------- torch.compile


def test_compiled_qlora_gpt_has_no_graph_break_and_same_gradients():
    model = _tiny_qlora()
    idx = torch.randint(0, TINY.vocab_size, (2, TINY.block_size))

    def loss_fn(m):
        logits = m(idx)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), idx.view(-1))

    explanation = torch._dynamo.explain(model)(idx)
    assert explanation.graph_break_count == 0
    eager = loss_fn(model)
    eager.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = loss_fn(compiled)
    loss.backward()
    torch.testing.assert_close(loss, eager)
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name])


# --------------------------------------------------------------------------- workbench


def test_qlora_is_a_finetuning_method_and_table3_runs():
    from pedaPEFT import train

    assert train.METHODS["qlora"] is qlora.prepare_qlora
    scale = experiments.Scale(steps=2, batch_size=8, n_train=32, seeds=(0,), n_test=16)
    label, method, options = experiments.TABLE3_SETTINGS[2]  # int8 base
    (row,) = experiments.run_many([{"label": label, "method": method, "options": options}],
                                  "shift", scale, experiments.TABLE3_LR)
    assert row["label"] == label
    per_block = 4 * (64 + 64) + (64 + 256) + (256 + 64)  # r = 8 times (in + out) per layer
    assert row["trainable"] == 8 * per_block * 4
    assert row["model_bytes_after"] < row["model_bytes_before"]
    assert 0.0 <= row["accuracy"] <= 1.0
    summary = experiments.summarize([row, {**row, "accuracy": 1.0}])
    assert summary[0]["label"] == label and summary[0]["n"] == 2
    assert summary[0]["mean"] == pytest.approx((row["accuracy"] + 1) / 2)


def test_finetune_counts_the_quantized_base_in_the_total():
    from dataclasses import replace

    from pedaPEFT import train

    model = gpt.GPT(TINY)
    config = replace(train.FINETUNE_CONFIG, steps=1, progress=False, device="cpu")
    result = train.finetune(model, "shift", "qlora", config, n_train=8)
    assert result.trainable == lora.count_parameters(model)[0] > 0
    assert result.total == gpt.parameter_count(TINY) + result.trainable


def test_demo_prints_its_table_and_writes_the_figure(tmp_path, capsys):
    out = demo.demo("shift", out_dir=tmp_path, progress=False, steps=2)
    printed = capsys.readouterr().out
    for needle in ("trainable parameters", "bits per weight", "MiB", "before", "after QLoRA"):
        assert needle in printed
    assert out["figure"].exists() and out["figure"].stat().st_size > 1000


def test_memory_py_predicts_the_quantized_model_bytes():
    from pedaPEFT import memory

    model = gpt.GPT(TINY)
    n_params = gpt.parameter_count(TINY)
    qlora.prepare_qlora(model)
    quantized = sum(m.in_features * m.out_features for m in model.modules()
                    if isinstance(m, qlora.QuantLinear))
    trainable, _ = lora.count_parameters(model)
    predicted = memory.finetune_memory(n_params, "qlora", trainable=trainable, quantized=quantized,
                                       base_bits=qlora.base_bits_per_parameter(model))
    assert predicted.weights == pytest.approx(qlora.model_bytes(model), rel=1e-12)
    naive = memory.finetune_memory(n_params, "qlora", trainable=trainable,
                                   base_bits=qlora.base_bits_per_parameter(model))
    assert naive.weights < predicted.weights  # every parameter quantized: too optimistic
    with pytest.raises(ValueError, match="quantized must be an integer in"):
        memory.finetune_memory(10, "qlora", trainable=1, quantized=11)
