#!/bin/sh
# Start the trainer and restart it after a crash: plain python for one process on one node,
# torchrun otherwise, through `python -m service.launch` (service/launch.py): torchrun with the
# same arguments, which ends with the first failed rank's own line and exit code where torchrun
# printed its ChildFailedError report after it.  "torchrun" below means that launcher.
#   NPROC          processes on this node (default auto: one per visible GPU, at least 1;
#                  the towers layout uses two GPUs per process, so set NPROC=GPUs/2 there)
#   NNODES         nodes in the job (default 1: torchrun --standalone)
#   NODE_RANK      0 on the node that hosts the c10d rendezvous store (RDZV_ENDPOINT's host)
#   RDZV_ENDPOINT  host:port of that store, e.g. host0:29400 (needed when NNODES > 1)
#   RDZV_ID        job id shared by all nodes (default alexnet)
#   HTTP_HOST, HTTP_PORT  where rank r serves /metrics, /healthz, /status (port HTTP_PORT + r);
#                  --http.host / --http.port in the command line win
#   RESTARTS       crashes in a row restarted before giving up (default 5; a run that lasted
#                  STABLE_SECONDS, default 600, resets the count); RESTART_DELAY seconds between (10)
#   (each a whole number; one that is not stops the container with exit 2, a bad setting)
#
# Why the restarts are here and not Docker's (compose.yaml says restart: "no"): Docker's
# on-failure restarts on every non-zero exit, so a run directory the trainer cannot write, a bad
# setting, a missing shard, a taken port or a diverged run (exit 5, 2, 1, 3, 6: service/errors.py)
# would print the same line and restart forever (a diverged run resumed diverges again).  Those
# need a person, so the container stops with that code.
# The service records such a code in ALEXNET_EXIT_FILE, since a traceback exits 1 too (a data
# error's code), and the launcher gives only the first failed rank's; an exit without one is a
# crash (a traceback, a signal, the kernel's OOM killer), which is restarted, and the service
# resumes from its newest checkpoint.
# docker stop's SIGTERM (and SIGINT, SIGHUP) reaches this script through tini (compose's init:
# true) and is passed on to the trainer, which checkpoints and exits 0: to python itself, and in
# torchrun's case to its ranks, not to torchrun.  Signalled, torchrun does not end with 0 (its own
# SignalException traceback and exit 1; service.launch dies of the signal), and it SIGKILLs its
# ranks 30 s later (TORCH_ELASTIC_SHUTDOWN_TIMEOUT), cutting a checkpoint write short on a slow
# disk (an ImageNet checkpoint, ~490 MB, needs ~61 s at 8 MB/s).  Signalled directly, the ranks
# checkpoint and exit 0, torchrun sees its workers succeed and exits 0, and compose's
# stop_grace_period is the only limit.  A rank is told once its stop handler is in (before, the
# signal would kill it: a failed rank), and ranks that appear after the signal are told too.
# With no trainer running yet (a node waiting minutes in the rendezvous for the others, the first
# seconds of python's or a rank's start) there is nothing to save: the launcher is killed, one
# line says so, and the container exits 0.  A diagnosed exit (ALEXNET_EXIT_FILE) keeps its code.
set -u
# Until `forward` is defined below: a stop is remembered (NPROC=auto asks torch for the GPUs first,
# seconds), and no trainer is started for it.
stopping=""
trap 'stopping=TERM' TERM
trap 'stopping=INT' INT
trap 'stopping=HUP' HUP

# The numbers in the environment, checked before anything starts: a bad one is a bad setting (exit
# 2, one line naming it).  NPROC=abc went on to torchrun, whose ValueError traceback and exit 1
# (a data error's code) this loop took for a crash, six times; a RESTARTS, RESTART_DELAY or
# STABLE_SECONDS that is not a number failed the shell's test, and the crashes were restarted forever.
whole() { case $1 in '' | *[!0-9]*) return 1 ;; esac; }  # 0, 1, 2...: no sign, no unit
bad_setting() { echo "entrypoint: $1 $2" >&2; exit 2; }
for setting in "RESTARTS=${RESTARTS:-0}" "RESTART_DELAY=${RESTART_DELAY:-0}" "STABLE_SECONDS=${STABLE_SECONDS:-0}"; do
    whole "${setting#*=}" || bad_setting "$setting" "is not a whole number (0, 1, 2...)"
done
nnodes=${NNODES:-1}
case $nnodes in  # a count, or torchrun's elastic MIN:MAX
    *:*) whole "${nnodes%%:*}" && whole "${nnodes#*:}" && [ "${nnodes%%:*}" -ge 1 ] ;;
    *) whole "$nnodes" && [ "$nnodes" -ge 1 ] ;;
esac || bad_setting "NNODES=$nnodes" "is not a number of nodes: 1, 2... (or torchrun's MIN:MAX)"
nproc=${NPROC:-auto}
if [ "$nproc" != auto ] && ! { whole "$nproc" && [ "$nproc" -ge 1 ]; }; then
    bad_setting "NPROC=$nproc" "is not a number of trainer processes on this node: 1, 2... or auto (one per GPU)"
