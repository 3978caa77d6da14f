"""Memory accounting: per-parameter arithmetic, exact static bytes, exact saved activations."""

import pytest
import torch

from pedaPEFT import data, gpt, memory, train


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
