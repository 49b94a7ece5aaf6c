"""Report plots from finished protocol units: what the numbers are, and how sure.

Every point is a mean over seeds with an error bar of one standard deviation over seeds (a seed's
value is its average over datasets, the papers' averaging). Dots with error bars, not bars from
zero, so the y axis can zoom to the data honestly; legends sit outside the plotting area. Accuracy
against shots uses a log2 axis when several shot counts exist and a categorical one (one column per
method) when there is a single shot count.
"""
from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable, Sequence

DPI = 110


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = list(values)
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


def per_seed(rows: Iterable[dict], value: Callable[[dict], float], group: Callable[[dict], tuple]) -> dict:
    """{group: (mean, std over seeds)} where each seed's value is averaged over its datasets first."""
    by: dict = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by[group(r)][r["seed"]].append(value(r))
    return {g: _mean_std([statistics.fmean(v) for v in seeds.values()]) for g, seeds in by.items()}


def _zoom(ax, lows: Sequence[float], highs: Sequence[float]) -> None:
    """y limits hugging the data (error bars included) with a little room, within 0-100."""
    lo, hi = min(lows), max(highs)
    pad = max(1.0, 0.08 * (hi - lo))
    ax.set_ylim(max(0.0, lo - pad), min(100.0, hi + pad))


def _legend_outside(ax) -> None:
    if len(ax.get_legend_handles_labels()[0]) < 2:  # one series: the title says what it is
        return
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False, fontsize=8)


def _dots(ax, groups: Sequence[str], series: dict[str, dict[str, tuple[float, float]]]) -> None:
    """One categorical x position per group, one marker series per key with ±1 std bars."""
    keys = list(series)
    width = 0.6 / max(len(keys), 1)
    lows, highs = [], []
    for j, key in enumerate(keys):
        xs, ys, es = [], [], []
        for i, g in enumerate(groups):
            if g in series[key]:
                m, s = series[key][g]
                xs.append(i + width * (j - (len(keys) - 1) / 2))
                ys.append(100 * m)
                es.append(100 * s)
        ax.errorbar(xs, ys, yerr=es, fmt="o", capsize=3, markersize=5, label=key)
        lows += [y - e for y, e in zip(ys, es)]
        highs += [y + e for y, e in zip(ys, es)]
    ax.set_xticks(range(len(groups)), groups, rotation=20 if len(groups) > 4 else 0)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.grid(axis="y", alpha=0.3)
    if lows:
        _zoom(ax, lows, highs)


def plot_base_to_novel(rows: list[dict], plt):
    methods = sorted({r["method"] for r in rows})
    series = {}
    for key, label in (("base", "base"), ("novel", "novel"), ("hm", "HM")):
        stats = per_seed(rows, lambda r, k=key: r[k], lambda r: r["method"])
        series[label] = {m: stats[m] for m in methods if m in stats}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(methods) + 2), 3.6))
    _dots(ax, methods, series)
    ax.set_ylabel("top-1 (%)")
    ax.set_title("Base-to-novel (mean ± std over seeds)")
    _legend_outside(ax)
    return fig


def plot_few_shot(rows: list[dict], plt):
    methods = sorted({r["method"] for r in rows})
    shots = sorted({int(r["shots"]) for r in rows})
    stats = per_seed(rows, lambda r: r["top1"], lambda r: (r["method"], int(r["shots"])))
    fig, ax = plt.subplots(figsize=(6.5, 3.6) if len(shots) > 1 else (max(6.0, 0.9 * len(methods) + 2), 3.6))
    if len(shots) == 1:  # one shot count: methods side by side, not a log axis with one x
        (k,) = shots
        _dots(ax, methods, {f"{k}-shot": {m: stats[(m, k)] for m in methods if (m, k) in stats}})
        ax.set_title(f"{k}-shot top-1 (mean ± std over seeds)")
    else:
        lows, highs = [], []
        for m in methods:
            pts = [(k, *stats[(m, k)]) for k in shots if (m, k) in stats]
            ax.errorbar([k for k, _, _ in pts], [100 * v for _, v, _ in pts], yerr=[100 * s for _, _, s in pts],
                        marker="o", capsize=3, label=m)
            lows += [100 * (v - s) for _, v, s in pts]
            highs += [100 * (v + s) for _, v, s in pts]
        ax.set_xscale("log", base=2)
        ax.set_xticks(shots, [str(k) for k in shots])
        ax.set_xlabel("shots per class")
        ax.grid(alpha=0.3)
        ax.set_title("Few-shot top-1 (mean ± std over seeds)")
        _zoom(ax, lows, highs)
    ax.set_ylabel("top-1 (%)")
    _legend_outside(ax)
    return fig


def plot_multi_task(rows: list[dict], plt):
    methods = sorted({r["method"] for r in rows})
    tasks = sorted({t for r in rows for t in r["per_task"]}) + ["mean"]
    series = {}
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        series[m] = {t: per_seed([r for r in mine if t == "mean" or t in r["per_task"]],
                                 lambda r, t=t: r["mean"] if t == "mean" else r["per_task"][t], lambda r: 0)[0]
                     for t in tasks if any(t == "mean" or t in r["per_task"] for r in mine)}
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(tasks) + 2), 3.6))
    _dots(ax, tasks, series)
    ax.set_ylabel("top-1 (%)")
    ax.set_title("Multi-task: one head, each domain a task (mean ± std over seeds)")
    _legend_outside(ax)
    return fig


PLOTS = {"base_to_novel": plot_base_to_novel, "few_shot": plot_few_shot, "multi_task": plot_multi_task}


def render_plots(rows: Iterable[dict], out_dir: Path) -> list[str]:
    """One PNG per protocol present in `rows` (finished units); returns the file names."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    by: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by[r["protocol"]].append(r)
    files = []
    for protocol, plot in PLOTS.items():
        if by.get(protocol):
            name = f"{protocol}.png"
            fig = plot(by[protocol], plt)
            fig.savefig(Path(out_dir) / name, dpi=DPI, bbox_inches="tight")
            plt.close(fig)
            files.append(name)
    return files
