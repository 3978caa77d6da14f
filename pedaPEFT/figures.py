"""Every figure of the course, one function each, and the command that writes them all.

A figure function builds its plot from the package (or from a small committed results file in
``pedaPEFT/results/``) and returns the ``Figure``; it never writes files. Lessons call the same
functions to show the figures, so a figure in ``figures/`` is exactly what the lesson shows.
``python -m pedaPEFT figures`` calls every registered function and writes ``figures/<name>.png``
under the working directory (a clone's committed ``figures/`` when run from its root).
"""

import functools
from collections.abc import Callable
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

from pedaPEFT import figures_quant, lora_learns
from pedaPEFT.figures_quant import (  # noqa: F401 (lessons 6-10 call them as figures.X)
    QUANT_BLOCKSIZES,
    double_quant_absmax,
    nf4_levels_density,
    paged_spike_memory,
    qlora_demo,
    quant_4bit_error_comparison,
    quant_error_vs_blocksize,
)
from pedaPEFT.files import atomic_write
from pedaPEFT.lora_learns import lora_learned_updates  # noqa: F401 (lesson 5 calls figures.X)

FigureFunction = Callable[[], Figure]
FIGURES: dict[str, FigureFunction] = {**figures_quant.FIGURES, **lora_learns.FIGURES}

STYLE = {
    "figure.dpi": 100,
    "savefig.dpi": 100,
    "font.size": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
}
matplotlib.rcParams.update(STYLE)


def register(name: str) -> Callable[[FigureFunction], FigureFunction]:
    """Decorator: list a figure function under ``name`` (the PNG is ``figures/<name>.png``)."""

    def decorator(function: FigureFunction) -> FigureFunction:
        if name in FIGURES:
            raise ValueError(f"figure name {name!r} is registered twice")
        FIGURES[name] = function
        return function

    return decorator


def save_figure(figure: Figure, path: Path) -> None:
    """Write ``figure`` as a PNG atomically, without a timestamp or software tag in the file."""
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", metadata={"Software": None}))


def write_figures(out_dir: Path, names: list[str] | None = None) -> list[Path]:
    """Regenerate the named figures (all when ``names`` is None) into ``out_dir``."""
    import matplotlib.pyplot as plt

    names = sorted(FIGURES) if names is None else names
    unknown = [name for name in names if name not in FIGURES]
    if unknown:
        raise ValueError(f"unknown figure names {unknown}; available: {sorted(FIGURES)}")
    written = []
    for name in names:
        figure = FIGURES[name]()
        save_figure(figure, out_dir / f"{name}.png")
        plt.close(figure)
        written.append(out_dir / f"{name}.png")
    return written


# The figures of lessons 6-10 live in ``figures_quant`` and are listed in ``FIGURES`` above.


# --- Lessons 1 and 2: matrix rank, SVD and low-rank approximation ---------------------------

PHOTO_RANKS = (5, 20, 50, 100)


def sample_photograph():
    """Grace Hopper's portrait shipped with matplotlib, as a (600, 512) float64 grayscale array.

    The RGB values (0–255) are mixed with the ITU-R BT.601 luma weights 0.299, 0.587, 0.114
    and scaled to [0, 1]. The file is part of matplotlib's installed sample data: nothing is
    downloaded.

    Introduced in lesson 2, section "4. A photograph at low rank"."""
    import matplotlib.cbook
    import matplotlib.image
    import numpy as np

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as file:
        rgb = matplotlib.image.imread(file, format="jpg")
    return rgb[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114]) / 255.0


@register("rank_parameter_counts")
def rank_parameter_counts() -> Figure:
    """Numbers stored for an n × n matrix: dense n² against a rank-r factorization 2rn.

    Introduced in lesson 1, section "6. From $n^2$ to $2rn$"."""
    import matplotlib.pyplot as plt
    import numpy as np

    from pedaPEFT import linalg

    sizes = np.array([2**p for p in range(4, 15)])
    figure, (counts, fraction) = plt.subplots(1, 2, figsize=(10, 3.8))
    counts.loglog(sizes, sizes.astype(float) ** 2, "k-", lw=2, label="dense  $n^2$")
    for r, colour in zip((1, 8, 64), ("C0", "C1", "C2"), strict=True):
        ok = sizes >= r
        stored = [linalg.factorized_param_count(int(n), int(n), r) for n in sizes[ok]]
        counts.loglog(sizes[ok], stored, "o-", color=colour, ms=3, label=f"rank {r}  $2rn$")
        fraction.semilogx(
            sizes[ok],
            100 * np.array(stored) / sizes[ok] ** 2.0,
            "o-",
            color=colour,
            ms=3,
            label=f"r = {r}",
        )
    counts.set(xlabel="n", ylabel="numbers stored", title="$n^2$ versus $2rn$")
    counts.legend(fontsize=8)
    fraction.axhline(100, color="k", lw=1, ls="--")
    fraction.set_yscale("log")
    fraction.set(xlabel="n", ylabel="% of dense", title="factorized / dense = 2r/n")
    fraction.legend(fontsize=8)
    figure.tight_layout()
    return figure


