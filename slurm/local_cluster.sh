#!/usr/bin/env bash
# A real Slurm on this machine, for tests and for trying launcher=slurm by hand: two nodes, each
# in its own network namespace, or one node on the host.
#
#   sudo slurm/local_cluster.sh start          # two nodes n1, n2 (the default); wait until both are idle
#   sudo slurm/local_cluster.sh start --single-node   # one node, this host, no namespaces
#   sudo slurm/local_cluster.sh status         # exit 0 when the cluster answers with usable nodes
#   sudo slurm/local_cluster.sh stop           # stop the daemons, remove the namespaces and links
#
# Two nodes: slurmctld and munged run on the host; each node is a `slurmd -N nK` started (nsenter,
# unshare) inside a network namespace this script creates, with its own hostname (nK) and address
# (10.213.0.1K) on a bridge (slurm-br0; its host side, 10.213.0.1, is where the controller
# listens). Names resolve through /etc/netns/slurm-nK/hosts, mounted over /etc/hosts for the
# node's processes (`ip netns exec slurm-n1 <command>` does the same). The nodes share the
# filesystem, as cluster nodes share a network filesystem, and see all of this machine's CPUs and
# memory (they are the same ones). Nothing is reachable beyond this machine.
#
# Partitions: `local` (the default, PriorityTier=1, PreemptMode=REQUEUE) and `high` (PriorityTier=2,
# never preempted), over the same nodes: a job in `high` that needs a node held by a `local` job
# preempts it. A preempted, requeued (`scontrol requeue`) or cancelled job gets SIGTERM, then
# KillWait seconds before SIGKILL: the time its ranks have to write a checkpoint. GraceTime stays
# 0 (with one, Slurm 22.05 sends SIGTERM to the job's steps only and requeues the job when the
# grace time ends).
#
# Installs slurm-wlm and munge with apt-get when missing; writes /etc/slurm/slurm.conf; creates a
# munge key. Does nothing when the cluster asked for already answers with usable nodes and this
# script would write the same slurm.conf; otherwise stops what runs and starts afresh. Needs
# root. Accounting is off (no slurmdbd): sacct does not work, squeue and scontrol do.
set -euo pipefail

SLURM_CONF=/etc/slurm/slurm.conf
MUNGE_KEY=/etc/munge/munge.key
MUNGE_PID=/run/munge/munged.pid
CTLD_PID=/run/slurmctld.pid
LOG_DIR=/var/log/slurm
HOST=$(hostname -s)
NODES=(n1 n2)
BRIDGE=slurm-br0
SUBNET=10.213.0
CTLD_ADDR=$SUBNET.1
# Seconds between SIGTERM and SIGKILL when a job is preempted, requeued or cancelled.
KILL_WAIT=30
NO_NAMESPACES_EXIT=3  # tests/slurm_cluster.py falls back to --single-node on this code

say() { echo "local_cluster: $*" >&2; }

namespace_of() { echo "slurm-$1"; }
address_of() { echo "$SUBNET.1${1#n}"; }  # n1 -> 10.213.0.11
slurmd_pidfile() { echo "/run/slurmd-$1.pid"; }

