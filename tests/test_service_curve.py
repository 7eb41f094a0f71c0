"""The run directory's curve.png: what it shows and where (service/plot.py)."""
from __future__ import annotations


def test_the_curve_s_legend_covers_none_of_the_validation_plot() -> None:
    """Inside the axes, matplotlib's 'best' spot covered the chance line (make demo's curve.png);
    the legend sits under the axes now, whatever the run's errors."""
    import matplotlib.pyplot as plt

    from service.plot import figure

    history = [dict(epoch=i + 1, train_loss=1.8 - 0.2 * i, top1_error=t1, top5_error=t5)
               for i, (t1, t5) in enumerate([(0.742, 0.325), (0.6, 0.2), (0.5, 0.08), (0.4, 0.042)])]
    fig = figure(history, chance=5 / 6)
    try:
        fig.canvas.draw()
        right = fig.axes[1]
        legend, axes = right.get_legend().get_window_extent(), right.get_window_extent()
        assert legend.y1 <= axes.y0, (legend, axes)
    finally:
        plt.close(fig)


def test_the_curve_marks_where_the_evaluation_s_views_changed() -> None:
    """A restart with another ``eval_views`` changes what the validation error measures (1 view
    errs more than 10); the curve drew both as one line with nothing to tell them apart.  It now
    names the views in the title when they are one kind, and marks the epoch they changed at."""
    import matplotlib.pyplot as plt

    from service.plot import figure

    def history(views):
        return [dict(epoch=i + 1, train_loss=1.0, top1_error=0.5, top5_error=0.2, eval_views=v)
                for i, v in enumerate(views)]

    fig = figure(history([10, 10, 10]), chance=0.9)
    try:
        assert fig.axes[1].get_title() == "validation (10-view)"
        assert not [t for t in fig.axes[1].texts if "view" in t.get_text()]
    finally:
        plt.close(fig)
    fig = figure(history([1, 1, 10, 10]), chance=0.9)
    try:
        right = fig.axes[1]
        assert right.get_title() == "validation"
        marks = [line.get_xdata()[0] for line in right.lines if line.get_linestyle() == ":"]
        assert marks == [2.5], marks
        assert [t.get_text() for t in right.texts] == ["1-view", "10-view"]
    finally:
        plt.close(fig)
    fig = figure([dict(epoch=1, train_loss=1.0, top1_error=0.5, top5_error=0.2)], chance=0.9)  # older history.json
    try:
        assert fig.axes[1].get_title() == "validation"
    finally:
        plt.close(fig)