@register("rank_near_tolerance")
def rank_near_tolerance() -> Figure:
    """Pivot versus smallest singular value of [[1, 1], [1, 1 + d]] against a tolerance 1e-3.

    Introduced in lesson 1,
    section "Why the SVD rank and the row-reduction rank can differ near the tolerance"."""
    import matplotlib.pyplot as plt
    import numpy as np

    from pedaPEFT import linalg

    tol = 1e-3
    deltas = np.logspace(-5, -1, 81)
    pivots, smallest, disagree = [], [], []
    for delta in deltas:
        A = np.array([[1.0, 1.0], [1.0, 1.0 + delta]])
        pivots.append(A[1, 1] - A[1, 0] / A[0, 0] * A[0, 1])  # elimination: row 2 - row 1
        smallest.append(np.linalg.svd(A, compute_uv=False)[-1])
        ranks = {
            method: linalg.matrix_rank(A, tol=tol, method=method) for method in ("rref", "svd")
        }
        disagree.append(ranks["rref"] != ranks["svd"])
    figure, axes = plt.subplots(figsize=(6.5, 4))
    axes.loglog(deltas, pivots, "C0-", lw=2, label="second pivot (row reduction)")
    axes.loglog(deltas, smallest, "C1-", lw=2, label=r"smallest singular value $\sigma_2$")
    axes.axhline(tol, color="k", ls="--", lw=1, label="tolerance $10^{-3}$")
    axes.fill_between(
        deltas, 1e-6, 1, where=disagree, color="C3", alpha=0.2, label="ranks disagree (2 vs 1)"
    )
    axes.set(
        xlabel=r"$\delta$",
        ylabel="size",
        ylim=(1e-6, 1),
        title=r"rank of $[[1, 1], [1, 1 + \delta]]$ near the tolerance",
    )
    axes.legend(fontsize=8, loc="upper left")
    figure.tight_layout()
    return figure


@functools.cache
def _photograph_svd():
    """The full SVD of :func:`sample_photograph`, computed once per process."""
    from pedaPEFT import linalg

    photo = sample_photograph()
    return (photo, *linalg.truncated_svd(photo, min(photo.shape)))


