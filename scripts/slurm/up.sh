#!/usr/bin/env bash
# Start a real one-node Slurm cluster on this machine, for tests and small local sweeps.
#
#   sudo scripts/slurm/up.sh     # installs what is missing (Debian/Ubuntu apt), configures, starts; "slurm ready"
#   sudo scripts/slurm/down.sh   # stops only the daemons this script started
#
# Needs root and apt-get, no systemd. Every daemon it starts is written to $STATE (one "comm pidfile" line), and
# down.sh signals exactly those PIDs. Daemons that were running before are reused and never stopped by down.sh.
# Running it again while the cluster is up does nothing.
#
# Environment:
#   CLBENCH_SLURM_ACCOUNTING=1   MariaDB + slurmdbd so that `sacct` works. submitit learns that a job died (cancelled,
#                                killed, out of time) only from sacct; without it (=0) such a job makes the waiting
#                                launcher hang, though jobs that finish still return their results.
#   CLBENCH_SLURM_NO_INSTALL=1   fail instead of calling apt-get
#   CLBENCH_SLURM_WAIT_S=60      how long to wait for the node to run a first job
#   CLBENCH_SLURM_STATE=/run/clbench-slurm/started   where the started daemons are listed (down.sh reads the same
#                                variable): a test gives its own file so that it stops only what its call started
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

ACCOUNTING=${CLBENCH_SLURM_ACCOUNTING:-1}
NO_INSTALL=${CLBENCH_SLURM_NO_INSTALL:-0}
WAIT_S=${CLBENCH_SLURM_WAIT_S:-60}
NODE=localhost
PARTITION=debug
CLUSTER=clbench
STATE=${CLBENCH_SLURM_STATE:-/run/clbench-slurm/started}
STATE_DIR=$(dirname "$STATE")
TAG="# written by clbench scripts/slurm/up.sh"
DB=slurm_acct_db
DB_USER=slurm
DB_PASS=clbench-local           # the database listens on its unix socket only

