#!/usr/bin/env bash
# Start a single-node SLURM cluster with accounting, for development and CI.
#
# Usage: bash slurm/start-dev-cluster.sh [--fake-gpus N] [--max-array-size N]
#                                        [--state-dir DIR] [--timeout-s S]
#
# Runs munged, MariaDB, slurmdbd, slurmctld and slurmd by hand (no systemd needed), each with
# a PID file and a log under one state folder, and waits until the node is idle and `sacct`
# answers. Running it again while the cluster is up changes nothing and says so.
#
# Environment (the options win over these):
#   DEHBWS_DEVSLURM_DIR             state folder (default /var/lib/dehbws-devslurm)
#   DEHBWS_DEVSLURM_FAKE_GPUS       dummy GPUs on the node (default 2; 0 for none)
#   DEHBWS_DEVSLURM_MAX_ARRAY_SIZE  MaxArraySize in slurm.conf (default 1001)
#   DEHBWS_DEVSLURM_TIMEOUT_S       how long to wait for the cluster to come up (default 120)
#   SLURM_CONF                      where slurm.conf goes (default /etc/slurm/slurm.conf);
#                                   gres.conf and slurmdbd.conf go beside it
#
# Stop it with slurm/stop-dev-cluster.sh (add --purge to delete the state folder).
set -euo pipefail

STATE_DIR="${DEHBWS_DEVSLURM_DIR:-/var/lib/dehbws-devslurm}"
FAKE_GPUS="${DEHBWS_DEVSLURM_FAKE_GPUS:-2}"
MAX_ARRAY_SIZE="${DEHBWS_DEVSLURM_MAX_ARRAY_SIZE:-1001}"
TIMEOUT_S="${DEHBWS_DEVSLURM_TIMEOUT_S:-120}"
SLURM_CONF_FILE="${SLURM_CONF:-/etc/slurm/slurm.conf}"

CLUSTER_NAME="dehbwsdev"
ACCOUNT_NAME="dehbws"
DB_NAME="slurm_acct_db"
DB_USER="slurm"
# The client library's compiled-in default: slurmdbd reaches MariaDB through it, so the server
# must listen here (slurmdbd.conf has no socket option).
MYSQL_SOCKET="/run/mysqld/mysqld.sock"
MUNGE_SOCKET_DIR="/run/munge"
# Every file this script writes outside the state folder starts with this line, so a
# configuration written by an administrator is never overwritten.
MARKER="# Written by slurm/start-dev-cluster.sh (dehbws development cluster)."

# Set once the configuration is known; true when a running daemon must reread it.
SLURM_CONF_CHANGED=false
DBD_CONF_CHANGED=false

log() { printf '[dev-slurm] %s\n' "$*"; }
die() { printf '[dev-slurm] error: %s\n' "$*" >&2; exit 1; }

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }

parse_args() {
  while (($#)); do
    case "$1" in
      --fake-gpus) FAKE_GPUS="${2:?--fake-gpus needs a number}"; shift 2 ;;
      --max-array-size) MAX_ARRAY_SIZE="${2:?--max-array-size needs a number}"; shift 2 ;;
      --state-dir) STATE_DIR="${2:?--state-dir needs a folder}"; shift 2 ;;
      --timeout-s) TIMEOUT_S="${2:?--timeout-s needs a number}"; shift 2 ;;
      -h | --help) usage; exit 0 ;;
      *) usage >&2; die "unknown argument '$1'" ;;
    esac
  done
  [[ "$FAKE_GPUS" =~ ^[0-9]+$ ]] || die "--fake-gpus is '$FAKE_GPUS', but must be an integer >= 0"
  [[ "$MAX_ARRAY_SIZE" =~ ^[1-9][0-9]*$ ]] \
    || die "--max-array-size is '$MAX_ARRAY_SIZE', but must be an integer >= 1"
  [[ "$TIMEOUT_S" =~ ^[1-9][0-9]*$ ]] || die "--timeout-s is '$TIMEOUT_S', but must be >= 1"
  CONF_DIR="$(dirname "$SLURM_CONF_FILE")"
  LOG_DIR="$STATE_DIR/log"
  RUN_DIR="$STATE_DIR/run"
}

