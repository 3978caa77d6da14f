"""LoRALinear, apply_lora, merging and adapter files: behaviour, bad input and properties."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pedaPEFT import lora, serialization


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(12, 20))
    model.add_module("act", nn.GELU())
    model.add_module("out", nn.Linear(20, 6))
    return model


def randomize_b(model: nn.Module, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator))


# ---------------------------------------------------------------- LoRALinear


def test_shapes_init_and_scaling():
    torch.manual_seed(0)
    base = nn.Linear(256, 48)
    layer = lora.LoRALinear(base, r=8, alpha=16)
    assert layer.lora_A.shape == (8, 256)
    assert layer.lora_B.shape == (48, 8)
    assert layer.scaling == 2.0
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(256)
    assert layer.lora_A.abs().max() <= bound
    # a uniform on ±bound has std bound/√3; 2048 draws pin it to a few percent
    assert abs(layer.lora_A.std().item() - bound / math.sqrt(3)) < 0.1 * bound
    assert lora.LoRALinear(nn.Linear(4, 4), r=16, alpha=16, rslora=True).scaling == 4.0
    assert not base.weight.requires_grad and not base.bias.requires_grad


def test_forward_is_base_plus_scaled_low_rank_branch():
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(10, 7), r=3, alpha=6)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 10)
    expected = layer.base_layer(x) + 2.0 * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(
        layer.delta_weight(), 2.0 * layer.lora_B @ layer.lora_A, atol=0, rtol=0
    )


def test_dropout_only_on_the_lora_branch():
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(10, 7), r=3, alpha=3, dropout=0.5)
    x = torch.randn(64, 10)
    layer.train()
    # B = 0: the branch is zero, so dropout must leave the output untouched
    torch.testing.assert_close(layer(x), layer.base_layer(x), atol=0, rtol=0)
    with torch.no_grad():
        layer.lora_B.normal_()
    torch.manual_seed(5)
    train_out = layer(x)
    torch.manual_seed(5)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    expected = layer.base_layer(x) + (dropped @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(train_out, expected, atol=1e-5, rtol=1e-5)
    layer.eval()
    expected_eval = layer.base_layer(x) + x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected_eval, atol=1e-5, rtol=1e-5)


def test_merge_gives_same_outputs_and_unmerge_restores():
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(16, 9), r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 16)
    before = layer(x)
    w0 = layer.base_layer.weight.clone()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.base_layer.weight, w0 + layer.delta_weight())
    with pytest.raises(ValueError, match="already merged"):
        layer.merge()
    layer.unmerge()
    with pytest.raises(ValueError, match="not merged"):
        layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"r": 0}, ValueError, "r must"),
        ({"r": -2}, ValueError, "r must"),
        ({"r": 2.0}, TypeError, "r must"),
        ({"alpha": 0}, ValueError, "alpha must"),
        ({"alpha": -1.0}, ValueError, "alpha must"),
        ({"alpha": float("nan")}, ValueError, "alpha must"),
        ({"dropout": 1.0}, ValueError, "dropout must"),
        ({"dropout": -0.1}, ValueError, "dropout must"),
    ],
)
def test_bad_layer_arguments(kwargs, error, name):
    arguments = {"r": 2, "alpha": 2} | kwargs
    with pytest.raises(error, match=name):
        lora.LoRALinear(nn.Linear(4, 4), **arguments)
    config = {"r": arguments["r"], "alpha": arguments["alpha"]}
    if "dropout" in kwargs:
        config["dropout"] = kwargs["dropout"]
    with pytest.raises(error, match=name):
        lora.LoRAConfig(**config)


def test_bad_base_and_double_wrap():
    with pytest.raises(TypeError, match="base must be a torch.nn.Linear"):
        lora.LoRALinear(nn.Conv1d(3, 3, 1), r=1, alpha=1)
    layer = lora.LoRALinear(nn.Linear(4, 4), r=1, alpha=1)
    with pytest.raises(ValueError, match="twice"):
        lora.LoRALinear(layer, r=1, alpha=1)


def test_config_target_modules_validation():
    with pytest.raises(ValueError, match="target_modules: module names never contain ','"):
        lora.LoRAConfig(target_modules="q,v")
    with pytest.raises(ValueError, match="target_modules"):
        lora.LoRAConfig(target_modules=())
    assert lora.LoRAConfig(target_modules=["q", "v"]).target_modules == ("q", "v")


# ---------------------------------------------------------------- apply_lora and friends


def test_apply_lora_matches_exact_names_and_dotted_suffixes():
    model = nn.Module()
    model.block = nn.Module()
    model.block.q = nn.Linear(4, 4)
    model.block.kq = nn.Linear(4, 4)
    model.q = nn.Linear(4, 4)
    wrapped = lora.apply_lora(model, lora.LoRAConfig(r=1, target_modules=("q",)))
    assert wrapped == ["block.q", "q"]
    assert isinstance(model.block.kq, nn.Linear)
    wrapped = lora.apply_lora(model, lora.LoRAConfig(r=1, target_modules=("block.kq",)))
    assert wrapped == ["block.kq"]


def test_apply_lora_freezes_all_but_lora_and_counts():
    model = mlp()
    wrapped = lora.apply_lora(model, lora.LoRAConfig(r=3, target_modules=("fc", "out")))
    assert wrapped == ["fc", "out"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.lora_A", "fc.lora_B", "out.lora_A", "out.lora_B"}
    total = 12 * 20 + 20 + 20 * 6 + 6 + 3 * (12 + 20) + 3 * (20 + 6)
    assert lora.count_parameters(model) == (3 * (12 + 20) + 3 * (20 + 6), total)


def test_no_match_lists_the_linear_names():
    model = mlp()
    with pytest.raises(ValueError) as info:
        lora.apply_lora(model, lora.LoRAConfig(target_modules=("q_proj",)))
    message = str(info.value)
    assert "q_proj" in message and "fc" in message and "out" in message


def test_apply_twice_and_non_linear_target():
    model = mlp()
    lora.apply_lora(model, lora.LoRAConfig(r=2, target_modules=("fc",)))
    with pytest.raises(ValueError, match="twice"):
        lora.apply_lora(model, lora.LoRAConfig(r=2, target_modules=("fc",)))
    with pytest.raises(TypeError, match="act"):
        lora.apply_lora(mlp(), lora.LoRAConfig(r=2, target_modules=("act",)))
    with pytest.raises(TypeError, match="config"):
        lora.apply_lora(mlp(), {"r": 2})


def test_print_trainable_parameters_line(capsys):
    model = mlp()
    lora.apply_lora(model, lora.LoRAConfig(r=3, target_modules=("fc",)))
    lora.print_trainable_parameters(model)
    trainable, total = 96, 12 * 20 + 20 + 20 * 6 + 6 + 96
    assert capsys.readouterr().out == (
        f"trainable params: {trainable} || all params: {total} || "
        f"trainable%: {100 * trainable / total:.4f}\n"
    )


def test_thousands_separators():
    model = nn.Linear(1000, 1000)
    wrapper = nn.Module()
    wrapper.q = model
    lora.apply_lora(wrapper, lora.LoRAConfig(r=8, target_modules=("q",)))
    assert lora.trainable_parameters_line(wrapper) == (
        "trainable params: 16,000 || all params: 1,017,000 || trainable%: 1.5733"
    )


def test_merge_lora_returns_plain_linear_with_same_outputs():
    model = mlp()
    reference = mlp()
    lora.apply_lora(model, lora.LoRAConfig(r=4, alpha=8, target_modules=("fc", "out")))
    randomize_b(model)
    x = torch.randn(7, 12)
    before = model(x)
    merged = lora.merge_lora(model)
    assert merged is model
    assert type(model.fc) is nn.Linear and type(model.out) is nn.Linear
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in reference.parameters()
    )
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no LoRALinear"):
        lora.merge_lora(model)


# ---------------------------------------------------------------- save / load


def test_save_load_roundtrip(tmp_path):
    model = mlp()
    lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=4, target_modules=("fc", "out")))
    randomize_b(model)
    serialization.save_lora_adapter(model, tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["lora_alpha"] == 4
    assert config["target_modules"] == ["fc", "out"]
    fresh = mlp()
    assert serialization.load_lora_adapter(fresh, tmp_path / "adapter") == ["fc", "out"]
    x = torch.randn(4, 12)
    torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)
    assert lora.count_parameters(fresh) == lora.count_parameters(model)


def test_save_load_keeps_per_layer_ranks(tmp_path):
    model = mlp()
    lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=4, target_modules=("fc",)))
    lora.apply_lora(model, lora.LoRAConfig(r=5, alpha=3, target_modules=("out",)))
    randomize_b(model)
    serialization.save_lora_adapter(model, tmp_path)
    fresh = mlp()
    serialization.load_lora_adapter(fresh, tmp_path)
    assert (fresh.fc.r, fresh.out.r) == (model.fc.r, model.out.r)
    assert fresh.out.scaling == model.out.scaling
    x = torch.randn(4, 12)
    torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)


def test_load_rejects_missing_extra_and_misshapen(tmp_path):
    model = mlp()
    lora.apply_lora(model, lora.LoRAConfig(r=2, target_modules=("fc", "out")))
    serialization.save_lora_adapter(model, tmp_path)
    only_fc = mlp()
    lora.apply_lora(only_fc, lora.LoRAConfig(r=2, target_modules=("fc",)))
    with pytest.raises(ValueError, match="unexpected keys: .*out.lora_A"):
        serialization.load_lora_adapter(only_fc, tmp_path)
    more = nn.Sequential()
    more.add_module("fc", nn.Linear(12, 20))
    more.add_module("act", nn.GELU())
    more.add_module("out", nn.Linear(20, 6))
    more.add_module("extra", nn.Linear(6, 6))
    lora.apply_lora(more, lora.LoRAConfig(r=2, target_modules=("fc", "out", "extra")))
    with pytest.raises(ValueError, match="missing keys: .*extra.lora_A"):
        serialization.load_lora_adapter(more, tmp_path)
    wider = mlp()
    lora.apply_lora(wider, lora.LoRAConfig(r=4, target_modules=("fc", "out")))
    with pytest.raises(ValueError, match="saved with r=2, the model's layer has r=4"):
        serialization.load_lora_adapter(wider, tmp_path)
    with pytest.raises(ValueError, match="no adapter_model.safetensors"):
        serialization.load_lora_adapter(mlp(), tmp_path / "nowhere")


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    model = mlp()
    lora.apply_lora(model, lora.LoRAConfig(r=2, target_modules=("fc",)))
    serialization.save_lora_adapter(model, tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(serialization, "save_file", failing_save)
    with torch.no_grad():
        model.fc.lora_B.fill_(1.0)
    with pytest.raises(OSError, match="disk full"):
        serialization.save_lora_adapter(model, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


# ---------------------------------------------------------------- properties

dims = st.integers(min_value=1, max_value=24)


@settings(max_examples=30, deadline=None)
@given(
    in_f=dims, out_f=dims, r=st.integers(1, 8), alpha=st.floats(0.5, 64), seed=st.integers(0, 99)
)
def test_property_output_unchanged_at_init(in_f, out_f, r, alpha, seed):
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f)
    x = torch.randn(3, in_f)
    expected = base(x)
    layer = lora.LoRALinear(base, r=r, alpha=alpha)
    torch.testing.assert_close(layer(x), expected, atol=0, rtol=0)


@settings(max_examples=30, deadline=None)
@given(
    in_f=dims, out_f=dims, r=st.integers(1, 8), alpha=st.floats(0.5, 64), seed=st.integers(0, 99)
)
def test_property_merge_unmerge_restores_weight(in_f, out_f, r, alpha, seed):
    torch.manual_seed(seed)
    layer = lora.LoRALinear(nn.Linear(in_f, out_f), r=r, alpha=alpha)
    with torch.no_grad():
        layer.lora_B.uniform_(-0.5, 0.5)
    w0 = layer.base_layer.weight.clone()
    largest = max(1.0, (w0 + layer.delta_weight()).abs().max().item())
    layer.merge()
    layer.unmerge()
    # float32 rounding is relative: (W + dW) - dW is W within 1e-6 of the merged magnitude
    assert (layer.base_layer.weight - w0).abs().max().item() <= 1e-6 * largest


@settings(max_examples=20, deadline=None)
@given(
    r=st.integers(1, 6),
    seed=st.integers(0, 99),
    targets=st.sampled_from([("fc",), ("out",), ("fc", "out")]),
)
def test_property_only_lora_gets_gradients_and_count(r, seed, targets):
    model = mlp(seed)
    wrapped = lora.apply_lora(model, lora.LoRAConfig(r=r, target_modules=targets))
    randomize_b(model, seed)
    model(torch.randn(4, 12)).square().sum().backward()
    for name, param in model.named_parameters():
        has_grad = param.grad is not None and bool(param.grad.abs().sum() > 0)
        assert has_grad == ("lora_" in name), name
    sizes = {"fc": (12, 20), "out": (20, 6)}
    expected = sum(r * sum(sizes[name]) for name in wrapped)
    assert lora.count_parameters(model)[0] == expected


@settings(max_examples=20, deadline=None)
@given(
    in_f=st.integers(2, 20), out_f=st.integers(2, 20), r=st.integers(1, 8), seed=st.integers(0, 99)
)
def test_property_delta_rank_at_most_r(in_f, out_f, r, seed):
    torch.manual_seed(seed)
    layer = lora.LoRALinear(nn.Linear(in_f, out_f, dtype=torch.float64), r=r, alpha=r)
    with torch.no_grad():
        layer.lora_B.normal_()
    rank = torch.linalg.matrix_rank(layer.delta_weight()).item()
    assert rank <= min(r, in_f, out_f)


def test_prepare_lora_is_apply_lora_with_keywords():
    model = mlp()
    assert lora.prepare_lora(model, r=3, alpha=6, targets=["fc"]) is model
    assert model.fc.r == 3 and model.fc.scaling == 2.0
    assert lora.count_parameters(model)[0] == 3 * (12 + 20)


@pytest.mark.parametrize(
    ("arguments", "expected_trainable"),
    [
        (["--method", "lora", "--r", "2", "--alpha", "4", "--targets", "q,v"], "lora"),
        (["--method", "adapter", "--bottleneck", "4"], "adapter"),
    ],
)
def test_finetune_command_methods(arguments, expected_trainable, capsys):
    from pedaPEFT import adapters, gpt
    from pedaPEFT.__main__ import main

    config = gpt.GPTConfig.preset("tiny")
    d, layers = config.n_embd, config.n_layer
    trainable = {
        "lora": 2 * layers * 2 * (d + d),
        "adapter": 2 * layers * adapters.bottleneck_param_count(d, 4),
    }[expected_trainable]
    command = ["finetune", "--task", "shift", "--steps", "2", "--n-train", "64", "--no-progress"]
    assert main(command + arguments) == 0
    assert f"method {expected_trainable}: trainable {trainable:,} of" in capsys.readouterr().out
