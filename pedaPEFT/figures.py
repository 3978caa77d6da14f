"""Every figure of the course, one function each, and the command that writes them all.

A figure function builds its plot from the package (or from a small committed results file in
``pedaPEFT/results/``) and returns the ``Figure``; it never writes files. Lessons call the same
functions to show the figures, so a figure in ``figures/`` is exactly what the lesson shows.
``python -m pedaPEFT figures`` calls every registered function and writes ``figures/<name>.png``
under the working directory (a clone's committed ``figures/`` when run from its root).
"""

import functools
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

FigureFunction = Callable[[], Figure]
FIGURES: dict[str, FigureFunction] = {}

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
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(handle)
    os.chmod(temporary, 0o644)
    try:
        figure.savefig(temporary, format="png", metadata={"Software": None})
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


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


# --- Lessons 1 and 2: matrix rank, SVD and low-rank approximation ---------------------------

PHOTO_RANKS = (5, 20, 50, 100)


def sample_photograph():
    """Grace Hopper's portrait shipped with matplotlib, as a (600, 512) float64 grayscale array.

    The RGB values (0–255) are mixed with the ITU-R BT.601 luma weights 0.299, 0.587, 0.114
    and scaled to [0, 1]. The file is part of matplotlib's installed sample data: nothing is
    downloaded.
    """
    import matplotlib.cbook
    import matplotlib.image
    import numpy as np

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as file:
        rgb = matplotlib.image.imread(file, format="jpg")
    return rgb[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114]) / 255.0


@register("rank_parameter_counts")
def rank_parameter_counts() -> Figure:
    """Numbers stored for an n × n matrix: dense n² against a rank-r factorization 2rn."""
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
    """Pivot versus smallest singular value of [[1, 1], [1, 1 + d]] against a tolerance 1e-3."""
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
    """The sample photograph and its best rank-k approximations, with size and error."""
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
    """Singular values of the photograph and the Eckart–Young error of its truncations."""
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
    """Singular values of a pretrained weight and of its fine-tuning update (planted rank 3)."""
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


@register("paged_spike_memory")
def paged_spike_memory(demo=None) -> Figure:  # noqa: ANN001 (a paged.SpikeDemo or None)
    """Device memory per step, torch AdamW vs PagedAdamW, when two batches are larger.

    ``demo`` is a ``paged.spike_demo()`` result (the lesson passes its own); run when None.
    """
    import matplotlib.pyplot as plt
    import numpy as np

    from pedaPEFT import paged

    demo = paged.spike_demo() if demo is None else demo
    parts = [("weights", "C7"), ("grads", "C8"), ("activations", "C0"),
             ("optimizer", "C3")]
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    runs = ((axes[0], demo.plain, "torch AdamW: out of memory at the first large batch"),
            (axes[1], demo.paged, "PagedAdamW: states leave for the large batches"))
    for ax, records, title in runs:
        steps = np.array([record.step for record in records])
        bottom = np.zeros(len(records))
        for name, color in parts:
            height = np.array([getattr(record, name) for record in records]) / 1e6
            label = "optimizer states on the device" if name == "optimizer" else name
            ax.bar(steps, height, bottom=bottom, color=color, width=0.8, label=label)
            bottom += height
        over = bottom > demo.capacity_bytes / 1e6
        if over.any():
            ax.bar(steps[over], bottom[over], width=0.8, facecolor="none", edgecolor="k",
                   hatch="//", label="does not fit")
        ax.axhline(demo.capacity_bytes / 1e6, color="k", lw=1.5, ls="--", label="device capacity")
        ax.set(xlabel="training step", title=title, xlim=(-0.7, len(demo.batch_sizes) - 0.3))
        ax.title.set_fontsize(9)
    axes[0].set_ylabel("device memory (MB)")
    axes[0].legend(fontsize=8, loc="center right")
    figure.tight_layout()
    return figure


# --- Lessons 6-8: quantization, NF4, double quantization -----------------------------------

