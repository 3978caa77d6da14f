"""Memory accounting: per-parameter arithmetic, exact static bytes, exact saved activations."""

import pytest
import torch

from pedaPEFT import data, gpt, lora, memory, train


def test_bytes_per_parameter_table():
    assert memory.bytes_per_parameter(precision="fp32")["total"] == 16
    mixed = memory.bytes_per_parameter(precision="mixed")
    assert (mixed["weights"], mixed["gradients"], mixed["optimizer"]) == (2, 2, 12)
    assert memory.bytes_per_parameter(precision="mixed", optimizer="adamw8bit")["total"] == (
        pytest.approx(2 + 2 + 4 + 2 + 8 / 256)
    )
    assert memory.bytes_per_parameter(precision="bf16")["total"] == 8
    assert memory.bytes_per_parameter(precision="fp32", optimizer="sgd")["total"] == 8


def test_lora_and_qlora_hooks():
    lora = memory.finetune_memory(1000, "lora", precision="bf16", trainable=10)
    assert (lora.weights, lora.gradients, lora.optimizer) == (1000 * 2 + 10 * 2, 20, 40)
    qlora = memory.finetune_memory(1000, "qlora", precision="bf16", trainable=10, base_bits=4)
    assert qlora.weights == 500 + 20
    with pytest.raises(ValueError, match="trainable must be"):
        memory.finetune_memory(1000, "lora")
    with pytest.raises(ValueError, match="method must be one of"):
        memory.finetune_memory(1000, "prefix")
    with pytest.raises(ValueError, match="precision must be one of"):
        memory.finetune_memory(1000, precision="fp8")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        memory.finetune_memory(1000, optimizer="lion")
    with pytest.raises(ValueError, match="base_bits must be in"):
        memory.finetune_memory(1000, "qlora", trainable=1, base_bits=0)


@pytest.mark.parametrize(("dtype", "precision"), [(torch.float32, "fp32"),
                                                  (torch.bfloat16, "bf16")])
@pytest.mark.parametrize("method", ["full", "top"])
def test_predicted_static_memory_equals_real_tensor_bytes(dtype, precision, method):
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig.preset("tiny")).to(dtype)
    train.METHODS[method](model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = train.make_optimizer(model, train.TrainConfig(progress=False))
    x, y = data.pretrain_batch(0, 4)
    train._scored_loss(model(x), y, 1.0).backward()
    optimizer.step()
    measured = memory.measured_static_memory(model, optimizer)
    n_total = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in trainable)
    if method == "full":
        predicted = memory.finetune_memory(n_total, precision=precision,
                                           n_tensors=len(trainable))
    else:  # frozen bottom, trainable top: same accounting as an adapter on a frozen base
        predicted = memory.finetune_memory(n_total - n_train, "lora", precision=precision,
                                           trainable=n_train, n_tensors=len(trainable))
    assert measured.as_dict() == predicted.as_dict()


@pytest.mark.parametrize("precision", ["fp32", "amp"])
@pytest.mark.parametrize(("n_layer", "batch", "seq"), [(4, 8, 16), (2, 3, 11)])
def test_activation_formula_equals_saved_tensors(precision, n_layer, batch, seq):
    torch.manual_seed(0)
    config = gpt.GPTConfig(vocab_size=48, block_size=16, n_layer=n_layer, n_head=4, n_embd=64)
    model = gpt.GPT(config)
    x, y = torch.randint(48, (batch, seq)), torch.randint(48, (batch, seq))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "amp"):
            logits = model(x)
        return train._scored_loss(logits, y, 1.0)

    measured = memory.saved_tensor_bytes(step, model)
    assert memory.gpt_activation_bytes(config, batch, seq, precision) == measured


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_checkpointing_gives_the_same_gradients_and_saves_less(dropout):
    """Full fine-tuning without dropout (the formula's case); LoRA with dropout (masks redrawn)."""
    torch.manual_seed(0)
    config = gpt.GPTConfig(vocab_size=48, block_size=16, n_layer=3, n_head=4, n_embd=32,
                           dropout=dropout)
    model = gpt.GPT(config)
    if dropout > 0:
        lora.apply_lora(model, lora.LoRAConfig(r=4, alpha=8, target_modules=gpt.ALL_LINEAR))
    x, y = torch.randint(48, (6, 16)), torch.randint(48, (6, 16))

    def step():
        return train._scored_loss(model(x), y, 1.0)

    saved, grads = {}, {}
    for checkpointing in (False, True):
        model.gradient_checkpointing_enable(checkpointing)
        torch.manual_seed(1)  # the same dropout masks in both runs
        saved[checkpointing] = memory.saved_tensor_bytes(step, model)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        step().backward()
        grads[checkpointing] = {name: p.grad.clone() for name, p in model.named_parameters()
                                if p.requires_grad}
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=0, atol=0, msg=name)
    assert saved[True] < saved[False] / 3
    if dropout == 0.0:
        for checkpointing in (False, True):
            assert saved[checkpointing] == memory.gpt_activation_bytes(
                config, 6, 16, checkpointing=checkpointing)
    with torch.no_grad():  # nothing to recompute without gradients
        assert model(x).shape == (6, 16, 48)
    with pytest.raises(TypeError, match="enabled must be"):
        model.gradient_checkpointing_enable("yes")
    with pytest.raises(ValueError, match="checkpointing is counted"):
        memory.gpt_activation_bytes(config, 1, precision="amp", checkpointing=True)


