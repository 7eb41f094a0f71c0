"""The training curve as a picture: loss and validation error per epoch."""
from __future__ import annotations

from pathlib import Path


def plot_history(history: list[dict], path: Path, chance: float) -> None:
    """Write ``path`` (PNG): train loss (left) and val top-1/top-5 error against chance (right)."""
    import matplotlib.pyplot as plt

    fig = figure(history, chance)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure(history: list[dict], chance: float):
    """The curve's matplotlib figure (laid out, not saved)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(epochs, [h["train_loss"] for h in history], marker="o")
    left.set(xlabel="epoch", ylabel="train loss", title="training loss")
    right.plot(epochs, [h["top1_error"] for h in history], marker="o", label="top-1 error")
    right.plot(epochs, [h["top5_error"] for h in history], marker="o", label="top-5 error")
    right.axhline(chance, color="grey", linestyle="--", label="chance (top-1)")
    right.set(xlabel="epoch", ylabel="validation error", ylim=(0, 1), title="validation")
    _mark_views(right, history)
    # Under the axes: inside, the default "best" spot covered the chance line, and any corner some
    # run's points (top-5 starts low, top-1 ends mid-height).
    right.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3, frameon=False, fontsize="small")
    fig.tight_layout()
    return fig


def _mark_views(axes, history: list[dict]) -> None:
    """Say which evaluation the errors are of: a restart may change ``eval_views`` (1 view errs
    more than 10), so each stretch of one kind is named and a dotted line marks each change.
    Records without ``eval_views`` (older runs) are not guessed at."""
    views = [h.get("eval_views") for h in history]
    if None in views or not views:
        return
    if len(set(views)) == 1:
        axes.set_title(f"validation ({views[0]}-view)")
        return
    top = axes.get_xaxis_transform()  # x in epochs, y in axes fractions
    for i, (h, v) in enumerate(zip(history, views)):
        if i and v == views[i - 1]:
            continue
        if i:
            axes.axvline(h["epoch"] - 0.5, color="grey", linestyle=":")
        axes.annotate(f"{v}-view", (h["epoch"], 0.02), xycoords=top, xytext=(-4, 0), textcoords="offset points",
                      va="bottom", fontsize="small", color="grey")  # at the bottom: chance sits near the top
