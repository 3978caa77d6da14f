"""What LoRA learns (lesson 5, section 9; the LoRA paper's section 7) on the tiny GPT.

The shipped base is fine-tuned on one task three ways from the same start: full fine-tuning,
LoRA with r = 8 and LoRA with r = 64 on {W_q, W_v} (α = 8, as in lesson 5's tables). For every
adapted layer the learned update ``ΔW`` (the weight's change under full fine-tuning, ``(α/r)
BA`` under LoRA) is then compared with :mod:`pedaPEFT.subspace`:

* its spectrum (singular values, the share of ``‖ΔW‖_F²`` in the top 8 directions);
* the overlap of the r = 8 and r = 64 runs: ``φ(A_8, A_64, i, j)`` on the right singular
  vectors of the two ``A`` matrices, as in the paper, and the same on ``ΔW`` itself;
* the amplification ``‖ΔW‖_F / ‖Uᵀ W V‖_F`` with ``U``, ``V`` the top ``PROJECTION_RANK``
  singular vectors of ``ΔW`` (one rank for every run: here ``d = 64``, so r = 64 directions
  would be the whole space), beside ``‖Uᵀ W V‖_F`` for ``W``'s own top directions and for
  random directions.

``experiment("full")`` is what ``python -m pedaPEFT lora-experiment learns --scale full``
runs; its results ship as ``pedaPEFT/results/lora_learns.json``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict

import torch
from matplotlib.figure import Figure

from pedaPEFT import data, experiments, gpt, lora, subspace, train

TARGETS = ("q", "v")
SETTINGS: dict[str, tuple[str, dict]] = {
    "full": ("full", {}),
    "r8": ("lora", {"r": 8, "alpha": experiments.LORA_ALPHA, "targets": list(TARGETS)}),
    "r64": ("lora", {"r": 64, "alpha": experiments.LORA_ALPHA, "targets": list(TARGETS)}),
}
"""The three fine-tunings compared: label -> (method, options)."""
LEARNING_RATES = {"full": 1e-3, "lora": 1e-2}
"""Peak learning rates: those lesson 4 (full) and lesson 5 (LoRA) chose on validation for
``shift`` (``lora_adapters.json``, ``lora_tables.json``)."""
PROJECTION_RANK = 8
PHI_MAX_I, PHI_MAX_J = 8, 16
LIVE_SCALE = experiments.Scale(steps=100, batch_size=32, n_train=512, seeds=(0,), n_test=128)
"""The lesson's live run: three fine-tunings of 100 steps (seconds on a CPU)."""


def layer_names(n_layer: int) -> list[str]:
    """``blocks.<l>.attn.<q|v>`` for every block: the layers both LoRA runs adapt.

    Introduced in lesson 5, section "9. What LoRA learns".
    """
    return [f"blocks.{layer}.attn.{name}" for layer in range(n_layer) for name in TARGETS]


def finetune_update(label: str, task: str, scale: experiments.Scale, seed: int) -> dict:
    """Fine-tune the shipped tiny base with setting ``label`` of ``SETTINGS``; return the test
    accuracy, ``delta`` (layer name -> ΔW) and, for LoRA, ``A`` (layer name -> ``lora_A``).

    Introduced in lesson 5, section "9. What LoRA learns".
    """
    if label not in SETTINGS:
        raise ValueError(f"label must be one of {sorted(SETTINGS)}, got {label!r}")
    method, options = SETTINGS[label]
    # Each run its own initialisation (the same seed would give A_64 the rows of A_8 in the
    # first layer), the same batches for every run of a seed.
    torch.manual_seed(len(SETTINGS) * seed + list(SETTINGS).index(label))
    model = gpt.load_pretrained("tiny")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    block = model.config.block_size
    train_set = data.task_data(task, "train", scale.n_train, block)
    test_set = data.task_data(task, "test", scale.n_test, block)
    model = train.METHODS[method](model, **options)
    experiments.train_prepared(model, train_set, scale, LEARNING_RATES[method], seed)
    delta, factors_a = {}, {}
    for name in layer_names(model.config.n_layer):
        module = model.get_submodule(name)
        if isinstance(module, lora.LoRALinear):
            delta[name] = module.delta_weight().detach()
            factors_a[name] = module.lora_A.detach().clone()
        else:
            delta[name] = module.weight.detach() - before[f"{name}.weight"]
    return {"accuracy": data.exact_match(model, test_set), "delta": delta, "A": factors_a}


def analyze_layer(weight: torch.Tensor, updates: dict[str, dict], name: str) -> dict:
    """Spectrum, subspace overlap and amplification of layer ``name`` (see the module text)
    for the runs in ``updates`` (label -> :func:`finetune_update` result); JSON-able.

    Introduced in lesson 5, section "9. What LoRA learns".
    """
    r = PROJECTION_RANK
    sigma_w = torch.linalg.svdvals(weight.double())
    d_in, d_out = weight.shape[1], weight.shape[0]
    row: dict[str, object] = {
        "layer": name,
        "norm_W": float(weight.norm()),
        "projected_W_top": float(sigma_w[:r].square().sum().sqrt()),
        "projected_random": float(weight.norm()) * r / (d_in * d_out) ** 0.5,
    }
    for label, update in updates.items():
        delta = update["delta"][name]
        U, V = subspace.top_singular_vectors(delta, r)
        row[label] = {
            "singular_values": [round(float(s), 6) for s in torch.linalg.svdvals(delta.double())],
            "norm": float(delta.norm()),
            "energy_top": subspace.energy_share(delta, r),
            "projected": subspace.projected_norm(weight, U, V),
            "amplification": subspace.amplification_factor(delta, weight, r),
        }
    if "r8" in updates and "r64" in updates:
        for key, matrices in (("phi_A", "A"), ("phi_delta", "delta")):
            a8, a64 = updates["r8"][matrices][name], updates["r64"][matrices][name]
            grid = subspace.subspace_similarity_grid(
                subspace.singular_directions(a8)[:, :PHI_MAX_I],
                subspace.singular_directions(a64)[:, :PHI_MAX_J], PHI_MAX_I, PHI_MAX_J)
            row[key] = [[round(float(v), 4) for v in line] for line in grid]
    if "full" in updates and "r8" in updates:
        full = subspace.singular_directions(updates["full"]["delta"][name])
        low = subspace.singular_directions(updates["r8"]["delta"][name])
        row["phi_full_r8"] = subspace.subspace_similarity(low, full, r, r)
    return row


