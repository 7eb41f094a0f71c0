"""The service's parts in-process: settings validation, ranks, run identity, the metric names (a
contract with the dashboard) and the HTTP endpoint.  (Checkpoint files in-process:
``tests/test_service_checkpoint_files.py``.)"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from pipeline.stats import DatasetStats
from service import data_stats
from service.app import parse
from service.config import TrainConfig
from service.dist import RankError, Ranks, core_share
from service.errors import ConfigMismatch, ServiceError
from service.metrics import ServiceMetrics, build_labels
from service.server import HttpEndpoint
from service.state import check_identity, identity
from service.status import StatusBoard
from tests.prometheus_bin import binaries

CONTRACT = [
    "alexnet_build_info", "alexnet_train_images_total", "alexnet_train_steps_total",
    "alexnet_train_step_seconds_bucket", "alexnet_train_data_wait_seconds_bucket", "alexnet_train_loss",
    "alexnet_learning_rate", "alexnet_epoch", "alexnet_val_top1_error", "alexnet_val_top5_error", "alexnet_val_loss",
    "alexnet_eval_duration_seconds", "alexnet_last_checkpoint_timestamp_seconds",
    "alexnet_checkpoint_duration_seconds_bucket",
    "alexnet_samples_failed_total", "alexnet_gpu_memory_allocated_bytes", "alexnet_gpu_memory_reserved_bytes",
    "alexnet_heartbeat_timestamp_seconds",
]


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "epochs must be >= 1, got 0"),
    (["--eval_views", "5"], "eval_views must be 1 or 10"),
    (["--loader.batch_size", "0"], "loader.batch_size must be >= 1"),
    (["--loader.dtype", "bfloat16"], "loader.dtype bfloat16 needs model.autocast"),
    (["--model.layout", "pipes"], "model.layout must be one of"),
    (["--model.autocast", "fp8"], "model.autocast must be one of"),
    (["--optim.lr", "-1"], "optim.lr must be a number > 0"),
    (["--optim.lr", "0"], "optim.lr must be a number > 0 .*got 0.0"),  # lr 0: every step a no-op, the whole run
    (["--optim.momentum", "-1"], "optim.momentum must be a number in \\[0, 1\\), got -1.0"),
    (["--loader.threads", "100000"], "loader.threads must be in 0..1024 .*got 100000"),  # DALI: exit 134, no line
    (["--checkpoint.keep", "0"], "checkpoint.keep must be >= 1"),
    (["--http.port", "70000"], "http.port must be in 0..65535"),
    (["--device", "gpu"], "device must be auto, cpu, cuda or cuda:N"),
    (["--checkpoint.every_steps", "often"], "checkpoint.every_steps must be int"),
    (["--loader.sigma", "nan"], "loader.sigma must be a finite number >= 0, got nan"),  # nan < 0 is False
    (["--loader.sigma", "inf"], "loader.sigma must be a finite number >= 0, got inf"),
    (["--checkpoint.every_seconds", "inf"], "checkpoint.every_seconds must be a finite number >= 0"),
    (["--http.stall_seconds", "inf"], "http.stall_seconds must be a finite number > 0"),
    (["--loader.crop", "300"], "loader.crop 300 does not fit the network: .* crops of 224 to 255 px"),
    (["--loader.crop", "8"], "loader.crop 8 does not fit the network"),
    (["--seed", "99999999999999999999999"], "seed must be in 0..4294967295"),
    (["--optim.lr", "1e308"], "optim.lr must be a number > 0 \\(float32's 1.175e-38 to 3.403e\\+38\\)"),
    (["--loader.prefetch", "100000"], "loader.prefetch must be in 1..16"),
    (["--out", ""], "command line: out is empty: give a path"),  # not ".": the working directory
    (["--shards="], "command line: shards is empty: give a path"),
    (["--config", ""], "command line: --config is empty: give a path"),
    # Absurd values past what any schedule or the pixel range gives; they were trained on, silently.
    (["--epochs", "1000000000"], "epochs must be at most 10000 .*got 1000000000"),
    (["--loader.sigma", "1e6"], "loader.sigma must be at most 10 .*got 1000000.0"),
    (["--optim.max_drops", "1000"], "optim.max_drops must be at most 35 at optim.lr 0.01 .*got 1000"),
    (["--optim.max_drops", "33", "--optim.lr", "1e-5"], "optim.max_drops must be at most 32 at optim.lr 1e-05 .*got 33"),
])
def test_bad_settings_are_rejected_naming_the_key(args: list[str], message: str) -> None:
    with pytest.raises(ServiceError, match=message) as info:
        parse(args)
    assert info.value.code == 2


def test_large_but_real_settings_pass() -> None:
    """The upper bounds leave what a person may mean: thousands of epochs (a small dataset, an
    overfitting study), the lighting noise 100 times the paper's, every lr drop float32 can hold."""
    cfg = parse(["--epochs", "10000", "--loader.sigma", "10", "--optim.max_drops", "35"])
    assert (cfg.epochs, cfg.loader.sigma, cfg.optim.max_drops) == (10000, 10.0, 35)


