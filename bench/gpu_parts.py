"""The small child programs of ``make gpu-check`` (``python -m bench.gpu_parts <part> ...``) and
the readers that turn each part's output files into the numbers of the summary.

Each part runs in its own process so that a crash (the nvImageCodec ROI decode can SIGSEGV on
H100), a hang or a CUDA error in one part cannot take the others down.
"""
from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

PACKAGES = ("torch", "nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-nvimgcodec-cu13",
            "nvidia-nvimgcodec-cu12", "webdataset", "numpy", "pillow", "pillow-simd", "prometheus-client",
            # what the tests and the parts import besides (a bare machine's own, or the carried wheels)
            "pytest", "pytest-timeout", "tqdm", "pyyaml", "scipy", "matplotlib", "scikit-image")
SMI_FIELDS = ("name", "driver_version", "memory.total", "memory.used", "clocks.sm", "clocks.max.sm",
              "clocks.mem", "clocks.max.mem", "power.limit", "temperature.gpu", "pcie.link.gen.current",
              "pcie.link.width.current")


def versions() -> dict:
    """The interpreter, the installed versions and what torch sees."""
    import torch

    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    info = {"python": platform.python_version(), "executable": sys.executable, "packages": found,
            "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    try:
        import nvidia.dali

        info["dali"] = nvidia.dali.__version__
    except ImportError as exc:
        info["dali_error"] = str(exc)
    if torch.cuda.is_available():
        info["cudnn"] = torch.backends.cudnn.version()
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def nvidia_smi() -> dict:
    """Card, driver, memory, clocks and link of every GPU, from ``nvidia-smi``."""
    if shutil.which("nvidia-smi") is None:
        raise FileNotFoundError("nvidia-smi is not on PATH")
    out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(SMI_FIELDS)}", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    return {"gpus": [dict(zip(SMI_FIELDS, (v.strip() for v in line.split(","))))
                     for line in out.splitlines() if line.strip()]}


def roi_probe(shards: str, batches: int = 8) -> dict:
    """Train batches through nvImageCodec's GPU ROI decode (``gpu_roi_decode=True``).  Run in a
    child: a SIGSEGV here is the result, not a crash of the check."""
    import torch

    from pipeline import LoaderConfig, build_train_loader

    if not torch.cuda.is_available():  # dry mode: the shards and the settings are checked only
        from pipeline import _spec

        _spec(shards, "train", 0, 1, torch.device("cpu"), LoaderConfig(gpu_roi_decode=True), True, 1, False)
        return {"dry": True}
    loader = build_train_loader(shards, device="cuda:0", config=LoaderConfig(batch_size=128, gpu_roi_decode=True))
    seen = 0
    for _, raw in zip(range(batches), loader.raw_batches()):  # range first: no batch decoded beyond
        seen += len(raw)
    torch.cuda.synchronize()
    return {"images": seen, "batches": batches}


def data_summary(shards: Path) -> dict:
    """What the data part made, from the shard manifest (the checked contract)."""
    from shards.manifest import load

    manifest = load(shards)
    return {"classes": manifest.num_classes, "train": manifest.splits["train"].samples,
            "val": manifest.splits["val"].samples,
            "shards": sum(len(s.shards) for s in manifest.splits.values())}


def junit_summary(path: Path) -> dict:
    """Counts and failure messages of a pytest ``--junitxml`` report."""
    root = ET.parse(path).getroot()
    cases = root.iter("testcase")
    out: dict = {"passed": [], "failed": {}, "skipped": {}}
    for case in cases:
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is not None:
            out["failed"][name] = (problem.get("message") or "")[:600]
        elif case.find("skipped") is not None:
            out["skipped"][name] = (case.find("skipped").get("message") or "")[:200]
        else:
            out["passed"].append(name)
    return out


_VERBOSE = re.compile(r"^tests/(\w+)\.py::(\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b ?(\(.*?\))?")


def log_summary(log: str) -> dict:
    """What ``junit_summary`` says, from pytest's ``-v`` log, for a run that ended before writing
    its report (killed at its limit, dead inside CUDA or DALI): each test's result as it ended,
    and the test it was in when it stopped (its name printed, no result after it)."""
    out: dict = {"passed": [], "failed": {}, "skipped": {}}
    for line in log.splitlines():
        if m := _VERBOSE.match(line):
            name, result = f"{m[1]}::{m[2]}", m[3]
            if result in ("PASSED", "XFAIL", "XPASS"):
                out["passed"].append(name)
            elif result == "SKIPPED":
                out["skipped"][name] = m[4] or ""
            else:
                out["failed"][name] = "see logs/gpu-tests.log"
    last = log.rstrip("\n").rsplit("\n", 1)[-1]
    if (m := re.match(r"^tests/(\w+)\.py::(\S+) ?$", last)):
        out["stopped_in"] = f"{m[1]}::{m[2]}"
    return out


