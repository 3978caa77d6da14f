"""Training loop: schedule, optimizer groups, checkpoints (atomic, safe, resumable), methods."""

import dataclasses
import fractions
import math

import pytest
import torch

from pedaPEFT import data, gpt, train
from pedaPEFT.gpt import GPT, GPTConfig


def micro_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=48, block_size=16, n_layer=2, n_head=2, n_embd=16))


def quiet(**overrides) -> train.TrainConfig:
    values = dict(steps=12, batch_size=8, lr=3e-3, warmup_steps=3, progress=False, device="cpu")
    return train.TrainConfig(**{**values, **overrides})


def batches(step: int):
    return data.pretrain_batch(step, 8, 16)


def test_schedule_warms_up_then_decays_to_the_floor():
    config = train.TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [train.lr_at(s, config) for s in range(100)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[55] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert train.lr_at(100, config) == pytest.approx(0.1)


def test_weight_decay_groups():
    model = micro_model()
    opt = train.make_optimizer(model, quiet(weight_decay=0.3))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.3 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"])
    assert all(p.dim() == 1 for p in plain["params"])
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))  # tied head once


def test_training_lowers_the_loss():
    model = micro_model()
    result = train.train(model, batches, quiet(steps=40, lr=1e-2))
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5 - 0.5
    assert len(result.lrs) == 40


def test_loss_is_the_mean_over_scored_targets():
    model = micro_model()
    x, y = batches(0)
    logits = model(x)
    n = int((y != data.IGNORE_INDEX).sum())
    expected = torch.nn.functional.cross_entropy(logits.view(-1, 48), y.view(-1))
    torch.testing.assert_close(train._scored_loss(logits, y, 1 / n), expected)


def test_resume_is_bit_identical(tmp_path):
    straight = micro_model()
    reference = train.train(straight, batches, quiet())

    ckpt = tmp_path / "run.pt"
    stopped = micro_model()
    with pytest.raises(KeyboardInterrupt):
        train.train(stopped, interrupt_at(7), quiet(checkpoint_interval=5), checkpoint=ckpt)
    assert train.load_checkpoint(ckpt)["step"] == 5
    resumed = micro_model(seed=123)  # different init: everything must come from the file
    result = train.train(resumed, batches, quiet(), checkpoint=ckpt, resume=True)
    assert result.losses == reference.losses
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name


def interrupt_at(stop_step: int):
    def get_batch(step: int):
        if step == stop_step:
            raise KeyboardInterrupt
        return batches(step)

    return get_batch


def test_interrupted_checkpoint_write_keeps_the_old_file(tmp_path, monkeypatch):
    ckpt = tmp_path / "run.pt"
    model = micro_model()
    train.train(model, batches, quiet(steps=2), checkpoint=ckpt)
    before = ckpt.read_bytes()
    real_save = torch.save

    def dying_save(obj, f):
        real_save(obj, f)
        with open(f, "r+b") as handle:  # leave a half-written file behind, then die
            handle.truncate(100)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        train.train(micro_model(), batches, quiet(steps=2), checkpoint=ckpt)
    assert ckpt.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]


