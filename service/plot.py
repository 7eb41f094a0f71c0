"""The training curve as a picture: loss and validation error per epoch."""
from __future__ import annotations

from pathlib import Path


def plot_history(history: list[dict], path: Path, chance: float) -> None:
    """Write ``path`` (PNG): train loss (left) and val top-1/top-5 error against chance (right)."""
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
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
