#!/usr/bin/env bash
# One torchrun per node of this SLURM job, meeting by c10d rendezvous on the job's first node.
#   slurm_torchrun.sh NODES GPUS_PER_NODE COMMAND [ARGS...]
# Snakemake's SLURM job step keeps only SLURM_JOB_ID of the job's variables, so the
# allocation (its node count and first node) is read back from squeue. The NODES agents are
# spread over the allocated nodes: one per node on a NODES-node job.
set -euo pipefail
nodes=$1
gpus=$2
shift 2
: "${SLURM_JOB_ID:?train.nodes > 1 runs inside a SLURM job (snakemake --profile profiles/slurm)}"
allocated=$(squeue --noheader --jobs "$SLURM_JOB_ID" --format %D)
first=$(scontrol show hostnames "$(squeue --noheader --jobs "$SLURM_JOB_ID" --format %N)" | head -n 1)
port=$((29500 + SLURM_JOB_ID % 1000))
exec srun --nodes "$allocated" --ntasks "$nodes" \
    torchrun --nnodes "$nodes" --nproc-per-node "$gpus" \
    --rdzv-backend c10d --rdzv-endpoint "$first:$port" --rdzv-id "$SLURM_JOB_ID" "$@"
