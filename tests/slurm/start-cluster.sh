#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for tests/test_slurm.py.
#
#   tests/slurm/start-cluster.sh start   # idempotent
#   tests/slurm/start-cluster.sh stop    # stops what start started
#
# Needs root and Debian's slurm-wlm and munge (apt-get install slurm-wlm munge;
# .ci/run does this). No systemd: the daemons are started directly. State,
# spool and logs live in $WEIGHTPCA_SLURM_DIR (default /tmp/weightpca-slurm).
# The configuration must be the default /etc/slurm/slurm.conf: the Slurm
# plugin's job step removes SLURM_* variables (SLURM_CONF too) before its
# srun. An existing slurm.conf that this script did not write is never
# replaced: start fails instead.
#
# The node declares fake resources so that profiles/slurm can be used as it is
# shipped: 2 GPUs backed by plain files (jobs asking for gpu: 1 are
# scheduled; they see no CUDA device and run on the CPU) and 128 GB of memory
# (SlurmdParameters=config_overrides: the declared node wins over the hardware).
set -euo pipefail

DIR=${WEIGHTPCA_SLURM_DIR:-/tmp/weightpca-slurm}
CONF=/etc/slurm/slurm.conf
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
    runuser -u munge -- munged
    touch "$DIR/started-munge"
    for _ in $(seq 50); do munge_ok && return 0; sleep 0.1; done
    echo "munged did not start: see /var/log/munge/munged.log" >&2
    return 1
}

ours() { [ -f "$CONF" ] && head -n 1 "$CONF" | grep -qxF "$MARK"; }

write_conf() {
    if [ -e "$CONF" ] && ! ours; then
        echo "$CONF exists and was not written by this script; not replacing it" >&2
        exit 1
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
    echo "NodeName=$HOST Name=gpu File=$DIR/fake-gpu[0-1]" > /etc/slurm/gres.conf
    mv "$CONF.new" "$CONF"
}

start() {
    command -v slurmctld >/dev/null || { echo "slurmctld not found: apt-get install slurm-wlm munge" >&2; exit 1; }
    mkdir -p "$DIR"
    start_munge
    if ours && cluster_idle; then
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
            rm -f "$DIR/$daemon.pid"
        fi
    done
    if [ -f "$DIR/started-munge" ]; then
        pkill -u munge munged 2>/dev/null || true
        rm -f "$DIR/started-munge"
    fi
    if ours; then
        rm -f "$CONF" /etc/slurm/gres.conf
    fi
}

case ${1:-start} in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