def test_fresh_is_refused_in_a_config_file(tmp_path: Path) -> None:
    """A file is read again at every start (the entrypoint's restarts too): fresh there would wipe
    the run each time, so it is taken from the command line only."""
    toml = tmp_path / "run.toml"
    toml.write_text("epochs = 2\nfresh = true\n")
    with pytest.raises(ServiceError, match=f"{toml}: fresh is a command-line-only setting") as info:
        parse(["--config", str(toml)])
    assert info.value.code == 2
    toml.write_text("epochs = 2\n")
    assert parse(["--config", str(toml), "--fresh", "true"]).fresh is True


def test_good_settings_pass_and_reduced_precision_input_needs_autocast() -> None:
    cfg = parse(["--loader.dtype", "bfloat16", "--model.autocast", "bfloat16", "--optim.bias_decay", "false"])
    assert cfg.loader.dtype == "bfloat16" and cfg.optim.bias_decay is False
    assert parse([]) == TrainConfig()


def test_ranks_from_the_torchrun_environment() -> None:
    assert Ranks.from_env({}) == Ranks(0, 1, 0)
    r = Ranks.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (r.is_main, r.http_port(9431), r.http_port(0), r.suffix()) == (False, 9432, 0, ".rank3")
    assert r.distributed and not Ranks().distributed
    assert Ranks().gather("x") == ["x"] and Ranks().any(True) == (True,) and Ranks().any(False, True) == (False, True)
    for env in ({"RANK": "2", "WORLD_SIZE": "2"}, {"WORLD_SIZE": "two"}):
        with pytest.raises(RankError):
            Ranks.from_env(env)
    assert Ranks().core_peers() == (0, 1)  # one process: it shares its cores with nobody


