#!/usr/bin/env bash
# Stop the development SLURM cluster that slurm/start-dev-cluster.sh started.
#
# Usage: bash slurm/stop-dev-cluster.sh [--purge] [--state-dir DIR]
#
# Stops only the daemons named in the state folder's PID files (slurmd, slurmctld, slurmdbd,
# MariaDB, munged, in that order), so a munged or MariaDB that was already running before the
# cluster started is left alone. Jobs survive a plain stop and start: slurmctld keeps its state.
#
#   --purge          also cancel all jobs first and delete the state folder (job history,
#                    accounting database, logs); the next start begins again at job id 1
#   --state-dir DIR  the state folder (default $DEHBWS_DEVSLURM_DIR or /var/lib/dehbws-devslurm)
set -euo pipefail

STATE_DIR="${DEHBWS_DEVSLURM_DIR:-/var/lib/dehbws-devslurm}"
PURGE=false

log() { printf '[dev-slurm] %s\n' "$*"; }
die() { printf '[dev-slurm] error: %s\n' "$*" >&2; exit 1; }

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }

parse_args() {
  while (($#)); do
    case "$1" in
      --purge) PURGE=true; shift ;;
      --state-dir) STATE_DIR="${2:?--state-dir needs a folder}"; shift 2 ;;
      -h | --help) usage; exit 0 ;;
      *) usage >&2; die "unknown argument '$1'" ;;
    esac
  done
  RUN_DIR="$STATE_DIR/run"
}

ensure_root() {
  ((EUID == 0)) && return
  command -v sudo >/dev/null || die "run this as root (no sudo found)"
  exec sudo --preserve-env=DEHBWS_DEVSLURM_DIR bash "$0" "$@"
}

# Jobs run by slurmstepd outlive slurmd under proctrack/linuxproc; a purge must end them
# while slurmctld can still reach them.
cancel_all_jobs() {
  local ids
  ids="$(squeue -h -o %A 2>/dev/null || true)"
  if [[ -z "$ids" ]]; then
    return
  fi
  # shellcheck disable=SC2086  # one job id per word
  scancel $ids 2>/dev/null || true
  for _ in $(seq 1 40); do
    [[ -z "$(squeue -h -o %A 2>/dev/null || true)" ]] && break
    sleep 0.25
  done
  log "jobs: cancelled $(wc -w <<<"$ids")"
}

# Send TERM to the process in a PID file, give it up to 15 s to finish, then KILL it.
stop_daemon() {
  local name="$1" file="$2" pid
  if [[ ! -s "$file" ]]; then
    log "$name: not running (no PID file)"
    return
  fi
  pid="$(tr -dc '0-9' <"$file")"
  # A PID file that outlived a reboot may name an unrelated process by now.
  if [[ -z "$pid" ]] || ! tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "$name"; then
    rm -f "$file"
    log "$name: not running (stale PID file removed)"
    return
  fi
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.25
  done
  if kill -0 "$pid" 2>/dev/null; then
    kill -9 "$pid" 2>/dev/null || true
    log "$name: killed (did not stop within 15 s)"
  else
    log "$name: stopped"
  fi
  rm -f "$file"
}

purge_state() {
  # Guard against an empty or root path reaching rm -rf.
  [[ -n "$STATE_DIR" && "$STATE_DIR" != / && -d "$STATE_DIR" ]] || return 0
  rm -rf "$STATE_DIR"
  log "state folder: deleted $STATE_DIR"
}

main() {
  parse_args "$@"
  ensure_root "$@"
  $PURGE && cancel_all_jobs
  stop_daemon slurmd "$RUN_DIR/slurmd.pid"
  stop_daemon slurmctld "$RUN_DIR/slurmctld.pid"
  stop_daemon slurmdbd "$RUN_DIR/slurmdbd.pid"
  stop_daemon mariadbd "$RUN_DIR/mysql/mariadbd.pid"
  stop_daemon munged "$RUN_DIR/munge/munged.pid"
  if $PURGE; then
    purge_state
  fi
  log "stopped"
}

main "$@"
