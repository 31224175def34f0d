#!/bin/bash
# LLaMA-7B with SLTrain linears (W = s·BA + S, r=1024, δ=0.05) on N nodes x 8 GPUs, preemption-safe.
#
#   mkdir -p logs && sbatch --nodes=4 slurm/llama7b_sl.sh            # from the repository root
#   NODES=4 TIME=24:00:00 PARTITION=gpu bash slurm/llama7b_sl.sh     # same, submitted for you
#   MSL_DATA_PREFIX=/data/c4/c4_text_document MSL_TOKENIZER=/data/llama/tokenizer.model \
#     MSL_OUTPUT_DIR=/scratch/$USER/llama7b_sl sbatch --nodes=8 slurm/llama7b_sl.sh optim.lr=1e-3
#
# TP and ZeRO come from the config (parallel.tensor_parallel, deepspeed.zero_stage -> the shipped
# template megatron_sl/ds_configs/zero{0,12,3}.json); MSL_TP / MSL_ZERO override them. Batch sizes live only in
# the config and are written into the DeepSpeed config at launch. Arguments after the script name
# are further section.key=value overrides. All environment inputs: slurm/lib/launch.sh.
#
# One srun task per node runs torchrun (python -m megatron_sl.training.preemption: torchrun plus
# USR1 forwarding and exit-code 75 propagation) with c10d rendezvous on the first host of
# `scontrol show hostnames`. GRACE seconds before the time limit Slurm sends USR1 to this shell; it
# forwards it to the ranks, which finish the step, checkpoint and exit 75; the shell then requeues
# the job (--requeue), and the next run resumes from <output_dir>/checkpoints/latest. Output is
# appended across restarts to logs/<job-name>-<job-id>.out (logs/ must exist at submission).
# Grace: 600 s covers a 7B checkpoint (~100 GB of fp32 master weights + Adam states across ranks)
# on a parallel filesystem; raise it for slow storage (`sbatch --signal=B:USR1@900 ...`).
#
# Environment of the ranks (slurm/lib/launch.sh sets these unless given at submission):
#   CUDA_DEVICE_MAX_CONNECTIONS=1   megatron TP/SP: communication kernels issued in program order
#   TORCH_NCCL_ASYNC_ERROR_HANDLING=1  a failed/hung collective raises instead of burning the allocation
#   NCCL_DEBUG=WARN                 INFO when debugging the fabric; set NCCL_SOCKET_IFNAME / NCCL_IB_HCA
#                                   for your site's network
#   OMP_NUM_THREADS=cpus/ranks      per node; PYTHONUNBUFFERED=1 so the log follows the run

# Monitoring: MSL_PROMETHEUS_PORT=9477 makes rank 0 serve /metrics on the first node (scrape it with
# dashboards/prometheus.yml, alerts in dashboards/alerts.yml); MSL_PROMETHEUS_TEXTFILE_DIR=DIR writes
# the same metrics for node_exporter's textfile collector instead. TensorBoard: <output_dir>/tensorboard.
#
#SBATCH --job-name=llama7b-sl
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

set -uo pipefail
_here=${MSL_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
# shellcheck source=slurm/lib/launch.sh
source "$_here/slurm/lib/launch.sh" 2>/dev/null || { echo "cannot read $_here/slurm/lib/launch.sh (submit from the repository root or set MSL_REPO)" >&2; exit 2; }
export MSL_CONFIG=${MSL_CONFIG:-configs/llama_7b_sl.yaml}
msl_submit_if_outside "${BASH_SOURCE[0]}" "$@"

export MSL_NPROC_PER_NODE=${MSL_NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
msl_setup "$@"
msl_banner
msl_run