def test_truncated_foreign_and_missing_checkpoints(tmp_path):
    good = tmp_path / "good.pt"
    train.train(micro_model(), batches, quiet(steps=1), checkpoint=good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or not a torch checkpoint"):
        train.load_checkpoint(truncated)
    garbage = tmp_path / "notes.pt"
    garbage.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="truncated or not a torch checkpoint"):
        train.load_checkpoint(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": micro_model().state_dict()}, foreign)
    with pytest.raises(ValueError, match="not a pedaPEFT training checkpoint"):
        train.load_checkpoint(foreign)
    with pytest.raises(FileNotFoundError, match="existing checkpoint file"):
        train.load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_refuses_pickled_code(tmp_path):
    path = tmp_path / "sneaky.pt"  # any pickled object that is not a tensor or a container
    torch.save({"format": train.CHECKPOINT_FORMAT, "payload": fractions.Fraction(1, 3)}, path)
    with pytest.raises(ValueError, match="truncated or not a torch checkpoint"):
        train.load_checkpoint(path)


@pytest.mark.parametrize(
    ("method", "trainable_prefixes"),
    [
        ("full", None),
        ("top", ("blocks.1.", "ln_f.", "lm_head.")),
        ("feature", ("lm_head.",)),
    ],
)
def test_methods_freeze_what_they_say(method, trainable_prefixes):
    model = train.METHODS[method](micro_model())
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if trainable_prefixes is None:
        assert len(names) == len(list(model.parameters()))
    else:
        assert names and all(n.startswith(trainable_prefixes) for n in names)
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        assert "wte.weight" in frozen


def test_feature_based_finetune_changes_only_the_head():
    model = micro_model()
    body_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train.finetune(model, "shift", "feature", quiet(steps=3), n_train=32)
    assert result.trainable == 16 * 48
    for name, p in model.named_parameters():
        if name != "lm_head.weight":
            assert torch.equal(p, body_before[name]), name
    assert not torch.equal(model.lm_head.weight, body_before["wte.weight"])
    assert 0.0 <= result.accuracy <= 1.0


def test_register_method_and_bad_arguments():
    calls = []

    def prepare_bias_only(model, note="x"):
        calls.append(note)
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith("bias"))
        return model

    train.register_method("bias_only_test", prepare_bias_only)
    try:
        result = train.finetune(micro_model(), "reverse", "bias_only_test", quiet(steps=2),
                                n_train=16, method_options={"note": "seen"})
        assert calls == ["seen"]
        assert result.trainable < result.total
    finally:
        del train.METHODS["bias_only_test"]
    with pytest.raises(ValueError, match="method must be one of"):
        train.finetune(micro_model(), "reverse", "magic", quiet(steps=1))
    with pytest.raises(ValueError, match="task must be one of"):
        train.finetune(micro_model(), "poetry", "full", quiet(steps=1))
    with pytest.raises(TypeError, match="prepare must be callable"):
        train.register_method("nothing", None)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        train.TrainConfig(steps=0)
    with pytest.raises(ValueError, match="device must be"):
        train.TrainConfig(device="tpu")
    with pytest.raises(ValueError, match="no trainable parameters"):
        train.make_optimizer(micro_model().requires_grad_(False), quiet())
    with pytest.raises(ValueError, match="n_blocks must be in"):
        train.prepare_top(micro_model(), n_blocks=3)


def test_pretrain_recipe_reproduces_the_shipped_base():
    info = gpt.pretrained_info("tiny")
    recipe = {k: v for k, v in dataclasses.asdict(train.PRETRAIN_CONFIG).items()
              if k not in ("progress", "device")}
    assert info["train_config"] == recipe
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the pretrain command runs it
    try:
        cpu_recipe = dataclasses.replace(train.PRETRAIN_CONFIG, device="cpu")
        _, fresh = train.pretrain_base("tiny", cpu_recipe, seed=info["seed"])
    finally:
        torch.set_num_threads(threads)
    # Bit-identical on the machine that made the file; elsewhere the floating-point sums of
    # another CPU move the loss in its third digit.
    assert fresh["final_loss"] == pytest.approx(info["final_loss"], rel=0.03)
    for name, value in info["metrics"].items():
        assert fresh["metrics"][name] == pytest.approx(value, abs=0.03), name
    assert all(v == 1.0 for k, v in info["metrics"].items() if k.startswith("pretrain/"))
    assert all(v < 0.2 for k, v in info["metrics"].items() if k.startswith("downstream/"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_computes_the_cpu_function_and_trains(tmp_path):
    base = gpt.load_pretrained("tiny")
    split = data.task_data("copy", "test", 64)
    cpu_logits = base(split.x)
    cuda_logits = gpt.load_pretrained("tiny").cuda()(split.x.cuda()).cpu()
    torch.testing.assert_close(cuda_logits, cpu_logits, rtol=1e-3, atol=1e-3)
    model = micro_model()
    result = train.train(model, batches, quiet(steps=40, lr=1e-2, device="cuda"),
                         checkpoint=tmp_path / "cuda.pt")  # bf16 autocast on CUDA
    assert next(model.parameters()).is_cuda
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5 - 0.5
    state = train.load_checkpoint(tmp_path / "cuda.pt")  # loads onto the CPU
    assert all(not t.is_cuda for t in state["model"].values())