def model_summary(path: Path) -> dict:
    """images/s per configuration and the best bf16 share of the measured matmul rate."""
    from bench.bench_model import Config  # imports torch: only in the process that reads the report

    report = json.loads(path.read_text())
    rows = {}
    for r in report["results"]:
        label = Config(r["layout"], r["precision"], r["channels_last"], r["compiled"], r["lrn_fp32"]).label
        rows[label] = r["error"] or {"images_per_s": round(r["images_per_s"], 1),
                                     "share_of_matmul_peak": round(r["share_of_matmul_peak"], 4)}
    return {"matmul_peak": report["matmul_peak"], "configs": rows}


def pipeline_summary(path: Path) -> dict:
    """The medians the issue asks for (images/s)."""
    report = json.loads(path.read_text())
    keys = ("mixed_images_per_s", "mixed_with_gpu_normalize_images_per_s", "mixed_decode_only_images_per_s",
            "pipeline_images_per_s", "dali_decode_only_images_per_s", "decode_floor_images_per_s")
    return {k: report.get(k) and round(report[k]) for k in keys}


def service_summary(run: Path, model_alone: float | None = None, source: str | None = None) -> dict:
    """images/s and data-wait share per epoch from the run's history (epoch 1 includes warm-up),
    and issue 13's criterion 2 for the last epoch: data wait under 5% and at least 0.9x the
    model alone (``model_alone`` images/s, measured as ``source`` says) of the same configuration."""
    history = json.loads((run / "history.json").read_text())
    epochs = [{k: h.get(k) for k in ("epoch", "images_per_s", "data_share", "eval_views_per_s", "train_loss",
                                     "top1_error")} for h in history]
    last = epochs[-1]
    criterion = {"data_wait_share": round(last["data_share"], 4), "model_alone_images_per_s": model_alone,
                 "model_alone_from": source, "ratio_to_model_alone": None, "met": None}
    if model_alone:
        ratio = last["images_per_s"] / model_alone
        criterion.update(ratio_to_model_alone=round(ratio, 4), met=last["data_share"] < 0.05 and ratio >= 0.9)
    return {"epochs": epochs, "criterion_2": criterion}


def sweep_summary(path: Path) -> dict:
    """What the sweep recommends and projects, and how many configurations ran."""
    summary = json.loads(path.read_text())
    status = [r["status"] for r in summary["configs"].values()]
    evals = [r["eval_views_per_s"] for r in summary["configs"].values() if r["status"] == "ok" and r.get("eval_views_per_s")]
    return {"recommended": summary.get("recommended"), "projection": summary.get("projection"),
            "eval_views_per_s": max(evals, default=None),  # the fastest measured, with or without a recommendation
            "mode": summary.get("mode"), "started": summary.get("started"),
            "compiled_ahead": {name: f"{r['status']} ({r['wall_seconds']:.0f} s)"
                               for name, r in summary.get("compiled_ahead", {}).items()},
            **{s: status.count(s) for s in ("ok", "failed", "skipped")}}


# ImageNet-1k (ILSVRC2012) and the paper's schedule: what the projection multiplies the rates by.
IMAGENET_TRAIN, IMAGENET_VAL, EVAL_VIEWS, EPOCHS = 1_281_167, 50_000, 10, 90
TARGET_SECONDS = 5400  # issue 13: 90 epochs in under 90 minutes


def projection(train_images_per_s: float, eval_views_per_s: float | None) -> dict:
    """Wall time of 90 ImageNet epochs, each with the 10-view evaluation of the 50,000 validation
    images, at the measured rates (training images/s end to end; evaluation views/s, i.e. images
    times views, of the evaluation forward).  Without an evaluation rate only training is projected."""
    train = EPOCHS * IMAGENET_TRAIN / train_images_per_s
    evaluation = EPOCHS * IMAGENET_VAL * EVAL_VIEWS / eval_views_per_s if eval_views_per_s else None
    total = train + (evaluation or 0.0)
    return {"epochs": EPOCHS, "train_images_per_s": round(train_images_per_s, 1),
            "eval_views_per_s": eval_views_per_s and round(eval_views_per_s, 1),
            "train_hours": round(train / 3600, 3), "eval_hours": evaluation and round(evaluation / 3600, 3),
            "total_hours": round(total / 3600, 3), "includes_evaluation": evaluation is not None,
            "meets_90_minutes": evaluation is not None and total <= TARGET_SECONDS}


