#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (munged, slurmctld, slurmd on localhost), to try the
# templates of scripts/slurm/ on a laptop and to test clipmask against a real scheduler in CI.
#
#   scripts/slurm/local-cluster.sh install   # Debian's slurm-wlm and munge (root, apt), once
#   scripts/slurm/local-cluster.sh start     # writes the config and starts the daemons
#   scripts/slurm/local-cluster.sh env       # prints `export SLURM_CONF=...` for sbatch/srun
#   scripts/slurm/local-cluster.sh stop
#
# Everything lives under $CLIPMASK_SLURM_DIR (default /tmp/clipmask-slurm): the config, state,
# spool, pid and log files. No cgroups (proctrack/linuxproc, task/none), so it runs in a
# container. `start` waits until the node is idle and fails with the daemons' logs otherwise.
set -euo pipefail
DIR=${CLIPMASK_SLURM_DIR:-/tmp/clipmask-slurm}
CONF=$DIR/slurm.conf
NODE=$(hostname -s)

logs() {
    for f in "$DIR"/slurmctld.log "$DIR"/slurmd.log "$DIR"/munged.log; do
        [ -f "$f" ] && { echo "--- $f (last 40 lines)" >&2; tail -n 40 "$f" >&2; }
    done
    return 0
}

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return 0
    fi
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "local-cluster: slurm-wlm and munge are missing and this is not a root Debian/Ubuntu shell" >&2
        exit 1
    fi
    echo "local-cluster: installing slurm-wlm and munge" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_conf() {
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/munge"
    local cpus mem
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512 ))
    cat > "$CONF" <<CONF
ClusterName=clipmask-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=300
SlurmdTimeout=60
InactiveLimit=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
}

start() {
    install
    stop >/dev/null 2>&1 || true
    write_conf
    export SLURM_CONF=$CONF
    # munge: its key (made by the package, or here), a socket of our own, run as root.
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
    fi
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        munged --force --key-file=/etc/munge/munge.key --log-file="$DIR/munged.log" \
            --pid-file="$DIR/munged.pid" 2>>"$DIR/munged.log" || { logs; exit 1; }
    fi
    slurmctld -f "$CONF" || { logs; exit 1; }
    slurmd -f "$CONF" -N "$NODE" || { logs; exit 1; }
    for _ in $(seq 1 60); do
        if sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
            echo "local-cluster: node $NODE up ($(nproc) CPUs); export SLURM_CONF=$CONF" >&2
            return 0
        fi
        scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
        sleep 1
    done
    echo "local-cluster: the node did not come up" >&2
    sinfo >&2 || true
    logs
    exit 1
}

stop() {
    for d in slurmd slurmctld munged; do
        [ -f "$DIR/$d.pid" ] && kill "$(cat "$DIR/$d.pid")" 2>/dev/null || true
    done
    pkill -f "slurmd -f $CONF" 2>/dev/null || true
    pkill -f "slurmctld -f $CONF" 2>/dev/null || true
    sleep 1
}

case "${1:-start}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    logs) logs ;;
    *) echo "usage: $0 install|start|stop|env|logs" >&2; exit 2 ;;
esac
