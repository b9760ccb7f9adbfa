#!/usr/bin/env bash
# A real single-node Slurm on this machine, with fake A100s, for CI and for trying
# `snakemake --profile slurm` without a cluster (tests/integration/test_slurm.py uses it).
#
#   bash scripts/slurm-node.sh install   # apt-get install slurm-wlm munge (root, ~30 s)
#   bash scripts/slurm-node.sh start     # write /etc/slurm/*.conf, start munged, slurmctld, slurmd
#   bash scripts/slurm-node.sh stop      # cancel every job, stop the three daemons by PID
#   bash scripts/slurm-node.sh status
#
# Debian's slurm-wlm 22.05 without systemd: the daemons are started by hand and
# stopped by the PIDs recorded in $SLURM_NODE_DIR. The config must be at
# /etc/slurm/slurm.conf (Snakemake's jobstep plugin drops SLURM_CONF before its
# inner srun); `start` refuses to overwrite a slurm.conf it did not write.
#
# Fake GPUs: Slurm 22.05 drops count-only GPU GRES ("Removing file-less GPU"), so
# each fake GPU is a character device made with `mknod <dir>/nvidiaN c 1 3` and
# listed in gres.conf. `--gpus=a100:N` then schedules, jobs see
# CUDA_VISIBLE_DEVICES, and run on CPU.
#
# Settings (environment): SLURM_NODE_DIR (state, logs, PIDs; /tmp/wmtp-slurm),
# SLURM_NODE_CPUS (nproc), SLURM_NODE_MEM_MB (90 % of RAM), SLURM_NODE_GPUS (4),
# SLURM_NODE_PARTITION (ci).
set -euo pipefail

DIR=${SLURM_NODE_DIR:-/tmp/wmtp-slurm}
CPUS=${SLURM_NODE_CPUS:-$(nproc)}
MEM_MB=${SLURM_NODE_MEM_MB:-$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)}
GPUS=${SLURM_NODE_GPUS:-4}
PARTITION=${SLURM_NODE_PARTITION:-ci}
CONF_DIR=/etc/slurm
MARKER="# written by wmtp scripts/slurm-node.sh, removed by its stop"
HOST=$(hostname -s)
DAEMONS=(slurmd slurmctld munged)  # stop order

die() { echo "slurm-node: $*" >&2; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "must run as root (installs packages, writes $CONF_DIR)"; }

ours() { [ ! -e "$CONF_DIR/slurm.conf" ] || grep -qxF "$MARKER" "$CONF_DIR/slurm.conf"; }

install() {
  need_root
  if command -v slurmctld >/dev/null && command -v munged >/dev/null; then
    return 0
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >"$DIR.apt.log" 2>&1 \
    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive \
         apt-get install -y -q slurm-wlm munge >"$DIR.apt.log" 2>&1; } \
    || die "apt-get install slurm-wlm munge failed (see $DIR.apt.log)"
}

write_config() {
  local last=$((GPUS - 1))
  mkdir -p "$CONF_DIR" "$DIR/dev" "$DIR/ctld" "$DIR/d"
  for i in $(seq 0 "$last"); do
    [ -c "$DIR/dev/nvidia$i" ] || mknod "$DIR/dev/nvidia$i" c 1 3
  done
  cat >"$CONF_DIR/slurm.conf" <<EOF
$MARKER
ClusterName=wmtp
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge.socket
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/d
SlurmctldPort=${SLURM_NODE_CTLD_PORT:-6817}
SlurmdPort=${SLURM_NODE_D_PORT:-6818}
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
GresTypes=gpu
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:a100:$GPUS State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
  cat >"$CONF_DIR/gres.conf" <<EOF
$MARKER
NodeName=$HOST Name=gpu Type=a100 File=$DIR/dev/nvidia[0-$last]
EOF
}

running() {  # running <daemon>: its recorded PID is alive
  local pid
  pid=$(cat "$DIR/$1.pid" 2>/dev/null) || return 1
  kill -0 "$pid" 2>/dev/null
}

start() {
  need_root
  command -v slurmctld >/dev/null || die "Slurm is not installed: run '$0 install' first"
  ours || die "$CONF_DIR/slurm.conf exists and was not written by this script: not touching it"
  if running slurmctld; then
    echo "slurm-node: already running (state in $DIR)"
    return 0
  fi
  if pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null; then
    die "a Slurm daemon not started from $DIR is running: not starting another"
  fi
  mkdir -p "$DIR"
  write_config
  # munged refuses a key or socket directory others can write to; --force covers root
  munged --force --socket="$DIR/munge.socket" --pid-file="$DIR/munged.pid" \
    --log-file="$DIR/munged.log" --seed-file="$DIR/munged.seed"
  slurmctld -i
  slurmd
  local deadline=$((SECONDS + 60))
  until [ "$(sinfo -h -n "$HOST" -o %t 2>/dev/null)" = idle ]; do
    [ $SECONDS -lt $deadline ] || { tail -5 "$DIR"/slurm*.log >&2; die "node $HOST did not become idle"; }
    sleep 1
  done
  echo "slurm-node: $HOST idle in partition $PARTITION: $CPUS CPUs, $MEM_MB MB, $GPUS x gpu:a100 (state in $DIR)"
}

stop() {
  if running slurmctld; then
    scancel --partition="$PARTITION" 2>/dev/null || true
    local deadline=$((SECONDS + 30))
    while [ -n "$(squeue -h -p "$PARTITION" 2>/dev/null)" ] && [ $SECONDS -lt $deadline ]; do
      sleep 1
    done
  fi
  local daemon pid
  for daemon in "${DAEMONS[@]}"; do
    pid=$(cat "$DIR/$daemon.pid" 2>/dev/null) || continue
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$DIR/$daemon.pid"
  done
  if [ -e "$CONF_DIR/slurm.conf" ] && ours; then
    rm -f "$CONF_DIR/slurm.conf" "$CONF_DIR/gres.conf"
  fi
}

status() {
  local daemon
  for daemon in munged slurmctld slurmd; do
    if running "$daemon"; then echo "$daemon: running (pid $(cat "$DIR/$daemon.pid"))"; else echo "$daemon: stopped"; fi
  done
  if running slurmctld; then sinfo -N -o "%N %P %t %c %m %G"; fi
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) die "usage: $0 install|start|stop|status" ;;
esac
