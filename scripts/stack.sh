#!/usr/bin/env bash
# The Docker side of the Makefile: `make train`, `stop`, `logs`, `shards-docker` call this.
#   stack.sh check TARGET   print why make TARGET (train, stop, logs, shards-docker) cannot run
#                           here, in one line, and exit 1; nothing when it can
#   stack.sh up       build the image, start trainer + Prometheus + dcgm-exporter + Grafana detached
#                     env: SHARDS RUN GRAFANA_PASSWORD [GPUS=all|N|0,1|none] [NPROC] [CONFIG] [BIND]
#                          [NNODES NODE_RANK RDZV_ENDPOINT] for one node of a multi-node job
#                     GPUS=none: the trainer on the CPU, no GPU request, no dcgm-exporter
#   stack.sh stop     SIGTERM to the trainer (it checkpoints), then stop the rest
#   stack.sh logs     follow the trainer's output
#   stack.sh shards   run `python -m shards` in the image: env SRC OUT [ARGS]
#   stack.sh gpus     print the compose override `up` uses for GPUS
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=alexnet2012:latest
COMPOSE=(docker compose -p alexnet -f docker/compose.yaml)
IMAGE_UID=10001  # the image's non-root user (docker/Dockerfile)
COMPOSE_MIN=2.24.4  # the first with the !override tag (gpu_override)

die() { echo "$*" >&2; exit 1; }

# Why TARGET cannot run on this machine, in one line; nothing when it can.
blocker() {
    local target=$1 instead="" why
    case $target in
        train) instead="; to train without Docker: make train-local" ;;
        shards-docker) instead="; to shard without Docker: make shards" ;;
    esac
    if ! command -v docker >/dev/null; then
        echo "make $target: there is no docker command on this machine$instead"
    elif ! timeout 20 docker info >/dev/null 2>&1; then
        echo "make $target: no Docker engine answers here (docker info failed)$instead"
    elif [ "$target" != shards-docker ] && ! compose_ok; then  # shards-docker: docker build + run
        echo "make $target: needs the docker compose plugin v$COMPOSE_MIN or newer (for !override)$instead"
    elif [ "$target" = train ] && ! why=$(gpu_override 2>&1 >/dev/null); then
        echo "$why"  # before anything is made: `up` created RUN first, then refused GPUS
    elif [ "$target" = train ] && [ "${GPUS:-all}" != none ] && ! nvidia_ok; then
        echo "make $target: Docker has no NVIDIA runtime (install the NVIDIA Container Toolkit, or GPUS=none for the CPU)$instead"
    elif [ "$target" = train ] && [ -z "${GRAFANA_PASSWORD:-}${GRAFANA_PASSWORD_SET:-}" ]; then
        echo "make train: set GRAFANA_PASSWORD, the Grafana admin password (e.g. make train GRAFANA_PASSWORD=... SHARDS=... RUN=...)"
    elif [ "$target" = train ] && [ "${BIND:-127.0.0.1}" != 127.0.0.1 ] && [ "$BIND" != 0.0.0.0 ]; then
        # One address moved every listener there, while Prometheus scrapes the trainer and Grafana
        # queries Prometheus at 127.0.0.1 (prometheus.yml, compose.yaml): every target down, no data.
        echo "make train: BIND=$BIND would hide the trainer from Prometheus and Prometheus from Grafana, which" \
            "reach them at 127.0.0.1: use 127.0.0.1 (this machine, the default) or 0.0.0.0 (every interface)"
    elif [ "$target" = train ]; then
        train_paths
    fi
}

# What is wrong with SHARDS, RUN or CONFIG for make train, in one line; nothing when they will do.
# Here, not in `up`: said from `up`, make added its own "*** [...] Error 1" line (and RUN as a file
# was mkdir's "File exists", SHARDS as one "has no manifest.json").
train_paths() {
    if [ -e "${SHARDS:?set SHARDS}" ] && [ ! -d "$SHARDS" ]; then
        echo "make train: SHARDS=$SHARDS is a file, not a directory of shards (what make shards writes)"
    elif [ ! -f "$SHARDS/manifest.json" ]; then
        echo "make train: $SHARDS has no manifest.json; make shards (or make shards-docker) first"
    elif [ ! -f "${CONFIG:-configs/paper.toml}" ]; then
        echo "make train: no config file ${CONFIG:-configs/paper.toml}"
    elif [ -e "${RUN:?set RUN}" ] && [ ! -d "$RUN" ]; then
        echo "make train: RUN=$RUN is a file, not a run directory: choose another RUN"
    fi
}