@register("svd_photo_reconstructions")
def svd_photo_reconstructions() -> Figure:
    """The sample photograph and its best rank-k approximations, with size and error.

    Introduced in lesson 2, section "4. A photograph at low rank"."""
    import matplotlib.pyplot as plt
    import numpy as np

    from pedaPEFT import linalg

    photo, U, S, Vt = _photograph_svd()
    m, n = photo.shape
    figure, axes = plt.subplots(1, len(PHOTO_RANKS) + 1, figsize=(13, 3.9))
    axes[0].imshow(photo, cmap="gray", vmin=0, vmax=1)
    axes[0].set_title(f"original: {m}×{n} = {m * n} numbers", fontsize=9)
    for ax, k in zip(axes[1:], PHOTO_RANKS, strict=True):
        approx = (U[:, :k] * S[:k]) @ Vt[:k]
        ratio = m * n / linalg.svd_param_count(m, n, k)
        error = np.linalg.norm(photo - approx) / np.linalg.norm(photo)
        ax.imshow(np.clip(approx, 0, 1), cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"rank {k}: {ratio:.1f}× smaller\nerror {100 * error:.1f}%", fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    figure.tight_layout()
    return figure


@register("svd_photo_spectrum")
def svd_photo_spectrum() -> Figure:
    """Singular values of the photograph and the Eckart–Young error of its truncations.

    Introduced in lesson 2, section "4. A photograph at low rank"."""
    import matplotlib.pyplot as plt
    import numpy as np

    photo, U, S, Vt = _photograph_svd()
    predicted = np.sqrt(np.cumsum(S[::-1] ** 2)[::-1]) / np.linalg.norm(photo)
    ranks = np.arange(1, len(S))
    measured_ranks = np.array([1, 2, 5, 10, 20, 50, 100, 200, 400])
    measured = [
        np.linalg.norm(photo - (U[:, :k] * S[:k]) @ Vt[:k]) / np.linalg.norm(photo)
        for k in measured_ranks
    ]
    figure, (spectrum, error) = plt.subplots(1, 2, figsize=(10, 3.8))
    spectrum.semilogy(np.arange(1, len(S) + 1), S, "k-")
    spectrum.set(xlabel="index i", ylabel=r"$\sigma_i$", title="singular values of the photograph")
    error.semilogy(
        ranks,
        predicted[1:],
        "C0-",
        label=r"$\sqrt{\sum_{i>k}\sigma_i^2}\,/\,\|A\|_F$ (Eckart–Young)",
    )
    error.semilogy(measured_ranks, measured, "C3o", ms=5, label=r"measured $\|A-A_k\|_F/\|A\|_F$")
    error.set(xlabel="rank k", ylabel="relative error", title="truncation error")
    error.legend(fontsize=8)
    figure.tight_layout()
    return figure


@register("weight_update_spectrum")
def weight_update_spectrum() -> Figure:
    """Singular values of a pretrained weight and of its fine-tuning update (planted rank 3).

    Introduced in lesson 2, section "6. Why a weight *update* can have low intrinsic rank"."""
    import matplotlib.pyplot as plt
    import numpy as np

    from pedaPEFT import linalg

    task = linalg.planted_update_task()
    W_after = linalg.finetune_linear(task.W_before, task.X, task.Y)
    index = np.arange(1, min(task.W_before.shape) + 1)
    figure, axes = plt.subplots(figsize=(6.5, 4))
    for matrix, style, label in (
        (task.W_before, "k.-", r"$W_{\mathrm{before}}$ (pretrained)"),
        (W_after - task.W_before, "C3o-", r"$\Delta W = W_{\mathrm{after}} - W_{\mathrm{before}}$"),
        (task.update, "C0x", "planted rank-3 change"),
    ):
        S = np.linalg.svd(matrix, compute_uv=False)
        keep = S > 1e-12
        axes.semilogy(index[keep], S[keep], style, ms=4, label=label)
    axes.set(xlabel="index i", ylabel=r"$\sigma_i$", title="a full-rank weight, a low-rank update")
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


# --- Lesson 3: fine-tuning and its memory ------------------------------------------------------

FINETUNE_MEMORY_SETTINGS = (  # label, finetune_memory keyword arguments for one parameter
    ("fp32\nAdamW", dict(precision="fp32", optimizer="adamw")),
    ("mixed\nAdamW", dict(precision="mixed", optimizer="adamw")),
    ("mixed\n8-bit AdamW", dict(precision="mixed", optimizer="adamw8bit")),
    ("bf16\nAdamW", dict(precision="bf16", optimizer="adamw")),
    ("bf16\n8-bit AdamW", dict(precision="bf16", optimizer="adamw8bit")),
)


@register("finetune_memory_per_parameter")
def finetune_memory_per_parameter() -> Figure:
    """Bytes per parameter of full fine-tuning by component, from ``memory.finetune_memory``.

    Introduced in lesson 3, section "4. What full fine-tuning costs: bytes per parameter"."""
    import matplotlib.pyplot as plt

    from pedaPEFT import memory

    figure, ax = plt.subplots(figsize=(8, 3.6))
    components = ("weights", "gradients", "optimizer")
    bottoms = [0.0] * len(FINETUNE_MEMORY_SETTINGS)
    for i, component in enumerate(components):
        values = [memory.bytes_per_parameter(**kw)[component]
                  for _, kw in FINETUNE_MEMORY_SETTINGS]
        ax.bar(range(len(values)), values, 0.6, bottom=bottoms, color=f"C{i}",
               label=component if component != "optimizer" else "optimizer (+ fp32 master)")
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    for x, total in enumerate(bottoms):
        ax.text(x, total + 0.2, f"{total:.2f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(bottoms)), [label for label, _ in FINETUNE_MEMORY_SETTINGS],
                  fontsize=8)
    ax.set(ylabel="bytes per parameter", ylim=(0, 18),
           title="full fine-tuning: static memory per parameter (activations come on top)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


# --- Lessons 4 and 5: bottleneck adapters and LoRA -----------------------------------------


@register("lora_alpha_scaling")
def lora_alpha_scaling(results: dict | None = None) -> Figure:
    """Why α/r: update size at one learning rate, and loss against learning rate, per rank r.

    ``results`` is ``experiments.alpha_scaling()`` (computed here, in seconds, when omitted).

    Introduced in lesson 5, section "4. Why scale by $\\\\alpha/r$?"."""
    import matplotlib.pyplot as plt

    from pedaPEFT import experiments

    results = experiments.alpha_scaling() if results is None else results
    figure, (norms, sweep) = plt.subplots(1, 2, figsize=(11, 4))
    labels = {"alpha/r": r"$\alpha/r$ (LoRA)", "alpha/sqrt(r)": r"$\alpha/\sqrt{r}$ (rsLoRA)",
              "none": r"none ($\alpha = r$)"}
    for rule, style in zip(experiments.SCALING_RULES, ("C0o-", "C2s-", "C3^-"), strict=True):
        norms.loglog(results["ranks"], results["norms"][rule], style, ms=4, label=labels[rule])
    norms.set_xscale("log", base=2)
    norms.set(xlabel="rank r", ylabel=r"$\|\Delta W\|_F$",
              title=f"update after {results['norm_steps']} Adam steps at lr "
                    f"{results['norm_lr']:g}")
    norms.legend(fontsize=8)
    for index, r in enumerate(results["sweep_ranks"]):
        colour = f"C{index}"
        for rule, style in (("alpha/r", "-"), ("none", "--")):
            sweep.semilogx(results["lrs"], results["losses"][rule][str(r)], style, color=colour,
                           marker="o", ms=3,
                           label=f"r={r}, {'α/r' if rule == 'alpha/r' else 'no scaling'}")
    sweep.set(xlabel="learning rate", ylabel="MSE",
              title=f"loss after {results['sweep_steps']} steps")
    sweep.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    return figure


def _summary_by_key(rows: list[dict], group: str) -> dict[tuple, dict]:
    from pedaPEFT import experiments

    return {
        (tuple(s["options"]["targets"]), s["options"]["r"]): s
        for s in experiments.summarize(rows, group)
    }


LORA_RESULT_FILES = {"tables": ("lora_tables", "lora_tables_reverse"),
                     "adapters": ("lora_adapters", "lora_adapters_reverse")}
"""Committed result files (``pedaPEFT/results/<name>.json``): task ``shift``, then ``reverse``."""


@register("lora_tables")
def lora_tables() -> Figure:
    """The LoRA paper's tables 5 and 6 in miniature on the tiny GPT, one row per task.

    Introduced in lesson 5, section "8. Which weights, which rank: tables 5 and 6 in miniature"."""
    import matplotlib.pyplot as plt

    from pedaPEFT import experiments

    names = LORA_RESULT_FILES["tables"]
    figure, grid = plt.subplots(len(names), 2, figsize=(11, 3.6 * len(names)), squeeze=False)
    for (which, rank), name in zip(grid, names, strict=True):
        results = experiments.load_results(name)
        table5 = _summary_by_key(results["runs"], "table5")
        table6 = _summary_by_key(results["runs"], "table6")
        labels = [f"{{{','.join(t)}}}\nr={r}" for t, r in table5]
        which.bar(range(len(labels)), [100 * s["mean"] for s in table5.values()],
                  yerr=[100 * s["std"] for s in table5.values()], capsize=3, color="C0",
                  alpha=0.8)
        which.set_xticks(range(len(labels)), labels, fontsize=8)
        budget = next(iter(table5.values()))["trainable"]
        which.set(ylabel="test exact match (%)", ylim=(0, 105),
                  title=f"{results['task']!r}: which weights ({budget:,} trainable each)")
        for index, targets in enumerate((*experiments.TABLE6, ("q",))):
            found = {r: s for (t, r), s in (*table5.items(), *table6.items()) if t == targets}
            points = sorted(found.items())
            rank.errorbar([r for r, _ in points], [100 * s["mean"] for _, s in points],
                          yerr=[100 * s["std"] for _, s in points], marker="o", ms=4,
                          capsize=3, color=f"C{index}", label="{" + ",".join(targets) + "}")
        rank.set_xscale("log", base=2)
        rank.set(xlabel="rank r", ylabel="test exact match (%)", ylim=(-3, 105),
                 title=f"{results['task']!r}: which rank "
                       f"(mean ± std, {len(results['config']['seeds'])} seeds)")
        rank.legend(fontsize=8)
    figure.tight_layout()
    return figure


@register("adapter_methods")
def adapter_methods() -> Figure:
    """Accuracy against trainable share: full, top-layer, adapters, LoRA; one panel per task.

    Introduced in lesson 4, section "5. Adapters on a downstream task"."""
    import matplotlib.pyplot as plt

    from pedaPEFT import experiments

    names = LORA_RESULT_FILES["adapters"]
    figure, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        results = experiments.load_results(name)
        for index, s in enumerate(experiments.summarize(results["runs"])):
            label = s["method"] + "".join(f" {k}={v}" for k, v in s["options"].items()
                                          if k != "targets")
            ax.errorbar(100 * s["trainable"] / s["total"], 100 * s["mean"], yerr=100 * s["std"],
                        marker="o", capsize=3, color=f"C{index}", label=label, ls="none")
        ax.set_xscale("log")
        ax.set(xlabel="trainable parameters (% of the model)", ylabel="test exact match (%)",
               ylim=(-3, 105), title=f"task {results['task']!r}, mean ± std over "
                                     f"{len(results['config']['seeds'])} seeds")
        ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


@register("qlora_table3")
def qlora_table3(results: dict | None = None, searched: dict | None = None) -> Figure:
    """Lesson 9: exact match of full fine-tuning, LoRA and QLoRA (NF4, FP4, int8) and, hatched,
    the W_q, W_v rows at searched learning rates (``results/qlora_{table3,qv}_<task>.json``);
    each seed a dot, the mean ± standard deviation a bar, the learning rate in each label.

    Introduced in lesson 9, section "5. Table 3 of the QLoRA paper, in miniature"."""
    from pedaPEFT import experiments

    results = results or experiments.load_results("qlora_table3_reverse")
    searched = searched or experiments.load_results(f"qlora_qv_{results['task']}")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(8, 4.4))
    colors = {"full": "C7", "lora": "C1", "qlora": "C0"}
    labels = []
    for source, note, hatch in ((results, "", None), (searched, ", searched", "//")):
        for i, row in enumerate(experiments.summarize(source["runs"]), start=len(labels)):
            ax.barh(i, row["mean"], xerr=row["std"], color=colors[row["method"]], alpha=0.7,
                    capsize=3, hatch=hatch)
            seeds = [r["accuracy"] for r in source["runs"] if r["label"] == row["label"]]
            ax.plot(seeds, [i] * len(seeds), "k.", markersize=4)
            labels.append(f"{row['label']} (lr {source['lr'][row['method']]:g}{note})")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlim=(0, 1), xlabel="exact match on the test split",
           title=f"'{results['task']}', {results['config']['steps']} steps, "
                 f"{len(results['config']['seeds'])} seeds (dots)")
    figure.tight_layout()
    return figure