def test_every_local_rank_refuses_a_base_port_its_last_rank_cannot_have() -> None:
    """65535 on two ranks: rank 1 would need 65536; rank 0 refuses too, so no rank joins alone."""
    for local_rank in (0, 1):
        ranks = Ranks.from_env({"RANK": str(local_rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(local_rank),
                                "LOCAL_WORLD_SIZE": "2"})
        with pytest.raises(RankError, match=r"http.port 65535: each of the 2 ranks .* up to 65536, .* "
                                            r"choose --http.port 65534 or lower"):
            ranks.http_port(65535)
        assert ranks.http_port(65534) == 65534 + local_rank and ranks.http_port(0) == 0
    assert Ranks().http_port(65535) == 65535


def test_each_rank_sharing_cores_gets_its_own_contiguous_part() -> None:
    cores = set(range(4, 20))  # 16 cores, say a container's cpuset 4-19
    assert [core_share(cores, i, 4) for i in range(4)] == [set(range(4, 8)), set(range(8, 12)),
                                                           set(range(12, 16)), set(range(16, 20))]
    assert [len(core_share(set(range(8)), i, 3)) for i in range(3)] == [2, 3, 3]
    assert set().union(*(core_share(set(range(8)), i, 3) for i in range(3))) == set(range(8))
    assert core_share(cores, 0, 1) == cores  # shared with nobody: every core
    assert [core_share({0, 1}, i, 4) for i in range(4)] == [{0}, {1}, {0}, {1}]  # fewer cores than ranks


def test_identity_separates_recipe_from_operational_keys() -> None:
    base = TrainConfig()
    mine = identity(base, "data1")
    operational = dataclasses.replace(base, epochs=5, log_every=1, loader=base.loader.replace(threads=1))
    check_identity(Path("c.pt"), identity(operational, "data1"), mine)  # accepted
    with pytest.raises(ConfigMismatch, match=r"loader.batch_size is 32 there and 128 here.*--fresh true"):
        check_identity(Path("c.pt"), identity(dataclasses.replace(base, loader=base.loader.replace(batch_size=32)),
                                              "data1"), mine)
    with pytest.raises(ConfigMismatch, match="the shards differ"):
        check_identity(Path("c.pt"), identity(base, "data2"), mine)


def _stats(shift: float = 0.0, flip: bool = False, noise: float = 0.0) -> dict:
    rng = np.random.default_rng(0)
    eigvec = np.linalg.qr(rng.normal(size=(3, 3)))[0] * (np.array([-1, 1, 1]) if flip else 1)
    image = rng.uniform(60, 180, size=(40, 40, 3)).astype(np.float32) + shift
    return data_stats.summary(DatasetStats(mean=image.mean(axis=(0, 1)) + noise, std=np.full(3, 60, np.float32) + noise,
                                           eigval=np.array([5000.0, 300.0, 40.0]) * (1 + noise), eigvec=eigvec,
                                           mean_image=image + noise))


def test_the_dataset_statistics_are_part_of_the_identity_within_a_tolerance() -> None:
    """Shards made again with other statistics (--stats_images 1: the same tars) were resumed
    without a word; the same statistics computed elsewhere (last bits, an eigenvector's sign) must
    still resume, and a checkpoint from before the check (no summary) resumes as before."""
    base = TrainConfig()
    mine = identity(base, "data1", _stats())
    check_identity(Path("c.pt"), identity(base, "data1", _stats(noise=1e-5, flip=True)), mine)  # accepted
    check_identity(Path("c.pt"), identity(base, "data1"), mine)  # an older checkpoint: accepted
    with pytest.raises(ConfigMismatch, match=r"c.pt belongs to another run: the shards' dataset statistics are not "
                                             r"the ones it trained with: the mean differs by up to 20 .*--fresh true"):
        check_identity(Path("c.pt"), identity(base, "data1", _stats(shift=20)), mine)
    lighter = dict(_stats(), lighting=(2 * np.asarray(_stats()["lighting"])).tolist())
    with pytest.raises(ConfigMismatch, match="the PCA lighting"):
        check_identity(Path("c.pt"), identity(base, "data1", lighter), mine)


def test_metric_names_of_the_contract() -> None:
    metrics = ServiceMetrics(build_labels("cpu", "grouped", 1))
    metrics.step(24, 0.5, 0.01)
    metrics.checkpoint_seconds.observe(0.2)
    metrics.gpu_allocated.labels(device="cuda:0").set(1)
    metrics.gpu_reserved.labels(device="cuda:0").set(2)
    from prometheus_client import generate_latest

    text = generate_latest(metrics.registry).decode()
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if not line.startswith("#")}
    assert set(CONTRACT) <= names, set(CONTRACT) - names
    info = next(line for line in text.splitlines() if line.startswith("alexnet_build_info{"))
    for label in ("version", "git_revision", "torch", "dali", "device", "layout", "world_size"):
        assert f'{label}="' in info
    assert "alexnet_train_images_total 24.0" in text and "alexnet_val_top1_error NaN" in text
    assert "alexnet_eval_duration_seconds NaN" in text  # before the first evaluation: not known, not 0
    assert "process_resident_memory_bytes" in text and "python_gc" in text
    if found := binaries():  # the promtool of the series compose pins (test_service_prometheus.py lints a live scrape)
        lint = subprocess.run([found[1], "check", "metrics"], input=text, capture_output=True, text=True)
        assert lint.returncode == 0 and lint.stdout + lint.stderr == "", lint.stdout + lint.stderr


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def test_http_endpoint_serves_metrics_status_and_health(tmp_path: Path) -> None:
    metrics = ServiceMetrics(build_labels("cpu", "grouped", 1))
    board = StatusBoard(stall_seconds=60, phase="training", run_id="run-x", step=12)
    endpoint = HttpEndpoint("127.0.0.1", 0, metrics.registry, board).start()
    try:
        code, kind, body = _get(endpoint.url("/metrics"))
        assert code == 200 and kind.startswith("text/plain") and "alexnet_train_steps_total" in body
        code, _, body = _get(endpoint.url("/status"))
        assert code == 200 and json.loads(body)["run_id"] == "run-x" and json.loads(body)["step"] == 12
        assert _get(endpoint.url("/healthz"))[:1] == (200,)
        board._beat_monotonic -= 61  # as if the loop had not beaten for 61 s
        code, _, body = _get(endpoint.url("/healthz"))
        assert code == 503 and "stalled: no heartbeat for 61 s (limit 60 s), phase training, step 12" in body
        assert _get(endpoint.url("/nope"))[0] == 404
        with pytest.raises(ServiceError, match=f"port {endpoint.port} on 127.0.0.1 is already in use") as info:
            HttpEndpoint("127.0.0.1", endpoint.port, metrics.registry, board)
        assert info.value.code == 3
    finally:
        endpoint.close()
    with socket.socket() as s:  # closed: nobody listens there any more (TIME_WAIT aside)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", endpoint.port))


