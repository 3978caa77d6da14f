"""LoRA and QLoRA under bad input: flags, layers LoRA cannot wrap, merged training, targets,
and adapter files that are corrupted, hostile or of another configuration."""

import pytest
import torch
from torch import nn

from pedaPEFT import data, lora, train
from pedaPEFT.gpt import GPT, GPTConfig


def micro_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=48, block_size=16, n_layer=2, n_head=2, n_embd=16))


@pytest.mark.parametrize("value", ["false", "true", 0, 1, None])
def test_rslora_must_be_a_bool(value):
    with pytest.raises(TypeError, match="rslora must be True or False"):
        lora.LoRAConfig(rslora=value)
    with pytest.raises(TypeError, match="rslora must be True or False"):
        lora.LoRALinear(nn.Linear(4, 4), 2, 2, rslora=value)


def test_multihead_attention_out_proj_is_refused_before_anything_changes():
    model = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8))
    before = [name for name, _ in model.named_modules()]
    with pytest.raises(TypeError, match="MultiheadAttention"):
        lora.apply_lora(model, lora.LoRAConfig(target_modules=("out_proj", "1")))
    assert [name for name, _ in model.named_modules()] == before


def test_training_a_merged_model_is_refused():
    model = micro_model()
    lora.apply_lora(model, lora.LoRAConfig(r=2, target_modules=("q",)))
    for layer in lora.lora_layers(model).values():
        layer.merge()
    config = train.TrainConfig(steps=1, batch_size=8, progress=False, device="cpu")
    with pytest.raises(ValueError, match="merged"):
        train.train(model, lambda step: data.pretrain_batch(step, 8, 16), config)


# --------------------------------------------------------------------------- adapter files

import json  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from pedaPEFT import qlora, serialization  # noqa: E402

FIXTURE_OK = [HealthCheck.function_scoped_fixture]


def snapshot(model):
    """Module structure and every tensor: what a refused load must leave unchanged."""
    return ([(n, type(m).__name__) for n, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()})


def assert_unchanged(model, before):
    names, tensors = before
    assert [(n, type(m).__name__) for n, m in model.named_modules()] == names
    now = model.state_dict()
    assert now.keys() == tensors.keys()
    assert all(torch.equal(now[k], tensors[k]) for k in tensors)


@pytest.fixture
def adapter_dir(tmp_path):
    model = micro_model()
    lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=16, target_modules=("q", "v")))
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.normal_()
    serialization.save_lora_adapter(model, tmp_path)
    return model, tmp_path


def edit_config(folder, **changes):
    file = folder / serialization.ADAPTER_CONFIG_NAME
    config = json.loads(file.read_text())
    config.update(changes)
    file.write_text(json.dumps(config))


def edit_tensor(folder, key_part, change):
    file = folder / serialization.ADAPTER_WEIGHTS_NAME
    tensors = load_file(str(file))
    key = next(k for k in sorted(tensors) if key_part in k)
    tensors[key] = change(tensors[key]).contiguous()
    save_file(tensors, str(file))


@pytest.mark.parametrize("corrupt, message", [
    (lambda d: edit_config(d, r=10**12), "lora_A.weight: file"),  # refused, nothing allocated
    (lambda d: edit_config(d, rank_pattern={"blocks.0.attn.q": 10**12}), "lora_A.weight: file"),
    (lambda d: edit_config(d, use_rslora="false"), "rslora must be True or False"),
    (lambda d: edit_config(d, target_modules="q"), "target_modules must be a list"),
    (lambda d: edit_config(d, rank_pattern=[1]), "rank_pattern must be an object"),
    (lambda d: (d / serialization.ADAPTER_CONFIG_NAME).write_text("{nope"), "not readable JSON"),
    (lambda d: (d / serialization.ADAPTER_CONFIG_NAME).write_text("[]"), "JSON object"),
    (lambda d: edit_tensor(d, "blocks.1.attn.v.lora_B", lambda t: t[:, :1]), "wrong shape"),
    (lambda d: edit_tensor(d, "blocks.1.attn.v.lora_B",
                           lambda t: t.index_fill(0, torch.tensor([0]), float("nan"))),
     "NaN"),
    (lambda d: edit_tensor(d, "lora_A", lambda t: t.long()), "must be a float tensor"),
])
def test_a_bad_adapter_file_is_refused_and_leaves_the_model_as_it_was(adapter_dir, corrupt,
                                                                      message):
    _, folder = adapter_dir
    corrupt(folder)
    model = micro_model(seed=3)
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        serialization.load_lora_adapter(model, folder)
    assert_unchanged(model, before)


