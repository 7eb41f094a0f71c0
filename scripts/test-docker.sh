#!/usr/bin/env bash
# make test-docker: build docker/Dockerfile and run the user's `make train GPUS=none` flow for real
# (tests/docker_stack.py), on a machine with no GPU and, if need be, no image registry.
#
# 1. A Docker engine: the running one, or Debian's docker.io started here as root (stopped on exit).
# 2. docker compose v2.24.4+: the installed plugin, or Debian trixie's (2.26) unpacked into a
#    private DOCKER_CONFIG (nothing installed system-wide).
# 3. The images the stack names but does not build (the Dockerfile's base, Prometheus, Grafana):
#    used when present, pulled when a registry answers, else stand-ins made from Debian's archive:
#    - the base (debian:trixie-slim): `debootstrap --variant=minbase trixie` imported under that
#      tag, plus this machine's CA bundle and pip settings, so pip inside the build trusts what the
#      host trusts (a machine that inspects TLS); docker/Dockerfile itself stays as shipped.
#    - Prometheus: on that base, the binaries of the series compose pins that the host tests run
#      (Debian sid's prometheus and promtool, tests/prometheus_bin.py), laid out as in its image.
#    - Grafana: no package or image reachable; a stand-in that only idles, so the stack starts as
#      the user's does (the test checks its mounts, and every dashboard query against Prometheus).
# 4. pytest tests/docker_stack.py (not collected by `make test`).
# Images stay for the next run (layer cache); dangling ones from rebuilds are pruned.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${DOCKER_TEST_CACHE:-$PWD/data/docker-test}
COMPOSE_MIN=2.24.4
SUITE=trixie
MIRROR=http://deb.debian.org/debian
STANDIN_LABEL=alexnet2012.stand-in
PY=${PY:-.venv/bin/python}
mkdir -p "$CACHE"
started=0 dockerd_pid=""
say() { echo "test-docker: $*"; }
die() { echo "test-docker: $*" >&2; exit 1; }

cleanup() {
    rm -rf "$CACHE/rootfs"
    if [ -n "$dockerd_pid" ]; then
        say "stopping the Docker engine started here (pid $dockerd_pid)"
        kill -TERM "$dockerd_pid" 2>/dev/null || true
        wait "$dockerd_pid" 2>/dev/null || true
        umount /run/docker/netns/default 2>/dev/null || true  # the one mount dockerd leaves behind
    fi
}
trap cleanup EXIT
# bash runs no EXIT trap when a signal it does not trap kills it (a CI cancel, timeout): dockerd,
# its netns mount and the containers were left.  Trapped, the signal ends the script through exit
# (once the command in the foreground, pytest, has returned), and cleanup runs.
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 143' TERM

install_missing() {  # Debian packages, as setup.sh does for headers: as root with apt, else say so
    local missing=() cmd pkg
    for pair in "$@"; do
        cmd=${pair%%:*} pkg=${pair#*:}
        command -v "$cmd" >/dev/null || [ -x "/usr/sbin/$cmd" ] || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "installing ${missing[*]}" >&2  # stderr: callers may capture stdout (root=$(rootfs))
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}"; } >"$CACHE/apt.log" 2>&1 || die "apt-get install ${missing[*]} failed: $(tail -3 "$CACHE/apt.log")"
    else
        die "needs ${missing[*]} (apt-get install ${missing[*]})"
    fi
}

start_engine() {
    timeout 20 docker info >/dev/null 2>&1 && { say "using the running Docker engine"; return; }
    [ "$(id -u)" = 0 ] || die "no Docker engine answers, and starting one needs root"
    install_missing dockerd:docker.io
    say "starting Debian's Docker engine (log: $CACHE/dockerd.log)"
    PATH=/usr/sbin:$PATH nohup dockerd --storage-driver=overlay2 >"$CACHE/dockerd.log" 2>&1 &
    dockerd_pid=$!
    for _ in $(seq 60); do
        timeout 5 docker info >/dev/null 2>&1 && return
        kill -0 "$dockerd_pid" 2>/dev/null || die "dockerd exited: $(tail -3 "$CACHE/dockerd.log")"
        sleep 1
    done
    die "dockerd did not answer within 60 s: $(tail -3 "$CACHE/dockerd.log")"
}

