#!/usr/bin/env bash
# A throw-away single-node Slurm on localhost, for tests/test_slurm.py (and by hand).
#
#   tests/slurm/cluster.sh up DIR     # start munged, slurmctld, slurmd with all state under DIR
#   . DIR/env                         # SLURM_CONF=DIR/slurm.conf for sbatch, squeue, srun, ...
#   tests/slurm/cluster.sh down DIR   # stop the daemons by their pid files (safe to repeat)
#
# Needs root and Debian's slurm-wlm + munge (.ci/slurm-setup.sh installs them); installs
# nothing itself. "up" prints the reason and exits 2 when Slurm is not installed, 1 when the
# daemons do not come up (their logs are in DIR). One node, NodeAddr=127.0.0.1, CPUs=16 with
# SlurmdParameters=config_overrides so 16 tasks fit on any machine, and 16 count-only "gpu"
# GRES so job scripts asking --gpus-per-task=1 run unchanged (no device is bound).
# Knobs:
#   SLURM_TEST_CPUS      CPUs (and fake GPUs) of the node (default 16)
#   SLURM_TEST_TIMEOUT   seconds to wait for the node to become idle (default 60)
#   SLURM_SBIN           where slurmctld/slurmd/munged live (default: found on PATH or /usr/sbin)
#   MUNGE_TMP            parent of munged's own folder (default /tmp; the munge user must reach it)
set -euo pipefail

SLURM_TEST_CPUS=${SLURM_TEST_CPUS:-16}
SLURM_TEST_TIMEOUT=${SLURM_TEST_TIMEOUT:-60}
export PATH="${SLURM_SBIN:+$SLURM_SBIN:}$PATH:/usr/sbin:/sbin"

die() { echo "cluster.sh: $*" >&2; exit 1; }

free_port() {  # a TCP port nobody listens on now (the kernel picks it)
    python3 - <<'PY'
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()
PY
}

stop_pidfile() {  # pidfile name: TERM, wait up to 10 s, then KILL
    local file=$1 name=$2 pid i
    [[ -s $file ]] || return 0
    pid=$(<"$file")
    if [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "cluster.sh: $name ($pid) ignored TERM, killing" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$file"
}

down() {
    local dir=$1
    stop_pidfile "$dir/slurmd.pid" slurmd
    stop_pidfile "$dir/slurmctld.pid" slurmctld
    stop_pidfile "$dir/munge/munged.pid" munged
    local mdir
    mdir=$(readlink "$dir/munge" || true)
    if [[ $mdir == */moempi-munge.* && -d $mdir ]]; then
        rm -rf "$mdir"
        rm -f "$dir/munge"
    fi
}

up() {
    local dir=$1 missing=() cmd
    for cmd in slurmctld slurmd munged sbatch srun scontrol sinfo python3; do
        command -v "$cmd" >/dev/null || missing+=("$cmd")
    done
    if ((${#missing[@]})); then
        echo "cluster.sh: not installed: ${missing[*]} (run .ci/slurm-setup.sh)" >&2
        exit 2
    fi
    [[ $(id -u) -eq 0 ]] || { echo "cluster.sh: needs root to run slurmd" >&2; exit 2; }
    id munge >/dev/null 2>&1 || { echo "cluster.sh: no 'munge' user (install munge)" >&2; exit 2; }

    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    # whatever fails from here on: stop what was started, keep the logs
    trap 'rc=$?; if ((rc)); then down "'"$dir"'"; fi' EXIT
    mkdir -p "$dir/state" "$dir/spool"
    # munged runs as the munge user, who may not reach DIR (pytest's folders are 0700): its
    # own folder under /tmp, linked as DIR/munge and removed by "down"
    local mdir
    mdir=$(mktemp -d "${MUNGE_TMP:-/tmp}/moempi-munge.XXXXXX")
    ln -sfn "$mdir" "$dir/munge"
    chown munge:munge "$mdir"
    chmod 755 "$mdir"   # munged insists the socket folder be reachable; the key stays 0400

    # munge: a fresh key and socket of our own, so no system munged is touched (real paths:
    # munged checks every folder above them)
    dd if=/dev/urandom of="$mdir/munge.key" bs=1024 count=1 status=none
    chown munge:munge "$mdir/munge.key"
    chmod 400 "$mdir/munge.key"
    local socket=$mdir/munge.socket
    runuser -u munge -- munged --socket="$socket" --key-file="$mdir/munge.key" \
        --pid-file="$mdir/munged.pid" --log-file="$mdir/munged.log" \
        --seed-file="$mdir/munged.seed" \
        || die "munged did not start (log: $dir/munge/munged.log)"

    local host ctld_port slurmd_port
    host=$(hostname -s)
    ctld_port=$(free_port)
    slurmd_port=$(free_port)
    while [[ $slurmd_port == "$ctld_port" ]]; do slurmd_port=$(free_port); done
    cat >"$dir/slurm.conf" <<CONF
# written by tests/slurm/cluster.sh: a one-node test cluster, all state under $dir
ClusterName=moempitest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
GresTypes=gpu
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
# a fresh range of job ids per cluster: MPICH names its /dev/shm segments after the PMI
# kvsname (jobid.stepid) and a killed step leaves them behind, so reused ids would collide
FirstJobId=$((RANDOM * 1000 + 1000))
InactiveLimit=0
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
NodeName=$host NodeAddr=127.0.0.1 CPUs=$SLURM_TEST_CPUS Gres=gpu:$SLURM_TEST_CPUS State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
    # stand-in GPUs: empty files (slurmd drops file-less GPUs); with task/none nothing is
    # bound, each task only sees CUDA_VISIBLE_DEVICES; enough for --gpus-per-task to schedule
    mkdir -p "$dir/gpu"
    local i
    for ((i = 0; i < SLURM_TEST_CPUS; i++)); do : >"$dir/gpu/fake$i"; done
    echo "NodeName=$host Name=gpu File=$dir/gpu/fake[0-$((SLURM_TEST_CPUS - 1))]" >"$dir/gres.conf"
    cat >"$dir/env" <<ENV
export SLURM_CONF=$dir/slurm.conf
ENV
    export SLURM_CONF=$dir/slurm.conf

    slurmctld -i -f "$SLURM_CONF" || die "slurmctld did not start (log: $dir/slurmctld.log)"
    slurmd -f "$SLURM_CONF" || die "slurmd did not start (log: $dir/slurmd.log)"

    local deadline=$((SECONDS + SLURM_TEST_TIMEOUT)) state=""
    while ((SECONDS < deadline)); do
        state=$(sinfo -h -N -o %T 2>/dev/null || true)
        [[ $state == idle ]] && break
        case $state in inval*|drain*|down*|fail*) sleep 2; state=$(sinfo -h -N -o %T || true)
            [[ $state == idle ]] || break ;; esac
        sleep 0.5
    done
    if [[ $state != idle ]]; then
        echo "cluster.sh: node not idle (waited up to ${SLURM_TEST_TIMEOUT}s) (state: '${state:-no answer}')" >&2
        tail -n 20 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
        exit 1
    fi
    echo "cluster.sh: node $host idle, SLURM_CONF=$SLURM_CONF"
}

case ${1:-} in
    up)   [[ -n ${2:-} ]] || die "usage: $0 up DIR";   up "$2" ;;
    down) [[ -n ${2:-} ]] || die "usage: $0 down DIR"; down "$2" ;;
    *)    die "usage: $0 up|down DIR" ;;
esac
