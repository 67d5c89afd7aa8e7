#!/usr/bin/env bash
# Stop the local SLURM cluster started by slurm/start.sh. Safe to run when it is already stopped.
#
# Jobs still pending or running are cancelled first, so no job processes outlive the daemons.
# Each daemon is stopped by the PID in its pid file, with SIGTERM and, after 10 s, SIGKILL.
# Saved state (jobs, node state, job ids) stays in the state folder. Deleting that folder gives a
# fresh cluster whose job ids restart at 1.
#
# Environment: DCP_SLURM_STATE_DIR, as for start.sh.
set -euo pipefail

SLURM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
# shellcheck source=slurm/lib.sh
source "$SLURM_DIR/lib.sh"
STATE_DIR=${DCP_SLURM_STATE_DIR:-$SLURM_DIR/state}
export SLURM_CONF=$STATE_DIR/slurm.conf
SCRIPT_START_US=${EPOCHREALTIME/./}
TERM_TIMEOUT_S=10
JOB_CANCEL_TIMEOUT_S=15

log() { echo "slurm/stop.sh: $*"; }

active_job_ids() {
  squeue -h -t PENDING,RUNNING,SUSPENDED,COMPLETING,CONFIGURING,REQUEUED -o %A 2>/dev/null || true
}

cancel_jobs() {
  live_pid "$STATE_DIR/slurmctld.pid" slurmctld >/dev/null || return 0
  local job_ids
  job_ids=$(active_job_ids)
  [[ -n $job_ids ]] || return 0

  log "cancelling jobs: $(echo $job_ids)"
  # shellcheck disable=SC2086  # one argument per job id
  scancel $job_ids || true
  local deadline_us=$((${EPOCHREALTIME/./} + JOB_CANCEL_TIMEOUT_S * 1000000))
  while [[ -n $(active_job_ids) ]] && ((${EPOCHREALTIME/./} < deadline_us)); do
    sleep 0.2
  done
  job_ids=$(active_job_ids)
  if [[ -n $job_ids ]]; then
    log "warning: jobs $(echo $job_ids) still active after ${JOB_CANCEL_TIMEOUT_S} s; their processes may outlive the daemons"
  fi
}

stop_daemon() {
  local name=$1 pid_file=$2 pid
  if ! pid=$(live_pid "$pid_file" "$name"); then
    rm -f "$pid_file"
    return 0
  fi

  local begin_us=${EPOCHREALTIME/./}
  local deadline_us=$((begin_us + TERM_TIMEOUT_S * 1000000))
  kill -TERM "$pid" 2>/dev/null || true
  while live_pid "$pid_file" "$name" >/dev/null && ((${EPOCHREALTIME/./} < deadline_us)); do
    sleep 0.02
  done
  if live_pid "$pid_file" "$name" >/dev/null; then
    log "$name (pid $pid) ignored SIGTERM for ${TERM_TIMEOUT_S} s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pid_file"
  log "$name (pid $pid) stopped in $(elapsed_since "$begin_us") s"
}

main() {
  if [[ ! -d $STATE_DIR ]]; then
    log "nothing to stop: no state folder $STATE_DIR"
    return 0
  fi
  cancel_jobs
  stop_daemon slurmd "$STATE_DIR/slurmd.pid"
  stop_daemon slurmctld "$STATE_DIR/slurmctld.pid"
  stop_daemon munged "$STATE_DIR/munge/munged.pid"
  log "stopped in $(elapsed_since "$SCRIPT_START_US") s"
}

main "$@"