# Daemons and SLURM's own files need root; a CI runner usually has passwordless sudo instead.
ensure_root() {
  ((EUID == 0)) && return
  command -v sudo >/dev/null || die "run this as root (no sudo found)"
  log "re-running under sudo"
  local keep="DEHBWS_DEVSLURM_DIR,DEHBWS_DEVSLURM_FAKE_GPUS,DEHBWS_DEVSLURM_MAX_ARRAY_SIZE"
  exec sudo --preserve-env="$keep,DEHBWS_DEVSLURM_TIMEOUT_S,SLURM_CONF" bash "$0" "$@"
}

APT_LOG=/tmp/dehbws-devslurm-apt.log

# apt-get with a wait for the dpkg lock (another install may be running) and a log file.
apt_get() {
  DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=600 "$@" >>"$APT_LOG" 2>&1
}

install_packages() {
  local missing=()
  command -v slurmctld >/dev/null || missing+=(slurm-wlm)
  command -v slurmdbd >/dev/null || missing+=(slurmdbd)
  command -v mariadbd >/dev/null || missing+=(mariadb-server)
  command -v munged >/dev/null || missing+=(munge)
  if ((${#missing[@]} == 0)); then
    log "packages: already installed"
    return
  fi
  log "packages: installing ${missing[*]} (apt-get, a minute or two; log in $APT_LOG)"
  # Without a policy-rc.d, package scripts on a sysvinit host would start the services
  # themselves, outside this script's PID files.
  local policy=/usr/sbin/policy-rc.d added_policy=false status=0
  if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 0755 "$policy"
    added_policy=true
  fi
  # Stale package lists are the usual reason for a failed install: refresh them and retry.
  apt_get install --no-install-recommends "${missing[@]}" \
    || { apt_get update && apt_get install --no-install-recommends "${missing[@]}"; } \
    || status=$?
  if $added_policy; then
    rm -f "$policy"
  fi
  ((status == 0)) || die "apt-get failed; see $APT_LOG"
}

make_folders() {
  mkdir -p "$STATE_DIR" "$LOG_DIR" "$RUN_DIR" "$STATE_DIR/spool/slurmctld" \
    "$STATE_DIR/spool/slurmd" "$STATE_DIR/dev" "$CONF_DIR"
  # MariaDB and munged drop root, so they need their own writable corners.
  chmod 0755 "$STATE_DIR" "$LOG_DIR" "$RUN_DIR"
  mkdir -p "$RUN_DIR/munge" "$RUN_DIR/mysql" "$LOG_DIR/munge" "$LOG_DIR/mysql"
  chown munge:munge "$RUN_DIR/munge" "$LOG_DIR/munge"
  chown mysql:mysql "$RUN_DIR/mysql" "$LOG_DIR/mysql"
  # /run is a tmpfs on most hosts: these vanish at reboot.
  mkdir -p "$MUNGE_SOCKET_DIR" "$(dirname "$MYSQL_SOCKET")"
  chown munge:munge "$MUNGE_SOCKET_DIR"
  chown mysql:mysql "$(dirname "$MYSQL_SOCKET")"
  log "state folder: $STATE_DIR"
}

# SlurmctldHost and NodeName must resolve to this machine, or slurmd never registers.
ensure_hostname_resolves() {
  NODE_NAME="$(hostname -s)"
  if ! getent hosts "$NODE_NAME" >/dev/null; then
    printf '127.0.1.1\t%s\t%s\n' "$NODE_NAME" "$MARKER" >>/etc/hosts
    log "hostname: added $NODE_NAME to /etc/hosts"
  else
    log "hostname: $NODE_NAME resolves"
  fi
}

# Write $2 to $1 only when it differs, refusing to replace a file this script did not write.
# Prints "changed" or "same" so callers know whether a running daemon must reread it.
write_config() {
  local path="$1" content="$2" mode="$3"
  if [[ -e "$path" ]] && ! head -n 1 "$path" | grep -qxF "$MARKER"; then
    die "$path exists and was not written by this script; move it away or set SLURM_CONF"
  fi
  if [[ -e "$path" ]] && [[ "$(cat "$path")" == "$content" ]]; then
    chmod "$mode" "$path"
    echo same
    return
  fi
  (umask 077 && printf '%s\n' "$content" >"$path.tmp")
  chmod "$mode" "$path.tmp"
  mv -f "$path.tmp" "$path"
  echo changed
}

make_fake_gpus() {
  local i
  for ((i = 0; i < FAKE_GPUS; i++)); do
    local dev="$STATE_DIR/dev/fakegpu$i"
    [[ -e "$dev" ]] && continue
    # A character device like /dev/null; a plain file stands in where mknod is not allowed
    # (unprivileged containers), since slurmd never opens it with task/none.
    mknod -m 0666 "$dev" c 1 3 2>/dev/null || touch "$dev"
  done
  log "fake GPUs: $FAKE_GPUS under $STATE_DIR/dev"
}

slurm_conf_text() {
  local cpus mem_mb gres_node="" gres_types="" tres=""
  cpus="$(nproc)"
  # Leave about a tenth of the memory to the daemons and the OS.
  mem_mb="$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo)"
  if ((FAKE_GPUS > 0)); then
    gres_node=" Gres=gpu:$FAKE_GPUS"
    gres_types="GresTypes=gpu"
    tres="AccountingStorageTRES=gres/gpu"
  fi
  cat <<EOF
$MARKER
ClusterName=$CLUSTER_NAME
SlurmctldHost=$NODE_NAME
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# Short credential lifetime: a requeued job restarts after seconds, not minutes.
AuthInfo=cred_expire=10
StateSaveLocation=$STATE_DIR/spool/slurmctld
SlurmdSpoolDir=$STATE_DIR/spool/slurmd
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups: plain process tracking works in VMs and containers without systemd.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default, a job that names no memory takes the whole node and jobs run one by one.
DefMemPerCPU=1024
SchedulerParameters=sched_interval=5,bf_interval=5
# Finished jobs stay visible to squeue/scontrol for five minutes.
MinJobAge=300
MaxArraySize=$MAX_ARRAY_SIZE
ReturnToService=2
KillWait=5
SlurmctldTimeout=30
SlurmdTimeout=60
# submitit reads job states from sacct, so accounting is required.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
$tres
JobCompType=jobcomp/none
# No mail on this machine; the default mail program does not exist and slurmctld complains.
MailProg=/bin/true
$gres_types
NodeName=$NODE_NAME CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN$gres_node
PartitionName=debug Nodes=$NODE_NAME Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$NODE_NAME Default=NO MaxTime=INFINITE State=UP
EOF
}

gres_conf_text() {
  local i
  echo "$MARKER"
  for ((i = 0; i < FAKE_GPUS; i++)); do
    echo "NodeName=$NODE_NAME Name=gpu File=$STATE_DIR/dev/fakegpu$i"
  done
}

# One password per state folder, made on first start and kept for restarts.
db_password() {
  local file="$STATE_DIR/db-password"
  if [[ ! -s "$file" ]]; then
    (umask 077 && head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$file")
  fi
  cat "$file"
}

slurmdbd_conf_text() {
  cat <<EOF
$MARKER
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$RUN_DIR/slurmdbd.pid
LogFile=$LOG_DIR/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=$DB_USER
StoragePass=$(db_password)
StorageLoc=$DB_NAME
EOF
}

write_configs() {
  local result
  result="$(write_config "$SLURM_CONF_FILE" "$(slurm_conf_text)" 0644)"
  [[ "$result" == changed ]] && SLURM_CONF_CHANGED=true
  result="$(write_config "$CONF_DIR/gres.conf" "$(gres_conf_text)" 0644)"
  [[ "$result" == changed ]] && SLURM_CONF_CHANGED=true
  # slurmdbd refuses a configuration file holding a password that others can read.
  result="$(write_config "$CONF_DIR/slurmdbd.conf" "$(slurmdbd_conf_text)" 0600)"
  [[ "$result" == changed ]] && DBD_CONF_CHANGED=true
  log "configuration: $SLURM_CONF_FILE, gres.conf, slurmdbd.conf in $CONF_DIR" \
    "(MaxArraySize=$MAX_ARRAY_SIZE, fake GPUs=$FAKE_GPUS)"
}

# True when the PID file names a live process whose command line mentions $2.
pid_alive() {
  local file="$1" name="$2" pid
  [[ -s "$file" ]] || return 1
  pid="$(tr -dc '0-9' <"$file")"
  [[ -n "$pid" && -r "/proc/$pid/cmdline" ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "$name"
}

# Poll a command until it succeeds or the timeout passes; on timeout, show the logs.
wait_for() {
  local what="$1" logfile="$2"
  shift 2
  local deadline=$((SECONDS + TIMEOUT_S))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      printf '[dev-slurm] error: %s did not happen within %s s\n' "$what" "$TIMEOUT_S" >&2
      if [[ -s "$logfile" ]]; then
        printf '[dev-slurm] last lines of %s:\n' "$logfile" >&2
        tail -n 20 "$logfile" | sed 's/^/    /' >&2
      else
        printf '[dev-slurm] %s is empty or missing\n' "$logfile" >&2
      fi
      die "all logs are in $LOG_DIR"
    fi
    sleep 0.5
  done
}

stop_pid() {
  local file="$1" pid
  pid="$(tr -dc '0-9' <"$file")"
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.25
  done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$file"
}

munge_answers() { munge -n -s "$MUNGE_SOCKET_DIR/munge.socket.2" </dev/null | unmunge >/dev/null; }

start_munge() {
  local pidfile="$RUN_DIR/munge/munged.pid"
  if pid_alive "$pidfile" munged; then
    wait_for "munged answering" "$LOG_DIR/munge/munged.log" munge_answers
    log "munged: already running"
    return
  fi
  if munge_answers 2>/dev/null; then
    log "munged: using the munged already running on this host"
    return
  fi
  if [[ ! -s /etc/munge/munge.key ]]; then
    runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
  fi
  runuser -u munge -- munged --force --pid-file="$pidfile" \
    --log-file="$LOG_DIR/munge/munged.log" --seed-file="$RUN_DIR/munge/munged.seed"
  wait_for "munged answering" "$LOG_DIR/munge/munged.log" munge_answers
  log "munged: started"
}

mariadb_answers() { mariadb-admin --socket="$MYSQL_SOCKET" ping; }

start_mariadb() {
  local pidfile="$RUN_DIR/mysql/mariadbd.pid" datadir="$STATE_DIR/mysql"
  if pid_alive "$pidfile" mariadbd; then
    # It may still be starting (an earlier run of this script gave up waiting for it).
    wait_for "mariadbd answering" "$LOG_DIR/mysql/mariadbd.log" mariadb_answers
    log "mariadbd: already running"
    return
  fi
  if mariadb_answers >/dev/null 2>&1; then
    log "mariadbd: using the MariaDB server already answering on $MYSQL_SOCKET"
    return
  fi
  if [[ ! -d "$datadir/mysql" ]]; then
    mariadb-install-db --user=mysql --datadir="$datadir" --skip-test-db \
      --auth-root-authentication-method=socket >"$LOG_DIR/mysql/install-db.log" 2>&1 \
      || die "mariadb-install-db failed; see $LOG_DIR/mysql/install-db.log"
  fi
  # --no-defaults keeps the distribution's my.cnf (which may open a TCP port) out of it. The
  # InnoDB sizes are the ones slurmdbd checks for; the buffer pool is only touched as it fills.
  setsid mariadbd --no-defaults --user=mysql --datadir="$datadir" --socket="$MYSQL_SOCKET" \
    --pid-file="$pidfile" --log-error="$LOG_DIR/mysql/mariadbd.log" --skip-networking \
    --innodb-buffer-pool-size=1024M --innodb-log-file-size=64M --innodb-lock-wait-timeout=900 \
    </dev/null >>"$LOG_DIR/mysql/mariadbd.log" 2>&1 &
  wait_for "mariadbd answering" "$LOG_DIR/mysql/mariadbd.log" mariadb_answers
  log "mariadbd: started (no networking, socket $MYSQL_SOCKET)"
}

create_database() {
  local password
  password="$(db_password)"
  mariadb --socket="$MYSQL_SOCKET" <<EOF
CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$password';
ALTER USER '$DB_USER'@'localhost' IDENTIFIED BY '$password';
GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost';
FLUSH PRIVILEGES;
EOF
  log "database: $DB_NAME ready for user $DB_USER"
}

sacctmgr_answers() { sacctmgr -n -P list cluster format=cluster; }

start_slurmdbd() {
  local pidfile="$RUN_DIR/slurmdbd.pid"
  if pid_alive "$pidfile" slurmdbd; then
    if ! $DBD_CONF_CHANGED; then
      log "slurmdbd: already running"
      return
    fi
    log "slurmdbd: configuration changed, restarting"
    stop_pid "$pidfile"
  fi
  slurmdbd
  wait_for "slurmdbd answering sacctmgr" "$LOG_DIR/slurmdbd.log" sacctmgr_answers
  log "slurmdbd: started"
}

# slurmctld registers its cluster on first contact, but adding it first (and an account with
# the users) makes accounting work from the first job and lets a real --account be tested.
register_accounting() {
  if ! sacctmgr -n -P list cluster format=cluster | grep -qxF "$CLUSTER_NAME"; then
    sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null
  fi
  if ! sacctmgr -n -P list account format=account | grep -qxF "$ACCOUNT_NAME"; then
    sacctmgr -i add account "$ACCOUNT_NAME" cluster="$CLUSTER_NAME" \
      description="dehbws development" organization=dehbws >/dev/null
  fi
  local user users=(root)
  [[ -n "${SUDO_USER:-}" && "${SUDO_USER}" != root ]] && users+=("$SUDO_USER")
  for user in "${users[@]}"; do
    if ! sacctmgr -n -P list assoc where cluster="$CLUSTER_NAME" account="$ACCOUNT_NAME" \
      user="$user" format=user | grep -qxF "$user"; then
      sacctmgr -i add user "$user" account="$ACCOUNT_NAME" cluster="$CLUSTER_NAME" >/dev/null
    fi
  done
  log "accounting: cluster $CLUSTER_NAME, account $ACCOUNT_NAME, users ${users[*]}"
}

start_slurm_daemon() {
  local name="$1" pidfile="$RUN_DIR/$1.pid"
  if pid_alive "$pidfile" "$name"; then
    if ! $SLURM_CONF_CHANGED; then
      log "$name: already running"
      return
    fi
    # AuthInfo and gres changes are read only at start, so reconfigure is not enough.
    log "$name: configuration changed, restarting"
    stop_pid "$pidfile"
  fi
  "$name"
  wait_for "$name writing its PID file" "$LOG_DIR/$name.log" pid_alive "$pidfile" "$name"
  log "$name: started"
}

node_ready() {
  local state
  state="$(sinfo -h -N -n "$NODE_NAME" -o %T 2>/dev/null | head -n 1)"
  [[ "$state" =~ ^(idle|mixed|allocated|completing)$ ]]
}

# The node may come back drained or down from an earlier run; clearing it is safe here
# because this cluster has no other administrator.
resume_node_if_down() {
  local state
  state="$(sinfo -h -N -n "$NODE_NAME" -o %T 2>/dev/null | head -n 1)"
  if [[ "$state" =~ ^(down|drained|draining|drain) ]]; then
    scontrol update nodename="$NODE_NAME" state=resume 2>/dev/null || true
    log "node: was $state, resumed"
  fi
}

# True once slurmctld has told slurmdbd where it runs, so job records reach the database.
cluster_registered() {
  sacct -n -X -S now-1minutes >/dev/null \
    && [[ -n "$(sacctmgr -n -P list cluster "$CLUSTER_NAME" format=controlhost)" ]]
}

wait_until_ready() {
  wait_for "sinfo answering" "$LOG_DIR/slurmctld.log" sinfo -h
  resume_node_if_down
  wait_for "node $NODE_NAME idle in sinfo" "$LOG_DIR/slurmd.log" node_ready
  wait_for "sacct answering (slurmctld registered with slurmdbd)" "$LOG_DIR/slurmdbd.log" \
    cluster_registered
  log "ready: node $NODE_NAME is $(sinfo -h -N -n "$NODE_NAME" -o %T | head -n 1)," \
    "partitions debug (default) and gpu, sacct answers"
}

all_running() {
  pid_alive "$RUN_DIR/slurmdbd.pid" slurmdbd \
    && pid_alive "$RUN_DIR/slurmctld.pid" slurmctld \
    && pid_alive "$RUN_DIR/slurmd.pid" slurmd \
    && munge_answers 2>/dev/null && mariadb_answers >/dev/null 2>&1
}

main() {
  parse_args "$@"
  ensure_root "$@"
  local started=$SECONDS
  install_packages
  make_folders
  ensure_hostname_resolves
  make_fake_gpus
  write_configs
  if all_running && ! $SLURM_CONF_CHANGED && ! $DBD_CONF_CHANGED; then
    log "already up: every daemon is running with this configuration"
    wait_until_ready
    return
  fi
  start_munge
  start_mariadb
  create_database
  start_slurmdbd
  register_accounting
  start_slurm_daemon slurmctld
  start_slurm_daemon slurmd
  wait_until_ready
  log "started in $((SECONDS - started)) s; logs in $LOG_DIR; stop with" \
    "bash slurm/stop-dev-cluster.sh"
}

main "$@"
