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
from safetensors.torch import load_file, save_file
from torch import nn

from pedaPEFT.files import atomic_write, atomic_write_text
from pedaPEFT.lora import LoRAConfig, LoRALinear, apply_lora, lora_layers
from pedaPEFT.qlora import BaseFormat, QLoRALinear, QuantLinear, qlora_layers
from pedaPEFT.targets import name_matches

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
    """Write ``path/adapter_model.safetensors`` and ``path/adapter_config.json`` atomically.

    Only the LoRA tensors are saved (``r·(in+out)`` numbers per layer), under PEFT's key names,
    so PEFT's ``PeftModel.from_pretrained`` can load them into the same base model.
    ``target_modules`` lists the full module names, which match exactly under PEFT's rule.
    """
    directory = Path(path)
    config = adapter_config_dict(model)
    state = adapter_state_dict(model)
    atomic_write(
        directory / ADAPTER_WEIGHTS_NAME,
        lambda tmp: save_file(state, tmp, metadata={"format": "pt"}),
    )
    atomic_write_text(directory / ADAPTER_CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True))


def _config_from_json(config: dict[str, object], path: Path) -> tuple[LoRAConfig, dict, dict]:
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"path: {path} holds a {config.get('peft_type')} adapter, not LORA")
    unsupported = {
        "use_dora": False,
        "fan_in_fan_out": False,
        "bias": "none",
    }
    for key, allowed in unsupported.items():
        if config.get(key, allowed) != allowed:
            raise ValueError(f"path: {key}={config[key]!r} is not supported (only {allowed!r})")
    targets = config.get("target_modules")
    if isinstance(targets, str) or not targets:
        raise ValueError(f"path: target_modules must be a list of names in {path}, got {targets!r}")
    lora_config = LoRAConfig(
        r=config["r"],
        alpha=config["lora_alpha"],
        dropout=config.get("lora_dropout", 0.0),
        target_modules=tuple(targets),
        rslora=bool(config.get("use_rslora", False)),
    )
    return lora_config, config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}


def _pattern_value(name: str, pattern: dict, default: object) -> object:
    """PEFT's pattern lookup: a key matches a module if it equals or dotted-suffixes its name."""
    for key, value in pattern.items():
        if name_matches(name, (key,)):
            return value
    return default


