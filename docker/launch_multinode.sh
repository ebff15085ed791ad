#!/usr/bin/env bash
# Start train.py on this node through `accelerate launch`, configured by environment variables; run it once per
# node (the SLURM script does it with srun). Arguments are passed to train.py unchanged.
#
#   NNODES         number of nodes (machines)                                   default 1
#   NODE_RANK      this node's rank, 0..NNODES-1                                default 0
#   MASTER_ADDR    address of node 0, reachable from every node                 default 127.0.0.1
#   MASTER_PORT    a free TCP port on node 0        default 29500, or 20000 + SLURM_JOB_ID % 20000 in a Slurm job
#   GPUS_PER_NODE  processes on this node, one per GPU                          default: visible GPUs, or 1 on CPU
#   ACCELERATE_USE_CPU=1  train on CPU (gloo). Without it the launcher needs GPUS_PER_NODE visible GPUs and fails
#                  otherwise: a GPU job that silently fell back to CPU would start N separate single-process runs
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT  seconds the launcher waits for trainers to checkpoint and exit after a
#                  SIGTERM before it kills them                                 default 100
#   PYTHON         the interpreter with the project installed                   default python3 on PATH
#   TRAIN_SCRIPT   the training entry point                                     default train.py beside docker/
#
# One process in total (one node, one GPU or CPU) runs train.py directly: accelerate's single-process launcher
# does not pass SIGTERM on to its child, and the trainer needs it to checkpoint before it is stopped.
# Signals: SIGTERM to this launcher (docker stop, tini) is passed on to the trainers by torch.distributed.run, which
# kills them only TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds later; a trainer stays graceful when it gets SIGTERM
# again from its agent (Slurm signals every process of a step). The trainers check that their process group has
# the size announced here (WORLDMODEL_WORLD_SIZE).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
train_script=${TRAIN_SCRIPT:-$repo/train.py}
nnodes=${NNODES:-1}
node_rank=${NODE_RANK:-0}
master_addr=${MASTER_ADDR:-127.0.0.1}
if [ -n "${SLURM_JOB_ID:-}" ]; then
  master_port=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}  # jobs sharing a node do not collide
else
  master_port=${MASTER_PORT:-29500}
fi
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-100}

use_cpu=$(echo "${ACCELERATE_USE_CPU:-0}" | tr '[:upper:]' '[:lower:]')
case "$use_cpu" in 1 | true | yes) use_cpu=1 ;; *) use_cpu=0 ;; esac
if [ "$use_cpu" = 0 ]; then
  if ! gpus=$("$python" -c "import torch; print(torch.cuda.device_count())"); then
    echo "[launch] cannot ask torch for the GPUs with $python (set PYTHON to the interpreter of the project)" >&2
    exit 2
  fi
fi
if [ -n "${GPUS_PER_NODE:-}" ]; then
  procs_per_node=$GPUS_PER_NODE
elif [ "$use_cpu" = 1 ]; then
  procs_per_node=1
else
  procs_per_node=$gpus
fi

for name in nnodes node_rank master_port procs_per_node; do
  value=${!name}
  if ! [[ "$value" =~ ^[0-9]+$ ]]; then
    echo "[launch] $name must be a non-negative integer, got '$value' (check NNODES, NODE_RANK, MASTER_PORT," \
      "GPUS_PER_NODE)" >&2
    exit 2
  fi
done
if [ "$use_cpu" = 0 ] && { [ "$gpus" -eq 0 ] || [ "$gpus" -lt "$procs_per_node" ]; }; then
  if [ "$gpus" -eq 0 ]; then
    echo "[launch] no GPU visible on $(hostname); set ACCELERATE_USE_CPU=1 to train on CPU (gloo) on purpose" >&2
  else
    echo "[launch] GPUS_PER_NODE=$procs_per_node but only $gpus GPU(s) visible on $(hostname)" >&2
  fi
  exit 2
fi

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
export WORLDMODEL_WORLD_SIZE=$num_processes
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
