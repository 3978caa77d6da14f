"""A small decoder-only GPT, written so that parameter-efficient methods read like their papers.

The block is pre-LayerNorm, as in GPT-2:

    x = x + o(attention(q(LN1(x)), k(LN1(x)), v(LN1(x))))      causal, through SDPA
    x = x + proj(GELU(fc(LN2(x))))

The four attention projections are separate ``nn.Linear`` modules named ``q``, ``k``, ``v`` and
``o``, so a LoRA target list reads like the LoRA paper's W_q, W_k, W_v, W_o; the MLP is ``fc``
(d -> 4d) and ``proj`` (4d -> d). The output head shares its weight with the token embedding
(weight tying), as GPT-2 does; ``untie_head`` gives the head its own copy when a fine-tuning
method must train the head without touching the embedding.

Parameter count (V vocabulary, T context, d width, L layers, every Linear with a bias):

    N = V d + T d                                  token and position embeddings
        + L (4 (d^2 + d)                           q, k, v, o
             + (4 d^2 + 4 d) + (4 d^2 + d)         fc, proj
             + 2 * 2 d)                            two LayerNorms (weight and bias)
        + 2 d                                      final LayerNorm
        + [V d if the head is untied]
      = V d + T d + L (12 d^2 + 13 d) + 2 d (+ V d)

For the ``gpt2`` preset (V = 50257, T = 1024, d = 768, L = 12, tied) this is 124,439,808,
GPT-2 small's published count.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

PRESETS: dict[str, dict[str, int | float]] = {
    # The course's workhorse: pretrains and fine-tunes on a 2-core CPU in about a minute.
    "tiny": dict(vocab_size=48, block_size=16, n_layer=4, n_head=4, n_embd=64),
    # A wider and deeper character model for experiments that want more capacity.
    "small": dict(vocab_size=48, block_size=64, n_layer=6, n_head=8, n_embd=256),
    # Real text: Python's documentation in a 2048-token BPE (pedaPEFT.corpus), 2.2M parameters.
    "pydocs": dict(vocab_size=2048, block_size=256, n_layer=4, n_head=6, n_embd=192,
                   dropout=0.1),
    # GPT-2 small: 124M parameters with the output head tied to the token embedding.
    "gpt2": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
}


ALL_LINEAR = ("q", "k", "v", "o", "fc", "proj")
"""Names of every ``nn.Linear`` in a block: attention ``q, k, v, o``, MLP ``fc, proj``."""

ADAPTER_TARGETS = ("o", "proj")
"""Where Houlsby adapters go: after the attention output projection ``o`` and after the MLP
output projection ``proj`` of every block."""


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a GPT. ``dropout`` is applied to attention weights and residual branches.

    Introduced in lesson 3, section "1. The workbench: a tiny GPT and synthetic tasks";
    used again in lessons 5 and 10.
    """

    vocab_size: int = 48
    block_size: int = 16
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.0
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"n_embd must be divisible by n_head, got n_embd={self.n_embd}, "
                f"n_head={self.n_head}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    @classmethod
    def preset(cls, name: str, **overrides: object) -> GPTConfig:
        """The configuration named ``name`` (one of ``PRESETS``), with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(
                f"unknown GPTConfig fields {sorted(unknown)}; allowed: {sorted(known)}"
            )
        return cls(**values)


def parameter_count(config: GPTConfig) -> int:
    """Analytic parameter count, V d + T d + L (12 d^2 + 13 d) + 2 d (+ V d if untied).

    Introduced in lesson 3, section "1. The workbench: a tiny GPT and synthetic tasks";
    used again in lesson 9.
    """
    V, T, L, d = config.vocab_size, config.block_size, config.n_layer, config.n_embd
    n = V * d + T * d + L * (12 * d * d + 13 * d) + 2 * d
    return n if config.tie_embeddings else n + V * d


def matmul_parameters(config: GPTConfig) -> int:
    """Weights that take part in a matrix product per token: L 12 d^2 plus the head's V d.

    This is the N of the usual 6 N FLOPs-per-token training estimate (position embeddings,
    biases and LayerNorms are left out; the head counts once even when tied).
    """
    d = config.n_embd
    return config.n_layer * 12 * d * d + config.vocab_size * d


def flops_per_token(config: GPTConfig, seq_len: int | None = None) -> int:
    """Training FLOPs per token: 6 N for the weight matmuls plus 12 L T d for attention.

    Forward is 2 N (one multiply-add per weight), backward twice that; attention scores and
    their weighted sum cost 2 * 2 T d per layer and token forward, times three with backward.
    """
    T = config.block_size if seq_len is None else seq_len
    return 6 * matmul_parameters(config) + 12 * config.n_layer * T * config.n_embd


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with separate q, k, v, o projections."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        d = config.n_embd
        self.n_head = config.n_head
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        h = self.n_head

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, h, d // h).transpose(1, 2)  # (B, h, T, d/h)

        y = F.scaled_dot_product_attention(
            heads(self.q(x)),
            heads(self.k(x)),
            heads(self.v(x)),
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=True,
        )
        y = y.transpose(1, 2).contiguous().view(B, T, d)
        return self.resid_dropout(self.o(y))


class MLP(nn.Module):
    """Position-wise feed-forward network d -> 4d -> d with GELU (tanh approximation, as GPT-2)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only transformer language model.

    ``forward(idx)`` maps token ids of shape (B, T), T <= block_size, to logits (B, T, V).
    ``features(idx)`` returns the final normalised hidden states (B, T, d) the head reads.

    ``gradient_checkpointing`` (default False; set it, or call
    ``gradient_checkpointing_enable()``): when gradients are being recorded, each block keeps
    only its input for the backward pass and runs its forward again there
    (``torch.utils.checkpoint``, non-reentrant, random state restored so dropout repeats).
    Saved activations fall from L blocks' worth (16 d + h + 4 floats per token each) to L
    block inputs (d floats per token each), at the price of a second forward of every block.

    Introduced in lesson 3, section "1. The workbench: a tiny GPT and synthetic tasks";
    used again in lessons 4 and 5 and 10.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.gradient_checkpointing = False
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 L) so the residual stream keeps its size.
        for name, p in self.named_parameters():
            if name.endswith(("attn.o.weight", "mlp.proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def features(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (batch, time), got {tuple(idx.shape)}")
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(
                f"sequence length {T} exceeds the context: idx.shape[1] must be <= "
                f"block_size={self.config.block_size}"
            )
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        return self.ln_f(x)

    def gradient_checkpointing_enable(self, enabled: bool = True) -> None:
        """Turn gradient checkpointing on (or off with ``enabled=False``).

        Introduced in lesson 10, section "8. Activations, and gradient checkpointing".
        """
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be True or False, got {enabled!r}")
        self.gradient_checkpointing = enabled

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.features(idx))

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Append ``max_new_tokens`` tokens: the arg-max (``temperature`` 0, greedy) or a draw
        from softmax(logits / temperature) using ``generator``."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if not temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        if idx.shape[1] + max_new_tokens > self.config.block_size:
            raise ValueError(
                f"prompt length {idx.shape[1]} + max_new_tokens {max_new_tokens} exceeds "
                f"block_size={self.config.block_size}"
            )
        for _ in range(max_new_tokens):
            logits = self(idx)[:, -1].float()
            if temperature == 0.0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                next_id = torch.multinomial(probs.cpu(), 1, generator=generator).to(idx.device)
            idx = torch.cat([idx, next_id], dim=1)
        return idx


