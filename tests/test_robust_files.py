"""Saved files under attack: interrupted saves, truncated, flipped and hostile files."""

import functools
import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pedaPEFT import files, gpt
from pedaPEFT.gpt import GPT, GPTConfig

FIXTURE_OK = [HealthCheck.function_scoped_fixture]


def micro_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=48, block_size=16, n_layer=1, n_head=2, n_embd=8))


@pytest.fixture
def saved_base(tmp_path):
    model = micro_model()
    gpt.save_pretrained(model, {"note": "old"}, tmp_path, "mini")
    return model, tmp_path


def test_interrupted_save_keeps_the_old_pair(saved_base, monkeypatch):
    old_model, folder = saved_base
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def dies(*args, **kwargs):
        raise KeyboardInterrupt  # the process is stopped while the second file is written

    monkeypatch.setattr(gpt.Path, "write_text", dies)  # the recipe, written after the weights
    with pytest.raises(KeyboardInterrupt):
        gpt.save_pretrained(micro_model(seed=1), {"note": "new"}, folder, "mini")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no stray files
    loaded = gpt.load_pretrained("mini", folder)
    assert torch.equal(loaded.wte.weight, old_model.wte.weight)


def test_a_journaled_save_is_completed_by_the_next_load(saved_base, monkeypatch):
    _, folder = saved_base
    new_model = micro_model(seed=1)
    real_replace = files.os.replace
    calls = []

    def dies_after_the_journal(source, target):
        calls.append(target)
        if str(target).endswith(".safetensors"):  # the journal is written; a rename dies
            raise KeyboardInterrupt
        return real_replace(source, target)

    monkeypatch.setattr(files.os, "replace", dies_after_the_journal)
    with pytest.raises(KeyboardInterrupt):
        gpt.save_pretrained(new_model, {"note": "new"}, folder, "mini")
    monkeypatch.setattr(files.os, "replace", real_replace)
    assert (folder / files.JOURNAL_NAME).exists()
    loaded = gpt.load_pretrained("mini", folder)  # finishes the save: all new
    assert torch.equal(loaded.wte.weight, new_model.wte.weight)
    assert gpt.pretrained_info("mini", folder)["note"] == "new"
    assert not (folder / files.JOURNAL_NAME).exists()


def test_load_names_the_file_for_truncated_or_mismatched_weights(saved_base):
    _, folder = saved_base
    weights, meta = gpt.pretrained_paths("mini", folder)
    info = json.loads(meta.read_text())
    info["model_config"]["n_embd"] = 16
    meta.write_text(json.dumps(info))
    with pytest.raises(ValueError, match="mini.safetensors.*n_embd|mini.safetensors"):
        gpt.load_pretrained("mini", folder)
    info["model_config"]["n_embd"] = 8
    meta.write_text(json.dumps(info))
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="mini.safetensors.*truncated"):
        gpt.load_pretrained("mini", folder)


@pytest.mark.parametrize("text, key", [
    ("not json", "not valid JSON"), ("[1, 2]", "JSON object"),
    ('{"model_config": [1]}', "model_config"),
    ('{"model_config": {"n_embd": -4}}', "model_config"),
    ('{"model_config": {"layers": 3}}', "model_config"),
])
def test_load_refuses_a_malformed_recipe(saved_base, text, key):
    _, folder = saved_base
    gpt.pretrained_paths("mini", folder)[1].write_text(text)
    with pytest.raises(ValueError, match=key):
        gpt.load_pretrained("mini", folder)


def test_load_refuses_non_finite_weights(saved_base):
    from safetensors.torch import load_file, save_file

    _, folder = saved_base
    weights = gpt.pretrained_paths("mini", folder)[0]
    tensors = load_file(str(weights))
    tensors["ln_f.weight"][0] = float("nan")
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match="'ln_f.weight' holds NaN"):
        gpt.load_pretrained("mini", folder)


