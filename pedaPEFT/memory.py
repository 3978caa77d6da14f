"""Fine-tuning memory accounting: weights, gradients, optimizer states, activations.

For N parameters of which P train, the static memory of a training step is

    weights    = (N - P) b_frozen + P b_weight
    gradients  = P b_grad
    optimizer  = P (b_state + b_master) + 4 n_tensors

with bytes per parameter b set by the precision and the optimizer:

    precision  b_weight  b_grad  b_master   note
    "fp32"        4        4        0       plain float32 training
    "amp"         4        4        0       torch.autocast: float32 weights, 16-bit compute
    "mixed"       2        2        4       16-bit weights and gradients, float32 master copy
                                            (the ZeRO paper's accounting)
    "bf16-fp32-moments"
                  2        2        0       16-bit weights and gradients, float32 Adam
                                            moments, no master copy (QLoRA's adapters)
    "bf16"        2        2        0       pure 16-bit training

    optimizer        b_state
    "adamw"           2 b_s       two moments, in float32 (b_s = 4) or, for "bf16", in bf16
    "adamw8bit"       2 + 8/256   two 8-bit moments and a float32 absmax per 256-block each
                                  (bitsandbytes' blockwise 8-bit Adam)
    "sgd"             0

``n_tensors`` adds PyTorch's per-tensor step counter (a float32 scalar per trainable tensor).
Frozen weights cost b_frozen: the precision's b_weight for full/LoRA, and ``base_bits / 8``
for QLoRA (4-bit NF4 with double quantization stores 4.127 bits per parameter).

Full fine-tuning with mixed precision and AdamW is the familiar 2 + 2 + (4 + 4 + 4) = 16 bytes
per parameter; with 8-bit AdamW it is 2 + 2 + (4 + 2.03) = 10.03.

``CONVENTIONS`` names the regimes the course quotes (16 bytes for full fine-tuning, 12 for a
LoRA/QLoRA adapter parameter, ...) and ``GB`` is the one unit every size is printed in;
``conventions_table`` prints both, for lesson 3 and the README.

Activations are what autograd keeps for the backward pass; ``gpt_activation_bytes`` counts
them for ``pedaPEFT.gpt.GPT`` and ``saved_tensor_bytes`` measures them.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

GB = 10**9  # the course's unit: every memory size is stated in GB (decimal gigabytes)
GiB = 2**30  # only for GPU cards, whose marketed "GB" are GiB (see gpu_card_bytes)

PRECISIONS = {  # b_weight, b_grad, b_master, bytes per optimizer moment
    "fp32": (4, 4, 0, 4),
    "amp": (4, 4, 0, 4),
    "mixed": (2, 2, 4, 4),
    "bf16-fp32-moments": (2, 2, 0, 4),
    "bf16": (2, 2, 0, 2),
}
OPTIMIZERS = ("adamw", "adamw8bit", "sgd")
METHODS = ("full", "lora", "qlora")
ADAM8BIT_BLOCK = 256  # bitsandbytes' block size for 8-bit optimizer states
ADAM8BIT_MIN_SIZE = 4096  # smaller tensors keep 32-bit states in bitsandbytes


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes by component."""

    weights: float
    gradients: float
    optimizer: float
    activations: float = 0.0

    @property
    def static(self) -> float:
        """Weights + gradients + optimizer states: what does not depend on the batch."""
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> float:
        return self.static + self.activations

    def as_dict(self) -> dict[str, float]:
        return {
            "weights": self.weights,
            "gradients": self.gradients,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "total": self.total,
        }


