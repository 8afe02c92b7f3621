"""Figures of the accuracy results (matplotlib, Agg backend: no display needed).

- NIAH heatmap: context length on x, needle depth on y, score colour 0..1, one panel per
  method (at one budget), one file per task.
- Accuracy versus budget: one line per method (dense as a horizontal line), one panel per
  context length, one file per task.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Sequence


def _plt():
    import matplotlib
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    return plt


def _task_id(row: dict) -> str:
    return row["task"] if row["haystack"] == "noise" else f"{row['task']}-{row['haystack']}"


def heatmaps(summary: Sequence[dict], out_dir: Path, budget: int = None) -> List[Path]:
    """One PNG per task: a panel per method label (dense, and each method at ``budget``;
    default: the largest budget run), cells = mean score / 100 per (length, depth)."""
    plt = _plt()
    rows = [r for r in summary if r["depth"] is not None]
    paths = []
    for task in sorted({_task_id(r) for r in rows}):
        trows = [r for r in rows if _task_id(r) == task]
        budgets = sorted({r["budget"] for r in trows if r["budget"] is not None})
        b = budget if budget in budgets else (budgets[-1] if budgets else None)
        labels = list(dict.fromkeys(r["label"] for r in trows
                                    if r["budget"] is None or r["budget"] == b))
        lengths = sorted({r["length"] for r in trows})
        depths = sorted({r["depth"] for r in trows})
        cols = min(len(labels), 3)
        nrows = math.ceil(len(labels) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
        for ax in axes.flat[len(labels):]:
            ax.axis("off")
        im = None
        for ax, label in zip(axes.flat, labels):
            grid = [[math.nan] * len(lengths) for _ in depths]
            for r in trows:
                if r["label"] == label:
                    grid[depths.index(r["depth"])][lengths.index(r["length"])] = r["score"] / 100
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
            ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n % 1024 == 0 else str(n)
                                                for n in lengths])
            ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel("needle depth")
            ax.set_title(label, fontsize=9)
        fig.colorbar(im, ax=axes, shrink=0.8, label="score (fraction of answers found)")
        fig.suptitle(f"{task}: score by context length and needle depth")
        paths.append(_save(plt, fig, Path(out_dir) / f"heatmap_{task}.png"))
    return paths


def _save(plt, fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def accuracy_vs_budget(summary: Sequence[dict], out_dir: Path) -> List[Path]:
    """One PNG per task: score (0..100) against budget (log2 axis), a line per method and
    rank, a panel per context length; dense is a dashed horizontal line."""
    plt = _plt()
    rows = [r for r in summary if r["depth"] is None]
    paths = []
    for task in sorted({_task_id(r) for r in rows}):
        trows = [r for r in rows if _task_id(r) == task]
        lengths = sorted({r["length"] for r in trows})
        fig, axes = plt.subplots(1, len(lengths), figsize=(4.6 * len(lengths), 3.6),
                                 squeeze=False, sharey=True)
        for ax, length in zip(axes[0], lengths):
            lines: Dict[str, List[tuple]] = {}
            for r in trows:
                if r["length"] != length:
                    continue
                if r["method"] == "dense":
                    ax.axhline(r["score"], color="black", ls="--", lw=1, label="dense")
                else:
                    lines.setdefault(f"{r['method']} r{r['rank']}", []).append(
                        (r["budget"], r["score"]))
            for name, pts in sorted(lines.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_ylim(-2, 102)
            ax.set_xlabel("budget (tokens)")
            ax.set_title(f"{length} tokens", fontsize=9)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("score (RULER, 0-100)")
        axes[0][-1].legend(fontsize=7, loc="lower right")
        fig.suptitle(f"{task}: accuracy versus budget")
        paths.append(_save(plt, fig, Path(out_dir) / f"budget_{task}.png"))
    return paths