@settings(max_examples=25, deadline=None, suppress_health_check=FIXTURE_OK)
@given(data=st.data())
def test_random_corruptions_of_a_saved_base_are_refused_or_harmless(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("base")
    model = micro_model()
    weights, _ = gpt.save_pretrained(model, {}, folder, "mini")
    raw = bytearray(weights.read_bytes())
    how = data.draw(st.sampled_from(["truncate", "flip", "overwrite"]))
    at = data.draw(st.integers(0, len(raw) - 1))
    if how == "truncate":
        raw = raw[:at]
    elif how == "flip":
        raw[at] ^= 1 << data.draw(st.integers(0, 7))
    else:
        raw[at:at + 8] = data.draw(st.binary(min_size=8, max_size=8))
    weights.write_bytes(bytes(raw))
    try:
        loaded = gpt.load_pretrained("mini", folder)
    except ValueError as error:
        assert "mini" in str(error)  # refused, naming the file
        return
    # Accepted: a change inside a tensor's data (a different but finite weight) is all that
    # can pass; the model is complete and finite.
    assert all(torch.isfinite(p).all() for p in loaded.parameters())


def test_output_checks_name_the_argument(tmp_path):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="out must be a folder"):
        files.check_output_dir(a_file, "out")
    with pytest.raises(ValueError, match="checkpoint must name a file"):
        files.check_output_file(tmp_path, "checkpoint")
    with pytest.raises(ValueError, match="exists"):
        files.check_output_file(a_file, "out", overwrite=False)
    with pytest.raises(ValueError, match="cannot create"):
        files.check_output_dir(a_file / "sub", "out")


# --------------------------------------------------------------------------- checkpoints


@functools.cache
def checkpoint_bytes() -> bytes:
    """A small training checkpoint, written once for the corruption tests."""
    import tempfile

    from pedaPEFT import data as corpora
    from pedaPEFT import train

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "run.pt"
        config = train.TrainConfig(steps=1, batch_size=8, progress=False, device="cpu")
        train.train(micro_model(), lambda step: corpora.pretrain_batch(step, 8, 16), config,
                    checkpoint=checkpoint)
        return checkpoint.read_bytes()


@settings(max_examples=30, deadline=None, suppress_health_check=FIXTURE_OK)
@given(data=st.data())
def test_a_checkpoint_with_changed_bytes_is_refused_or_unchanged(tmp_path_factory, data):
    from pedaPEFT import checkpoints, train

    raw = bytearray(checkpoint_bytes())
    at = data.draw(st.integers(0, len(raw) - 1))
    if data.draw(st.booleans()):
        raw[at] ^= 1 << data.draw(st.integers(0, 7))
    else:
        raw = raw[:at]
    checkpoint = tmp_path_factory.mktemp("ck") / "run.pt"
    checkpoint.write_bytes(bytes(raw))
    try:
        state = train.load_checkpoint(checkpoint)
    except ValueError as error:
        assert "run.pt" in str(error)
        return
    # Loaded: the byte was one the reader never uses (zip padding, a duplicate header), and
    # the recorded SHA-256 proves every value is the one saved.
    assert state["sha256"] == checkpoints.content_digest(state)


# --------------------------------------------------------------------------- bitsandbytes dicts


def bnb_dict():
    from pedaPEFT import quant

    return quant.to_bnb_state_dict(quant.quantize_4bit(torch.randn(8, 64)))


def set_meta(sd, **changes):
    key = next(k for k in sd if "quant_state" in k)
    meta = json.loads(bytes(sd[key].tolist()).decode())
    meta.update(changes)
    for name, value in changes.items():
        if value is None:
            del meta[name]
    sd[key] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return sd


@pytest.mark.parametrize("corrupt, message", [
    (lambda sd: sd.update({next(k for k in sd if "quant_state" in k):
                           torch.tensor(list(b"{no json"), dtype=torch.uint8)}), "JSON"),
    (lambda sd: set_meta(sd, shape=None), "lacks"),
    (lambda sd: set_meta(sd, shape=[-8, 64]), "shape"),
    (lambda sd: set_meta(sd, nested_blocksize=0), "nested_blocksize"),
    (lambda sd: set_meta(sd, quant_type="int4"), "quant_type"),
    (lambda sd: sd.pop("weight.absmax"), "lacks"),
    (lambda sd: sd.update({"weight.absmax": sd["weight.absmax"].long()}), "absmax"),
    (lambda sd: sd.update({"weight.quant_map": sd["weight.quant_map"] * float("nan")}), "NaN"),
])
def test_malformed_bitsandbytes_dicts_are_refused_by_name(corrupt, message):
    from pedaPEFT import quant

    sd = bnb_dict()
    corrupt(sd)
    with pytest.raises(ValueError, match=message):
        quant.from_bnb_state_dict(sd)
