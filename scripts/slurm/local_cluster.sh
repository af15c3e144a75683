#!/usr/bin/env bash
# A real one-node Slurm on this machine, for the tests and for trying the sbatch templates.
#
#   scripts/slurm/local_cluster.sh start    # install (apt) if needed, start munged + slurmctld + slurmd
#   eval "$(scripts/slurm/local_cluster.sh env)"   # export SLURM_CONF for sinfo/sbatch/squeue
#   scripts/slurm/local_cluster.sh status
#   scripts/slurm/local_cluster.sh stop
#
# Runs as root (no systemd, no cgroups): conf, state, spool, logs and pid files live in $CLLM_SLURM_DIR
# (default /tmp/cllm-slurm). `start` and `stop` are idempotent. Debian/Ubuntu only (apt-get).
set -euo pipefail

DIR="${CLLM_SLURM_DIR:-/tmp/cllm-slurm}"
CONF="$DIR/slurm.conf"
NODE="$(hostname -s)"
# CPUs/memory as slurmd sees them, so the node does not get drained for "low resources". GNU nproc honours
# OMP_NUM_THREADS: started from a shell with OMP_NUM_THREADS=1, the node had 1 CPU and a 2-task job pended forever.
CPUS="${CLLM_SLURM_CPUS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}"

log() { echo "local_cluster: $*" >&2; }

alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_if_needed() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return
    fi
    [[ $EUID -eq 0 ]] || { log "slurm-wlm/munge missing and not root: install them with apt-get"; exit 1; }
    log "installing slurm-wlm and munge with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    if id munge >/dev/null 2>&1; then
        chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
        chmod 400 /etc/munge/munge.key
        runuser -u munge -- munged
    else
        chmod 400 /etc/munge/munge.key
        munged --force
    fi
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    log "munged did not come up"; exit 1
}

write_conf() {
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    local mem
    mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    mem=$((mem * 9 / 10))
    cat >"$CONF.tmp" <<CONF
# Written by scripts/slurm/local_cluster.sh: one node, daemons as root, no cgroups.
ClusterName=cllm-local
SlurmctldHost=$NODE
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
SlurmctldPort=${CLLM_SLURMCTLD_PORT:-6817}
SlurmdPort=${CLLM_SLURMD_PORT:-6818}
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=600
SchedulerParameters=bf_interval=5
SchedulerType=sched/backfill
KillWait=10
InactiveLimit=0
NodeName=$NODE CPUs=$CPUS RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
    mv "$CONF.tmp" "$CONF"
}

wait_idle() {
    for _ in $(seq 60); do
        if SLURM_CONF="$CONF" sinfo -h -N -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
            return
        fi
        sleep 0.5
    done
    log "node did not become idle; see $DIR/log/"; SLURM_CONF="$CONF" sinfo -N -l >&2 || true; exit 1
}

start() {
    install_if_needed
    start_munge
    if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid"; then
        log "already running (SLURM_CONF=$CONF)"
    else
        [[ $EUID -eq 0 ]] || { log "slurmctld/slurmd run as root here: run start as root"; exit 1; }
        write_conf
        alive "$DIR/slurmctld.pid" || slurmctld -f "$CONF"
        alive "$DIR/slurmd.pid" || slurmd -f "$CONF"
        wait_idle
        # A node left down/drained by an earlier run is taken back into service.
        SLURM_CONF="$CONF" scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true
        log "started (SLURM_CONF=$CONF)"
    fi
    echo "export SLURM_CONF=$CONF"
}

stop() {
    local name pid
    for name in slurmd slurmctld; do
        if alive "$DIR/$name.pid"; then
            pid=$(cat "$DIR/$name.pid")
            kill "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
            log "stopped $name ($pid)"
        fi
    done
    # munged is left running: it is harmless and other tools on the machine may use it.
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    status)
        if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid"; then
            SLURM_CONF="$CONF" sinfo
        else
            echo "not running"; exit 1
        fi
        ;;
    *) echo "usage: $0 start|stop|status|env" >&2; exit 64 ;;
esac