def test_float16_needs_a_gpu_and_auto_layout_resolves_per_machine() -> None:
    from service.build import resolve

    with pytest.raises(ServiceError, match="model.autocast float16 needs a CUDA device") as info:
        resolve(parse(["--model.autocast", "float16", "--device", "cpu"]), Ranks())
    assert info.value.code == 2
    cfg = resolve(parse(["--model.layout", "auto", "--device", "cpu", "--seed", "3"]), Ranks())
    assert (cfg.device, cfg.model.layout, cfg.loader.seed) == ("cpu", "grouped", 3)
    towers = resolve(parse(["--model.layout", "towers", "--device", "cpu"]), Ranks())
    assert towers.model.devices == ("cpu", "cpu")


def test_one_dali_thread_per_core_counts_the_cores_of_this_ranks_share() -> None:
    """``loader.threads 0`` with two ranks sharing this machine's cores: each rank its part of
    them, not all of them (every rank's pool on every core oversubscribes them ranks-fold); the
    process itself stays unbound without ``spare_core``."""
    from service.build import share_cores

    cores = len(os.sched_getaffinity(0))
    alone, bound = share_cores(parse(["--device", "cpu"]), 0, 1)
    assert alone.loader.threads == 0 and alone.loader.num_threads == cores and bound is None
    shares = [share_cores(parse(["--device", "cpu"]), place, 2) for place in (0, 1)]
    assert [cfg.loader.threads for cfg, _ in shares] == ([cores // 2, cores - cores // 2] if cores > 1 else [1, 1])
    assert all(bound is None for _, bound in shares) and len(os.sched_getaffinity(0)) == cores
    assert share_cores(parse(["--device", "cpu", "--loader.threads", "5"]), 1, 2)[0].loader.threads == 5


def test_a_compiled_model_on_two_gpus_is_told_it_gets_no_cuda_graphs() -> None:
    from service.build import compile_note

    towers = parse(["--model.compile", "step", "--model.compile_mode", "reduce-overhead"])
    two = dataclasses.replace(towers, model=dataclasses.replace(towers.model, layout="towers",
                                                                devices=("cuda:0", "cuda:1")))
    assert "no CUDA graphs for a model on cuda:0 and cuda:1" in compile_note(two)
    one = dataclasses.replace(two, model=dataclasses.replace(two.model, devices=("cuda:0", "cuda:0")))
    default = dataclasses.replace(two, model=dataclasses.replace(two.model, compile_mode="default"))
    assert compile_note(one) is compile_note(default) is compile_note(towers) is None


def test_a_curve_that_cannot_be_drawn_costs_only_the_curve(tmp_path: Path, monkeypatch, capfd) -> None:
    """The history is written before the epoch's checkpoint: a plot that fails (matplotlib, its
    font cache) must not end the run and lose the epoch; it is said on stderr."""
    from service import runlog

    def broken(*args, **kwargs):
        raise RuntimeError("no usable font")

    monkeypatch.setattr(runlog, "plot_history", broken)
    log = runlog.RunLog(tmp_path, console=False).open()
    records = [{"epoch": 1, "top1_error": 0.5, "top5_error": 0.2, "train_loss": 1.0, "val_loss": 1.1}]
    try:
        log.history(records, 0.9)
    finally:
        log.close()
    assert json.loads((tmp_path / "history.json").read_text()) == records and not (tmp_path / "curve.png").exists()
    assert "curve.png not drawn (RuntimeError: no usable font)" in capfd.readouterr().err
