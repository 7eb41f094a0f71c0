"""The benchmarks' one chart: horizontal bars of medians, every run as a dot, the value written."""
from __future__ import annotations

from pathlib import Path


def bars(path: Path, values: dict[str, float], xlabel: str, title: str,
         runs: dict[str, list[float]] | None = None, unit: str = "") -> tuple[float, float]:
    """Write ``path`` (PNG): one bar per entry of ``values``, top to bottom in their order; returns
    the x-axis range drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(values)
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.45 * len(names)))
    ax.barh(names, [values[n] for n in names], color="tab:blue")
    for i, name in enumerate(names):
        value = values[name]  # a negative one's label on its left (a cost below the noise is one)
        ax.text(value, i, f"{value:.1f}{unit} " if value < 0 else f" {value:.1f}{unit}", va="center",
                ha="right" if value < 0 else "left")
        if runs:
            ax.plot(runs[name], [i] * len(runs[name]), "k.", ms=4)
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.8)
    shown = [0.0, *values.values(), *(x for name in names for x in (runs or {}).get(name, []))]
    low, high = min(shown), max(shown)
    room = 0.2 * ((high - low) or 1.0)  # for the labels, on the side(s) the bars go
    ax.set_xlim(low - (room if low < 0 else 0.0), high + (room if high > 0 or low == 0 else 0.0))
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    drawn = ax.get_xlim()
    plt.close(fig)
    return drawn