def untie_head(model: GPT) -> None:
    """Give the output head its own trainable copy of the (tied) embedding matrix, in place.

    Introduced in lesson 3, section "2. Three methods, three sets of trainable parameters".
    """
    if model.lm_head.weight is model.wte.weight:
        model.lm_head.weight = nn.Parameter(model.wte.weight.detach().clone())


STORED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Weights a base may be stored in (``save_pretrained(dtype=...)``); loading casts to float32."""
PRETRAINED_DIR = Path(str(resources.files("pedaPEFT") / "weights"))


def pretrained_paths(preset: str, directory: str | Path = PRETRAINED_DIR) -> tuple[Path, Path]:
    """Paths of a saved base: ``<preset>.safetensors`` (weights), ``<preset>.json`` (recipe)."""
    directory = Path(directory)
    return directory / f"{preset}.safetensors", directory / f"{preset}.json"


def load_pretrained(preset: str = "tiny", directory: str | Path = PRETRAINED_DIR) -> GPT:
    """The pretrained base ``preset`` saved in ``directory`` (default: the shipped bases).

    Loads in well under a second, with no download; ``pretrained_info`` returns the recipe
    and the metrics measured when the file was made. The weights must be exactly the tensors
    of the recorded ``model_config`` (names, shapes, float32, finite); anything else raises
    ``ValueError`` naming the file and the tensor.

    Introduced in lesson 3, section "1. The workbench: a tiny GPT and synthetic tasks";
    used again in lessons 4 and 9.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from pedaPEFT.files import finish_interrupted_write

    weights, _ = pretrained_paths(preset, directory)
    finish_interrupted_write(weights.parent)
    if not weights.exists():
        saved = sorted(p.stem for p in Path(directory).glob("*.safetensors"))
        where = "shipped bases" if Path(directory) == PRETRAINED_DIR else f"bases in {directory}"
        raise ValueError(f"preset must be one of the {where} {saved}, got {preset!r}")
    info = pretrained_info(preset, directory)
    model = GPT(_config_from_info(info, weights.with_suffix(".json")))
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{str(weights)!r} is truncated or not a safetensors file ({error})"
                         ) from None
    expected = model.state_dict()
    tied = ("wte.weight", "lm_head.weight")
    if model.config.tie_embeddings and sum(name in tensors for name in tied) == 1:
        shared = tensors.get("wte.weight", tensors.get("lm_head.weight"))
        tensors = {**tensors, "wte.weight": shared, "lm_head.weight": shared}
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"{str(weights)!r} does not hold the tensors of its model_config: "
                         f"missing {missing[:4]}, unexpected {extra[:4]}")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape or tensor.dtype not in STORED_DTYPES:
            raise ValueError(
                f"{str(weights)!r}: tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, "
                f"model_config needs {tuple(expected[name].shape)} in float32, bfloat16 or "
                "float16"
            )
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{str(weights)!r}: tensor {name!r} holds NaN or inf")
    model.load_state_dict(tensors)
    return model.eval()


