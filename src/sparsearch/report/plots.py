"""PNG figures of a study: accuracy against sparsity with the spread over seeds, and convergence curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window; must precede pyplot
import matplotlib.pyplot as plt
import numpy as np

from sparsearch.report.summary import SPARSITY_DEFINITION, ArmSummary, StudyResults, arm_order


def _colors(arms: Sequence[str]) -> dict[str, str]:
    palette = plt.get_cmap("tab10").colors
    return {arm: matplotlib.colors.to_hex(palette[index % len(palette)]) for index, arm in enumerate(arms)}


def plot_accuracy_vs_sparsity(results: StudyResults, rows: Sequence[ArmSummary], path: Path) -> Path:
    """Test accuracy (mean, band and error bars = std over seeds) per arm at each sparsity; dense as a line.

    Sparsities sit at evenly spaced positions so that 0.9, 0.95 and 0.98 stay readable.
    """
    arms = arm_order(results)
    colors = _colors(arms)
    sparsities = sorted({row.sparsity for row in rows if row.arm != "dense"})
    position = {sparsity: index for index, sparsity in enumerate(sparsities)}
    figure, axes = plt.subplots(figsize=(7.5, 4.5))
    for row in rows:
        if row.arm == "dense":
            mean, std = 100 * row.test_accuracy_mean, 100 * row.test_accuracy_std
            axes.axhline(mean, color="black", linestyle="--", linewidth=1.2, label=f"dense parent ({mean:.1f}%)")
            if std > 0:
                axes.axhspan(mean - std, mean + std, color="black", alpha=0.08)
    for arm in arms:
        arm_rows = sorted((row for row in rows if row.arm == arm and row.arm != "dense"), key=lambda r: r.sparsity)
        if not arm_rows:
            continue
        x = np.array([position[row.sparsity] for row in arm_rows], dtype=float)
        mean = np.array([100 * row.test_accuracy_mean for row in arm_rows])
        std = np.array([100 * row.test_accuracy_std for row in arm_rows])
        axes.errorbar(x, mean, yerr=std, marker="o", capsize=3, color=colors[arm], label=arm)
        axes.fill_between(x, mean - std, mean + std, color=colors[arm], alpha=0.12)
    axes.set_xticks(range(len(sparsities)), [f"{s:g}" for s in sparsities])
    axes.set_xlabel(f"sparsity ({SPARSITY_DEFINITION.split(' = ')[1]})", fontsize=8)
    axes.set_ylabel("test accuracy (%)")
    axes.set_title(f"{results.name}: accuracy vs sparsity (mean ± std over seeds)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_convergence(results: StudyResults, path: Path) -> Path:
    """Test accuracy per epoch (mean and std band over seeds), one panel per sparsity, dense in every panel."""
    arms = arm_order(results)
    colors = _colors(arms)
    done = results.done
    sparsities = sorted({t["sparsity"] for t in done if t["arm"] != "dense"}) or [0.0]
    columns = min(3, len(sparsities))
    rows_needed = -(-len(sparsities) // columns)
    figure, grid = plt.subplots(
        rows_needed, columns, figsize=(4.2 * columns, 3.3 * rows_needed), squeeze=False, sharey=True
    )

    def draw(axes: plt.Axes, arm: str, keys: list[str], style: str) -> None:
        curves = [[100 * row.test_accuracy for row in results.curves.get(key, [])] for key in keys]
        length = min((len(curve) for curve in curves), default=0)
        if length == 0:
            return
        values = np.array([curve[:length] for curve in curves])
        epochs = np.arange(1, length + 1)
        mean = values.mean(axis=0)
        std = values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(length)
        axes.plot(epochs, mean, style, color=colors[arm], label=arm, linewidth=1.4)
        axes.fill_between(epochs, mean - std, mean + std, color=colors[arm], alpha=0.12)

    dense_keys = [t["key"] for t in done if t["arm"] == "dense"]
    for index, sparsity in enumerate(sparsities):
        axes = grid[index // columns][index % columns]
        if dense_keys:
            draw(axes, "dense", dense_keys, "--")
        for arm in arms:
            keys = [t["key"] for t in done if t["arm"] == arm and t["sparsity"] == sparsity and arm != "dense"]
            if keys:
                draw(axes, arm, keys, "-")
        axes.set_title(f"sparsity {sparsity:g}", fontsize=10)
        axes.set_xlabel("epoch")
        axes.grid(alpha=0.3)
        if index % columns == 0:
            axes.set_ylabel("test accuracy (%)")
    for index in range(len(sparsities), rows_needed * columns):
        grid[index // columns][index % columns].set_visible(False)
    handles, labels = grid[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8)
    figure.suptitle(f"{results.name}: convergence (mean ± std over seeds)")
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
