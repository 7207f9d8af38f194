#!/bin/bash
# A sweep as a Slurm array job: task I of N measures every N-th example into its own file,
# then one merge combines them. lsbench needs no Ray for this; Slurm does the scheduling.
#
#   sbatch --array=1-8 sweeps/slurm-array.sh          # 8 shards, one GPU each
#   # when all tasks are done (or: sbatch --dependency=afterok:<jobid> --wrap "...merge...")
#   lsbench merge results/quickstart.parquet results/quickstart.shard-*-of-8.parquet
#
# A shard takes whole examples (every run and repeat of an example), so each speedup is still
# taken against a baseline measured in the same process on the same device. A task that is
# preempted or killed resumes where it stopped when it is rerun: rows already in its shard
# file are skipped.
#
#SBATCH --job-name=lsbench-sweep
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=4
#SBATCH --time=04:00:00
#SBATCH --output=logs/lsbench-%A_%a.out
set -euo pipefail

SWEEP=${SWEEP:-sweeps/quickstart.toml}
OUT=${OUT:-results/quickstart.parquet}
# Slurm numbers tasks from --array's first index (0-7 or 1-8 alike); lsbench counts from 1.
N=${SLURM_ARRAY_TASK_COUNT:?run me with sbatch --array=1-N}
I=$(( ${SLURM_ARRAY_TASK_ID:?} - ${SLURM_ARRAY_TASK_MIN:-1} + 1 ))

# Writes results/quickstart.shard-$I-of-$N.parquet
lsbench sweep "$SWEEP" --out "$OUT" --shard "$I/$N"