compose_ok() {
    local v
    v=$(docker compose version --short 2>/dev/null) || return 1
    [ "$(printf '%s\n' "$COMPOSE_MIN" "${v#v}" | sort -V | head -1)" = "$COMPOSE_MIN" ]
}

# A minimal Debian root in $CACHE/rootfs (about a minute); made once per run, removed on exit.
rootfs() {
    local root=$CACHE/rootfs
    [ -x "$root/bin/sh" ] && { echo "$root"; return; }
    install_missing debootstrap:debootstrap
    rm -rf "$root"
    say "debootstrap --variant=minbase $SUITE (about a minute)" >&2
    debootstrap --variant=minbase "$SUITE" "$root" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
        || die "debootstrap failed: $(tail -3 "$CACHE/debootstrap.log")"
    # The sources of Debian's own images (deb822, with updates and security).
    rm -f "$root/etc/apt/sources.list"
    printf '%s\n' "Types: deb" "URIs: $MIRROR" "Suites: $SUITE $SUITE-updates" "Components: main" \
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" "" "Types: deb" \
        "URIs: ${MIRROR%/debian}/debian-security" "Suites: $SUITE-security" "Components: main" \
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" >"$root/etc/apt/sources.list.d/debian.sources"
    echo "$root"
}

# Debian trixie's compose v2 plugin, unpacked into a private DOCKER_CONFIG.
compose_plugin() {
    export DOCKER_CONFIG=$CACHE/docker-config
    mkdir -p "$DOCKER_CONFIG/cli-plugins"
    compose_ok && { say "docker compose $(docker compose version --short)"; return; }
    local root deb
    root=$(rootfs)
    say "unpacking Debian $SUITE's docker-compose (v2) into $DOCKER_CONFIG"
    chroot "$root" sh -c 'apt-get update -qq && cd /tmp && apt-get download -qq docker-compose' >/dev/null
    deb=$(ls "$root"/tmp/docker-compose_*.deb)
    dpkg-deb -x "$deb" "$CACHE/compose-deb"
    cp "$CACHE/compose-deb/usr/libexec/docker/cli-plugins/docker-compose" "$DOCKER_CONFIG/cli-plugins/"
    rm -rf "$CACHE/compose-deb" "$deb" "$root"/var/lib/apt/lists/*
    compose_ok || die "docker compose is still missing or older than $COMPOSE_MIN"
    say "docker compose $(docker compose version --short)"
}

have_image() {  # present, or pulled from a registry that answers
    docker image inspect "$1" >/dev/null 2>&1 && return 0
    timeout 60 docker pull -q "$1" >/dev/null 2>&1
}

# The host's CA bundle and pip settings (cert, timeout, index), so pip in the build trusts what
# the host trusts.  Only what exists here is copied; local file indexes of this machine are not.
host_trust() {
    local root=$1 env=()
    if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
        mkdir -p "$root/etc/ssl/certs" "$root/usr/local/share/ca-certificates"
        cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
        # update-ca-certificates (should a build install ca-certificates) keeps these too.
        cp /etc/ssl/certs/ca-certificates.crt "$root/usr/local/share/ca-certificates/host-bundle.crt"
    fi
    [ -f /etc/pip.conf ] && cp /etc/pip.conf "$root/etc/pip.conf"
    for var in PIP_CERT PIP_DEFAULT_TIMEOUT PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST \
        REQUESTS_CA_BUNDLE SSL_CERT_FILE; do
        [ -n "${!var:-}" ] && [[ ${!var} != file:* ]] && env+=(--change "ENV $var=${!var}")
    done
    printf '%s\n' "${env[@]}"
}

standin_base() {
    local tag=$1 root change=()
    root=$(rootfs)
    mapfile -t change < <(host_trust "$root")
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/tmp/*
    say "importing a stand-in for $tag (Debian $SUITE minbase + this machine's CA bundle and pip settings)"
    tar -C "$root" -c . | docker import "${change[@]}" \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change "LABEL $STANDIN_LABEL=\"debootstrap $SUITE, made by scripts/test-docker.sh\"" \
        --change 'CMD ["bash"]' - "$tag" >/dev/null
}

standin_build() {  # tag, base tag, build context (- for none), Dockerfile lines (legacy builder)
    local tag=$1 base=$2 context=(-)
    [ "$3" = - ] || context=(-f - "$3")
    shift 3
    say "building a stand-in for $tag"
    printf '%s\n' "FROM $base" "LABEL $STANDIN_LABEL=\"made by scripts/test-docker.sh\"" "$@" \
        | docker build -q -t "$tag" "${context[@]}" >"$CACHE/standin-build.log" 2>&1 \
        || die "building a stand-in for $tag failed: $(tail -5 "$CACHE/standin-build.log")"
}

label() { docker image inspect -f "{{index .Config.Labels \"$2\"}}" "$1" 2>/dev/null; }

# Prometheus as in its own image: /bin/prometheus and /bin/promtool (/bin is /usr/bin), run as
# nobody in /prometheus, owned by nobody.  The binaries are the host tests' (Debian sid's build of
# the series compose pins), named in a label: a stand-in made from anything else (Debian trixie's
# 2.53 package, before) is made again.
standin_prometheus() {
    local tag=$1 base=$2 out version bindir
    if docker image inspect "$tag" >/dev/null 2>&1 && [ -z "$(label "$tag" "$STANDIN_LABEL")" ]; then
        return 0  # the real image
    fi
    out=$("$PY" -m tests.prometheus_bin 2>"$CACHE/prometheus-bin.log") \
        || die "no Prometheus binaries for the stand-in of $tag: $(tail -1 "$CACHE/prometheus-bin.log")"
    read -r version bindir <<<"$out"
    [ "$(label "$tag" "$STANDIN_LABEL.prometheus")" = "$version" ] && return 0
    docker image rm -f "$tag" >/dev/null 2>&1 || true
    have_image "$tag" && return 0  # a registry answers now
    standin_build "$tag" "$base" "$bindir" "LABEL $STANDIN_LABEL.prometheus=\"$version\"" \
        "COPY prometheus promtool /usr/bin/" "RUN mkdir /prometheus && chown nobody:nogroup /prometheus" \
        "USER nobody" "WORKDIR /prometheus" 'ENTRYPOINT ["/bin/prometheus"]'
}

standins() {
    local base prom grafana
    base=$(sed -n 's/^FROM \([^ ]*\) AS base$/\1/p' docker/Dockerfile)
    prom=$(sed -n 's/^ *image: \(prom\/prometheus:.*\)$/\1/p' docker/compose.yaml)
    grafana=$(sed -n 's/^ *image: \(grafana\/grafana:.*\)$/\1/p' docker/compose.yaml)
    [ -n "$base" ] && [ -n "$prom" ] && [ -n "$grafana" ] || die "cannot read the image tags of docker/"
    have_image "$base" || standin_base "$base"
    standin_prometheus "$prom" "$base"
    have_image "$grafana" || standin_build "$grafana" "$base" - "USER 472" \
        "ENTRYPOINT [\"/bin/sh\", \"-c\", \"trap 'exit 0' TERM INT; while :; do sleep 1; done\"]"
    for image in "$base" "$prom" "$grafana"; do
        docker image inspect -f "{{index .Config.Labels \"$STANDIN_LABEL\"}}" "$image" | grep -q . \
            && echo "$image" >>"$CACHE/standins"
    done
    true
}

t0=$(date +%s)
start_engine
compose_plugin
rm -f "$CACHE/standins"
standins
say "stand-ins in use: $(paste -sd' ' "$CACHE/standins" 2>/dev/null || echo none)"
say "ready after $(($(date +%s) - t0)) s; running tests/docker_stack.py"
set +e
TQDM_DISABLE=1 "$PY" -m pytest -p no:cacheprovider -s -q tests/docker_stack.py "$@"
code=$?
set -e
docker image prune -f >/dev/null  # images left untagged by a rebuild
say "finished in $(($(date +%s) - t0)) s (exit $code)"
exit $code