def projection_line(p: dict) -> str:
    evaluation = (f" + 10-view evaluation {p['eval_hours']:.2f} h at {p['eval_views_per_s']:.0f} views/s"
                  if p["includes_evaluation"] else " (no evaluation rate measured: training only)")
    return (f"90 ImageNet epochs: training {p['train_hours']:.2f} h at {p['train_images_per_s']:.0f} img/s"
            f"{evaluation} = {p['total_hours']:.2f} h (target 1.5 h)")


def headline(name: str, record: dict) -> str:
    """One line of numbers per part for the summary table."""
    r = record.get("results") or {}
    if record["status"] != "ok":
        return (record.get("reason") or record.get("error") or "").splitlines()[0][:90]
    if name == "versions":
        return f"torch {r['packages'].get('torch')} (CUDA {r['torch_cuda']}), DALI {r.get('dali', r.get('dali_error'))}"
    if name == "nvidia-smi":
        g = r["gpus"][0]
        return f"{g['name']}, driver {g['driver_version']}, {g['memory.total']} MiB, SM {g['clocks.max.sm']} MHz max"
    if name == "data":
        return f"{r['train']} train + {r['val']} val images, {r['classes']} classes, {r['shards']} shards"
    if name == "gpu-tests":
        return f"{len(r['passed'])} passed, {len(r['skipped'])} skipped"
    if name == "bench-model":
        best = max((v for v in r["configs"].values() if isinstance(v, dict)), key=lambda v: v["images_per_s"],
                   default=None)
        return f"best {best['images_per_s']:.0f} img/s ({100 * best['share_of_matmul_peak']:.1f}% of matmul)" if best else "-"
    if name == "bench-pipeline":
        return ", ".join(f"{k.replace('_images_per_s', '')} {v}" for k, v in r.items() if v)[:90]
    if name == "service":
        last, c = r["epochs"][-1], r["criterion_2"]
        ratio = f", {c['ratio_to_model_alone']:.2f}x model alone" if c["ratio_to_model_alone"] else ""
        return f"epoch {last['epoch']}: {last['images_per_s']:.0f} img/s, data wait {100 * last['data_share']:.1f}%{ratio}"
    if name == "sweep":
        best = r["recommended"] or {}
        return (f"{r['ok']} ok, {r['failed']} failed, {r['skipped']} skipped; best end to end: "
                f"{best.get('images_per_s', 0):.0f} img/s ({best.get('name', '-')})")[:120]
    return json.dumps(r)[:90]


def project(records: dict[str, dict]) -> dict | None:
    """90 epochs with the 10-view evaluation at the measured rates: training from the service
    part's last epoch, else the sweep's best end to end; evaluation from the sweep (the forward
    timed on 12 warm batches: ImageNet's 500,000 views an epoch amortise what the service's
    600-image evaluation also times, its first batch's latency and last short batch), else
    from the service part's last epoch, and with no recommendation the sweep's fastest measured."""
    results = records.get("sweep", {}).get("results") or {}
    sweep = results.get("projection") or {}
    service = records.get("service", {})
    if service.get("status") != "ok":
        return {**sweep, "train_rate_from": "sweep, best end to end", "eval_rate_from": "sweep"} if sweep else None
    last = service["results"]["epochs"][-1]
    sources = ((sweep.get("eval_views_per_s"), "sweep"), (last.get("eval_views_per_s"), "service part, last epoch"),
               (results.get("eval_views_per_s"), "sweep, fastest measured"))
    evaluation, source = next(((rate, name) for rate, name in sources if rate), (None, None))
    return {**projection(last["images_per_s"], evaluation), "train_rate_from": "service part, last epoch",
            "eval_rate_from": source, "service_eval_views_per_s": last.get("eval_views_per_s")}


def main(argv: list[str]) -> int:
    part = argv[0] if argv else ""
    if part == "versions":
        result = versions()
    elif part == "nvidia-smi":
        result = nvidia_smi()
    elif part == "roi-probe":
        result = roi_probe(argv[1])
    else:
        print(f"gpu_parts: unknown part {part!r}; one of versions, nvidia-smi, roi-probe", file=sys.stderr)
        return 2
    print("RESULT " + json.dumps(result), flush=True)
    sys.stderr.flush()
    # The result is out: skip the teardown of DALI's pipelines and nvImageCodec (the roi-probe's),
    # which can hang or crash after the measurement (as bench.sweep_child does).
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
