"""The sweep's table and chart (``bench.sweep``): one line per configuration, and the images/s of
those that ran as bars.  A chart that cannot be drawn costs the chart alone: the summary and the
recommendation are written before it."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.sweep import Sweep


def headline(record: dict) -> str:
    """One configuration's numbers in a line (or why it has none)."""
    if record["status"] != "ok":
        return (record.get("reason") or record.get("error") or "").splitlines()[0][:100]
    parts = [f"{record['images_per_s']:.0f} img/s"]
    for key, fmt in (("data_wait_share", "data wait {:.1%}"), ("ratio_to_model_alone", "{:.2f}x model alone"),
                     ("eval_views_per_s", "eval {:.0f} views/s"), ("cpu_us_per_image", "{:.0f} CPU us/image")):
        if record.get(key) is not None:
            parts.append(fmt.format(record[key]))
    return ", ".join(parts)


def report(sweep: Sweep) -> None:
    """The table on stdout and the chart next to the summary (a chart that cannot be drawn is
    said, and costs nothing else: the summary and the recommendation are written before)."""
    print(f"\n{'configuration':<78} {'status':<8} result")
    for name, record in sweep.records.items():
        print(f"{name:<78} {record['status']:<8} {headline(record)}")
    done = {name: r["images_per_s"] for name, r in sweep.records.items() if r["status"] == "ok"}
    if not done:
        return
    try:
        from bench.charts import bars

        bars(sweep.out / "sweep.png", done, "images/s (model and e2e: training; pipeline: normalised batches)",
             f"issue 13 sweep ({sweep.summary['mode']} mode)")
    except Exception as exc:  # matplotlib missing or failing: the numbers are in the table and JSON
        print(f"sweep: no chart ({type(exc).__name__}: {exc})", flush=True)
