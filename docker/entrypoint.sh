#!/bin/sh
# Start the trainer: plain python for one process on one node, torchrun otherwise.
#   NPROC          processes on this node (default auto: one per visible GPU, at least 1;
#                  the towers layout uses two GPUs per process, so set NPROC=GPUs/2 there)
#   NNODES         nodes in the job (default 1: torchrun --standalone)
#   NODE_RANK      0 on the node that hosts the c10d rendezvous store (RDZV_ENDPOINT's host)
#   RDZV_ENDPOINT  host:port of that store, e.g. host0:29400 (needed when NNODES > 1)
#   RDZV_ID        job id shared by all nodes (default alexnet)
#   HTTP_HOST, HTTP_PORT  where rank r serves /metrics, /healthz, /status (port HTTP_PORT + r)
# exec everywhere: the launcher receives docker's SIGTERM itself (torchrun forwards it to the
# ranks, which checkpoint and exit).
set -eu

nproc=${NPROC:-auto}
if [ "$nproc" = auto ] || [ -z "$nproc" ]; then
    nproc=$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi
echo "$nproc" > "${NPROC_FILE:-/tmp/alexnet-nproc}"  # for healthcheck.py: the rank ports to probe
nnodes=${NNODES:-1}
set -- --http.host "$HTTP_HOST" --http.port "$HTTP_PORT" "$@"  # later flags in "$@" win

if [ "$nnodes" = 1 ] && [ "$nproc" = 1 ]; then
    exec python -m service "$@"
fi
if [ "$nnodes" = 1 ]; then
    exec torchrun --standalone --nproc-per-node "$nproc" -m service "$@"
fi
: "${RDZV_ENDPOINT:?NNODES=$nnodes needs RDZV_ENDPOINT=host:port of node 0}"
# torchrun guesses which node hosts the store by matching its hostname to the endpoint, which a
# container's hostname need not match; NODE_RANK says it instead.
is_host=false
[ "${NODE_RANK:-}" = 0 ] && is_host=true
exec torchrun --nnodes "$nnodes" --nproc-per-node "$nproc" --rdzv-backend c10d \
    --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-alexnet}" --rdzv-conf "is_host=$is_host" \
    -m service "$@"
