"""The sweep's trade-off plot: labels never overlap one another (rendered, boxes compared), even when the points
crowd together, and seeds' spread is drawn as error bars."""

from __future__ import annotations

import itertools

import pytest

from stage2_student.sweep import plot_tradeoff, tradeoff_figure

pytest.importorskip("matplotlib", reason="matplotlib is in the dev extra ([plot])")
import matplotlib.pyplot  # noqa: E402
import matplotlib.text  # noqa: E402


def _table(n_lrs=2, lams=(0, 0.3, 1, 3), with_std=False):
    rows = [{"name": "base", "method": "base", "lr": None, "knob": "", "target_nll": 2.0, "target_gain": 0.0}]
    rows[0].update({"prose_nll": 3.0, "prose_forgetting": 0.0, "prose_kl": 0.0})
    for lr, lam in itertools.product([3e-4 * (i + 1) for i in range(n_lrs)], lams):
        # crowded on purpose: every point within 1e-3 of the others, at the top edge
        r = {
            "name": f"kl{lam:g}_lr{lr:g}",
            "method": "direct fine-tuning" if lam == 0 else "label annealing",
            "lr": lr,
            "knob": f"kl_weight={lam:g}",
            "target_nll": 1.5,
            "target_gain": 0.5 + 1e-4 * lam,
            "prose_nll": 3.1,
            "prose_forgetting": 0.1 + 1e-4 * lam,
            "prose_kl": 0.1,
        }
        if with_std:
            r.update({"target_gain_std": 0.01, "prose_forgetting_std": 0.02})
        rows.append(r)
    return rows


@pytest.mark.parametrize("n_lrs", [1, 3, 8])
def test_labels_do_not_overlap(n_lrs):
    table = _table(n_lrs)
    fig = tradeoff_figure(table, "target")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = [a for ax in fig.axes for a in ax.texts]
    assert len(texts) == sum(1 for r in table if r["knob"])  # every labelled point has its label
    # the text's own box (an Annotation's get_window_extent also covers its leader line)
    boxes = [matplotlib.text.Text.get_window_extent(t, renderer) for t in texts]
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b), (a, b)
    # and all labels lie inside the saved figure
    fb = fig.bbox
    for b in boxes:
        assert fb.x0 <= b.x0 and b.x1 <= fb.x1 and fb.y0 <= b.y0 and b.y1 <= fb.y1, (b, fb)
    matplotlib.pyplot.close(fig)


def test_seed_spread_is_drawn_as_error_bars(tmp_path):
    fig = tradeoff_figure(_table(1, with_std=True), "target")
    (ax,) = fig.axes
    # errorbar() adds a LineCollection per direction: one for x, one for y
    assert len(ax.collections) == 2
    matplotlib.pyplot.close(fig)
    fig = tradeoff_figure(_table(1, with_std=False), "target")
    assert len(fig.axes[0].collections) == 0
    matplotlib.pyplot.close(fig)
    plot_tradeoff(_table(2, with_std=True), "target", tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
