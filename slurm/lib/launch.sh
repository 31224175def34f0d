# shellcheck shell=bash
# The body shared by slurm/llama7b_sl.sh and slurm/train.sbatch (sourced by them, not run directly):
# submission from outside Slurm, the environment, one srun task per node running torchrun, the
# preemption signal path, and the requeue decision.
#
# Signal path (measured on the local Slurm 22.05 test cluster, see tests/slurm/):
#   slurmctld --signal=B:USR1@GRACE --> this batch shell (trap) --> `kill -USR1 <srun pid>`
#   --> srun --> slurmstepd on every node signals every process of the step: the torchrun agents
#   (python -m megatron_sl.training.preemption, which block USR1 and forward it to their workers) and
#   the trainer ranks, whose PreemptionHandler sets a flag. The ranks agree on a stop step (flag
#   all-reduced each step), checkpoint and exit 75; each node's agent exits 75 and records
#   "75 preempted" in $MSL_NODE_EXIT_DIR; if some node says "preempted" and none "worker-failed",
#   this shell runs `scontrol requeue $SLURM_JOB_ID`, and the next run of the job resumes from
#   <output_dir>/checkpoints/latest. Any other failure ends the job with its exit code, no requeue.
#   Plain torchrun would not work here: it has no USR1 handler (the default action kills the agent
#   and its workers) and exits 1 whatever its workers' codes.
#   SIGTERM (scancel, time limit, preemption by Slurm) reaches every process directly; the trainer
#   also checkpoints and exits 75 on it if Slurm's KillWait leaves time, but this shell does not
#   requeue after a TERM (the job is being cancelled or has run out of time).
#
# Inputs (environment; every one optional except where a script says otherwise):
#   MSL_CONFIG          training config YAML                 (llama7b_sl.sh: configs/llama_7b_sl.yaml)
#   MSL_DATA_PREFIX     -> data.prefix=...                    indexed dataset prefix (.bin/.idx)
#   MSL_TOKENIZER       -> data.tokenizer=...                 sentencepiece model
#   MSL_OUTPUT_DIR      -> run.output_dir=...                 run dir (checkpoints/, metrics.jsonl)
#   MSL_TP, MSL_ZERO    -> parallel.tensor_parallel=, deepspeed.zero_stage=   (else: the config's)
#   MSL_OVERRIDES       more section.key=value overrides, whitespace separated (script args too)
#   MSL_NPROC_PER_NODE  ranks per node (default: GPUs on the node, else 8)
#   MSL_PYTHON          interpreter (default: <repo>/.venv/bin/python if present, else python3)
#   MSL_MASTER_PORT     rendezvous port on the first node (default: derived from job id + restart)
#   MSL_DRY_RUN=1       pass --dry-run (the memory planner's per-rank figures, no training)
#   MSL_MAX_RESTARTS    stop requeueing after this many restarts (default 100)
#   MSL_SRUN_WAIT       seconds srun waits after the first node exits before killing the rest (120)
#   MSL_REPO            repository root (default: $SLURM_SUBMIT_DIR)
# Monitoring (metrics: section of the config; Prometheus rules and a Grafana dashboard in dashboards/):
#   MSL_PROMETHEUS_PORT -> metrics.prometheus_port=...        global rank 0 (on the first node of
#                          `scontrol show hostnames`) serves http://<first node>:PORT/metrics; the
#                          banner prints the scrape target (default: off)
#   MSL_PROMETHEUS_TEXTFILE_DIR -> metrics.prometheus_textfile=DIR/megatron_sl_{run}_{job_id}.prom
#                          for node_exporter's textfile collector (--collector.textfile.directory=DIR
#                          on the first node) where compute nodes cannot be scraped directly (default: off)
#   Labels: run = run.output_dir's name, job_id = $SLURM_JOB_ID (the same across requeues), tp, dp.
#   TensorBoard event files are written to <output_dir>/tensorboard (metrics.tensorboard=false: off).
# Submission from outside Slurm (`NODES=4 bash slurm/llama7b_sl.sh`): NODES, TIME, PARTITION,
#   ACCOUNT, QOS and SBATCH_ARGS become sbatch options (sbatch has no SBATCH_NODES variable).