nodes_usable() {
    # Every expected node idle, mixed or allocated (a job may already be running).
    local want=("$@") states
    states=$(timeout 5 sinfo -h -N -o '%N %T' 2>/dev/null | sort -u) || return 1
    local node
    for node in "${want[@]}"; do
        grep -Eq "^$node (idle|mix|alloc|completing)" <<<"$states" || return 1
    done
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

remove_namespaces() {
    local node ns pid
    for node in "${NODES[@]}"; do
        ns=$(namespace_of "$node")
        if ip netns list 2>/dev/null | grep -qw "$ns"; then
            # What is left in it was started by this cluster (job steps, their processes).
            for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
            ip netns del "$ns"
        fi
        rm -rf "/etc/netns/$ns"
    done
    if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link del "$BRIDGE"; fi
}

stop() {
    local node
    for node in "${NODES[@]}"; do stop_pidfile "$(slurmd_pidfile "$node")"; done
    stop_pidfile /run/slurmd.pid  # the --single-node daemon
    stop_pidfile "$CTLD_PID"
    stop_pidfile "$MUNGE_PID"
    remove_namespaces
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

hardware() {
    # `slurmd -C` measures CPUs, sockets, cores, threads and RealMemory; a node declared bigger
    # than the machine would be drained as "Low RealMemory/CPUs".
    local measured
    measured=$(slurmd -C 2>/dev/null | grep '^NodeName=' | head -n1 || true)
    if [[ -n $measured ]]; then
        echo "CPUs=${measured#* CPUs=}"
    else
        echo "CPUs=$(nproc) RealMemory=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 ))"
    fi
}

make_namespaces() {
    # A bridge on the host, one veth pair per node: the node's end, renamed eth0, goes into its
    # namespace with the node's address.
    remove_namespaces
    ip link add "$BRIDGE" type bridge
    ip addr add "$CTLD_ADDR/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    local node ns hosts
    hosts="127.0.0.1 localhost"$'\n'"$CTLD_ADDR $HOST"
    for node in "${NODES[@]}"; do hosts+=$'\n'"$(address_of "$node") $node"; done
    for node in "${NODES[@]}"; do
        ns=$(namespace_of "$node")
        ip netns add "$ns"
        ip link add "$ns-h" type veth peer name "$ns-c"
        ip link set "$ns-h" master "$BRIDGE"
        ip link set "$ns-h" up
        ip link set "$ns-c" netns "$ns"
        ip netns exec "$ns" ip link set lo up
        ip netns exec "$ns" ip link set "$ns-c" name eth0
        ip netns exec "$ns" ip addr add "$(address_of "$node")/24" dev eth0
        ip netns exec "$ns" ip link set eth0 up
        mkdir -p "/etc/netns/$ns"
        echo "$hosts" >"/etc/netns/$ns/hosts"
    done
}

start_node() {
    # In the node's network namespace, with its own hostname (a UTS namespace) and /etc/hosts (a
    # mount namespace), so that torch's gloo and srun find the node's address through its name.
    # Not `ip netns exec`: it mounts a fresh /sys, without the cgroup tree slurmd insists on.
    local node=$1 ns
    ns=$(namespace_of "$node")
    mkdir -p "/var/spool/slurmd/$node"
    nsenter --net="/run/netns/$ns" unshare --uts --mount -- \
        sh -c "mount --bind /etc/netns/$ns/hosts /etc/hosts && hostname $node && exec slurmd -N $node"
}

conf_text() {
    # slurm.conf for one node (--single-node) or the namespaced nodes.
    local single=$1 ctld_host node_lines nodes_csv
    if [[ $single == 1 ]]; then
        ctld_host=$HOST
        node_lines="NodeName=$HOST $(hardware) State=UNKNOWN"
        nodes_csv=$HOST
        local daemon="SlurmdPidFile=/run/slurmd.pid"$'\n'"SlurmdSpoolDir=/var/spool/slurmd"$'\n'"SlurmdLogFile=$LOG_DIR/slurmd.log"
    else
        ctld_host="$HOST($CTLD_ADDR)"
        node_lines=""
        for node in "${NODES[@]}"; do
            node_lines+="NodeName=$node NodeHostname=$node NodeAddr=$(address_of "$node") $(hardware) State=UNKNOWN"$'\n'
        done
        nodes_csv=$(IFS=,; echo "${NODES[*]}")
        # %n: the node's name, so that the two daemons on this machine keep apart.
        local daemon="SlurmdPidFile=/run/slurmd-%n.pid"$'\n'"SlurmdSpoolDir=/var/spool/slurmd/%n"$'\n'"SlurmdLogFile=$LOG_DIR/slurmd-%n.log"
    fi
    cat <<EOF
# Written by slurm/local_cluster.sh: $([[ $single == 1 ]] && echo "one node (this host)" || echo "two nodes in network namespaces"), two partitions, no accounting.
ClusterName=local
SlurmctldHost=$ctld_host
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
SlurmctldPidFile=$CTLD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
$daemon
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
# Preempted (or requeued, or cancelled) jobs get SIGTERM, then KillWait seconds to checkpoint.
KillWait=$KILL_WAIT
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
# A requeued job becomes eligible cred_expire + 1 s after the requeue, but nothing happens then
# that would wake the scheduler: the periodic main pass starts it (every 60 s by default).
SchedulerParameters=sched_interval=2
$node_lines
PartitionName=local Nodes=$nodes_csv Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE
PartitionName=high Nodes=$nodes_csv MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
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

can_make_namespaces() {
    command -v ip >/dev/null && command -v unshare >/dev/null && command -v nsenter >/dev/null || return 1
    local probe=slurm-probe-$$
    ip netns add "$probe" 2>/dev/null || return 1
    nsenter --net="/run/netns/$probe" unshare --uts --mount -- \
        sh -c 'mount --bind /etc/hostname /etc/hostname && hostname probe' 2>/dev/null
    local ok=$?
    ip netns del "$probe" 2>/dev/null || true
    return $ok
}

start() {
    local single=0
    [[ ${1:-} == --single-node ]] && single=1
    local want=("${NODES[@]}")
    [[ $single == 1 ]] && want=("$HOST")
    if command -v sinfo >/dev/null && nodes_usable "${want[@]}" && [[ $(conf_text "$single") == "$(cat "$SLURM_CONF" 2>/dev/null)" ]]; then
        say "already running: $(sinfo -h -N -o '%N %T %c CPUs %m MB' | sort -u | tr '\n' ';')"
        return 0
    fi
    [[ $(id -u) -eq 0 ]] || { say "needs root (it installs packages, starts daemons and creates network namespaces)"; exit 1; }
    if [[ $single == 0 ]] && ! can_make_namespaces; then
        say "cannot create a network namespace (ip netns add, unshare --uts): start --single-node runs one node on the host"
        exit $NO_NAMESPACES_EXIT
    fi
    install
    # Daemons (and namespaces) of an earlier start answer nothing useful: begin afresh.
    stop 2>/dev/null
    mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$LOG_DIR"
    conf_text "$single" >"$SLURM_CONF"
    start_munge
    if [[ $single == 1 ]]; then
        slurmctld -c  # -c: forget jobs of an earlier local cluster, so old test jobs do not come back
        slurmd
    else
        make_namespaces
        slurmctld -c
        local node
        for node in "${NODES[@]}"; do
            start_node "$node"
        done
    fi
    for _ in $(seq 60); do
        if nodes_usable "${want[@]}"; then
            say "up: $(sinfo -h -N -o '%N %T %c CPUs %m MB' | sort -u | tr '\n' ';')"
            return 0
        fi
        sleep 0.5
    done
    say "the nodes did not become idle in 30 s; see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd*.log"
    sinfo -N -l >&2 || true
    exit 1
}

status() {
    if nodes_usable "${NODES[@]}" || nodes_usable "$HOST"; then
        sinfo -N -o '%N %P %T %c %m'
        return 0
    fi
    say "not running"
    return 1
}

case "${1:-start}" in
    start) start "${2:-}" ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 [start [--single-node]|status|stop]" >&2; exit 2 ;;
esac
