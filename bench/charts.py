"""The benchmarks' one chart: horizontal bars of medians, every run as a dot, the value written."""
from __future__ import annotations

from pathlib import Path


def bars(path: Path, values: dict[str, float], xlabel: str, title: str,
         runs: dict[str, list[float]] | None = None, unit: str = "") -> None:
    """Write ``path`` (PNG): one bar per entry of ``values``, top to bottom in their order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(values)
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.45 * len(names)))
    ax.barh(names, [values[n] for n in names], color="tab:blue")
    for i, name in enumerate(names):
        ax.text(values[name], i, f" {values[name]:.1f}{unit}", va="center")
        if runs:
            ax.plot(runs[name], [i] * len(runs[name]), "k.", ms=4)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.2 * max(values.values(), default=1.0))
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