def experiment(scale_name: str = "small", task: str | None = None,
               log: Callable[[str], None] | None = None) -> dict:
    """Every setting of ``SETTINGS`` for every seed of the scale, analysed layer by layer.

    ``scale_name`` is ``"live"`` (:data:`LIVE_SCALE`) or a key of ``experiments.SCALES``.

    Introduced in lesson 5, section "9. What LoRA learns".
    """
    scales = {"live": LIVE_SCALE, **experiments.SCALES}
    if scale_name not in scales:
        raise ValueError(f"scale must be one of {sorted(scales)}, got {scale_name!r}")
    scale, task = scales[scale_name], task or "shift"
    base = gpt.load_pretrained("tiny")
    start = time.perf_counter()
    accuracy: dict[str, list[float]] = {label: [] for label in SETTINGS}
    layers = []
    for seed in scale.seeds:
        updates = {label: finetune_update(label, task, scale, seed) for label in SETTINGS}
        for label, update in updates.items():
            accuracy[label].append(update["accuracy"])
            if log is not None:
                log(f"{label} seed {seed}: test exact match {update['accuracy']:.3f}")
        for name in layer_names(base.config.n_layer):
            weight = base.get_submodule(name).weight.detach()
            layers.append({"seed": seed, **analyze_layer(weight, updates, name)})
    return {
        "experiment": "learns",
        "task": task,
        "scale": scale_name,
        "config": asdict(scale),
        "settings": {label: {"method": m, "options": o} for label, (m, o) in SETTINGS.items()},
        "lr": LEARNING_RATES,
        "projection_rank": PROJECTION_RANK,
        "base_sha256": experiments.base_sha256(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - start, 1),
        "accuracy": accuracy,
        "layers": layers,
    }


def lora_learned_updates(results: dict | None = None, layer: str = "blocks.1.attn.q",
                         seed: int = 0) -> Figure:
    """Three panels for one layer and seed of ``results`` (the shipped ``lora_learns`` when
    None): the singular values of ΔW under full fine-tuning, LoRA r = 8 and r = 64; the
    subspace similarity φ(A_8, A_64, i, j); the amplification factor of every layer.

    Introduced in lesson 5, section "9. What LoRA learns"."""
    import matplotlib.pyplot as plt
    import numpy as np

    results = experiments.load_results("lora_learns") if results is None else results
    rows = [row for row in results["layers"] if row["seed"] == seed]
    by_name = {row["layer"]: row for row in rows}
    if layer not in by_name:
        raise ValueError(f"layer must be one of {sorted(by_name)}, got {layer!r}")
    row = by_name[layer]
    labels = {"full": "full fine-tuning", "r8": "LoRA r = 8", "r64": "LoRA r = 64"}
    colors = {"full": "C7", "r8": "C0", "r64": "C3"}
    figure, axes = plt.subplots(1, 3, figsize=(14, 4.0))
    for label in labels:
        rank = SETTINGS[label][1].get("r", len(row[label]["singular_values"]))
        sigma = np.array(row[label]["singular_values"][:rank])  # BA has rank <= r
        axes[0].semilogy(np.arange(1, sigma.size + 1), sigma / sigma[0], "o-", ms=3,
                         color=colors[label], label=labels[label])
    axes[0].set_ylim(1e-4, 1.5)
    axes[0].set_xlabel("index i")
    axes[0].set_ylabel(r"$\sigma_i / \sigma_1$ of $\Delta W$")
    axes[0].set_title(f"spectrum of the learned update ({layer})")
    axes[0].legend()
    grid = np.array(row["phi_A"])
    image = axes[1].imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto",
                           extent=(0.5, grid.shape[1] + 0.5, grid.shape[0] + 0.5, 0.5))
    figure.colorbar(image, ax=axes[1], label=r"$\phi$")
    axes[1].set_xticks([1, 4, 8, 12, 16])
    axes[1].set_xlabel("j (top directions of $A_{r=64}$)")
    axes[1].set_ylabel("i (top directions of $A_{r=8}$)")
    axes[1].set_title(r"$\phi(A_{r=8}, A_{r=64}, i, j)$; random: $\max(i,j)/64$")
    axes[1].grid(False)
    names = [r["layer"].removeprefix("blocks.").replace(".attn.", ".") for r in rows]
    positions = np.arange(len(rows))
    for offset, label in zip((-0.27, 0.0, 0.27), labels, strict=True):
        axes[2].bar(positions + offset, [r[label]["amplification"] for r in rows], 0.27,
                    color=colors[label], label=labels[label])
    axes[2].axhline(1.0, color="k", lw=0.8)
    axes[2].set_xticks(positions, names)
    axes[2].set_xlabel("layer (block.matrix)")
    axes[2].set_ylabel(r"$\|\Delta W\|_F \,/\, \|U^\top W V\|_F$")
    axes[2].set_title(f"amplification (top {results['projection_rank']} directions of ΔW)")
    axes[2].legend()
    figure.tight_layout()
    return figure


FIGURES = {"lora_learned_updates": lora_learned_updates}
