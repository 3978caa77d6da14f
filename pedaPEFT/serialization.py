"""Files: LoRA adapters in Hugging Face PEFT's format, and quantized QLoRA models.

**LoRA (lesson 5).** :func:`save_lora_adapter` writes exactly what PEFT's ``save_pretrained``
writes: ``adapter_model.safetensors`` with only the ``r · (in + out)`` numbers per layer under
the keys ``base_model.model.<path>.lora_A.weight`` / ``lora_B.weight``, and
``adapter_config.json`` in PEFT's field names, so PEFT can load it into the same base and
:func:`load_lora_adapter` can load PEFT's files.

**QLoRA (lesson 9).** :func:`save_quantized` writes the whole quantized model (packed 4-bit
codes and scales, never dense weights) and :func:`save_qlora_adapter` only the LoRA tensors;
each file carries, under the metadata key ``pedapeft_qlora``, every layer's base format, so
loading rebuilds the same layers and refuses an adapter trained on a different quantization.

Every file is written through ``files.atomic_write``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from pedaPEFT.files import (
    atomic_write,
    finish_interrupted_write,
    read_tensors,
    write_files_atomically,
)
from pedaPEFT.lora import LoRAConfig, LoRALinear, check_flag, check_lora_base, lora_layers
from pedaPEFT.qlora import BaseFormat, QLoRALinear, QuantLinear, qlora_layers
from pedaPEFT.quant_4bit import check_state_values
from pedaPEFT.targets import find_targets, name_matches

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
KEY_PREFIX = "base_model.model."
QLORA_MODEL_NAME = "qlora_model.safetensors"
QLORA_ADAPTER_NAME = "qlora_adapter.safetensors"
FORMAT_KEY = "pedapeft_qlora"


# --------------------------------------------------------------------------- LoRA, PEFT's format


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors under PEFT's saved names ``base_model.model.<path>.lora_{A,B}.weight``."""
    state = {}
    for name, layer in lora_layers(model).items():
        state[f"{KEY_PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().cpu().contiguous()
        state[f"{KEY_PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().cpu().contiguous()
    return state


def adapter_config_dict(model: nn.Module) -> dict[str, object]:
    """``adapter_config.json`` in PEFT's field names, read back from the model's LoRA layers.

    The most common ``r`` and ``alpha`` become ``r``/``lora_alpha``; layers that differ go in
    ``rank_pattern``/``alpha_pattern`` under their full name, as PEFT does.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRALinear layers (call apply_lora first)")
    ranks = [layer.r for layer in layers.values()]
    alphas = [layer.alpha for layer in layers.values()]
    r = max(set(ranks), key=ranks.count)
    alpha = max(set(alphas), key=alphas.count)
    dropouts = {layer.dropout_p for layer in layers.values()}
    rslora = {layer.rslora for layer in layers.values()}
    if len(dropouts) > 1 or len(rslora) > 1:
        raise ValueError("all LoRA layers must share dropout and rslora to be saved in one config")
    return {
        "alpha_pattern": {n: layer.alpha for n, layer in layers.items() if layer.alpha != alpha},
        "base_model_name_or_path": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "lora_alpha": alpha,
        "lora_dropout": dropouts.pop(),
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": {n: layer.r for n, layer in layers.items() if layer.r != r},
        "target_modules": sorted(layers),
        "task_type": None,
        "use_dora": False,
        "use_rslora": rslora.pop(),
    }


def save_lora_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``path/adapter_model.safetensors`` and ``path/adapter_config.json`` as one atomic
    change (``files.write_files_atomically``: an interrupted save leaves the old pair or the new).

    Only the LoRA tensors are saved (``r·(in+out)`` numbers per layer), under PEFT's key names,
    so PEFT's ``PeftModel.from_pretrained`` can load them into the same base model.
    ``target_modules`` lists the full module names, which match exactly under PEFT's rule.

    Introduced in lesson 5, section "5. Merging: zero inference cost".
    """
    directory = Path(path)
    config = adapter_config_dict(model)
    state = adapter_state_dict(model)
    text = json.dumps(config, indent=2, sort_keys=True)
    write_files_atomically({
        directory / ADAPTER_WEIGHTS_NAME:
            lambda tmp: save_file(state, tmp, metadata={"format": "pt"}),
        directory / ADAPTER_CONFIG_NAME: lambda tmp: Path(tmp).write_text(text, encoding="utf-8"),
    })


def _read_json(file: Path) -> dict:
    """The JSON object in ``file``; ``ValueError`` naming the file otherwise."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{file}: not readable JSON ({error})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{file}: must hold a JSON object, got {type(value).__name__}")
    return value


def _config_from_json(config: dict[str, object], file: Path) -> tuple[LoRAConfig, dict, dict]:
    """LoRAConfig, rank_pattern and alpha_pattern of an ``adapter_config.json``, all checked."""
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{file}: peft_type={config.get('peft_type')!r}; only 'LORA' loads")
    unsupported = {"use_dora": False, "fan_in_fan_out": False, "bias": "none"}
    for key, allowed in unsupported.items():
        if config.get(key, allowed) != allowed:
            raise ValueError(f"{file}: {key}={config[key]!r} is not supported (only {allowed!r})")
    missing = [key for key in ("r", "lora_alpha", "target_modules") if key not in config]
    if missing:
        raise ValueError(f"{file}: missing keys {missing}")
    targets = config["target_modules"]
    if isinstance(targets, str) or not isinstance(targets, list) or not targets:
        raise ValueError(f"{file}: target_modules must be a list of names, got {targets!r}")
    try:
        lora_config = LoRAConfig(
            r=config["r"],
            alpha=config["lora_alpha"],
            dropout=config.get("lora_dropout", 0.0),
            target_modules=tuple(targets),
            rslora=config.get("use_rslora", False),
        )
    except (TypeError, ValueError) as error:
        raise ValueError(f"{file}: {error} (keys r, lora_alpha, lora_dropout, use_rslora, "
                         "target_modules)") from None
    patterns = []
    for key, check in (("rank_pattern", lambda v: LoRAConfig(r=v)),
                       ("alpha_pattern", lambda v: LoRAConfig(alpha=v))):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise ValueError(f"{file}: {key} must be an object of name -> value, got {pattern!r}")
        for name, value in pattern.items():
            try:
                check(value)
            except (TypeError, ValueError) as error:
                raise ValueError(f"{file}: {key}[{name!r}]: {error}") from None
        patterns.append(pattern)
    return lora_config, patterns[0], patterns[1]


def _pattern_value(name: str, pattern: dict, default: object) -> object:
    """PEFT's pattern lookup: a key matches a module if it equals or dotted-suffixes its name."""
    for key, value in pattern.items():
        if name_matches(name, (key,)):
            return value
    return default


def _check_same(name: str, field: str, saved: object, ours: object, file: Path) -> None:
    """Refuse a layer whose setting differs from the file's, naming both values."""
    if saved != ours:
        raise ValueError(
            f"{file}: the adapter for {name!r} was saved with {field}={saved!r}, the model's "
            f"layer has {field}={ours!r}; load into a model without LoRA layers (they are "
            "built from the file) or prepare it with the file's settings"
        )


def load_lora_adapter(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load an adapter saved by :func:`save_lora_adapter` (or by PEFT) into ``model``, in place.

    A model without LoRA layers gets them, built from ``adapter_config.json`` (targets,
    ``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``, ``rank_pattern``,
    ``alpha_pattern``); a model with LoRA layers must have the file's settings (a different
    ``r``, α, dropout or rsLoRA is refused, naming both values). All or nothing: the config
    and every tensor (keys, shapes, finite values) are checked before the model changes, and
    nothing is allocated for shapes the model does not have. Returns the LoRA module names.

    Introduced in lesson 12, section "6. Saving and loading adapters".
    """
    directory = Path(path)
    finish_interrupted_write(directory)
    weights_file = directory / ADAPTER_WEIGHTS_NAME
    config_file = directory / ADAPTER_CONFIG_NAME
    for needed in (weights_file, config_file):
        if not needed.is_file():
            raise ValueError(f"path: {directory} has no {needed.name}")
    config, rank_pattern, alpha_pattern = _config_from_json(_read_json(config_file), config_file)
    existing = lora_layers(model)
    if existing:
        if any(layer.merged for layer in existing.values()):
            raise ValueError("model: cannot load an adapter into merged LoRA layers "
                             "(unmerge first)")
        plan = {name: (layer.base_layer, layer) for name, layer in existing.items()}
    else:
        matches = find_targets(model, config.target_modules, "target_modules")
        for name, module in matches:
            check_lora_base(module, f"{config_file}: target_modules: {name!r}")
        plan = {name: (module, None) for name, module in matches}
    settings = {}
    for name, (base, layer) in plan.items():
        r = _pattern_value(name, rank_pattern, config.r)
        alpha = _pattern_value(name, alpha_pattern, config.alpha)
        if layer is not None:
            for field, saved, ours in (("r", r, layer.r), ("alpha", alpha, layer.alpha),
                                       ("dropout", config.dropout, layer.dropout_p),
                                       ("rslora", config.rslora, layer.rslora)):
                _check_same(name, field, saved, ours, config_file)
        settings[name] = (base, r, alpha)
    expected = {}
    for name, (base, r, _) in settings.items():
        expected[f"{KEY_PREFIX}{name}.lora_A.weight"] = ((r, base.in_features), None)
        expected[f"{KEY_PREFIX}{name}.lora_B.weight"] = ((base.out_features, r), None)
    loaded = read_tensors(weights_file, expected)
    # Everything is checked: now change the model.
    for name, (base, r, alpha) in settings.items():
        if name not in existing:
            model.set_submodule(name, LoRALinear(base, r, alpha, config.dropout, config.rslora))
    if not existing:
        for param_name, param in model.named_parameters():
            param.requires_grad = "lora_" in param_name
    layers = lora_layers(model)
    with torch.no_grad():
        for name in settings:
            for part in ("lora_A", "lora_B"):
                param = getattr(layers[name], part)
                param.copy_(loaded[f"{KEY_PREFIX}{name}.{part}.weight"].to(param.device,
                                                                          param.dtype))
    return list(settings)


# --------------------------------------------------------------------------- QLoRA


def _formats(model: nn.Module) -> dict[str, dict[str, object]]:
    layers = qlora_layers(model)
    if not layers:
        raise ValueError("model has no QLoRALinear layers (call quantize_model first)")
    return {
        name: {
            "base": layer.base_layer.fmt.to_json(),
            "bias": layer.base_layer.bias is not None,
            "r": layer.r,
            "alpha": layer.alpha,
            "dropout": layer.dropout_p,
            "rslora": layer.rslora,
        }
        for name, layer in layers.items()
    }


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {"format": "pt", FORMAT_KEY: json.dumps(meta, sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _read_layers(file: Path) -> dict[str, dict[str, object]]:
    """The per-layer formats a QLoRA file records, every field checked (``base`` becomes a
    :class:`BaseFormat`); ``ValueError`` naming the file, the layer and the key otherwise."""
    finish_interrupted_write(file.parent)
    if not file.is_file():
        raise ValueError(f"path: {file} does not exist")
    try:
        with safe_open(str(file), framework="pt") as handle:
            text = (handle.metadata() or {}).get(FORMAT_KEY)
    except Exception as error:  # safetensors raises its own error type for corrupt headers
        raise ValueError(f"{file}: truncated or not a safetensors file ({error})") from None
    if text is None:
        raise ValueError(f"{file} was not written by pedaPEFT (no {FORMAT_KEY} metadata)")
    try:
        layers = json.loads(text)["layers"]
    except (json.JSONDecodeError, TypeError, KeyError) as error:
        raise ValueError(f"{file}: metadata {FORMAT_KEY} needs JSON 'layers' ({error!r})") from None
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"{file}: metadata 'layers' must map layer names to formats")
    checked = {}
    for name, spec in layers.items():
        keys = ("base", "bias", "r", "alpha", "dropout", "rslora")
        if not isinstance(spec, dict) or set(spec) != set(keys):
            raise ValueError(f"{file}: layer {name!r} must have exactly the keys {list(keys)}")
        try:
            base = BaseFormat.from_json(spec["base"])
            LoRAConfig(r=spec["r"], alpha=spec["alpha"], dropout=spec["dropout"],
                       rslora=spec["rslora"])
            check_flag(spec["bias"], "bias")
        except (TypeError, ValueError) as error:
            raise ValueError(f"{file}: layer {name!r}: {error}") from None
        checked[name] = {**spec, "base": base}
    return checked


def _expected(modules: dict[str, nn.Module]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of every tensor of ``modules``' state dicts, under ``<name>.<key>``."""
    return {f"{name}.{key}" if name else key: (tuple(value.shape), value.dtype)
            for name, module in modules.items() for key, value in module.state_dict().items()}


def save_quantized(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the whole quantized model with its adapters to ``path/qlora_model.safetensors``.

    Every tensor of ``model.state_dict()`` is saved (packed codes and scales, not dense
    weights, for the quantized layers; tied tensors once) with each QLoRA layer's format, so
    :func:`load_quantized` can rebuild the layers on a freshly built dense model.

    Introduced in lesson 9, section "8. Merging for inference".
    """
    directory = Path(path)
    formats = _formats(model)
    tensors, seen = {}, {}
    for key, value in model.state_dict().items():
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), value.shape)
        if value.numel() and ident in seen:
            continue  # a tied tensor (e.g. the head sharing the embedding) is stored once
        seen[ident] = key
        tensors[key] = value
    file = directory / QLORA_MODEL_NAME
    _write_safetensors(file, tensors, {"layers": formats})
    return file


def load_quantized(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Rebuild a model saved by :func:`save_quantized` on ``model``, a dense model of the same
    architecture (e.g. a fresh ``gpt.GPT(config)``). In place; returns ``model``.

    All or nothing: every layer's format must fit the model's ``nn.Linear`` of that name (so
    no size from the file is allocated that the model does not have), and every tensor must
    have the rebuilt model's key, shape and dtype and finite values, before the model changes.
    Raises ``ValueError`` naming the file, the layer or the key.
    """
    file = Path(path) / QLORA_MODEL_NAME
    layers = _read_layers(file)
    device = next(iter(model.parameters())).device
    rebuilt = {}
    for name, spec in layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{file}: layer {name!r} does not exist in model") from None
        fmt = spec["base"]
        if type(module) is not nn.Linear:
            raise ValueError(f"{file}: layer {name!r} of the model is a "
                             f"{type(module).__name__}, not the nn.Linear the file quantized")
        if (fmt.out_features, fmt.in_features) != (module.out_features, module.in_features):
            raise ValueError(f"{file}: layer {name!r} is {fmt.out_features} x {fmt.in_features}"
                             f" in the file, {module.out_features} x {module.in_features} in "
                             "the model")
        if spec["bias"] != (module.bias is not None):
            raise ValueError(f"{file}: layer {name!r}: bias={spec['bias']} in the file, "
                             f"{module.bias is not None} in the model")
        base = QuantLinear(fmt, spec["bias"], device=device)
        rebuilt[name] = QLoRALinear(base, spec["r"], spec["alpha"], spec["dropout"],
                                    spec["rslora"])
    inside = tuple(f"{name}." for name in rebuilt)
    rest = {key: (tuple(v.shape), v.dtype) for key, v in model.state_dict().items()
            if not key.startswith(inside)}
    expected = {**rest, **_expected(rebuilt)}
    tied = [key for key in rest if _is_tied(model, key, rest)]
    expected_in_file = {k: v for k, v in expected.items() if k not in tied[1:]}
    state = _read_with_ties(file, expected_in_file, tied)
    for name, layer in rebuilt.items():  # structure and finite scales of every 4-bit base
        layer.load_state_dict({k[len(name) + 1:]: v for k, v in state.items()
                               if k.startswith(f"{name}.")})
        if layer.base_layer.fmt.quant_type != "int8":
            check_state_values(layer.base_layer.quant_state(), f"{file}: layer {name!r}")
    # Everything is checked: now change the model.
    for name, layer in rebuilt.items():
        model.set_submodule(name, layer)
    for param in model.parameters():
        param.requires_grad_(False)
    for layer in qlora_layers(model).values():
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith(inside)},
                          strict=False)
    return model


def _read_with_ties(file: Path, expected: dict, tied: list[str]) -> dict[str, torch.Tensor]:
    """``read_tensors``, accepting any one name of a tied group (safetensors keeps one)."""
    if len(tied) < 2:
        return read_tensors(file, expected)
    try:
        with safe_open(str(file), framework="pt") as handle:
            present = [key for key in tied if key in handle.keys()]
    except Exception as error:
        raise ValueError(f"{file}: truncated or not a safetensors file ({error})") from None
    if len(present) == 1 and present[0] not in expected:
        expected = {**{k: v for k, v in expected.items() if k not in tied},
                    present[0]: expected[tied[0]]}
    return read_tensors(file, expected)


def _is_tied(model: nn.Module, key: str, state: dict[str, torch.Tensor]) -> bool:
    """Whether ``key`` names a tensor that shares storage with one present in ``state``."""
    own = model.state_dict()
    target = own[key]
    return any(
        k in state and v.data_ptr() == target.data_ptr() and v.shape == target.shape
        for k, v in own.items()
        if k != key
    )


def save_qlora_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write only the LoRA tensors (``<name>.lora_A``/``lora_B``) and each base's format."""
    directory = Path(path)
    formats = _formats(model)
    tensors = {}
    for name, layer in qlora_layers(model).items():
        tensors[f"{name}.lora_A"] = layer.lora_A
        tensors[f"{name}.lora_B"] = layer.lora_B
    file = directory / QLORA_ADAPTER_NAME
    _write_safetensors(file, tensors, {"layers": formats})
    return file


def load_qlora_adapter(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load an adapter written by :func:`save_qlora_adapter` into a model already quantized.

    The adapter must have been trained on a base of the same format: a different
    ``quant_type``, blocksize, double quantization or shape raises ``ValueError`` (the LoRA
    update learned the errors of one quantization and does not transfer to another), as do
    layers missing on either side and a different ``r``, α, dropout or rsLoRA (both values are
    named). All or nothing: every tensor is checked (shape, finite) before any is copied.
    """
    file = Path(path) / QLORA_ADAPTER_NAME
    meta = _read_layers(file)
    layers = qlora_layers(model)
    if set(meta) != set(layers):
        raise ValueError(
            f"{file}: adapter layers {sorted(meta)[:6]} do not match the model's QLoRA layers "
            f"{sorted(layers)[:6]}"
        )
    expected = {}
    for name, layer in layers.items():
        saved = meta[name]["base"]
        ours = layer.base_layer.fmt
        for field in ("quant_type", "blocksize", "double_quant", "out_features", "in_features"):
            if getattr(saved, field) != getattr(ours, field):
                raise ValueError(
                    f"{file}: adapter for {name!r} was trained on a base with {field}="
                    f"{getattr(saved, field)!r}, but the model's base has {field}="
                    f"{getattr(ours, field)!r}; quantize the model the same way first"
                )
        for field, ours_value in (("r", layer.r), ("alpha", layer.alpha),
                                  ("dropout", layer.dropout_p), ("rslora", layer.rslora)):
            _check_same(name, field, meta[name][field], ours_value, file)
        expected[f"{name}.lora_A"] = ((layer.r, layer.in_features), None)
        expected[f"{name}.lora_B"] = ((layer.out_features, layer.r), None)
    state = read_tensors(file, expected)
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_A.copy_(state[f"{name}.lora_A"])
            layer.lora_B.copy_(state[f"{name}.lora_B"])
    return list(layers)
