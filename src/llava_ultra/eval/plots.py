"""PNG plots of a scored run, drawn from the `scores.json` dict alone (so `score` and `eval` draw
the same pictures, and a plot can be redrawn without the model or the predictions).

Plots: per-subset bars (F1 and BLEU for open questions, accuracy for closed ones, 95% CI
whiskers) for every subset dimension with more than one value; the closed yes/no confusion
matrix; selector vs random valid-frame rate by k. matplotlib runs on the Agg backend (no display
needed); figures are closed after saving so long runs do not leak memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

PLOTS_DIR = "plots"
BAR_METRICS = (("f1", "F1 (open)"), ("bleu", "BLEU (open)"), ("closed_accuracy", "Accuracy (closed)"))


def _whiskers(values: list[float | None], cis: list[list[float] | None]) -> np.ndarray:
    """(2, n) distances below/above each bar for matplotlib's yerr (0 where no CI)."""
    err = np.zeros((2, len(values)))
    for i, (v, ci) in enumerate(zip(values, cis, strict=True)):
        if v is not None and ci:
            err[:, i] = [max(v - ci[0], 0.0), max(ci[1] - v, 0.0)]
    return err


def plot_subset(dimension: str, groups: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    """Grouped bars: one group per subset value, one bar per metric in BAR_METRICS."""
    names = list(groups)
    x = np.arange(len(names))
    width = 0.8 / len(BAR_METRICS)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(names) + 2), 3.6))
    for j, (key, label) in enumerate(BAR_METRICS):
        values = [groups[n].get(key) for n in names]
        cis = [(groups[n].get("ci") or {}).get(key) for n in names]
        heights = [0.0 if v is None else v for v in values]
        ax.bar(
            x + (j - (len(BAR_METRICS) - 1) / 2) * width,
            heights,
            width,
            yerr=_whiskers(values, cis),
            capsize=2,
            label=label,
        )
    ax.set_xticks(x, [f"{n}\n(n={groups[n]['n']})" for n in names], fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("score (x100), 95% CI")
    ax.set_title(f"By {dimension.replace('_', ' ')}")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_confusion(confusion: Mapping[str, Any], path: Path) -> Path:
    """Reference (rows) x predicted (columns) counts for closed yes/no questions."""
    counts = np.asarray(confusion["counts"])
    fig, ax = plt.subplots(figsize=(4.2, 3.2))
    ax.imshow(counts, cmap="Blues")
    for (r, c), n in np.ndenumerate(counts):
        ax.text(c, r, str(n), ha="center", va="center", color="black")
    ax.set_xticks(range(counts.shape[1]), confusion["predicted_labels"])
    ax.set_yticks(range(counts.shape[0]), confusion["reference_labels"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    ax.set_title(f"Closed yes/no (n={confusion['n']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_selection(selection: Mapping[str, Any], path: Path) -> Path:
    """Selector and random valid-frame rates (x100) against k, with 95% CI whiskers."""
    by_k = selection["by_k"]
    ks = list(by_k)
    x = np.arange(len(ks))
    fig, ax = plt.subplots(figsize=(max(4.5, 0.8 * len(ks) + 2), 3.4))
    for key, label, marker in (("rate", "selector", "o"), ("random_rate", "random choice", "s")):
        values = [by_k[k][key] for k in ks]
        ax.errorbar(
            x,
            values,
            yerr=_whiskers(values, [by_k[k][f"{key}_ci"] for k in ks]),
            marker=marker,
            capsize=3,
            label=label,
        )
    ax.set_xticks(x, [f"{k}\n(n={by_k[k]['n']})" for k in ks], fontsize=8)
    ax.set_xlabel("k (frames per sample)")
    ax.set_ylabel("valid frame chosen (%)")
    ax.set_ylim(-2, 105)
    ax.set_title("Frame selection accuracy vs k")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(scores: Mapping[str, Any], out_dir: str | Path) -> list[str]:
    """Draw every plot the scores support into `out_dir/plots/`; returns paths relative to out_dir."""
    folder = Path(out_dir) / PLOTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for dim, groups in scores.get("subsets", {}).items():
        if len(groups) > 1:
            written.append(plot_subset(dim, groups, folder / f"subset_{dim}.png"))
    if scores.get("confusion"):
        written.append(plot_confusion(scores["confusion"], folder / "closed_confusion.png"))
    if scores.get("selection"):
        written.append(plot_selection(scores["selection"], folder / "selection_vs_k.png"))
    return [str(p.relative_to(out_dir)) for p in written]