def optimizer_state_bytes(optimizer: str, precision: str = "fp32") -> float:
    """Bytes of optimizer state per trainable parameter (without a master copy).

    Introduced in lesson 9, section "7. The lecture's LLaMA-3-8B arithmetic, recomputed".
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    _check_precision(precision)
    if optimizer == "adamw":
        return 2 * PRECISIONS[precision][3]
    if optimizer == "adamw8bit":
        return 2 + 2 * 4 / ADAM8BIT_BLOCK
    return 0.0


def _check_count(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")


def finetune_memory(
    n_params: int,
    method: str = "full",
    *,
    precision: str = "fp32",
    optimizer: str = "adamw",
    trainable: int | None = None,
    base_bits: float = 4.127,
    quantized: int | None = None,
    n_tensors: int = 0,
    activations: float = 0.0,
) -> MemoryBreakdown:
    """Memory of fine-tuning a model of ``n_params`` parameters, in bytes, by component.

    ``method``: ``"full"`` trains every parameter; ``"lora"`` and ``"qlora"`` train
    ``trainable`` extra parameters (the adapters) on a frozen base of ``n_params``, stored at
    the precision's weight size (LoRA) or at ``base_bits`` bits per parameter (QLoRA).
    ``quantized`` (QLoRA): how many of the base's parameters are quantized (default: all);
    QLoRA quantizes the Linear weights only, and the rest (embeddings, norms, biases, an
    untied head) keeps the precision's weight size.
    ``n_tensors`` is the number of trainable tensors (each costs a 4-byte step counter in
    PyTorch's AdamW); ``activations`` is passed through (see ``gpt_activation_bytes``).

    Introduced in lesson 3, section "4. What full fine-tuning costs: bytes per parameter";
    used again in lesson 9.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    _check_precision(precision)
    _check_count(n_params, "n_params")
    _check_count(n_tensors, "n_tensors")
    if trainable is not None:
        _check_count(trainable, "trainable")
    if isinstance(activations, bool) or not isinstance(activations, int | float) or not (
        math.isfinite(activations) and activations >= 0
    ):
        raise ValueError(f"activations must be a finite number of bytes >= 0, got {activations!r}")
    b_weight, b_grad, b_master, _ = PRECISIONS[precision]
    state = optimizer_state_bytes(optimizer, precision)
    counter = 4 * n_tensors if optimizer == "adamw" else 0
    if method == "full":
        if trainable is not None and trainable != n_params:
            raise ValueError("trainable must be None (or n_params) for method='full'")
        return MemoryBreakdown(
            weights=n_params * b_weight,
            gradients=n_params * b_grad,
            optimizer=n_params * (state + b_master) + counter,
            activations=activations,
        )
    if trainable is None:
        raise ValueError(f"trainable must be a non-negative integer for method={method!r}")
    if method == "qlora" and not 0 < base_bits <= 32:
        raise ValueError(f"base_bits must be in (0, 32], got {base_bits!r}")
    if method == "qlora":
        quantized = n_params if quantized is None else quantized
        if not isinstance(quantized, int) or not 0 <= quantized <= n_params:
            raise ValueError(f"quantized must be an integer in [0, n_params], got {quantized!r}")
        frozen = quantized * base_bits / 8 + (n_params - quantized) * b_weight
    else:
        frozen = n_params * b_weight
    return MemoryBreakdown(
        weights=frozen + trainable * b_weight,
        gradients=trainable * b_grad,
        optimizer=trainable * (state + b_master) + counter,
        activations=activations,
    )


def bytes_per_parameter(**kwargs: object) -> dict[str, float]:
    """``finetune_memory`` of one parameter, component by component (full fine-tuning).

    Introduced in lesson 3, section "4. What full fine-tuning costs: bytes per parameter".
    """
    return finetune_memory(1, "full", **kwargs).as_dict()


# --------------------------------------------------------------------------- conventions


@dataclass(frozen=True)
class Convention:
    """One fine-tuning regime as the course counts it: the arguments of ``finetune_memory``
    (``method``, ``precision``, ``optimizer``) and, in words, what a trained parameter keeps.

    Introduced in lesson 3, section "The course's memory conventions".
    """

    method: str
    precision: str
    optimizer: str
    stores: str

    def memory(self, n_params: int, trainable: int | None = None,
               quantized: int | None = None) -> MemoryBreakdown:
        """``finetune_memory`` of ``n_params`` base parameters under this regime.

        For LoRA and QLoRA, ``trainable`` adapter parameters train on the frozen base;
        ``quantized`` (QLoRA) is how many base parameters are in NF4 (default: all).
        """
        extra = {} if self.method == "full" else {"trainable": trainable}
        if self.method == "qlora":
            extra["quantized"] = quantized
        return finetune_memory(n_params, self.method, precision=self.precision,
                               optimizer=self.optimizer, **extra)

    def bytes_per_trainable(self) -> float:
        """Bytes of one trainable parameter: weight + gradient + master copy + moments."""
        if self.method == "full":
            return self.memory(1).static
        return self.memory(0, trainable=1).static

    def bytes_per_frozen(self) -> float:
        """Bytes of one frozen base parameter (a quantized one, for QLoRA); 0 for full."""
        return 0.0 if self.method == "full" else self.memory(1, 0).static


CONVENTIONS = {
    "full": Convention("full", "mixed", "adamw",
                       "bf16 weight and gradient, fp32 master copy, two fp32 Adam moments"),
    "full, no master copy": Convention(
        "full", "bf16-fp32-moments", "adamw",
        "bf16 weight and gradient, two fp32 Adam moments (the QLoRA paper's '>780 GB')"),
    "full, 8-bit Adam": Convention("full", "mixed", "adamw8bit",
                                   "bf16 weight and gradient, fp32 master copy, 8-bit moments"),
    "full, pure bf16": Convention("full", "bf16", "adamw",
                                  "bf16 weight, gradient and Adam moments"),
    "lora": Convention("lora", "bf16-fp32-moments", "adamw",
                       "frozen bf16 base; bf16 adapter and gradient, two fp32 Adam moments"),
    "qlora": Convention("qlora", "bf16-fp32-moments", "adamw",
                        "frozen NF4 + DQ base (4.127 bits); adapter as for LoRA"),
}


def gpu_card_bytes(marketed_gb: int) -> int:
    """Bytes of a GPU card sold as ``marketed_gb`` "GB": its memory comes in powers of two,
    so the marketed number counts GiB (a "24 GB" card holds 24 x 2^30 bytes = 25.77 GB).

    Introduced in lesson 3, section "The course's memory conventions".
    """
    _check_count(marketed_gb, "marketed_gb")
    return marketed_gb * GiB


def conventions_table(markdown: bool = False) -> str:
    """The course's memory conventions: bytes per parameter of each regime, and the unit.

    Plain text for a lesson, or (``markdown=True``) the table the README shows.

    Introduced in lesson 3, section "The course's memory conventions".
    """
    header = ("regime", "frozen B/param", "trained B/param", "what each trained parameter keeps")
    rows = [(name, "-" if c.method == "full" else f"{c.bytes_per_frozen():.3g}",
             f"{c.bytes_per_trainable():.4g}", c.stores) for name, c in CONVENTIONS.items()]
    unit = (f"Sizes are in GB = 10^9 bytes. A GPU card sold as \"N GB\" holds N GiB "
            f"(2^30 bytes): a \"24 GB\" card is {gpu_card_bytes(24) / GB:.2f} GB. QLoRA's "
            f"frozen bytes are for the quantized Linear weights; embeddings, norms and head "
            f"stay bf16 (2 bytes).")
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|---|---:|---:|---|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines) + "\n\n" + unit
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
    lines = [f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]}"
             for row in [header, *rows]]
    return "\n".join(lines) + "\n" + textwrap.fill(unit, 96)


