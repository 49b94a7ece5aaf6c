"""Report plots (issue 15.8): error bars over seeds, a categorical axis for one shot count, legends
outside the data, y axes zoomed to the data."""
from __future__ import annotations

import random

import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from clipheads.training.protocols.plots import per_seed, plot_base_to_novel, plot_few_shot, render_plots  # noqa: E402


def _few_shot_rows(shots=(16,), methods=("coop", "maple"), seeds=(1, 2, 3), datasets=("a", "b")):
    rng = random.Random(0)
    return [{"protocol": "few_shot", "method": m, "shots": k, "seed": s, "dataset": d,
             "top1": 0.70 + 0.02 * i + 0.01 * (k.bit_length()) + rng.uniform(-0.02, 0.02)}
            for i, m in enumerate(methods) for k in shots for s in seeds for d in datasets]


def test_seed_statistics_average_datasets_first():
    rows = [{"seed": 1, "top1": 0.6, "m": "x"}, {"seed": 1, "top1": 0.8, "m": "x"}, {"seed": 2, "top1": 0.9, "m": "x"}]
    mean, std = per_seed(rows, lambda r: r["top1"], lambda r: r["m"])["x"]
    assert mean == pytest.approx(0.8) and std == pytest.approx(0.1)  # seeds 0.7 and 0.9


def test_one_shot_count_is_a_categorical_axis_with_error_bars():
    fig = plot_few_shot(_few_shot_rows(), plt)
    ax = fig.axes[0]
    assert ax.get_xscale() == "linear" and [t.get_text() for t in ax.get_xticklabels()] == ["coop", "maple"]
    (bars,) = ax.containers  # one errorbar series, one point per method
    assert len(bars.lines[2][0].get_segments()) == 2  # the vertical error bars
    lo, hi = ax.get_ylim()
    assert 70 < lo < 75 and 77 < hi < 82  # zoomed to the data (75-77 % ± noise), not 0-100
    plt.close(fig)


def test_several_shot_counts_use_a_log_axis_and_the_legend_sits_outside():
    fig = plot_few_shot(_few_shot_rows(shots=(1, 2, 4, 8, 16)), plt)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4", "8", "16"]
    fig.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    assert legend.x0 >= ax.get_window_extent().x1  # right of the plotting area, over no data
    plt.close(fig)


def test_base_to_novel_dots_and_files(tmp_path):
    rows = [{"protocol": "base_to_novel", "method": m, "seed": s, "dataset": "d", "base": b + 0.01 * s,
             "novel": b - 0.05, "hm": b - 0.02} for m, b in (("coop", 0.8), ("mma", 0.85)) for s in (1, 2, 3)]
    fig = plot_base_to_novel(rows, plt)
    ax = fig.axes[0]
    assert len(ax.containers) == 3 and ax.get_ylim()[0] > 60  # base, novel, HM; zoomed
    plt.close(fig)
    files = render_plots(rows + _few_shot_rows(), tmp_path)
    assert files == ["base_to_novel.png", "few_shot.png"]
    assert all((tmp_path / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in files)
