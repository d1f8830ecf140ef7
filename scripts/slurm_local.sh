#!/usr/bin/env bash
# A real multi-node Slurm cluster on this machine, for trying and testing the Slurm launch path.
#
#   scripts/slurm_local.sh up DIR       install munge + slurm-wlm if missing (apt-get), start munged,
#                                       slurmctld and four slurmd "nodes" n1..n4 (127.0.0.1, ports of their
#                                       own); all state, logs and the munge key under DIR. Prints
#                                       `export SLURM_CONF=DIR/slurm.conf` on stdout (eval it).
#                                       A second `up` on a running cluster reuses it.
#   scripts/slurm_local.sh down DIR     stop the daemons it started (by the pids under DIR)
#   scripts/slurm_local.sh status DIR   exit 0 and show the nodes when the cluster in DIR is up
#
# It only touches a cluster it started: DIR must be empty, absent, or hold its marker file. Ports:
# SLURM_LOCAL_PORT (slurmctld, default 16817), +1 slurmd default port, and 17001.. for n1.. (SLURM_LOCAL_NODE_PORT).
# Four nodes, not two: Slurm never puts two components of one heterogeneous job on the same node (a
# 2-node + 1-node het job on a 2-node cluster pends for ever, Reason=Resources), and the CPU recipe's job
# is 2 trainer nodes + 2 rollout nodes. Needs root (slurmd runs the jobs as their user; SlurmUser=root).
# Exit status: 0 ok, 1 error, 3 Slurm or munge cannot be installed (tests skip on 3).
# Facts behind the configuration: ../shared/spec/slurm_local.md of the project.
set -euo pipefail

MARK=".slurm_local_cluster"
CTLD_PORT="${SLURM_LOCAL_PORT:-16817}"
NODE_PORT="${SLURM_LOCAL_NODE_PORT:-17001}"
NODES=(n1 n2 n3 n4)

die() { echo "slurm_local: $*" >&2; exit 1; }
say() { echo "slurm_local: $*" >&2; }

usage() { die "usage: $0 up|down|status DIR"; }
[ $# -eq 2 ] || usage
cmd="$1"
mkdir -p "$2" 2>/dev/null || true
[ -d "$2" ] || die "$2: cannot create the directory"
DIR="$(cd "$2" && pwd)"
CONF="$DIR/slurm.conf"
export SLURM_CONF="$CONF"

install_missing() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
      && command -v sbatch >/dev/null; then
    return 0
  fi
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { say "munge/slurm-wlm missing and not root (no sudo): cannot install"; exit 3; }
    sudo="sudo -n"
  fi
  say "installing munge and slurm-wlm with apt-get"
  if ! { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq munge slurm-wlm; } \
      >"$DIR/apt.log" 2>&1; then
    say "apt-get could not install munge slurm-wlm (see $DIR/apt.log):"
    tail -n 5 "$DIR/apt.log" >&2
    exit 3
  fi
}

# pid files: munged.pid, ctld.pid, dn1.pid, dn2.pid; a pid counts only while its command line names DIR
ours_alive() {  # $1 = pid file
  local f="$DIR/$1" pid
  [ -s "$f" ] || return 1
  pid="$(tr -dc 0-9 <"$f")"
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$DIR/"
}

all_pidfiles() { echo munged.pid ctld.pid; for n in "${NODES[@]}"; do echo "d$n.pid"; done; }

