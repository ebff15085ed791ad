#!/usr/bin/env bash
# Start train.py on this node through `accelerate launch`, configured by environment variables; run it once per
# node (the SLURM script does it with srun). Arguments are passed to train.py unchanged.
#
#   NNODES         number of nodes (machines)                                   default 1
#   NODE_RANK      this node's rank, 0..NNODES-1                                default 0
#   MASTER_ADDR    address of node 0, reachable from every node                 default 127.0.0.1
#   MASTER_PORT    a free TCP port on node 0                                    default 29500
#   GPUS_PER_NODE  processes on this node, one per GPU                          default: visible GPUs, or 1 on CPU
#   ACCELERATE_USE_CPU=1  train on CPU (gloo), also chosen when no GPU is visible
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT  seconds the launcher waits for trainers to checkpoint and exit after a
#                  SIGTERM before it kills them                                 default 100
#   PYTHON         the interpreter with the project installed                   default python3 on PATH
#   TRAIN_SCRIPT   the training entry point                                     default train.py beside docker/
#
# One process in total (one node, one GPU or CPU) runs train.py directly: accelerate's single-process launcher
# does not pass SIGTERM on to its child, and the trainer needs it to checkpoint before it is stopped.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
train_script=${TRAIN_SCRIPT:-$repo/train.py}
nnodes=${NNODES:-1}
node_rank=${NODE_RANK:-0}
master_addr=${MASTER_ADDR:-127.0.0.1}
master_port=${MASTER_PORT:-29500}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-100}

use_cpu=$(echo "${ACCELERATE_USE_CPU:-0}" | tr '[:upper:]' '[:lower:]')
if [ -n "${GPUS_PER_NODE:-}" ]; then
  procs_per_node=$GPUS_PER_NODE
elif [ "$use_cpu" = 1 ] || [ "$use_cpu" = true ] || [ "$use_cpu" = yes ]; then
  procs_per_node=1
else
  procs_per_node=$("$python" -c "import torch; print(torch.cuda.device_count())")
  if [ "$procs_per_node" -eq 0 ]; then
    echo "[launch] no GPU visible: one CPU process per node (gloo)" >&2
    export ACCELERATE_USE_CPU=1
    procs_per_node=1
  fi
fi

for name in nnodes node_rank master_port procs_per_node; do
  value=${!name}
  if ! [[ "$value" =~ ^[0-9]+$ ]]; then
    echo "[launch] $name must be a non-negative integer, got '$value' (check NNODES, NODE_RANK, MASTER_PORT," \
      "GPUS_PER_NODE)" >&2
    exit 2
  fi
done
if [ "$nnodes" -lt 1 ] || [ "$procs_per_node" -lt 1 ] || [ "$node_rank" -ge "$nnodes" ]; then
  echo "[launch] need NNODES >= 1, GPUS_PER_NODE >= 1 and 0 <= NODE_RANK < NNODES;" \
    "got NNODES=$nnodes GPUS_PER_NODE=$procs_per_node NODE_RANK=$node_rank" >&2
  exit 2
fi
if [ ! -f "$train_script" ]; then
  echo "[launch] training script not found: $train_script (set TRAIN_SCRIPT)" >&2
  exit 2
fi

num_processes=$((nnodes * procs_per_node))
echo "[launch] node $node_rank of $nnodes, $procs_per_node process(es) here, $num_processes in all," \
  "rendezvous at $master_addr:$master_port" >&2
if [ "$num_processes" -eq 1 ]; then
  exec "$python" "$train_script" "$@"
fi
# --multi_gpu selects accelerate's torch.distributed.run launcher, which also serves CPU processes (gloo) and
# forwards SIGTERM to them. Mixed precision is the config's train.mixed_precision, which the trainer passes to
# Accelerator; the flag below only silences accelerate's warning about a missing default.
exec "$python" -m accelerate.commands.launch \
  --multi_gpu \
  --num_machines "$nnodes" \
  --machine_rank "$node_rank" \
  --main_process_ip "$master_addr" \
  --main_process_port "$master_port" \
  --num_processes "$num_processes" \
  --mixed_precision no \
  --dynamo_backend no \
  "$train_script" "$@"
