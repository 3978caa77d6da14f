"""The figures of lessons 6-10: quantization, NF4, double quantization, QLoRA, paging.

Same rules as ``pedaPEFT.figures`` (which lists these in its ``FIGURES`` and re-exports them):
one function per figure, built from the package, returning the ``Figure``.
"""

from matplotlib.figure import Figure


def paged_spike_memory(demo=None) -> Figure:  # noqa: ANN001 (a SpikeDemo or None)
    """Device memory per step, torch AdamW vs PagedAdamW, when two batches are larger.

    ``demo`` is a ``simulated_device.spike_demo()`` result (the lesson passes its own); run
    when None.

    Introduced in lesson 10, section "4. A memory spike, simulated"."""
    import matplotlib.pyplot as plt
    import numpy as np

    from pedaPEFT import simulated_device

    demo = simulated_device.spike_demo() if demo is None else demo
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


def quant_error_vs_blocksize() -> Figure:
    """Absmax int8 / int4 round-trip error against blocksize on normal data with outliers.

    Introduced in lesson 6, section "5. Error against blocksize"."""
    import matplotlib.pyplot as plt
    import numpy as np

    from pedaPEFT import quant

    x = quant.normal_with_outliers()
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


def nf4_levels_density() -> Figure:
    """The 16 NF4 levels over the standard normal density, with FP4 and int4 for comparison.

    Introduced in lesson 7, section "3. The levels over the normal density"."""
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


def quant_4bit_error_comparison() -> Figure:
    """NF4 vs FP4 vs int4 (blocksize 64) on normal data and on the tiny GPT's trained weights.

    Introduced in lesson 7, section "4. NF4 vs FP4 vs int4: normal data and trained weights"."""
    import matplotlib.pyplot as plt
    import numpy as np
    import torch
    from scipy.stats import norm

    from pedaPEFT import gpt, quant

    trained = gpt.linear_weights("tiny")
    normal = [torch.randn(2**18, generator=torch.Generator().manual_seed(0))]
    errors = quant.four_bit_errors({"N(0, 1) samples": normal, "tiny GPT, trained": trained})
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


def double_quant_absmax() -> Figure:
    """The signed 8-bit dynamic map, and how well it rebuilds a 4096 x 4096 weight's absmax.

    Introduced in lesson 8, section "2. The second level, step by step"."""
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


FIGURES = {
    "paged_spike_memory": paged_spike_memory,
    "quant_error_vs_blocksize": quant_error_vs_blocksize,
    "nf4_levels_density": nf4_levels_density,
    "quant_4bit_error_comparison": quant_4bit_error_comparison,
    "double_quant_absmax": double_quant_absmax,
}
"""The registered figures of this module: ``figures/<name>.png`` is made by the function."""
