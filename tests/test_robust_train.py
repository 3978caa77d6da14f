"""Training under hostile settings: divergence keeps the last good checkpoint, bad configs,
checkpoints of another model, and the low-level checks (rank, decode, memory, 4-bit layout)."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pedaPEFT import data, kernels, linalg, memory, quant, train
from pedaPEFT.gpt import GPT, GPTConfig


def micro_model(seed: int = 0, n_embd: int = 16) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=48, block_size=16, n_layer=2, n_head=2, n_embd=n_embd))


def quiet(**overrides) -> train.TrainConfig:
    values = dict(steps=4, batch_size=8, lr=3e-3, warmup_steps=1, progress=False, device="cpu")
    return train.TrainConfig(**{**values, **overrides})


def batches(step: int):
    return data.pretrain_batch(step, 8, 16)


def test_divergence_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    checkpoint = tmp_path / "run.pt"
    train.train(micro_model(), batches, quiet(steps=2), checkpoint=checkpoint)
    model = micro_model()
    with pytest.raises(train.TrainingDiverged, match="diverged"):
        train.train(model, batches, quiet(steps=30, lr=1e10, grad_clip=0.0,
                                          checkpoint_interval=1),
                    checkpoint=checkpoint, resume=True)
    state = train.load_checkpoint(checkpoint)  # the last good state, never a NaN one
    assert 2 <= state["step"] < 30
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("field, value", [
    ("lr", math.inf), ("lr", math.nan), ("lr", -1e-3), ("lr", 0.0),
    ("steps", 2.5), ("steps", True), ("batch_size", 0), ("warmup_steps", -1),
    ("weight_decay", -0.1), ("weight_decay", math.nan), ("grad_clip", math.nan),
    ("grad_clip", -1.0), ("beta1", 1.0), ("beta2", math.nan), ("min_lr_ratio", 2.0),
    ("eval_interval", 0.5), ("device", "tpu"),
])
def test_train_config_refuses_bad_values_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        train.TrainConfig(**{field: value})


def test_resume_needs_a_checkpoint_and_refuses_another_model(tmp_path):
    with pytest.raises(ValueError, match="resume=True needs checkpoint"):
        train.train(micro_model(), batches, quiet(), resume=True)
    with pytest.raises(ValueError, match="checkpoint must name a file"):
        train.train(micro_model(), batches, quiet(), checkpoint=tmp_path)
    checkpoint = tmp_path / "run.pt"
    train.train(micro_model(), batches, quiet(steps=1), checkpoint=checkpoint)
    with pytest.raises(ValueError, match=r"another model: model_config differs in \['n_embd'\]"):
        train.train(micro_model(n_embd=32), batches, quiet(), checkpoint=checkpoint, resume=True)
    train.train(micro_model(), batches, quiet(steps=4), checkpoint=checkpoint)
    with pytest.raises(ValueError, match="'step' must be an integer"):  # a longer run's file
        train.train(micro_model(), batches, quiet(steps=2), checkpoint=checkpoint, resume=True)


# --------------------------------------------------------------------------- low-level inputs


@pytest.mark.parametrize("method", ["rref", "svd"])
@given(exponent=st.integers(-300, 300), signs=st.sampled_from([(1, -1), (1, 1)]))
@settings(max_examples=15, deadline=None)
def test_rank_is_scale_invariant_at_the_limits_of_float64(method, exponent, signs):
    A = np.array([[1.0, 1.0], [signs[0], signs[1]]]) * 10.0**exponent
    assert linalg.matrix_rank(A, method=method) == (2 if signs == (1, -1) else 1)
    assert linalg.matrix_rank(A / np.abs(A).max() * 1.7976931348623157e308, method=method) \
        == (2 if signs == (1, -1) else 1)


@given(ids=st.lists(st.one_of(st.integers(max_value=-1), st.integers(min_value=len(data.CHARS)),
                              st.floats(allow_nan=True), st.booleans()), min_size=1, max_size=4))
@settings(max_examples=20, deadline=None)
def test_decode_refuses_ids_outside_the_alphabet(ids):
    with pytest.raises((TypeError, ValueError), match="ids must"):
        data.decode(ids)


def test_decode_refuses_float_tensors_and_keeps_round_trips():
    assert data.decode(torch.tensor(data.encode("abc"))) == "abc"
    with pytest.raises(TypeError, match="ids must hold integers"):
        data.decode(torch.tensor([1.0]))


@pytest.mark.parametrize("kwargs, name", [
    (dict(activations=-1e9), "activations"), (dict(activations=math.nan), "activations"),
    (dict(n_tensors=-1), "n_tensors"), (dict(method="lora", trainable=-3), "trainable"),
    (dict(method="lora", trainable=2.5), "trainable"),
])
def test_finetune_memory_refuses_negative_or_fractional_counts(kwargs, name):
    with pytest.raises(ValueError, match=name):
        memory.finetune_memory(1000, **kwargs)


def _layout(n=640, double_quant=True):
    state = quant.quantize_4bit(torch.randn(n), double_quant=double_quant)
    return dict(packed=state.packed.reshape(-1), absmax=state.absmax, code=state.code,
                nested_absmax=state.nested_absmax, nested_code=state.nested_code,
                offset=state.offset, n=n, blocksize=64,
                dq_blocksize=state.dq_blocksize or 256), state


@pytest.mark.parametrize("change, name", [
    (dict(blocksize=77), "absmax"), (dict(blocksize=0), "blocksize"), (dict(n=1000), "packed"),
    (dict(n=0), "n must"), ("packed:long", "packed"), ("packed:float", "packed"),
    ("absmax:long", "absmax"), ("nested_code:short", "nested_code"),
    (dict(dq_blocksize=0), "dq_blocksize"), (dict(offset=None), "together"),
])
def test_dequantize_refuses_a_malformed_layout(change, name):
    args, state = _layout()
    if isinstance(change, str):
        key, how = change.split(":")
        args[key] = {"long": args[key].long(), "float": args[key].float(),
                     "short": args[key][:100]}[how]
    else:
        args.update(change)
    with pytest.raises((TypeError, ValueError), match=name):
        kernels.dequantize_4bit_eager(**args, out_dtype=torch.float32)
    if isinstance(change, str):  # the same tensor inside a QuantState
        key = change.split(":")[0]
        value = args[key].reshape(state.packed.shape) if key == "packed" else args[key]
        with pytest.raises((TypeError, ValueError), match=f"state: {key}"):
            quant.dequantize_4bit(dataclasses.replace(state, **{key: value}))


@pytest.mark.parametrize("call", [
    lambda m: quant.quantize_4bit(m), lambda m: quant.absmax_quantize(m),
    lambda m: quant.quantize_int8(m), lambda m: linalg.matrix_rank(m),
    lambda m: quant.pack_4bit(torch.zeros(8, dtype=torch.uint8, device="meta")),
])
def test_meta_tensors_are_refused_by_name(call):
    with pytest.raises(ValueError, match="meta device"):
        call(torch.empty(8, 64, device="meta"))
