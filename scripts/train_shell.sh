#!/bin/sh
# Launch ftloop on one node or many. Flags are passed to `python -m ftloop.train` unchanged, e.g.
#   sh scripts/train_shell.sh --model-name-or-path Qwen/Qwen2.5-VL-3B-Instruct --train-data data.json ...
# Multi-node: run it on every node with NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT set.
# PYTHON names the interpreter (default python3); NPROC_PER_NODE defaults to the number of GPUs.
# SHUTDOWN_TIMEOUT: seconds torchrun waits after passing a SIGTERM/SIGINT on before it kills the workers (default
# 30, torchrun's); the checkpoint of a preemption must be written within it (see the README: Preemption).
set -eu

PYTHON=${PYTHON:-python3}
NPROC_PER_NODE=${NPROC_PER_NODE:-$("$PYTHON" -c "import torch; print(torch.cuda.device_count() or 1)")}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-30}

if [ "$#" -eq 0 ]; then
    # No flags: the embedded demo (a tiny model that learns to name colours), so the image runs as is.
    exec "$PYTHON" -m ftloop.demo --nproc-per-node "$NPROC_PER_NODE"
fi

exec "$PYTHON" -m torch.distributed.run \
    --nproc_per_node "$NPROC_PER_NODE" \
    --nnodes "$NNODES" \
    --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" \
    --master_port "$MASTER_PORT" \
    --shutdown-timeout "$SHUTDOWN_TIMEOUT" \
    -m ftloop.train "$@"