msl_log() { echo "[$(date +%FT%T)] [slurm] $*"; }
msl_die() { echo "[$(date +%FT%T)] [slurm] error: $*" >&2; exit 2; }

# Outside a job: submit this script (logs/ must exist before the job starts, or Slurm drops output).
msl_submit_if_outside() {
  local script=$1; shift
  [ -n "${SLURM_JOB_ID:-}" ] && return 0
  command -v sbatch >/dev/null || msl_die "not inside a Slurm job and sbatch is not on PATH"
  # the cheap checks before anything is queued (the ranks validate the whole config again)
  [ -n "${MSL_CONFIG:-}" ] || msl_die "MSL_CONFIG is not set (a training config YAML, e.g. configs/tiny_sl.yaml)"
  [ -f "$MSL_CONFIG" ] || msl_die "MSL_CONFIG=$MSL_CONFIG does not exist (relative paths are from $PWD)"
  [ -z "${NODES:-}" ] || [[ "$NODES" =~ ^[1-9][0-9]*$ ]] || msl_die "NODES=$NODES must be a positive integer"
  mkdir -p logs
  local opts=()
  [ -n "${NODES:-}" ] && opts+=("--nodes=$NODES")
  [ -n "${TIME:-}" ] && opts+=("--time=$TIME")
  [ -n "${PARTITION:-}" ] && opts+=("--partition=$PARTITION")
  [ -n "${ACCOUNT:-}" ] && opts+=("--account=$ACCOUNT")
  [ -n "${QOS:-}" ] && opts+=("--qos=$QOS")
  # shellcheck disable=SC2206
  [ -n "${SBATCH_ARGS:-}" ] && opts+=($SBATCH_ARGS)
  exec sbatch "${opts[@]}" "$script" "$@"
}