def _config_from_info(info: dict, meta: Path) -> GPTConfig:
    values = info.get("model_config")
    if not isinstance(values, dict):
        raise ValueError(f"{str(meta)!r}: key 'model_config' must be an object of GPTConfig "
                         f"fields, got {values!r}")
    try:
        return GPTConfig.from_dict(values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{str(meta)!r}: key 'model_config': {error}") from None


def save_pretrained(model: GPT, info: dict, directory: str | Path, name: str = "tiny",
                    dtype: torch.dtype | None = None) -> tuple[Path, Path]:
    """Write ``<name>.safetensors`` and ``<name>.json`` into ``directory`` as one atomic change
    (``files.write_files_atomically``: an interrupted save leaves the old pair or the new);
    the weights are stored in ``dtype`` (default: the model's own)."""
    import copy

    from safetensors.torch import save_model

    from pedaPEFT.files import write_files_atomically

    if dtype is not None:
        model = copy.deepcopy(model).to(dtype)
    weights, meta = pretrained_paths(name, directory)
    info = {**info, "model_config": model.config.to_dict()}
    text = json.dumps(info, indent=1, sort_keys=True) + "\n"
    write_files_atomically({
        weights: lambda tmp: save_model(model, tmp),
        meta: lambda tmp: Path(tmp).write_text(text),
    })
    return weights, meta


def pretrained_info(preset: str = "tiny", directory: str | Path = PRETRAINED_DIR) -> dict:
    """Recipe and metrics recorded next to a saved base.

    Introduced in lesson 3, section "1. The workbench: a tiny GPT and synthetic tasks";
    used again in lesson 9.
    """
    _, meta = pretrained_paths(preset, directory)
    if not meta.exists():
        raise ValueError(f"no saved base for preset {preset!r} in {str(directory)!r}")
    try:
        info = json.loads(meta.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{str(meta)!r} is not valid JSON ({error})") from None
    if not isinstance(info, dict):
        raise ValueError(f"{str(meta)!r} must hold a JSON object, got {type(info).__name__}")
    return info


def linear_weights(preset: str = "tiny") -> list[torch.Tensor]:
    """The weight matrices of every ``ALL_LINEAR`` layer of a shipped pretrained GPT.

    Introduced in lesson 7, section "4. NF4 vs FP4 vs int4: normal data and trained weights".
    """
    model = load_pretrained(preset)
    return [module.weight.detach() for name, module in model.named_modules()
            if name.split(".")[-1] in ALL_LINEAR]