# GPU requests (compose's deploy.resources.reservations.devices) need the toolkit's hook on the
# daemon's machine, or a runtime/CDI device named nvidia in `docker info`.
nvidia_ok() {
    timeout 20 docker info --format '{{json .}}' 2>/dev/null | grep -qi nvidia && return 0
    command -v nvidia-container-runtime-hook >/dev/null || command -v nvidia-cdi-hook >/dev/null
}

compose_ok() {
    local v
    v=$(docker compose version --short 2>/dev/null) || return 1
    [ "$(printf '%s\n' "$COMPOSE_MIN" "${v#v}" | sort -V | head -1)" = "$COMPOSE_MIN" ]
}

# compose reads a relative volume source without ./ (configs/paper.toml) as a named volume: every
# path it gets is absolute.  -m: stop and logs get paths that need not exist.
abs_path() { realpath -m -- "$1"; }

# The uid:gid the trainer runs as: the run directory's owner, so checkpoints stay the user's.
# A fresh root-owned directory (make run as root) is handed to the image's non-root user.
run_owner() {
    local dir=$1 uid gid
    uid=$(stat -c %u "$dir") gid=$(stat -c %g "$dir")
    if [ "$uid" = 0 ]; then
        if [ -z "$(ls -A "$dir")" ] && chown "$IMAGE_UID:$IMAGE_UID" "$dir" 2>/dev/null; then
            uid=$IMAGE_UID gid=$IMAGE_UID
        else
            die "stack: $dir belongs to root; chown it to the user who should own the output"
        fi
    fi
    echo "$uid:$gid"
}

# The trainer's GPU request for GPUS=all | N (a count) | 0,1 (device ids; "3," is GPU 3 alone,
# GPU-<uuid> works too), as a compose override that replaces compose.yaml's entry (`!override`:
# merged files would append a second entry, and count and device_ids cannot share one).
# GPUS=none removes the request (`!reset`) and hides the GPUs even where nvidia is Docker's
# default runtime (NVIDIA_VISIBLE_DEVICES=void).
gpu_override() {
    local gpus=${GPUS:-all} request bad
    bad="make train: GPUS=${GPUS:-all} is not all, none, a count of GPUs (1, 2...) or a list of their ids (0,1; one alone: 3,)"
    case $gpus in
        none)
            printf '%s\n' "services:" "  trainer:" "    environment:" "      NVIDIA_VISIBLE_DEVICES: void" \
                "    deploy:" "      resources:" "        reservations:" "          devices: !reset []"
            return ;;
        all) request="count: all" ;;
        *,* | GPU-*)
            [[ $gpus =~ ^[0-9A-Za-z-]+(,[0-9A-Za-z-]+)*,?$ ]] || die "$bad"
            request="device_ids: [$(echo "${gpus%,}" | sed 's/[^,]*/"&"/g; s/,/, /g')]" ;;
        *)
            [[ $gpus =~ ^[1-9][0-9]*$ ]] || die "$bad"
            request="count: $gpus" ;;
    esac
    printf '%s\n' "services:" "  trainer:" "    deploy:" "      resources:" "        reservations:" \
        "          devices: !override" "            - driver: nvidia" "              $request" \
        "              capabilities: [gpu]"
}

revision() { git describe --always --dirty --abbrev=12 2>/dev/null || echo unknown; }

