#!/bin/sh
# Launch ftloop on one node or many. Flags are passed to `python -m ftloop.train` unchanged, e.g.
#   sh scripts/train_shell.sh --model-name-or-path Qwen/Qwen2.5-VL-3B-Instruct --train-data data.json ...
# Multi-node: run it on every node with NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT set.
# PYTHON names the interpreter (default python3); NPROC_PER_NODE defaults to the number of GPUs.
# SHUTDOWN_TIMEOUT: seconds torchrun waits after passing a SIGTERM/SIGINT on before it kills the workers (default
# 30, torchrun's); the checkpoint of a preemption must be written within it (see the README: Preemption). It goes to
# torchrun as TORCH_ELASTIC_SHUTDOWN_TIMEOUT, read by torch >= 2.12 and ignored (30 s) before: the flag
# --shutdown-timeout would stop an older torchrun at its argument parser.
# NCCL flight recorder: on a collective timeout every rank writes its last collectives to
# ${FTLOOP_NCCL_TRACE_DIR:-./nccl_traces}/rank_<rank>; `torchfrtrace DIR` reads them (README: NCCL timeouts).
set -eu

PYTHON=${PYTHON:-python3}
NPROC_PER_NODE=${NPROC_PER_NODE:-$("$PYTHON" -c "import torch; print(torch.cuda.device_count() or 1)")}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}

if [ "$#" -eq 0 ]; then
    # No flags: the embedded demo (a tiny model that learns to name colours), so the image runs as is.
    exec "$PYTHON" -m ftloop.demo --nproc-per-node "$NPROC_PER_NODE"
fi

export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-30}}
# The flight recorder, under the names torch >= 2.8 reads first: a value set under an older TORCH_NCCL_* name is
# carried over, or the default given here would hide it. The dump folder must exist (torch makes only its default).
export TORCH_FR_BUFFER_SIZE=${TORCH_FR_BUFFER_SIZE:-${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}}
export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
trace_dir=${FTLOOP_NCCL_TRACE_DIR:-$PWD/nccl_traces}
export TORCH_FR_DUMP_TEMP_FILE=${TORCH_FR_DUMP_TEMP_FILE:-${TORCH_NCCL_DEBUG_INFO_TEMP_FILE:-$trace_dir/rank_}}
mkdir -p "$(dirname "$TORCH_FR_DUMP_TEMP_FILE")"

exec "$PYTHON" -m torch.distributed.run \
    --nproc_per_node "$NPROC_PER_NODE" \
    --nnodes "$NNODES" \
    --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" \
    --master_port "$MASTER_PORT" \
    -m ftloop.train "$@"
