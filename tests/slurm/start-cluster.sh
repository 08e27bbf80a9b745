#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for tests/test_slurm.py.
#
#   tests/slurm/start-cluster.sh start   # idempotent
#   tests/slurm/start-cluster.sh stop    # stops what start started
#
# Needs root and Debian's slurm-wlm and munge (apt-get install slurm-wlm munge;
# .ci/run does this). No systemd: the daemons are started directly. State,
# spool and logs live in $WEIGHTPCA_SLURM_DIR (default /tmp/weightpca-slurm);
# a fresh start clears the state, so no earlier run's jobs are listed.
# The configuration must be the default /etc/slurm/slurm.conf: the Slurm
# plugin's job step removes SLURM_* variables (SLURM_CONF too) before its
# srun. An existing slurm.conf or gres.conf that this script did not write is
# never replaced (start fails instead) nor removed by stop; stop ends only the
# daemons start launched.
#
# The node declares fake resources so that profiles/slurm can be used as it is
# shipped: 2 GPUs backed by plain files (jobs asking for gpu: 1 are
# scheduled; they see no CUDA device and run on the CPU) and 128 GB of memory
# (SlurmdParameters=config_overrides: the declared node wins over the hardware).
set -euo pipefail

DIR=${WEIGHTPCA_SLURM_DIR:-/tmp/weightpca-slurm}
CONF=/etc/slurm/slurm.conf
GRES=/etc/slurm/gres.conf
MARK="# written by weightpca tests/slurm/start-cluster.sh"
HOST=$(hostname -s)

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
cluster_idle() { sinfo -h -o %T 2>/dev/null | grep -qx idle; }

start_munge() {
    munge_ok && return 0
    mkdir -p /run/munge /var/log/munge /etc/munge /var/lib/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /run/munge /var/log/munge /etc/munge /etc/munge/munge.key /var/lib/munge
    chmod 0700 /etc/munge /var/log/munge
    chmod 0400 /etc/munge/munge.key
    chmod 0755 /run/munge
    touch /var/log/munge/munged.log && chown munge:munge /var/log/munge/munged.log
    # munged refuses to run as root
    mkdir -p "$DIR/munge" && chown munge:munge "$DIR/munge"
    runuser -u munge -- munged --pid-file="$DIR/munge/munged.pid"
    for _ in $(seq 50); do munge_ok && return 0; sleep 0.1; done
    echo "munged did not start: see /var/log/munge/munged.log" >&2
    return 1
}

ours() { [ -f "$1" ] && head -n 1 "$1" | grep -qxF "$MARK"; }

write_conf() {
    for f in "$CONF" "$GRES"; do
        if [ -e "$f" ] && ! ours "$f"; then
            echo "$f exists and was not written by this script; not replacing it" >&2
            exit 1
        fi
    done
    # a clean state for a fresh controller: the previous run's jobs are not listed again
    if ! pgrep -F "$DIR/slurmctld.pid" >/dev/null 2>&1; then
        rm -rf "$DIR/state" "$DIR/spool"
    fi
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" /etc/slurm
    cat > "$CONF.new" <<CONF
$MARK
ClusterName=weightpca-test
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
# finished jobs stay visible to squeue for an hour (the status command without accounting)
MinJobAge=3600
ReturnToService=2
SlurmdParameters=config_overrides
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
NodeName=$HOST CPUs=$(nproc) RealMemory=128000 Gres=gpu:2 State=UNKNOWN
PartitionName=main Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
    # slurmd counts a GPU per device file; plain files stand in for /dev/nvidia*
    touch "$DIR/fake-gpu0" "$DIR/fake-gpu1"
    printf '%s\nNodeName=%s Name=gpu File=%s\n' "$MARK" "$HOST" "$DIR/fake-gpu[0-1]" > "$GRES"
    mv "$CONF.new" "$CONF"
}

start() {
    command -v slurmctld >/dev/null || { echo "slurmctld not found: apt-get install slurm-wlm munge" >&2; exit 1; }
    mkdir -p "$DIR"
    start_munge
    if ours "$CONF" && cluster_idle; then
        return 0
    fi
    write_conf
    pgrep -F "$DIR/slurmctld.pid" >/dev/null 2>&1 || slurmctld
    pgrep -F "$DIR/slurmd.pid" >/dev/null 2>&1 || slurmd
    for _ in $(seq 150); do
        if cluster_idle; then return 0; fi
        sleep 0.2
    done
    echo "the test cluster did not become idle; state: $(sinfo -h -o '%T %E' 2>&1)" >&2
    tail -n 5 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
    exit 1
}

stop() {
    for daemon in slurmd slurmctld; do
        if [ -f "$DIR/$daemon.pid" ]; then
            pkill -F "$DIR/$daemon.pid" 2>/dev/null || true
            # it saves its state on the way out: wait, then the state can go
            for _ in $(seq 100); do pgrep -F "$DIR/$daemon.pid" >/dev/null 2>&1 || break; sleep 0.1; done
            rm -f "$DIR/$daemon.pid"
        fi
    done
    # only the munged that start launched (its PID file), never another of that user
    if [ -f "$DIR/munge/munged.pid" ]; then
        pkill -F "$DIR/munge/munged.pid" munged 2>/dev/null || true
        rm -f "$DIR/munge/munged.pid"
    fi
    for f in "$CONF" "$GRES"; do
        if ours "$f"; then rm -f "$f"; fi
    done
    rm -rf "$DIR/state" "$DIR/spool"
}

case ${1:-start} in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