def test_the_saved_scaling_wins_or_a_mismatch_is_refused(adapter_dir):
    saved, folder = adapter_dir
    fresh = micro_model()
    serialization.load_lora_adapter(fresh, folder)  # no LoRA yet: built from the file
    assert all(layer.alpha == 16 for layer in lora.lora_layers(fresh).values())
    x = torch.randint(0, 48, (2, 16))
    torch.testing.assert_close(fresh(x), saved(x))
    for prepared in (lora.LoRAConfig(r=2, alpha=1, target_modules=("q", "v")),
                     lora.LoRAConfig(r=2, alpha=16, target_modules=("q", "v"), rslora=True)):
        model = micro_model()
        lora.apply_lora(model, prepared)
        before = snapshot(model)
        with pytest.raises(ValueError, match="saved with (alpha=16|rslora=False)"):
            serialization.load_lora_adapter(model, folder)
        assert_unchanged(model, before)


def test_an_interrupted_adapter_save_keeps_the_old_pair(adapter_dir, monkeypatch):
    _, folder = adapter_dir
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    model = micro_model(seed=5)
    lora.apply_lora(model, lora.LoRAConfig(r=4, alpha=4, target_modules=("q",)))

    def dies(*args, **kwargs):
        raise KeyboardInterrupt  # stopped while writing the config, after the weights

    monkeypatch.setattr(serialization.Path, "write_text", dies)
    with pytest.raises(KeyboardInterrupt):
        serialization.save_lora_adapter(model, folder)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    serialization.load_lora_adapter(micro_model(), folder)


@settings(max_examples=30, deadline=None, suppress_health_check=FIXTURE_OK)
@given(data=st.data())
def test_random_corruptions_of_adapter_files_are_refused_or_harmless(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("adapter")
    model = micro_model()
    lora.apply_lora(model, lora.LoRAConfig(r=2, target_modules=("q",)))
    serialization.save_lora_adapter(model, folder)
    name = data.draw(st.sampled_from([serialization.ADAPTER_WEIGHTS_NAME,
                                      serialization.ADAPTER_CONFIG_NAME]))
    raw = bytearray((folder / name).read_bytes())
    at = data.draw(st.integers(0, len(raw) - 1))
    if data.draw(st.booleans()):
        raw = raw[:at]
    else:
        raw[at] = data.draw(st.integers(0, 255))
    (folder / name).write_bytes(bytes(raw))
    target = micro_model(seed=1)
    before = snapshot(target)
    try:
        serialization.load_lora_adapter(target, folder)
    except (ValueError, TypeError) as error:
        assert_unchanged(target, before)
        assert str(folder) in str(error) or "target_modules" in str(error)
        return
    assert all(torch.isfinite(p).all() for p in target.parameters())


def test_a_string_target_is_one_name():
    model = micro_model()
    wrapped = lora.apply_lora(model, lora.LoRAConfig(r=2, target_modules="proj"))
    assert wrapped == ["blocks.0.mlp.proj", "blocks.1.mlp.proj"]
    model = micro_model()
    lora.prepare_lora(model, targets="fc")
    assert sorted(lora.lora_layers(model)) == ["blocks.0.mlp.fc", "blocks.1.mlp.fc"]
    converted = qlora.quantize_model(micro_model(), lora.LoRAConfig(r=2, target_modules="fc"))
    assert converted == ["blocks.0.mlp.fc", "blocks.1.mlp.fc"]


# --------------------------------------------------------------------------- QLoRA files


def quantized_model(seed=0):
    model = micro_model(seed)
    qlora.quantize_model(model, lora.LoRAConfig(r=2, target_modules=("q", "fc")),
                         compute_dtype=torch.float32)
    return model


def test_quantize_model_is_all_or_nothing():
    model = micro_model()
    model.blocks[1].mlp.fc = nn.Linear(16, 3)  # 48 weights: no blocksize divides them
    before = snapshot(model)
    requires = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match="blocksize"):
        qlora.quantize_model(model, lora.LoRAConfig(r=2, target_modules=("q", "fc")))
    assert_unchanged(model, before)
    assert [p.requires_grad for p in model.parameters()] == requires


