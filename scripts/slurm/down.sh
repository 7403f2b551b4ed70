#!/usr/bin/env bash
# Stop the daemons scripts/slurm/up.sh started, and nothing else.
#
#   sudo scripts/slurm/down.sh           # stop them; packages, configs and Slurm's state stay
#   sudo scripts/slurm/down.sh --purge   # also remove Slurm's state and logs, the configs up.sh wrote and the
#                                        # accounting database (job ids then restart at 1: use fresh sweep folders)
#
# Each PID comes from the pid file up.sh recorded and is signalled only while /proc/<pid>/comm still names that
# daemon, so a recycled PID is never hit.
set -uo pipefail
export PATH="$PATH:/usr/sbin:/sbin"
STATE=${CLBENCH_SLURM_STATE:-/run/clbench-slurm/started}  # the file up.sh wrote
TAG="# written by clbench scripts/slurm/up.sh"
purge=0; [ "${1:-}" = --purge ] && purge=1
[ "$(id -u)" -eq 0 ] || { echo "down.sh: run as root" >&2; exit 1; }

stop_recorded() {  # stop_recorded COMM...: SIGTERM each recorded daemon of these names, then wait for all
  local comm pidfile pid pids=()
  for comm in "$@"; do
    pidfile=$(awk -v c="$comm" '$1 == c {print $2}' "$STATE" | tail -1)
    [ -n "$pidfile" ] && [ -s "$pidfile" ] || continue
    pid=$(tr -cd '0-9' <"$pidfile")
    if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ]; then
      kill -TERM "$pid" && pids+=("$pid:$comm")
    fi
  done
  for entry in "${pids[@]}"; do
    pid=${entry%%:*}
    for _ in $(seq 75); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; echo "down.sh: ${entry#*:} needed SIGKILL"; fi
    echo "down.sh: stopped ${entry#*:} ($pid)"
  done
}

if [ -s "$STATE" ]; then
  stop_recorded slurmd slurmctld   # slurmctld hands its last job records to slurmdbd as it exits
  stop_recorded slurmdbd
  if [ $purge = 1 ] && grep -q '^mariadbd ' "$STATE" && mariadb-admin ping >/dev/null 2>&1; then
    mariadb -e "DROP DATABASE IF EXISTS slurm_acct_db" && echo "down.sh: dropped the accounting database"
  fi
  stop_recorded mariadbd munged
  rm -f "$STATE"
else
  echo "down.sh: up.sh started nothing that is still recorded"
fi
if [ $purge = 1 ]; then
  rm -rf /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
  for f in /etc/slurm/slurm.conf /etc/slurm/slurmdbd.conf; do
    head -1 "$f" 2>/dev/null | grep -qF "$TAG" && rm -f "$f"
  done
  echo "down.sh: removed Slurm state, logs and the configs up.sh wrote"
fi
echo "slurm down"