fi
if [ "$nproc" = auto ]; then
    nproc=$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi
if [ "$nnodes" != 1 ] && [ -z "${RDZV_ENDPOINT:-}" ]; then
    echo "entrypoint: NNODES=$nnodes needs RDZV_ENDPOINT=host:port of node 0" >&2
    exit 2
fi
# What healthcheck.py probes: the ranks, and the host and port the service really uses.
host=$HTTP_HOST port=$HTTP_PORT prev=""
for arg in "$@"; do
    case $prev in --http.host) host=$arg ;; --http.port) port=$arg ;; esac
    case $arg in --http.host=*) host=${arg#*=} ;; --http.port=*) port=${arg#*=} ;; esac
    prev=$arg
done
echo "$nproc $host $port" > "${PROBE_FILE:-/tmp/alexnet-probe}"
set -- --http.host "$HTTP_HOST" --http.port "$HTTP_PORT" "$@"  # later flags in "$@" win
export ALEXNET_EXIT_FILE="${ALEXNET_EXIT_FILE:-/tmp/alexnet-exit}"
# The exit code of the crash a restart follows, for the service's alexnet_previous_exit_code (a
# process cannot learn how its predecessor ended: an OOM kill, 137, or a segfault, 139, says
# nothing); unset at the first start, so an inherited value is not taken for this container's.
unset ALEXNET_PREVIOUS_EXIT

launch() {
    launcher=torchrun
    if [ "$nnodes" = 1 ] && [ "$nproc" = 1 ]; then
        launcher=python
        python -m service "$@" &
    elif [ "$nnodes" = 1 ]; then
        python -m service.launch --standalone --nproc-per-node "$nproc" -m service "$@" &
    else
        # torchrun guesses which node hosts the store by matching its hostname to the endpoint,
        # which a container's hostname need not match; NODE_RANK says it instead.
        is_host=false
        [ "${NODE_RANK:-}" = 0 ] && is_host=true
        python -m service.launch --nnodes "$nnodes" --nproc-per-node "$nproc" --rdzv-backend c10d \
            --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-alexnet}" --rdzv-conf "is_host=$is_host" \
            -m service "$@" &
    fi
    child=$!
}

# The child's exit code; a trapped signal interrupts `wait`, so wait again until it is gone.
wait_child() {
    wait "$child"
    code=$?
    while kill -0 "$child" 2>/dev/null; do
        watch_torchrun
        if [ -z "$unstarted" ]; then
            wait "$child"
        else  # without dash's "Killed" for the process forward killed: the line below says why
            wait "$child" 2>/dev/null
        fi
        code=$?
    done
    child=""
}