check_ours() {
  if [ -e "$DIR/$MARK" ]; then return 0; fi
  if [ -n "$(ls -A "$DIR" 2>/dev/null | grep -v '^apt.log$')" ]; then
    die "$DIR is not empty and holds no cluster started by this script ($MARK missing): not touching it"
  fi
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

stop_all() {
  local f pid
  for f in $(all_pidfiles | tac); do
    if ours_alive "$f"; then
      pid="$(tr -dc 0-9 <"$DIR/$f")"
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do [ -d "/proc/$pid" ] || break; sleep 0.2; done
      [ -d "/proc/$pid" ] && kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$DIR/$f"
  done
}

nodes_idle() {
  local out
  out="$(sinfo -h -N -o '%N %t' 2>/dev/null)" || return 1
  for n in "${NODES[@]}"; do echo "$out" | grep -qE "^$n (idle|mix|alloc)" || return 1; done
}

write_conf() {
  local h; h="$(hostname)"
  mkdir -p "$DIR/state" "$DIR/log" "$DIR/munge"
  cat >"$CONF.tmp" <<EOF
# written by scripts/slurm_local.sh: a two-node cluster (n1, n2) on this machine
ClusterName=local
SlurmctldHost=$h(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$((CTLD_PORT + 1))
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1
SlurmdParameters=config_overrides
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool%n
SlurmctldPidFile=$DIR/ctld.pid
SlurmdPidFile=$DIR/d%n.pid
SlurmctldLogFile=$DIR/log/ctld.log
SlurmdLogFile=$DIR/log/d%n.log
SlurmUser=root
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
KillWait=5
EOF
  local i=0
  for n in "${NODES[@]}"; do
    echo "NodeName=$n NodeHostname=$h NodeAddr=127.0.0.1 Port=$((NODE_PORT + i)) CPUs=2 RealMemory=8000 State=UNKNOWN" >>"$CONF.tmp"
    i=$((i + 1))
  done
  echo "PartitionName=batch Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES" >>"$CONF.tmp"
  mv "$CONF.tmp" "$CONF"
}

start_all() {
  local n
  for p in "$CTLD_PORT" $(seq "$NODE_PORT" $((NODE_PORT + ${#NODES[@]} - 1))); do
    port_busy "$p" && die "port $p on 127.0.0.1 is in use (another Slurm?): not starting; set SLURM_LOCAL_PORT / SLURM_LOCAL_NODE_PORT"
  done
  touch "$DIR/$MARK"
  write_conf
  if [ ! -s "$DIR/munge/munge.key" ]; then
    (umask 077; head -c 1024 /dev/urandom >"$DIR/munge/munge.key.tmp" && mv "$DIR/munge/munge.key.tmp" "$DIR/munge/munge.key")
  fi
  chmod 700 "$DIR/munge"
  munged --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" \
    2>>"$DIR/log/munged.log" || die "munged did not start (see $DIR/log/munged.log)"
  chmod 755 "$DIR/munge"  # clients (sbatch, slurmd) connect to the socket
  slurmctld -f "$CONF" || die "slurmctld did not start (see $DIR/log/ctld.log)"
  for n in "${NODES[@]}"; do
    mkdir -p "$DIR/spool$n"
    slurmd -f "$CONF" -N "$n" || die "slurmd $n did not start (see $DIR/log/d$n.log)"
  done
  for _ in $(seq 150); do nodes_idle && return 0; sleep 0.2; done
  sinfo -N >&2 || true
  die "nodes not idle after 30 s (logs under $DIR/log)"
}

case "$cmd" in
  up)
    check_ours
    install_missing
    running=1
    for f in $(all_pidfiles); do ours_alive "$f" || running=0; done
    if [ "$running" = 1 ] && nodes_idle; then
      say "reusing the cluster running in $DIR"
    else
      stop_all  # whatever is left of an earlier cluster in DIR
      start_all
      say "cluster up: nodes ${NODES[*]} (logs under $DIR/log)"
    fi
    echo "export SLURM_CONF=$CONF"
    ;;
  down)
    [ -e "$DIR/$MARK" ] || die "$DIR holds no cluster started by this script: not touching it"
    # cancel what still runs so no job process is left behind, then stop the daemons
    if ours_alive ctld.pid; then
      scancel --full --signal=KILL --user="$(id -un)" 2>/dev/null || true
      scancel --user="$(id -un)" 2>/dev/null || true
    fi
    stop_all
    say "cluster in $DIR stopped"
    ;;
  status)
    [ -e "$DIR/$MARK" ] || die "$DIR holds no cluster started by this script"
    for f in $(all_pidfiles); do ours_alive "$f" || { say "$f: not running"; exit 1; }; done
    sinfo -N
    squeue
    ;;
  *) usage ;;
esac