def edit_metadata(file, change):
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(file))
    meta = json.loads(metadata[serialization.FORMAT_KEY])
    change(meta, tensors)
    metadata[serialization.FORMAT_KEY] = json.dumps(meta)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(file), metadata=metadata)


def first_layer(meta):
    return meta["layers"][sorted(meta["layers"])[0]]


@pytest.mark.parametrize("change, message", [
    (lambda m, t: first_layer(m)["base"].update(quant_type="int4"), "quant_type"),
    (lambda m, t: first_layer(m)["base"].update(compute_dtype="float64"), "compute_dtype"),
    (lambda m, t: first_layer(m)["base"].update(out_features=10**7, in_features=10**7),
     "in the file"),
    (lambda m, t: first_layer(m)["base"].update(blocksize=0), "blocksize"),
    (lambda m, t: first_layer(m).update(rslora="false"), "rslora"),
    (lambda m, t: first_layer(m).pop("alpha"), "exactly the keys"),
    (lambda m, t: m.update(layers=[]), "layers"),
    (lambda m, t: t.update({"blocks.0.attn.q.base_layer.code":
                            t["blocks.0.attn.q.base_layer.code"] * float("nan")}), "NaN"),
    (lambda m, t: t.update({"blocks.0.attn.q.base_layer.absmax":
                            t["blocks.0.attn.q.base_layer.absmax"].long()}), "absmax"),
    (lambda m, t: t.update({"blocks.1.mlp.fc.lora_B": t["blocks.1.mlp.fc.lora_B"][:3]}),
     "wrong shape"),
])
def test_a_bad_quantized_model_file_is_refused_before_any_change(tmp_path, change, message):
    file = serialization.save_quantized(quantized_model(), tmp_path)
    edit_metadata(file, change)
    model = micro_model(seed=2)
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        serialization.load_quantized(model, tmp_path)
    assert_unchanged(model, before)


def test_quantized_round_trip_still_exact(tmp_path):
    saved = quantized_model()
    serialization.save_quantized(saved, tmp_path)
    loaded = serialization.load_quantized(micro_model(seed=9), tmp_path)
    x = torch.randint(0, 48, (2, 16))
    torch.testing.assert_close(loaded(x), saved(x), atol=0, rtol=0)


@pytest.mark.parametrize("change, message", [
    (lambda m, t: t.update({"blocks.1.mlp.fc.lora_B": t["blocks.1.mlp.fc.lora_B"][:, :1]}),
     "wrong shape"),
    (lambda m, t: first_layer(m).update(alpha=1.0), "saved with alpha=1.0"),
    (lambda m, t: first_layer(m).update(dropout=0.5), "saved with dropout=0.5"),
    (lambda m, t: first_layer(m)["base"].update(quant_type="fp4"), "quant_type"),
])
def test_a_bad_qlora_adapter_is_refused_before_any_layer_changes(tmp_path, change, message):
    trained = quantized_model()
    with torch.no_grad():
        for layer in qlora.qlora_layers(trained).values():
            layer.lora_B.normal_()
    file = serialization.save_qlora_adapter(trained, tmp_path)
    edit_metadata(file, change)
    model = quantized_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        serialization.load_qlora_adapter(model, tmp_path)
    assert_unchanged(model, before)