# The pids whose parent is $1.  The image has no procps (pgrep), so from /proc: the parent is the
# second field after the command name, which is in parentheses and may hold spaces or ')'.
children() {
    for stat in /proc/[0-9]*/stat; do
        { read -r fields < "$stat"; } 2>/dev/null || continue  # gone meanwhile
        fields=${fields##*) }
        fields=${fields#* }
        [ "${fields%% *}" = "$1" ] || continue
        stat=${stat#/proc/}
        echo "${stat%/stat}"
    done
}

# Whether $1 handles SIGTERM (bit 14, signal 15, of the hex SigCgt in /proc/PID/status): a rank
# of the service does once its stop handler is in, a few seconds after it starts (its imports).
catches_term() {
    mask=""
    { while read -r key value; do [ "$key" = SigCgt: ] && mask=$value; done < "/proc/$1/status"; } 2>/dev/null
    mask=${mask#"${mask%????????}"}  # signals 1-32: all 64 bits would overflow signed arithmetic
    [ -n "$mask" ] && [ $((0x$mask >> 14 & 1)) = 1 ]
}

# The second field of /proc/$1/stat: R, S, T (stopped), Z (exited, not reaped)...; empty when gone.
proc_state() {
    { read -r fields < "/proc/$1/stat"; } 2>/dev/null || return 0
    fields=${fields##*) }
    echo "${fields%% *}"
}

# $1's command line, its arguments joined by spaces; empty when gone.
proc_cmdline() {
    { tr '\0' ' ' < "/proc/$1/cmdline"; } 2>/dev/null
}

# SIGSTOP is delivered asynchronously: wait (up to a second) until $1 is stopped, or gone.
freeze() {
    kill -s STOP "$1" 2>/dev/null || return 1
    tries=0
    while [ $tries -lt 100 ]; do
        case $(proc_state "$1") in T|t|Z|"") return 0 ;; esac
        sleep 0.01
        tries=$((tries + 1))
    done
}

# Pass the stop signal to each rank of torchrun's that is not yet told and has its handler in;
# one still starting is told at a later call (the signal's default action would kill it, and
# torchrun, seeing a rank fail, would fail too).  A child with torchrun's own command line is a rank
# forked but not yet exec'd: it still carries torchrun's handlers, and the exec would drop the
# signal.  (Not told apart by name, /proc/PID/comm: the launcher and its ranks are both "python".)
# A rank is told once per signal: the service takes a second signal a second later for "stop
# now, without the checkpoint".
tell_ranks() {
    for rank in $(children "$child"); do
        case " $told " in *" $rank "*) continue ;; esac
        [ "$(proc_cmdline "$rank")" != "$(proc_cmdline "$child")" ] || continue
        catches_term "$rank" || continue
        kill -s "$stopping" "$rank" 2>/dev/null
        told="$told $rank"
    done
}

# Once stopping, torchrun is polled until it is gone rather than waited for, to tell the ranks it
# starts after the signal (or whose handler was not in yet): it would wait on them until Docker's
# SIGKILL.  (The shell reaps torchrun while `sleep` runs; `wait` then gives its exit code.)
watch_torchrun() {
    if [ -z "$stopping" ] || [ "$launcher" != torchrun ] || [ -n "$unstarted" ]; then
        return 0
    fi
    while kill -0 "$child" 2>/dev/null; do
        tell_ranks
        sleep 1
    done
}

# torchrun starts its ranks in sessions of their own, so nothing else reaches them.  When it has
# no rank running (it waits in the rendezvous, is still starting, or its ranks have ended) there is
# nothing to save, and a signal would make it print a traceback and exit 1: it is SIGKILLed
# instead.  Frozen (SIGSTOP) first, it cannot start a rank between the look and the kill, so none
# is left behind.  The rendezvous is left as torchrun's own signal handler leaves it: open, for
# this node to rejoin (or gone, if this node hosts the store); the other nodes see a node lost.
# Likewise python before its stop handler is in (its imports): killed, nothing to save, where the
# signal's own default would have ended it with 143.  A signal before the launch (NPROC=auto asks
# torch for the GPUs first) is passed on as soon as there is a child.
child="" launcher="" told="" unstarted="" forwarded=""
forward() {
    stopping=$1 told=""
    [ -n "$child" ] || return 0
    forwarded=1
    if [ "$launcher" = sleep ]; then
        kill -s "$1" "$child" 2>/dev/null
    elif [ -n "$unstarted" ]; then
        return 0  # killed already
    elif [ "$launcher" = python ]; then
        catches_term "$child" && kill -s "$1" "$child" 2>/dev/null && return 0
        kill -s KILL "$child" 2>/dev/null
        unstarted=1
    elif freeze "$child" && [ -z "$(children "$child")" ]; then
        kill -s KILL "$child" 2>/dev/null
        unstarted=1
    else
        kill -s CONT "$child" 2>/dev/null
        tell_ranks
    fi
}
trap 'forward TERM' TERM
trap 'forward INT' INT
# A closed terminal or ssh session: the service stops on it as on SIGTERM; untrapped, it killed
# this shell (the container exited 129) and the trainer with it, without a checkpoint.
trap 'forward HUP' HUP

crashes=0
nothing_to_save() {
    echo "entrypoint: stopped with no trainer running (not started yet, or its ranks had ended); nothing to save" >&2
    exit 0
}

while :; do
    [ -z "$stopping" ] || nothing_to_save  # a stop while NPROC=auto asked torch for the GPUs
    rm -f "$ALEXNET_EXIT_FILE"
    started=$(date +%s)
    launch "$@"
    [ -z "$stopping" ] || [ -n "$forwarded" ] || forward "$stopping"  # came between `&` and child=$!
    wait_child
    [ "$code" = 0 ] && exit 0
    [ ! -s "$ALEXNET_EXIT_FILE" ] || exit "$(cat "$ALEXNET_EXIT_FILE")"  # diagnosed: the line is printed
    [ -z "$unstarted" ] || nothing_to_save  # forward killed it: $code is the kill's, or the trap's
    [ -z "$stopping" ] || exit "$code"
    [ $(($(date +%s) - started)) -lt "${STABLE_SECONDS:-600}" ] || crashes=0
    crashes=$((crashes + 1))
    if [ "$crashes" -gt "${RESTARTS:-5}" ]; then
        echo "entrypoint: the trainer crashed $crashes times in a row (exit $code): not restarting again" >&2
        exit "$code"
    fi
    echo "entrypoint: the trainer crashed (exit $code); restarting in ${RESTART_DELAY:-10} s, from its newest" \
        "checkpoint (crash $crashes of ${RESTARTS:-5} in a row)" >&2
    crash=$code launcher=sleep
    sleep "${RESTART_DELAY:-10}" &
    child=$!
    wait_child
    [ -z "$stopping" ] || exit "$crash"
    export ALEXNET_PREVIOUS_EXIT="$crash"
    # A restart resumes from the newest checkpoint: a --fresh of the first start (a config file
    # cannot set it) would wipe the run again at every crash.  The loop's words are expanded
    # before it runs, so rebuilding "$@" inside it is safe.
    skip="" first=1
    for arg in "$@"; do
        [ "$first" = 1 ] && { set --; first=""; }
        if [ -n "$skip" ]; then skip=""; continue; fi
        case $arg in --fresh) skip=1; continue ;; --fresh=*) continue ;; esac
        set -- "$@" "$arg"
    done
done
