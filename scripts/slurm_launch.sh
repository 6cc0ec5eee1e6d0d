#!/bin/bash
# Multi-node ProLong training under SLURM: one `accelerate launch` per node, each starting one
# process per GPU. Submit from the repository root:
#
#   sbatch --nodes 4 scripts/slurm_launch.sh recipes/prolong-8b/stage1.yaml --activation_checkpointing false
#   ACCELERATE_CONFIG=accelerate_configs/deepspeed_zero3.yaml sbatch --nodes 2 scripts/slurm_launch.sh RECIPE
#
# Extra arguments after the recipe override recipe fields. A requeued (preempted) job runs this
# same command again and continues from the newest complete checkpoint in output_dir
# (--resume_from_checkpoint auto, passed below; add --overwrite_output_dir true to start over).
# Environment knobs:
#   ENTRY_POINT        (default prolong/run_cpt.py; prolong/run_sft.py for SFT)
#   ACCELERATE_CONFIG  (default accelerate_configs/multi_node_fsdp2.yaml)
#   GPUS_PER_NODE      (default: SLURM_GPUS_ON_NODE, else 8)
#   MASTER_PORT        (default 29500)
#   PYTHON_ENV         (default .venv; activated when it exists)
#SBATCH --job-name=prolong
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1          # one launcher per node; it forks one process per GPU
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --requeue                    # a preempted job starts again and resumes (resume_from_checkpoint: auto)
set -euo pipefail

RECIPE=${1:?usage: sbatch [--nodes N] scripts/slurm_launch.sh RECIPE [--field value ...]}
shift
ENTRY_POINT=${ENTRY_POINT:-prolong/run_cpt.py}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-accelerate_configs/multi_node_fsdp2.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON_ENV=${PYTHON_ENV:-.venv}
mkdir -p logs
if [ -f "$PYTHON_ENV/bin/activate" ]; then source "$PYTHON_ENV/bin/activate"; fi

# the first node of the allocation hosts the rendezvous
MAIN_PROCESS_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)  # sed reads all: no SIGPIPE under pipefail
NUM_PROCESSES=$((SLURM_NNODES * GPUS_PER_NODE))

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export TOKENIZERS_PARALLELISM=false
export NCCL_ASYNC_ERROR_HANDLING=1     # a dead rank fails the job instead of hanging it
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1

echo "job $SLURM_JOB_ID: $SLURM_NNODES nodes x $GPUS_PER_NODE GPUs, main $MAIN_PROCESS_IP:$MASTER_PORT, config $ACCELERATE_CONFIG"

# srun starts one task per node; SLURM_PROCID (= node index with one task per node) must be read
# inside the task, hence the single quotes around the command.
srun --kill-on-bad-exit=1 bash -c '
  accelerate launch \
    --config_file "'"$ACCELERATE_CONFIG"'" \
    --num_machines "$SLURM_NNODES" \
    --machine_rank "$SLURM_PROCID" \
    --num_processes "'"$NUM_PROCESSES"'" \
    --main_process_ip "'"$MAIN_PROCESS_IP"'" \
    --main_process_port "'"$MASTER_PORT"'" \
    --rdzv_backend static \
    "'"$ENTRY_POINT"'" "$@"
' prolong-launch "$RECIPE" --resume_from_checkpoint auto "$@"
