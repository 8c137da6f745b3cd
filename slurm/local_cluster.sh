#!/usr/bin/env bash
# A real single-node Slurm on this machine, for tests and for trying launcher=slurm by hand.
#
#   sudo slurm/local_cluster.sh          # install (apt) if needed, configure, start; wait for an idle node
#   sudo slurm/local_cluster.sh stop     # stop the daemons this script started
#
# Installs slurm-wlm and munge with apt-get when they are missing, writes /etc/slurm/slurm.conf
# with one node that has this machine's CPUs and memory (as `slurmd -C` measures them) and one
# default partition, creates a munge key, then starts munged, slurmctld and slurmd. Does nothing
# when `sinfo` already answers with a usable node. Needs root. Accounting is off (no slurmdbd):
# sacct does not work, squeue and scontrol do.
set -euo pipefail

SLURM_CONF=/etc/slurm/slurm.conf
MUNGE_KEY=/etc/munge/munge.key
MUNGE_PID=/run/munge/munged.pid
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
LOG_DIR=/var/log/slurm
HOST=$(hostname -s)

say() { echo "local_cluster: $*" >&2; }

node_usable() {
    # idle, mixed or allocated (a job may already be running): the cluster answers and has a node.
    local state
    state=$(timeout 5 sinfo -h -N -o '%T' 2>/dev/null | head -n1) || return 1
    case "$state" in idle* | mix* | alloc* | completing*) return 0 ;; *) return 1 ;; esac
}

stop_pidfile() {
    local file=$1
    [[ -s $file ]] || return 0
    local pid
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$file"
}

stop() {
    stop_pidfile "$SLURMD_PID"
    stop_pidfile "$CTLD_PID"
    stop_pidfile "$MUNGE_PID"
    say "stopped"
}

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return 0
    fi
    say "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
}

node_line() {
    # `slurmd -C` prints this machine's node line (CPUs, sockets, cores, threads, RealMemory);
    # a node declared bigger than the machine would be drained as "Low RealMemory/CPUs".
    local measured
    measured=$(slurmd -C 2>/dev/null | grep '^NodeName=' | head -n1 || true)
    if [[ -n $measured ]]; then
        echo "${measured/NodeName=* CPUs=/NodeName=$HOST CPUs=} State=UNKNOWN"
    else
        local memory_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 ))
        echo "NodeName=$HOST CPUs=$(nproc) RealMemory=$memory_mb State=UNKNOWN"
    fi
}

write_conf() {
    mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$LOG_DIR"
    cat >"$SLURM_CONF" <<EOF
# Written by slurm/local_cluster.sh: one node, one partition, no accounting.
ClusterName=local
SlurmctldHost=$HOST
AuthType=auth/munge
# A requeued job waits cred_expire + 1 s before it may start again (default 120): short here so
# that a preempted-and-requeued test job resumes within seconds.
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmUser=root
SlurmdUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
$(node_line)
PartitionName=local Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    if [[ -s $MUNGE_PID ]] && kill -0 "$(cat "$MUNGE_PID")" 2>/dev/null; then
        return 0
    fi
    if [[ ! -s $MUNGE_KEY ]]; then
        dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
    fi
    chown munge:munge "$MUNGE_KEY"
    chmod 400 "$MUNGE_KEY"
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged
}

start() {
    if command -v sinfo >/dev/null && node_usable; then
        say "already running: $(sinfo -h -N -o '%N %T %c CPUs %m MB')"
        return 0
    fi
    [[ $(id -u) -eq 0 ]] || { say "needs root (it installs packages and starts daemons)"; exit 1; }
    install
    write_conf
    start_munge
    # A controller or node daemon left from an earlier start answers nothing useful: restart both.
    stop_pidfile "$SLURMD_PID"
    stop_pidfile "$CTLD_PID"
    # -c: forget jobs of an earlier local cluster, so old test jobs do not come back.
    slurmctld -c
    slurmd
    for _ in $(seq 60); do
        if node_usable; then
            say "up: $(sinfo -h -N -o '%N %T %c CPUs %m MB')"
            return 0
        fi
        sleep 0.5
    done
    say "the node did not become idle in 30 s; see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd.log"
    sinfo -N -l >&2 || true
    exit 1
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 [start|stop]" >&2; exit 2 ;;
esac
