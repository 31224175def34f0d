#!/usr/bin/env bash
# Wait for a Slurm job to reach a final state, with a wall-clock guard (tests must never hang).
#   source it:  . scripts/slurm/wait.sh; slurm_wait JOBID [TIMEOUT_S]
#   or run it:  bash scripts/slurm/wait.sh JOBID [TIMEOUT_S]
# Prints "STATE EXITCODE RESTARTS" (e.g. "COMPLETED 0:0 1"); returns 0 only for COMPLETED with 0:0,
# 124 on timeout (the job is then cancelled), 2 if the job record is gone. It polls every second, so it
# reads the final state before slurmctld purges the record (MinJobAge=4 in up.sh); a requeued job passes
# through PENDING/REQUEUED and is waited for until its last run ends. Do not trust `sbatch --wait`'s
# status alone: a job cancelled while pending returns 0 there.
slurm_wait() {
  local jid=$1 to=${2:-900} t0=$SECONDS line st ec rs
  while :; do
    line=$(scontrol show job -o "$jid" 2>/dev/null) || { echo "PURGED ? ?"; return 2; }
    st=$(sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p' <<<"$line")
    ec=$(sed -n 's/.* ExitCode=\([0-9:]*\).*/\1/p' <<<"$line")
    rs=$(sed -n 's/.* Restarts=\([0-9]*\).*/\1/p' <<<"$line")
    case $st in
      COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|PREEMPTED|BOOT_FAIL|DEADLINE)
        echo "$st $ec ${rs:-0}"; [ "$st" = COMPLETED ] && [ "$ec" = 0:0 ]; return ;;
    esac
    if (( SECONDS - t0 > to )); then scancel "$jid"; echo "WAIT_TIMEOUT($st) $ec ${rs:-0}"; return 124; fi
    sleep 1
  done
}
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  [ $# -ge 1 ] || { echo "usage: $0 JOBID [TIMEOUT_S]" >&2; exit 2; }
  slurm_wait "$@"
fi