msl_setup() {
  REPO=${MSL_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
  [ -f "$REPO/megatron_sl/training/preemption.py" ] || \
    msl_die "MSL_REPO=$REPO is not the megatron-sl repository (submit from the repo root or set MSL_REPO)"
  if [ -n "${MSL_PYTHON:-}" ]; then PY=$MSL_PYTHON
  elif [ -x "$REPO/.venv/bin/python" ]; then PY=$REPO/.venv/bin/python
  else PY=python3; fi
  CONFIG=${MSL_CONFIG:-}
  [ -n "$CONFIG" ] || msl_die "MSL_CONFIG is not set (a training config YAML, e.g. configs/tiny_sl.yaml)"
  [ -f "$CONFIG" ] || msl_die "MSL_CONFIG=$CONFIG does not exist (relative paths are from $PWD)"

  OVERRIDES=()
  [ -n "${MSL_DATA_PREFIX:-}" ] && OVERRIDES+=("data.prefix=$MSL_DATA_PREFIX")
  [ -n "${MSL_TOKENIZER:-}" ] && OVERRIDES+=("data.tokenizer=$MSL_TOKENIZER")
  [ -n "${MSL_OUTPUT_DIR:-}" ] && OVERRIDES+=("run.output_dir=$MSL_OUTPUT_DIR")
  [ -n "${MSL_TP:-}" ] && OVERRIDES+=("parallel.tensor_parallel=$MSL_TP")
  [ -n "${MSL_ZERO:-}" ] && OVERRIDES+=("deepspeed.zero_stage=$MSL_ZERO")
  [ -n "${MSL_PROMETHEUS_PORT:-}" ] && OVERRIDES+=("metrics.prometheus_port=$MSL_PROMETHEUS_PORT")
  [ -n "${MSL_PROMETHEUS_TEXTFILE_DIR:-}" ] && \
    OVERRIDES+=("metrics.prometheus_textfile=$MSL_PROMETHEUS_TEXTFILE_DIR/megatron_sl_{run}_{job_id}.prom")
  # shellcheck disable=SC2206
  [ -n "${MSL_OVERRIDES:-}" ] && OVERRIDES+=($MSL_OVERRIDES)
  OVERRIDES+=("$@")
  # progress bars in a log file are noise; the metrics JSONL has every step
  OVERRIDES=("run.progress_bar=false" "${OVERRIDES[@]}")

  NNODES=${SLURM_NNODES:-1}
  NPROC=${MSL_NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
  [[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || msl_die "MSL_NPROC_PER_NODE=$NPROC must be a positive integer"
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  RESTART=${SLURM_RESTART_COUNT:-0}
  # distinct per job and per restart (the previous run's port may linger in TIME_WAIT); emulated
  # nodes sharing one host share one port space, and only the first node's agent binds it
  MASTER_PORT=${MSL_MASTER_PORT:-$(( 20000 + (SLURM_JOB_ID % 2000) * 10 + RESTART % 10 ))}
  NODE_EXIT_DIR=${MSL_NODE_EXIT_DIR:-$PWD/logs/.node-exit-$SLURM_JOB_ID-$RESTART}

  # --- environment of the ranks (documented defaults; a value set at submission wins) ---
  export PYTHONUNBUFFERED=1
  # one OpenMP thread per CPU the rank can have; torchrun would force 1 otherwise
  local cpus=${SLURM_CPUS_ON_NODE:-$NPROC}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cpus / NPROC > 0 ? cpus / NPROC : 1 ))}
  # megatron: one hardware queue per device so TP/SP communication is issued in program order
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
  # a failed/hung NCCL collective raises instead of hanging until the job's time limit
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  # site specific, set at submission if needed: NCCL_SOCKET_IFNAME (e.g. ib0 / ^lo,docker),
  # NCCL_IB_HCA, NCCL_IB_GID_INDEX, NCCL_NET_GDR_LEVEL, FI_PROVIDER/FI_EFA_* (AWS EFA)
  export MSL_NODE_EXIT_DIR=$NODE_EXIT_DIR
}

msl_banner() {
  msl_log "job $SLURM_JOB_ID (${SLURM_JOB_NAME:-}) restart $RESTART on $NNODES node(s) [$SLURM_JOB_NODELIST] x $NPROC rank(s)," \
    "time left $(squeue -h -j "$SLURM_JOB_ID" -o %L 2>/dev/null || echo '?')"
  msl_log "rendezvous $MASTER_ADDR:$MASTER_PORT; python $PY; config $CONFIG"
  msl_log "overrides: ${OVERRIDES[*]}"
  [ -n "${MSL_PROMETHEUS_PORT:-}" ] && msl_log "metrics: Prometheus scrape target $MASTER_ADDR:$MSL_PROMETHEUS_PORT (/metrics)"
  msl_log "env: OMP_NUM_THREADS=$OMP_NUM_THREADS CUDA_DEVICE_MAX_CONNECTIONS=$CUDA_DEVICE_MAX_CONNECTIONS NCCL_DEBUG=$NCCL_DEBUG"
}

# Run training (all nodes) and handle preemption; exits the batch shell with the final status.
msl_run() {
  local train_args=(train --config "$CONFIG")
  [ "${MSL_DRY_RUN:-0}" = 1 ] && train_args+=(--dry-run)
  train_args+=("${OVERRIDES[@]}")
  rm -rf "$NODE_EXIT_DIR"; mkdir -p "$NODE_EXIT_DIR"

  MSL_GOT_USR1=0 MSL_GOT_TERM=0 MSL_SIGNALLED=0 SRUN_PID=
  local started=$SECONDS
  msl_on_usr1() {
    MSL_GOT_USR1=1 MSL_SIGNALLED=1
    msl_log "received USR1 (time limit or preemption ahead): asking the ranks to checkpoint and exit"
    (( SECONDS - started < 60 )) && msl_log "warning: USR1 came $(( SECONDS - started )) s after start; if --time is" \
      "not longer than the --signal=B:USR1@GRACE, every run is signalled at once (bounded by MSL_MAX_RESTARTS)"
    [ -n "$SRUN_PID" ] && kill -USR1 "$SRUN_PID" 2>/dev/null
  }
  msl_on_term() {
    MSL_GOT_TERM=1 MSL_SIGNALLED=1
    msl_log "received TERM (cancel / time limit): Slurm signals the ranks directly; no requeue"
  }
  msl_on_int() {  # e.g. scancel --signal=INT --batch: stop with a checkpoint like TERM, no requeue
    MSL_GOT_TERM=1 MSL_SIGNALLED=1
    msl_log "received INT: asking the ranks to checkpoint and exit; no requeue"
    [ -n "$SRUN_PID" ] && kill -TERM "$SRUN_PID" 2>/dev/null
  }
  trap msl_on_usr1 USR1
  trap msl_on_term TERM
  trap msl_on_int INT

  srun --nodes="$NNODES" --ntasks-per-node=1 --ntasks="$NNODES" --wait="${MSL_SRUN_WAIT:-120}" \
    --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" \
    "$PY" -m megatron_sl.training.preemption \
      --nnodes "$NNODES" --nproc-per-node "$NPROC" --max-restarts 0 \
      --rdzv-id "$SLURM_JOB_ID-$RESTART" --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \
      -m megatron_sl.cli.main "${train_args[@]}" &
  SRUN_PID=$!
  # a USR1 that arrived before srun existed
  [ "$MSL_GOT_USR1" = 1 ] && kill -USR1 "$SRUN_PID" 2>/dev/null
  local rc
  while :; do
    MSL_SIGNALLED=0
    wait "$SRUN_PID"; rc=$?
    [ "$MSL_SIGNALLED" = 1 ] && continue  # wait was interrupted by a trapped signal: srun still runs
    break
  done
  trap - USR1 TERM INT

  # per-node results "<code> <kind>" written by megatron_sl.training.preemption (srun keeps only the max)
  local results=() f code kind preempted=0 crashed=0
  for f in "$NODE_EXIT_DIR"/node-*.rc; do
    [ -f "$f" ] || continue
    read -r code kind < "$f"
    results+=("$(basename "$f" .rc)=$code/$kind")
    case $kind in
      preempted) preempted=1 ;;
      worker-failed) crashed=1 ;;
    esac
  done
  msl_log "srun exited with $rc; node results: ${results[*]:-none recorded}"
  # a 75 on any node means every rank passed the checkpoint's final barrier; agents that failed
  # afterwards (rendezvous store gone with the first node to exit) do not make it a crash
  [ "$rc" = 75 ] && [ "${#results[@]}" = 0 ] && preempted=1
  rm -rf "$NODE_EXIT_DIR"

  if [ "$preempted" = 1 ] && [ "$crashed" = 0 ]; then
    if [ "$MSL_GOT_TERM" = 1 ]; then
      msl_log "checkpointed after TERM; not requeueing a cancelled / timed-out job"
      exit 75
    fi
    if [ "$RESTART" -ge "${MSL_MAX_RESTARTS:-100}" ]; then
      msl_log "checkpointed, but restart $RESTART reached MSL_MAX_RESTARTS=${MSL_MAX_RESTARTS:-100}; not requeueing"
      exit 75
    fi
    msl_log "checkpointed (exit 75): scontrol requeue $SLURM_JOB_ID; the next run resumes from checkpoints/latest"
    if scontrol requeue "$SLURM_JOB_ID"; then exit 0; fi
    msl_log "scontrol requeue failed; resubmit to resume"
    exit 75
  fi
  [ "$rc" = 0 ] && msl_log "finished" || msl_log "failed (exit $rc)"
  exit "$rc"
}