start_s=$EPOCHREALTIME
say() { printf 'up.sh [%5.1fs] %s\n' "$(awk -v a="$start_s" -v b="$EPOCHREALTIME" 'BEGIN{print b-a}')" "$*"; }
die() { say "error: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (it installs packages and starts system daemons)"
mkdir -p "$STATE_DIR" /run/slurm /var/log/slurm /var/spool/slurmctld /var/spool/slurmd
touch "$STATE"

# --- 1. packages -----------------------------------------------------------------------------------------------
missing=()
have() { command -v "$1" >/dev/null 2>&1; }
have munged || missing+=(munge)
have slurmctld || missing+=(slurmctld)
have slurmd || missing+=(slurmd)
have sbatch || missing+=(slurm-client)
if [ "$ACCOUNTING" = 1 ]; then
  have slurmdbd || missing+=(slurmdbd)
  have mariadbd || missing+=(mariadb-server)
  compgen -G "/usr/lib/*/slurm-wlm/accounting_storage_mysql.so" >/dev/null || missing+=(slurm-wlm-mysql-plugin)
fi
if [ ${#missing[@]} -gt 0 ]; then
  [ "$NO_INSTALL" = 1 ] && die "not installed: ${missing[*]} (unset CLBENCH_SLURM_NO_INSTALL to let apt-get install them)"
  have apt-get || die "not installed: ${missing[*]}, and there is no apt-get to install them"
  say "apt-get install ${missing[*]}"
  # Package scripts must not start daemons behind our back: policy-rc.d exit 101 forbids it (Debian policy).
  added_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && added_policy=1
  fi
  log=${TMPDIR:-/tmp}/clbench-slurm-apt.log
  rc=0
  { DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends \
      "${missing[@]}"; } >"$log" 2>&1 || rc=$?
  [ $added_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
  [ $rc -eq 0 ] || { tail -n 15 "$log" >&2; die "apt-get failed with code $rc (full log: $log)"; }
  say "installed"
fi

# --- helpers ---------------------------------------------------------------------------------------------------
alive() {  # alive PIDFILE COMM: true when the pid in PIDFILE runs the program COMM
  local pid
  [ -s "$1" ] || return 1
  pid=$(tr -cd '0-9' <"$1")
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}
remember() { grep -qxF "$1 $2" "$STATE" || echo "$1 $2" >>"$STATE"; }
stop() {  # stop PIDFILE COMM: SIGTERM, wait up to 10 s, then SIGKILL
  alive "$1" "$2" || return 0
  local pid; pid=$(tr -cd '0-9' <"$1"); kill "$pid"
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
  kill -9 "$pid" 2>/dev/null || true
}
until_ok() {  # until_ok SECONDS WHAT CMD...
  local limit=$(( $(date +%s) + $1 )) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$limit" ] || die "$what did not come up within the time limit"
    sleep 0.2
  done
}

# --- 2. munge (authentication between the daemons and the client commands) -------------------------------------
if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
fi
install -d -o munge -g munge -m 755 /run/munge
install -d -o munge -g munge /var/lib/munge /var/log/munge
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  say "munged is already running"
else
  runuser -u munge -- munged --force
  remember munged /run/munge/munged.pid
  until_ok 10 munged sh -c 'munge -n | unmunge'
  say "munged started"
fi

# --- 3. slurm.conf from what slurmd detects on this machine ------------------------------------------------------
hw=$(slurmd -C | head -1)
field() { sed -n "s/.*\b$1=\([0-9]*\).*/\1/p" <<<"$hw"; }
cpus=$(field CPUs); boards=$(field Boards); sockets=$(field SocketsPerBoard); cores=$(field CoresPerSocket)
threads=$(field ThreadsPerCore); mem=$(field RealMemory)
[ -n "$cpus" ] && [ -n "$mem" ] || die "could not read the hardware from 'slurmd -C': $hw"
# Declare less memory than detected: a node that reports less than its configured memory is drained.
node_mem=$(( mem * 9 / 10 ))
if [ "$ACCOUNTING" = 1 ]; then
  acct=$'AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=localhost\nJobAcctGatherType=jobacct_gather/linux'
else
  acct=$'AccountingStorageType=accounting_storage/none\nJobAcctGatherType=jobacct_gather/none'
fi
conf="$TAG
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
# a requeued job waits cred_expire+1 s before it may start again (default 120 s: too slow for a test)
AuthInfo=cred_expire=10
MpiDefault=none
# no cgroups in a container: processes are tracked by parent pid, limits are not enforced
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# start batch jobs on the next scheduling tick (default waits 3 s)
SchedulerParameters=batch_sched_delay=0
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=300
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
$acct
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus Boards=${boards:-1} SocketsPerBoard=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$node_mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP"
mkdir -p /etc/slurm
restart_slurm=0
if [ "$(cat /etc/slurm/slurm.conf 2>/dev/null)" != "$conf" ]; then
  if [ -f /etc/slurm/slurm.conf ] && ! head -1 /etc/slurm/slurm.conf | grep -qF "$TAG"; then
    cp /etc/slurm/slurm.conf "/etc/slurm/slurm.conf.before-clbench.$(date +%s)"
    say "kept the existing slurm.conf as /etc/slurm/slurm.conf.before-clbench.*"
  fi
  printf '%s\n' "$conf" >/etc/slurm/slurm.conf
  restart_slurm=1
  say "wrote /etc/slurm/slurm.conf ($cpus CPUs, ${node_mem} MB)"
fi

# --- 4. accounting: MariaDB on a unix socket, slurmdbd ----------------------------------------------------------
if [ "$ACCOUNTING" = 1 ]; then
  install -d -o mysql -g root /run/mysqld
  [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
  if mariadb-admin ping >/dev/null 2>&1; then
    say "MariaDB is already running"
  else
    setsid mariadbd --user=mysql --skip-networking --socket=/run/mysqld/mysqld.sock \
      --pid-file=/run/mysqld/mysqld.pid --innodb-buffer-pool-size=32M \
      --log-error=/var/log/slurm/mariadb.log </dev/null >/dev/null 2>&1 &
    remember mariadbd /run/mysqld/mysqld.pid
    until_ok 60 MariaDB mariadb-admin ping
    say "MariaDB started"
  fi
  mariadb -e "CREATE DATABASE IF NOT EXISTS $DB; CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
              GRANT ALL ON $DB.* TO '$DB_USER'@'localhost'; FLUSH PRIVILEGES;"
  dbd="$TAG
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=/run/slurm/slurmdbd.pid
LogFile=/var/log/slurm/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=$DB"
  if [ "$(cat /etc/slurm/slurmdbd.conf 2>/dev/null)" != "$dbd" ]; then
    (umask 077; printf '%s\n' "$dbd" >/etc/slurm/slurmdbd.conf)  # slurmdbd refuses a readable file (password)
    stop /run/slurm/slurmdbd.pid slurmdbd
  fi
  if alive /run/slurm/slurmdbd.pid slurmdbd; then
    say "slurmdbd is already running"
  else
    slurmdbd
    remember slurmdbd /run/slurm/slurmdbd.pid
    say "slurmdbd started"
  fi
  until_ok 60 slurmdbd sacctmgr -n list cluster
  sacctmgr -n -P list cluster format=cluster | grep -qxF "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
fi

# --- 5. controller and node daemon ------------------------------------------------------------------------------
if [ $restart_slurm = 1 ]; then  # daemons started with another config would keep it
  stop /run/slurm/slurmd.pid slurmd
  stop /run/slurm/slurmctld.pid slurmctld
fi
if alive /run/slurm/slurmctld.pid slurmctld; then say "slurmctld is already running"; else
  slurmctld; remember slurmctld /run/slurm/slurmctld.pid; say "slurmctld started"
fi
until_ok 30 slurmctld scontrol ping
if alive /run/slurm/slurmd.pid slurmd; then say "slurmd is already running"; else
  slurmd -N "$NODE"; remember slurmd /run/slurm/slurmd.pid; say "slurmd started"
fi

# --- 6. ready = the node runs a job (an "idle" node can be state restored before slurmd registered) -------------
limit=$(( $(date +%s) + WAIT_S ))
while :; do
  case "$(sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -1)" in
    idle|mixed|allocated)
      timeout 20 srun -J clbench-up-probe -N1 -n1 -t 1 true >/dev/null 2>&1 && break ;;
    down*|drain*)
      scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
  esac
  if [ "$(date +%s)" -ge "$limit" ]; then
    sinfo -N -l >&2 || true; tail -n 5 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
    die "the node did not run a probe job within ${WAIT_S}s"
  fi
  sleep 0.5
done
say "node $NODE ran a probe job"
echo "slurm ready"