up() {
    local why gpus owner host services=()
    why=$(blocker train)
    [ -z "$why" ] || die "$why"
    CONFIG=${CONFIG:-configs/paper.toml}
    mkdir -p "$RUN"
    SHARDS=$(abs_path "$SHARDS") RUN=$(abs_path "$RUN") CONFIG=$(abs_path "$CONFIG")
    owner=$(run_owner "$RUN")
    TRAIN_UID=${owner%:*} TRAIN_GID=${owner#*:} GIT_REVISION=$(revision)
    export SHARDS RUN CONFIG TRAIN_UID TRAIN_GID GIT_REVISION
    gpus=$(mktemp --suffix .yaml)
    # shellcheck disable=SC2064  # expanded now: $gpus is local, gone when the EXIT trap runs
    trap "rm -f '$gpus'" EXIT  # compose reads it at `up`; the trainer's own restarts do not need it
    gpu_override > "$gpus"
    [ "${GPUS:-all}" = none ] && services=(trainer prometheus grafana)  # no GPUs: no dcgm-exporter
    "${COMPOSE[@]}" -f "$gpus" up -d --build "${services[@]}"
    host=${BIND:-127.0.0.1}
    [ "$host" = 0.0.0.0 ] && host=$(hostname)
    echo "stack: training on GPUS=${GPUS:-all}, run directory $RUN"
    echo "  Grafana     http://$host:${GRAFANA_PORT:-3000}  (user admin, password GRAFANA_PASSWORD)"
    echo "  Prometheus  http://$host:${PROMETHEUS_PORT:-9090}"
    echo "  /status     http://$host:9431/status  (rank r on port 9431 + r)"
    echo "  make logs follows the trainer; make stop checkpoints and stops the stack"
}

# stop and logs only address the running containers, but compose still interpolates the whole
# file, so its required variables get placeholders here, and the paths it gets are absolute.
compose_existing() {
    SHARDS=$(abs_path "${SHARDS:-/nonexistent}") RUN=$(abs_path "${RUN:-/nonexistent}") \
        CONFIG=$(abs_path "${CONFIG:-configs/paper.toml}") GRAFANA_PASSWORD=${GRAFANA_PASSWORD:-unused} \
        "${COMPOSE[@]}" "$@"
}

# The image, as `make train` builds it: with compose where it is (BuildKit, and the same layer
# cache as make train), else plain docker build (shards-docker needs no compose).
build_image() {
    if compose_ok; then
        GIT_REVISION=$(revision) compose_existing build trainer
    else
        docker build -f docker/Dockerfile -t "$IMAGE" --build-arg GIT_REVISION="$(revision)" .
    fi
}

shards() {
    local why owner tty=()
    why=$(blocker shards-docker)
    [ -z "$why" ] || die "$why"
    [ -d "${SRC:?set SRC}" ] || die "make shards-docker: SRC=$SRC is not a directory"
    mkdir -p "${OUT:?set OUT}"
    owner=$(run_owner "$OUT")
    [ -t 1 ] && tty=(-t)  # the progress bar wants a terminal
    build_image
    # shellcheck disable=SC2086  # ARGS is a list of --key value words
    docker run --rm --init --ipc host --no-healthcheck "${tty[@]}" --user "$owner" \
        --mount "$(bind_mount "$SRC" /data/src),readonly" --mount "$(bind_mount "$OUT" /data/out)" \
        --entrypoint python "$IMAGE" -m shards --src /data/src --out /data/out ${ARGS:-}
}

# --mount's value for the directory $1 at $2.  Not -v SRC:DEST, which split a path at its ':' (an
# "invalid volume specification"); --mount reads CSV, so the source is a quoted field, its own
# quotes doubled, and a ',' in it stays too.
bind_mount() {
    local src
    src=$(abs_path "$1")
    echo "type=bind,\"source=${src//\"/\"\"}\",target=$2"
}

case ${1:-} in
    check)
        why=$(blocker "${2:?check TARGET}")
        [ -z "$why" ] || { echo "$why"; exit 1; } ;;
    up) up ;;
    stop)
        why=$(blocker stop); [ -z "$why" ] || die "$why"
        # compose stops nothing and exits 0 without a word when nothing runs: say so
        [ -n "$(compose_existing ps -q)" ] || { echo "make stop: the stack is not running; nothing to stop"; exit 0; }
        compose_existing stop trainer  # first, alone: Prometheus still scrapes while it checkpoints
        compose_existing stop ;;
    logs)
        why=$(blocker logs); [ -z "$why" ] || die "$why"
        # compose follows nothing and exits 0 when there is no container: say so instead
        [ -n "$(compose_existing ps -a -q trainer)" ] || die "make logs: the stack has no trainer container: make train starts it"
        if [ -t 1 ]; then compose_existing logs -f trainer; else compose_existing --ansi never logs -f trainer; fi ;;
    shards) shards ;;
    gpus) gpu_override ;;  # print the trainer's GPU request for GPUS (what `up` passes to compose)
    *) die "usage: $0 check TARGET | up | stop | logs | shards | gpus" ;;
esac
