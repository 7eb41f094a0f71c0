"""The benchmarks' bar chart (``bench.charts.bars``) shows every value it is given on its axis.

bench_agree charts what the agreement costs per step, a difference of medians that is negative
whenever the noise exceeds the cost (docs/benchmarks.md quotes -0.1 ms lagged next to 2.0 ms
blocking); the axis was fixed at 0 .. 1.2 x the largest value.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from bench.charts import bars


@pytest.mark.parametrize("values", [
    {"2 ranks, blocking": 2000.0, "2 ranks, lagged": -100.0},
    {"2 ranks, blocking": -478.9, "2 ranks, lagged": -402.2},
    {"one configuration": 3.0},
    {"zero": 0.0},
    {},
], ids=["a negative next to a positive", "all negative", "one value", "zero", "empty record"])
def test_every_value_lies_on_the_drawn_axis_next_to_zero(tmp_path: Path, values: dict[str, float]) -> None:
    path = tmp_path / "chart.png"
    low, high = bars(path, values, "µs per step", "title", runs={k: [v] for k, v in values.items()})
    assert path.stat().st_size > 0
    assert low < high and low <= 0 <= high, (low, high)
    for value in values.values():
        assert low <= value <= high, (value, low, high)