@register("realtext_perplexity")
def realtext_perplexity(results: dict | None = None) -> Figure:
    """Lesson 11: held-out-domain perplexity of the pydocs base before (grey line) and after
    full fine-tuning, LoRA and QLoRA, mean ± standard deviation over seeds (dots), next to the
    trainable parameters of each method (``figures/data/realtext_asyncio.json``).

    Introduced in lesson 11, section "6. Full fine-tuning, LoRA and QLoRA, three seeds"."""
    from pedaPEFT import realtext

    if results is None:
        results = realtext.load_results()
    summary = results["summary"]
    labels = [row["label"] for row in summary]
    import matplotlib.pyplot as plt

    figure, (ax, ax_params) = plt.subplots(1, 2, figsize=(9, 3.4),
                                           gridspec_kw={"width_ratios": [3, 2]})
    for i, row in enumerate(summary):
        ax.barh(i, row["perplexity_after"], xerr=row["perplexity_after_std"], color=f"C{i}",
                alpha=0.7, capsize=3)
        seeds = [r["perplexity_after"] for r in results["runs"] if r["label"] == row["label"]]
        ax.plot(seeds, [i] * len(seeds), "k.", markersize=4)
        ax_params.barh(i, row["trainable"], color=f"C{i}", alpha=0.7)
    before = summary[0]["perplexity_before"]
    ax.axvline(before, color="0.4", linestyle="--", label=f"base, before: {before:.1f}")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlim=(0, 1.5 * before), xlabel=f"perplexity on unseen '{results['domain']}' documents",
           title=f"after fine-tuning ({summary[0]['n']} seeds)")
    ax.legend(loc="lower right", fontsize=8)
    ax_params.set_xscale("log")
    ax_params.set_yticks(range(len(labels)), [])
    ax_params.invert_yaxis()
    ax_params.set(xlabel="trainable parameters", title="what each method trains")
    figure.tight_layout()
    return figure