def load_lora_adapter(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load an adapter saved by :func:`save_lora_adapter` (or by PEFT) into ``model``, in place.

    A model without LoRA layers gets them first, built from ``adapter_config.json`` (targets,
    ``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``, ``rank_pattern``,
    ``alpha_pattern``).  The tensors must match the LoRA layers exactly: missing keys, extra keys
    and wrong shapes raise ``ValueError`` naming them.  Returns the LoRA module names.
    """
    directory = Path(path)
    weights_file = directory / ADAPTER_WEIGHTS_NAME
    config_file = directory / ADAPTER_CONFIG_NAME
    for needed in (weights_file, config_file):
        if not needed.is_file():
            raise ValueError(f"path: {directory} has no {needed.name}")
    if not lora_layers(model):
        config, rank_pattern, alpha_pattern = _config_from_json(
            json.loads(config_file.read_text()), directory
        )
        apply_lora(model, config)
        for name, layer in lora_layers(model).items():
            r = _pattern_value(name, rank_pattern, config.r)
            alpha = _pattern_value(name, alpha_pattern, config.alpha)
            if (r, alpha) != (config.r, config.alpha):
                model.set_submodule(
                    name, LoRALinear(layer.base_layer, r, alpha, config.dropout, config.rslora)
                )
    layers = lora_layers(model)
    if any(layer.merged for layer in layers.values()):
        raise ValueError("model: cannot load an adapter into merged LoRA layers (unmerge first)")
    loaded = load_file(str(weights_file))
    expected = {}
    for name, layer in layers.items():
        expected[f"{KEY_PREFIX}{name}.lora_A.weight"] = layer.lora_A
        expected[f"{KEY_PREFIX}{name}.lora_B.weight"] = layer.lora_B
    missing = sorted(set(expected) - set(loaded))
    extra = sorted(set(loaded) - set(expected))
    if missing or extra:
        raise ValueError(
            f"path: adapter keys do not match the model; missing keys: {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}; unexpected keys: {extra[:8]}"
            f"{' ...' if len(extra) > 8 else ''}"
        )
    wrong = [
        f"{key}: file {tuple(loaded[key].shape)} vs model {tuple(param.shape)}"
        for key, param in expected.items()
        if loaded[key].shape != param.shape
    ]
    if wrong:
        raise ValueError("path: adapter tensors have the wrong shape: " + "; ".join(wrong))
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(loaded[key].to(device=param.device, dtype=param.dtype))
    return list(layers)


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


def _read_meta(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"path: {path} does not exist")
    with safe_open(str(path), framework="pt") as f:
        meta = (f.metadata() or {}).get(FORMAT_KEY)
    if meta is None:
        raise ValueError(f"path: {path} was not written by pedaPEFT.qlora (no {FORMAT_KEY} entry)")
    return json.loads(meta)


def save_quantized(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the whole quantized model with its adapters to ``path/qlora_model.safetensors``.

    Every tensor of ``model.state_dict()`` is saved (packed codes and scales, not dense
    weights, for the quantized layers; tied tensors once) with each QLoRA layer's format, so
    :func:`load_quantized` can rebuild the layers on a freshly built dense model.
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

    Raises ``ValueError`` when the file's layers do not exist in ``model`` or its tensors do
    not match the rebuilt model (missing or unexpected keys, wrong shapes).
    """
    file = Path(path) / QLORA_MODEL_NAME
    meta = _read_meta(file)
    device = next(iter(model.parameters())).device
    for name, spec in meta["layers"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"path: layer {name!r} of {file} does not exist in model") from None
        if type(module) is not nn.Linear:
            raise ValueError(f"path: layer {name!r} of the model is a {type(module).__name__}, "
                             "not the nn.Linear the file quantized")
        base = QuantLinear(BaseFormat.from_json(spec["base"]), spec["bias"], device=device)
        model.set_submodule(
            name, QLoRALinear(base, spec["r"], spec["alpha"], spec["dropout"], spec["rslora"])
        )
    for param in model.parameters():
        param.requires_grad_(False)
    for layer in qlora_layers(model).values():
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    state = load_file(str(file), device=str(device))
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not _is_tied(model, k, state)]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f"path: {file} does not match the model; missing keys: {missing[:6]}; "
            f"unexpected keys: {unexpected[:6]}; wrong shapes: {wrong[:6]}"
        )
    model.load_state_dict(state, strict=False)
    return model


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
    layers missing on either side and a different ``r``.
    """
    file = Path(path) / QLORA_ADAPTER_NAME
    meta = _read_meta(file)["layers"]
    layers = qlora_layers(model)
    if set(meta) != set(layers):
        raise ValueError(
            f"path: adapter layers {sorted(meta)[:6]} do not match the model's QLoRA layers "
            f"{sorted(layers)[:6]}"
        )
    for name, layer in layers.items():
        saved = BaseFormat.from_json(meta[name]["base"])
        ours = layer.base_layer.fmt
        for field in ("quant_type", "blocksize", "double_quant", "out_features", "in_features"):
            if getattr(saved, field) != getattr(ours, field):
                raise ValueError(
                    f"path: adapter for {name!r} was trained on a base with {field}="
                    f"{getattr(saved, field)!r}, but the model's base has {field}="
                    f"{getattr(ours, field)!r}; quantize the model the same way first"
                )
        if meta[name]["r"] != layer.r:
            raise ValueError(
                f"path: adapter for {name!r} has r={meta[name]['r']}, the model's has r={layer.r}"
            )
    state = load_file(str(file))
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_A.copy_(state[f"{name}.lora_A"])
            layer.lora_B.copy_(state[f"{name}.lora_B"])
    return list(layers)
