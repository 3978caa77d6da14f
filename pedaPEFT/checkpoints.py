"""Training checkpoints: written atomically, read without running code, checked before use.

A checkpoint holds everything a resume needs (model and optimizer state, the random
generator, the step, the losses so far, the training configuration) plus two things that make
it safe to trust:

* ``model_config`` (for a ``gpt.GPT``): a resume into a model of another shape is refused,
  naming the fields that differ, instead of failing deep inside ``load_state_dict``;
* ``sha256``, a digest of every value in the file: ``torch.load(weights_only=True)`` refuses
  to run code from a file, but a flipped bit in a weight would load silently; the digest
  turns it into a clear error.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from pedaPEFT.files import atomic_write
from pedaPEFT.gpt import GPT

CHECKPOINT_FORMAT = "pedaPEFT-train-checkpoint-v1"


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    result: object,
    config: object,
) -> None:
    """Write everything a resume needs, atomically (temporary file, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": torch.get_rng_state(),
        "train_config": asdict(config),
        "result": asdict(result),
    }
    if isinstance(model, GPT):
        state["model_config"] = model.config.to_dict()
    state["sha256"] = content_digest(state)
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def content_digest(value: object) -> str:
    """SHA-256 of everything in a checkpoint (tensors by dtype, shape and bytes; other values
    by ``repr``), walked in a fixed order; the key ``"sha256"`` itself is left out.

    ``torch.load(weights_only=True)`` refuses code but not changed numbers: a flipped bit in a
    weight loads silently. The digest stored at save time and compared at load catches that.
    """
    digest = hashlib.sha256()

    def walk(item: object) -> None:
        if isinstance(item, torch.Tensor):
            flat = item.detach().cpu().contiguous().reshape(-1)
            digest.update(f"T{item.dtype}{tuple(item.shape)}".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes())
        elif isinstance(item, dict):
            digest.update(b"{")
            for key in sorted(item, key=repr):
                if key != "sha256":
                    digest.update(repr(key).encode())
                    walk(item[key])
            digest.update(b"}")
        elif isinstance(item, list | tuple):
            digest.update(b"[")
            for element in item:
                walk(element)
            digest.update(b"]")
        else:
            digest.update(repr(item).encode())

    walk(value)
    return digest.hexdigest()


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint with ``weights_only=True`` (no code from the file is run) and check
    its recorded SHA-256 (a changed byte is refused, not loaded)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path must name an existing checkpoint file, got {str(path)!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged file can fail anywhere in the unpickler or zip reader
        raise ValueError(
            f"checkpoint {str(path)!r} is truncated or not a torch checkpoint ({e})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"checkpoint {str(path)!r} is not a pedaPEFT training checkpoint "
            f"(expected format {CHECKPOINT_FORMAT!r})"
        )
    if "sha256" in state and state["sha256"] != content_digest(state):
        raise ValueError(
            f"checkpoint {str(path)!r} is corrupted: its content does not match the SHA-256 "
            "recorded when it was saved"
        )
    return state


def check_resumable(state: dict, model: nn.Module, steps: int, checkpoint: str | Path) -> None:
    """Refuse to resume from a checkpoint of another model or another run's length.

    The stored ``model_config`` must equal the model's, the tensor names and shapes must
    match, and the stored step must lie in [0, steps]; ``ValueError`` names what differs.
    """
    where = str(checkpoint)
    stored = state.get("model_config")
    if isinstance(model, GPT) and stored is not None and stored != model.config.to_dict():
        differ = sorted(k for k in set(stored) | set(model.config.to_dict())
                        if stored.get(k) != model.config.to_dict().get(k))
        raise ValueError(
            f"checkpoint {where!r} is of another model: model_config differs in {differ} "
            f"(checkpoint {[stored.get(k) for k in differ]}, "
            f"model {[model.config.to_dict().get(k) for k in differ]})"
        )
    saved = state.get("model")
    if not isinstance(saved, dict):
        raise ValueError(f"checkpoint {where!r}: key 'model' must be a state dict")
    own = model.state_dict()
    wrong = sorted(set(saved) ^ set(own)) + sorted(
        k for k in set(saved) & set(own)
        if not isinstance(saved[k], torch.Tensor) or saved[k].shape != own[k].shape
    )
    if wrong:
        raise ValueError(f"checkpoint {where!r} does not fit the model: tensors {wrong[:5]} "
                         "are missing, extra or of another shape")
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= steps:
        raise ValueError(f"checkpoint {where!r}: key 'step' must be an integer in "
                         f"[0, steps={steps}], got {step!r}")