# --------------------------------------------------------------------------- activations


def gpt_activation_bytes(config, batch_size: int, seq_len: int | None = None,
                         precision: str = "fp32", checkpointing: bool = False) -> int:
    """Bytes autograd keeps between forward and backward for one training step of ``gpt.GPT``.

    n = batch_size x seq_len tokens, width d, h heads, L layers, vocabulary V. In float32
    every layer keeps, per token, 16 d + h + 4 floats:

        LayerNorm 1 input, and its output (shared by q, k, v)       2 d
        attention q, k, v and output (SDPA; o reads the output)    4 d
        LayerNorm 2 input, and its output (read by fc)              2 d
        fc output (GELU input), GELU output (proj input)            4 d + 4 d
        attention log-sum-exp, two LayerNorms' mean and 1/std       h + 4

    the final LayerNorm keeps 2 d + 2, the loss the float32 log-softmax (V per token). Under
    bf16 autocast ("amp") the LayerNorm inputs and statistics stay float32 (2 d + h + 4);
    the LayerNorm outputs are not kept, but q, k, v and fc each keep their own 16-bit cast of
    their input (3 d + d), and the other 12 d are 16-bit too; the head keeps a 16-bit copy of
    its input; every matrix weight is cast once to 16-bit (2 bytes per matmul parameter).
    Token and position indices, the targets and the loss's divisor add 8 n + 8 T + 8 n + 4.

    With ``checkpointing`` (``GPT.gradient_checkpointing``, float32 only) a layer keeps just its
    input, d floats per token, instead of 16 d + h + 4; backward recomputes one block at a
    time, so its 16 d + h + 4 come back for one layer while that layer's gradient is computed.

    Exact for the eager CPU run (tested with ``saved_tensor_bytes``); on a GPU the same
    tensors are kept, and the allocator's rounding and workspaces come on top.

    Introduced in lesson 3, section "Checking the accounting against real tensors";
    used again in lesson 10.
    """
    T = config.block_size if seq_len is None else seq_len
    for name, value in (("batch_size", batch_size), ("seq_len", T)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    n = batch_size * T
    d, h, L, V = config.n_embd, config.n_head, config.n_layer, config.vocab_size
    indices = 8 * n + 8 * T + 8 * n + 4
    if checkpointing and precision != "fp32":
        raise ValueError(f"checkpointing is counted for precision 'fp32' only, got {precision!r}")
    if precision == "fp32":
        per_layer = d if checkpointing else 16 * d + h + 4
        per_token = L * 4 * per_layer + 4 * (2 * d + 2 + V)
        return n * per_token + indices
    if precision == "amp":
        per_layer = 4 * (2 * d + h + 4) + 2 * (3 * d + 4 * d + d + 4 * d + 4 * d)
        per_token = L * per_layer + 4 * (d + 2 + V) + 2 * d
        weight_copies = 2 * (L * 12 * d * d + V * d)
        return n * per_token + weight_copies + indices
    raise ValueError(f"precision must be 'fp32' or 'amp', got {precision!r}")


def gpt_step_peak_bytes(config, batch_size: int, seq_len: int | None = None,
                        precision: str = "amp", optimizer: str = "adamw") -> dict[str, int]:
    """Predicted peak memory of one full fine-tuning step of ``gpt.GPT`` (eager, no compile).

    With gradients set to None between steps, the peak comes at the start of the backward
    pass: weights and optimizer states, every saved activation, and two float32 (n, V)
    gradients at once — of the log-probabilities and of the logits, 8 n V bytes — while the
    weight gradients are not yet allocated. This assumes the step drops its reference to the
    16-bit logits once the loss is computed (backward does not need them); a caller that keeps
    them adds 2 n V. (The forward pass peaks lower, at 4 n V extra:
    the float32 logits and their log-softmax; the end of backward holds all 4 N bytes of
    gradients but few activations.) Precision ``"fp32"`` or ``"amp"``: float32 weights and
    AdamW states either way.
    """
    from pedaPEFT.gpt import parameter_count

    T = config.block_size if seq_len is None else seq_len
    n_params = parameter_count(config)
    # Parameter tensors: wte, wpe, (lm_head if untied), 16 per block (6 Linear weights and
    # biases, 2 LayerNorms with two each), the final LayerNorm's two.
    n_tensors = 2 + (0 if config.tie_embeddings else 1) + 16 * config.n_layer + 2
    static = finetune_memory(n_params, precision="fp32", optimizer=optimizer,
                             n_tensors=n_tensors)
    activations = gpt_activation_bytes(config, batch_size, T, precision)
    logits_grads = 8 * batch_size * T * config.vocab_size
    parts = {
        "weights": int(static.weights),
        "optimizer": int(static.optimizer),
        "activations": activations,
        "logits_gradients": logits_grads,
    }
    parts["total"] = sum(parts.values())
    return parts


def saved_tensor_bytes(step: Callable[[], torch.Tensor], model: nn.Module) -> int:
    """Measure the bytes autograd saves during ``step()`` (a forward that returns the loss).

    Each saved tensor is counted once per storage; the model's parameters (and their
    16-bit copies' parents) are excluded, so the result is the activation memory. Under
    gradient checkpointing it counts what the checkpoints keep (each block's input), not what
    they recompute.

    Introduced in lesson 10, section "8. Activations, and gradient checkpointing".
    """
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in param_storages:
            seen[key] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    del loss
    return sum(seen.values())


# --------------------------------------------------------------------------- measurement


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (shared storage counted once)."""
    storages = {}
    for t in tensors:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def measured_static_memory(model: nn.Module, optimizer: torch.optim.Optimizer) -> MemoryBreakdown:
    """Real bytes of a model's weights, its gradients and the optimizer's state tensors.

    Introduced in lesson 3, section "Checking the accounting against real tensors".
    """
    params = list(model.parameters())
    states = [v for state in optimizer.state.values() for v in state.values()
              if isinstance(v, torch.Tensor)]
    return MemoryBreakdown(
        weights=tensor_bytes(params),
        gradients=tensor_bytes(p.grad for p in params if p.grad is not None),
        optimizer=tensor_bytes(states),
    )


# --------------------------------------------------------------------------- LLaMA-3-8B


def llama_parameter_count(vocab: int, d: int, n_layer: int, n_head: int, n_kv_head: int,
                          ffn: int, tied: bool = False) -> int:
    """Parameters of a LLaMA-style decoder (no biases, RMSNorm, SwiGLU, grouped-query attention).

    Per layer: q and o are d x d, k and v are d x (d n_kv_head / n_head), the SwiGLU MLP has
    three d x ffn matrices, two RMSNorm gains of d. Plus the embedding (V d), a final norm
    (d) and, unless tied, the output head (V d).

    Introduced in lesson 3, section "5. The lecture's LLaMA-3-8B arithmetic, recomputed";
    used again in lesson 9.
    """
    kv = d * n_kv_head // n_head
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * ffn + 2 * d
    return vocab * d * (1 if tied else 2) + n_layer * per_layer + d


# Meta's published configuration of Llama-3-8B (config.json of meta-llama/Meta-Llama-3-8B).
LLAMA3_8B = dict(vocab=128_256, d=4096, n_layer=32, n_head=32, n_kv_head=8, ffn=14_336)
