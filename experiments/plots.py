"""Figures saved as PNG (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from villa.core.io import atomic_file


def _save(fig, path: Path) -> None:
    """PNG written to a temporary name and renamed: never a half-written figure."""
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def retrieval_bars(results: dict[str, dict[str, Any]], groups: list[str], path: Path, title: str) -> Path:
    """Text-to-region R-Precision per attribute group, one bar per model, chance as a marker."""
    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(results)
    width = 0.8 / len(names)
    cols = ["all"] + groups
    for i, name in enumerate(names):
        t = results[name]["text_to_region"]
        vals = [t["r_precision"]] + [t["per_group"][g] for g in groups]
        ax.bar([c + i * width for c in range(len(cols))], [100 * v for v in vals], width, label=name)
    t = results[names[0]]["text_to_region"]
    chance = [t["chance"]] + [t["chance_per_group"][g] for g in groups]
    ax.scatter(
        [c + 0.4 - width / 2 for c in range(len(cols))],
        [100 * v for v in chance],
        marker="_",
        s=400,
        c="k",
        label="chance",
    )
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cols))], cols)
    ax.set_ylabel("text-to-region R-Precision (%)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
    return path


def complexity_lines(summary: list[dict[str, Any]], methods: list[str], path: Path) -> Path:
    """Text-to-region and region-to-text R-Precision vs sample complexity: one line per method, mean +- std over
    seeds as error bars (``summary``: rows of ``experiments/complexity.py``'s results.json)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    xs = [r["complexity"]["mean"] for r in summary]
    for ax, (key, title) in zip(axes, (("text_to_region", "text-to-region"), ("region_to_text", "region-to-text"))):
        for m in methods:
            mean = [100 * r[key][m]["all"]["mean"] for r in summary]
            std = [100 * r[key][m]["all"]["std"] for r in summary]
            ax.errorbar(xs, mean, yerr=std, marker="o", capsize=3, label=m)
        ax.set_xlabel("sample complexity (region-attribute pairs per image)")
        ax.set_ylabel(f"{title} R-Precision (%)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    _save(fig, path)
    return path