def test_memory_conventions():
    full = memory.CONVENTIONS["full"]
    # mixed precision: 2 (weight) + 2 (gradient) + 4 (fp32 master) + 4 + 4 (Adam m, v)
    assert full.bytes_per_trainable() == 2 + 2 + 4 + 4 + 4
    assert memory.CONVENTIONS["full, no master copy"].bytes_per_trainable() == 2 + 2 + 4 + 4
    assert memory.CONVENTIONS["full, pure bf16"].bytes_per_trainable() == 2 + 2 + 2 + 2
    assert memory.CONVENTIONS["full, 8-bit Adam"].bytes_per_trainable() == pytest.approx(
        2 + 2 + 4 + 2 * (1 + 4 / 256))
    for name in ("lora", "qlora"):
        assert memory.CONVENTIONS[name].bytes_per_trainable() == 2 + 2 + 4 + 4
    assert memory.CONVENTIONS["lora"].bytes_per_frozen() == 2
    assert memory.CONVENTIONS["qlora"].bytes_per_frozen() == pytest.approx(4.127 / 8)
    qlora = memory.CONVENTIONS["qlora"].memory(1000, 10, quantized=800)
    assert qlora.weights == pytest.approx(800 * 4.127 / 8 + 200 * 2 + 10 * 2)
    assert full.memory(70 * 10**9).static / memory.GB == 1120
    assert memory.gpu_card_bytes(24) == 24 * 2**30
    with pytest.raises(ValueError, match="marketed_gb"):
        memory.gpu_card_bytes(-1)
    table = memory.conventions_table()
    for name, convention in memory.CONVENTIONS.items():
        assert name in table and convention.stores in table
    assert "GB = 10^9 bytes" in table and "25.77 GB" in table


def test_llama3_8b_parameter_count():
    # Meta lists Llama-3-8B at 8.03B parameters.
    n = memory.llama_parameter_count(**memory.LLAMA3_8B)
    assert round(n / 1e9, 2) == 8.03


def test_step_peak_static_part_matches_the_model():
    config = gpt.GPTConfig.preset("tiny")
    with torch.device("meta"):
        model = gpt.GPT(config)
    params = list(model.parameters())
    peak = memory.gpt_step_peak_bytes(config, 4, 16)
    assert peak["weights"] == 4 * sum(p.numel() for p in params)
    assert peak["optimizer"] == 8 * sum(p.numel() for p in params) + 4 * len(params)
    assert peak["logits_gradients"] == 8 * 4 * 16 * config.vocab_size
    assert peak["total"] == sum(v for k, v in peak.items() if k != "total")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_activation_formula_on_cuda_with_autocast():
    torch.manual_seed(0)
    config = gpt.GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=4, n_embd=128)
    model = gpt.GPT(config).cuda()
    x, y = torch.randint(512, (4, 64), device="cuda"), torch.randint(512, (4, 64), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(x)
        return train._scored_loss(logits, y, 1.0)

    measured = memory.saved_tensor_bytes(step, model)
    # The same tensors as on the CPU; CUDA attention kernels may keep a few extra bytes
    # (random-number state), hence the tolerance.
    assert memory.gpt_activation_bytes(config, 4, 64, "amp") == pytest.approx(measured, rel=0.01)