QUANT_BLOCKSIZES = (8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 65536)


def normal_with_outliers(n: int = 2**20, outlier_every: int = 1000, seed: int = 0):
    """N(0, 1) samples where every ``outlier_every``-th value (at random places) is scaled ×20."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=generator)
    where = torch.randperm(n, generator=generator)[: n // outlier_every]
    x[where] *= 20
    return x


@register("quant_error_vs_blocksize")
def quant_error_vs_blocksize() -> Figure:
    """Absmax int8 / int4 round-trip error against blocksize on normal data with outliers."""
    import matplotlib.pyplot as plt
    import numpy as np

    from pedaPEFT import quant

    x = normal_with_outliers()
    sizes = [*QUANT_BLOCKSIZES, x.numel()]
    figure, (error_ax, tradeoff_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    for bits, colour in ((8, "C0"), (4, "C3")):
        errors = []
        for size in sizes:
            q, scale = quant.blockwise_absmax_quantize(x, bits=bits, blocksize=size)
            out = quant.blockwise_absmax_dequantize(q, scale, size)
            errors.append(float((out - x).abs().mean()))
        errors = np.array(errors)
        error_ax.loglog(sizes, errors, "o-", color=colour, ms=4, label=f"int{bits} absmax")
        total_bits = bits + 32 / np.array(sizes)
        tradeoff_ax.semilogy(total_bits, errors, "o-", color=colour, ms=4, label=f"int{bits}")
        for size, total, error in zip(sizes, total_bits, errors, strict=True):
            if size in (16, 64, 1024):
                tradeoff_ax.annotate(f"B={size}", (total, error), fontsize=7,
                                     xytext=(4, 4), textcoords="offset points")
    error_ax.axvline(x.numel(), color="k", ls=":", lw=1)
    error_ax.text(x.numel(), error_ax.get_ylim()[0], " whole\n tensor", fontsize=7, va="bottom")
    error_ax.set(xlabel="blocksize B (elements per absmax)", ylabel="mean |x - dequant(quant(x))|",
                 title="one outlier per 1,000 values: smaller blocks, smaller error")
    error_ax.title.set_fontsize(9)
    error_ax.legend(fontsize=8)
    tradeoff_ax.set(xlabel="bits per value (code + 32-bit absmax / B)", ylabel="mean abs error",
                    title="the price: 32/B extra bits per value")
    tradeoff_ax.title.set_fontsize(9)
    tradeoff_ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


@register("nf4_levels_density")
def nf4_levels_density() -> Figure:
    """The 16 NF4 levels over the standard normal density, with FP4 and int4 for comparison."""
    import matplotlib.pyplot as plt
    import numpy as np
    from scipy.stats import norm

    from pedaPEFT import quant

    top = norm.ppf(np.float32(quant.NF4_OFFSET))  # the normal quantile that NF4 maps to 1
    u = np.linspace(-1.15, 1.15, 400)
    figure, axes = plt.subplots(figsize=(9, 4.2))
    axes.plot(u, norm.pdf(u * top), "k-", lw=1.5, label=f"N(0, 1) density, x = {top:.3f} u")
    nf4 = quant.nf4_code().numpy()
    midpoints = (nf4[:-1] + nf4[1:]) / 2
    edges = np.concatenate([[-1.15], midpoints, [1.15]])
    for i in range(16):
        axes.axvspan(edges[i], edges[i + 1], color="C0" if i % 2 else "C9", alpha=0.12, lw=0)
    rows = (("NF4", nf4, "C0", -0.05), ("FP4", quant.fp4_code().numpy(), "C1", -0.11),
            ("int4", np.arange(-7, 8) / 7, "C2", -0.17))
    for name, levels, colour, height in rows:
        distinct = np.unique(levels)
        axes.plot(distinct, np.full(len(distinct), height), "|", color=colour, ms=14, mew=2,
                  label=f"{name}: {len(distinct)} distinct levels")
    axes.vlines(nf4, 0, norm.pdf(nf4 * top), color="C0", lw=1)
    axes.set(xlabel="normalised value u = x / absmax", ylabel="density", ylim=(-0.21, 0.45),
             title="NF4 puts its levels where normal weights are dense (shaded: its 16 bins)")
    axes.title.set_fontsize(9)
    axes.legend(fontsize=8, loc="upper right")
    figure.tight_layout()
    return figure


def four_bit_errors(weights: dict, blocksize: int = 64) -> dict:
    """Relative RMS round-trip error (%) of NF4, FP4 and int4 on each named list of tensors."""
    from pedaPEFT import quant

    errors = {}
    for name, tensors in weights.items():
        errors[name] = {}
        total = sum(float((t.float() ** 2).sum()) for t in tensors)
        for method in ("nf4", "fp4", "int4"):
            squared = sum(float(((quant.fake_quantize(t, method, blocksize) - t) ** 2).sum())
                          for t in tensors)
            errors[name][method] = 100 * (squared / total) ** 0.5
    return errors


def gpt_linear_weights(preset: str = "tiny") -> list:
    """The weight matrices of every q, k, v, o, fc and proj layer of a shipped pretrained GPT."""
    from pedaPEFT import gpt

    model = gpt.load_pretrained(preset)
    names = ("q", "k", "v", "o", "fc", "proj")
    return [module.weight.detach() for name, module in model.named_modules()
            if name.split(".")[-1] in names]


@register("quant_4bit_error_comparison")
def quant_4bit_error_comparison() -> Figure:
    """NF4 vs FP4 vs int4 (blocksize 64) on normal data and on the tiny GPT's trained weights."""
    import matplotlib.pyplot as plt
    import numpy as np
    import torch
    from scipy.stats import norm

    trained = gpt_linear_weights("tiny")
    normal = [torch.randn(2**18, generator=torch.Generator().manual_seed(0))]
    errors = four_bit_errors({"N(0, 1) samples": normal, "tiny GPT, trained": trained})
    figure, (hist_ax, bar_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    standardised = torch.cat([(w / w.std()).reshape(-1) for w in trained]).numpy()
    hist_ax.hist(standardised, bins=120, range=(-6, 6), density=True, color="C7",
                 label="trained weights / their std")
    u = np.linspace(-6, 6, 300)
    hist_ax.plot(u, norm.pdf(u), "k-", lw=1.5, label="N(0, 1)")
    hist_ax.set_yscale("log")
    hist_ax.set(xlabel="standardised weight", ylabel="density (log)", ylim=(1e-5, 1),
                title="trained weights of the tiny GPT against a normal")
    hist_ax.title.set_fontsize(9)
    hist_ax.legend(fontsize=8)
    width = 0.25
    for i, method in enumerate(("nf4", "fp4", "int4")):
        values = [errors[data][method] for data in errors]
        bars = bar_ax.bar(np.arange(len(errors)) + (i - 1) * width, values, width,
                          color=f"C{i}", label=method.upper() if method != "int4" else "int4")
        bar_ax.bar_label(bars, fmt="%.2f", fontsize=7)
    bar_ax.set_xticks(np.arange(len(errors)), list(errors))
    bar_ax.set(ylabel="relative RMS error (%)", title="4-bit round trip, blocksize 64")
    bar_ax.title.set_fontsize(9)
    bar_ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


@register("double_quant_absmax")
def double_quant_absmax() -> Figure:
    """The signed 8-bit dynamic map, and how well it rebuilds a 4096 x 4096 weight's absmax."""
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    from pedaPEFT import quant

    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(4096, 4096, generator=generator) * 0.02).to(torch.bfloat16)
    state = quant.quantize_4bit(weight)
    true_absmax = quant.quantize_4bit(weight, double_quant=False).absmax.numpy()
    rebuilt = quant.dequantize_absmax(state).numpy()
    figure, (map_ax, error_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    dynamic = quant.dynamic_code().numpy()
    index = np.arange(dynamic.size)
    map_ax.semilogy(index[dynamic > 0], dynamic[dynamic > 0], "C0.", ms=3, label="positive levels")
    map_ax.semilogy(index[dynamic < 0], -dynamic[dynamic < 0], "C3.", ms=3,
                    label="|negative levels|")
    map_ax.set(xlabel="8-bit code", ylabel="|level| (log)",
               title="dynamic map: ±10^(e-6) · f, 7 decades, 0 at code 127")
    map_ax.title.set_fontsize(9)
    map_ax.legend(fontsize=8)
    relative = 100 * (rebuilt - true_absmax) / true_absmax
    error_ax.plot(true_absmax, relative, "C0,", alpha=0.3)
    error_ax.axvline(float(state.offset), color="k", ls="--", lw=1, label="offset (mean absmax)")
    error_ax.set(xlabel="first-level absmax of a 64-block", ylabel="rebuilt - true (%)",
                 title="double quantization: relative error of each block's absmax")
    error_ax.title.set_fontsize(9)
    error_ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


def qlora_demo(losses: list[float], accuracy_before: float, accuracy_after: float,
               task: str) -> Figure:
    """The demo's run: QLoRA training loss per step, and exact match before and after."""
    figure = Figure(figsize=(8, 3.2))
    loss_ax, acc_ax = figure.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    loss_ax.plot(range(1, len(losses) + 1), losses, color="C0")
    loss_ax.set(xlabel="step", ylabel="training loss", yscale="log",
                title=f"QLoRA (NF4 + DQ, r = 8) on '{task}'")
    acc_ax.bar(["base", "QLoRA"], [accuracy_before, accuracy_after], color=["C7", "C0"])
    acc_ax.set(ylim=(0, 1), ylabel="exact match", title="test accuracy")
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
    """Bytes per parameter of full fine-tuning by component, from ``memory.finetune_memory``."""
    from pedaPEFT import memory

    figure = Figure(figsize=(8, 3.6))
    ax = figure.subplots()
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
    """
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


LORA_RESULT_FILES = {"tables": ("tables", "tables_reverse"),
                     "adapters": ("adapters", "adapters_reverse")}
"""Committed result files (``pedaPEFT/results/lora_<name>.json``): ``shift``, then ``reverse``."""


@register("lora_tables")
def lora_tables() -> Figure:
    """The LoRA paper's tables 5 and 6 in miniature on the tiny GPT, one row per task."""
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
    """Accuracy against trainable share: full, top-layer, adapters, LoRA; one panel per task."""
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
def qlora_table3(results: dict | None = None) -> Figure:
    """Lesson 9: exact match of full fine-tuning, LoRA and QLoRA (NF4, FP4, int8), each seed a
    dot and the mean ± standard deviation a bar (``pedaPEFT/results/qlora_table3_<task>.json``)."""
    import json

    from pedaPEFT import qlora

    if results is None:
        results = json.loads(qlora.table3_results_path().read_text())
    summary = qlora.table3_summary(results)
    figure = Figure(figsize=(8, 3.8))
    ax = figure.subplots()
    colors = {"full": "C7", "lora": "C1", "qlora": "C0"}
    for i, row in enumerate(summary):
        ax.barh(i, row["mean"], xerr=row["std"], color=colors[row["method"]], alpha=0.7,
                capsize=3)
        seeds = [r["accuracy"] for r in results["runs"] if r["label"] == row["label"]]
        ax.plot(seeds, [i] * len(seeds), "k.", markersize=4)
    ax.set_yticks(range(len(summary)), [row["label"] for row in summary], fontsize=8)
    ax.invert_yaxis()
    ax.set(xlim=(0, 1), xlabel="exact match on the test split",
           title=f"'{results['task']}', {results['config']['steps']} steps, "
                 f"{len(results['config']['seeds'])} seeds (dots)")
    figure.tight_layout()
    return figure
