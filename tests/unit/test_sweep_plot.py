"""The sweep's trade-off plot: labels never overlap one another (rendered, boxes compared), even when the points
crowd together, and seeds' spread is drawn as error bars."""

from __future__ import annotations

import itertools

import numpy as np
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


def test_seeds_train_each_configuration_once_per_seed_and_average(tmp_path):
    from stage2_student.config import SweepConfig
    from stage2_student.sweep import format_markdown, tradeoff_table

    cfg = SweepConfig(run_dir=tmp_path, out=tmp_path / "o", kl_weights="0,1", lrs="1e-4", seeds="0,1,2")
    plan = cfg.plan()
    assert [n for n, _, _ in plan] == [f"kl{k}_lr0.0001_seed{s}" for s in (0, 1, 2) for k in (0, 1)]
    assert all(o["seed"] == d["seed"] and d["config"] == n.rsplit("_seed", 1)[0] for n, o, d in plan)
    assert [n for n, _, _ in SweepConfig(run_dir=tmp_path, out=tmp_path, kl_weights="1").plan()] == ["kl1_lr2e-05"]

    # rows as run() builds them; gains 0.1, 0.2, 0.4 over the seeds for λ=1
    rows = {"base": {"method": "base", "eval": {"target": {"nll": 2.0}, "prose": {"nll": 3.0, "kl": 0.0}}}}
    for n, _, d in plan:
        g = {0: 0.1, 1: 0.2, 2: 0.4}[d["seed"]] if d["kl_weight"] == 1 else 0.5
        rows[n] = {**d, "eval": {"target": {"nll": 2.0 - g}, "prose": {"nll": 3.0 + g / 2, "kl": g}}}
    table = {l["name"]: l for l in tradeoff_table(rows, "target")}
    assert set(table) == {"base", "kl0_lr0.0001", "kl1_lr0.0001"}
    lam1 = table["kl1_lr0.0001"]
    assert lam1["seeds"] == 3
    assert lam1["target_gain"] == pytest.approx(np.mean([0.1, 0.2, 0.4]))
    assert lam1["target_gain_std"] == pytest.approx(np.std([0.1, 0.2, 0.4], ddof=1))
    assert lam1["prose_forgetting_std"] == pytest.approx(np.std([0.05, 0.1, 0.2], ddof=1))
    assert table["kl0_lr0.0001"]["target_gain_std"] == pytest.approx(0.0, abs=1e-12)
    md = format_markdown(list(table.values()), "target")
    assert f"+{lam1['target_gain']:.3f} ± {lam1['target_gain_std']:.3f}" in md


@pytest.mark.parametrize(
    "seeds, student, msg",
    [("0,x", {}, "--seeds '0,x'"), ("1,1", {}, "distinct"), ("0,1", {"seed": 3}, "either --seed or --seeds")],
)
def test_bad_seeds_are_refused(tmp_path, seeds, student, msg):
    from stage2_student.config import SweepConfig

    with pytest.raises(ValueError, match=msg):
        SweepConfig(run_dir=tmp_path, out=tmp_path, seeds=seeds, student=student)
