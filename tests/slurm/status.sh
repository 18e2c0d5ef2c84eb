#!/usr/bin/env bash
# Show which of the daemons started by tests/slurm/up.sh run, and sinfo.
# Exit 0 when the cluster is usable (controller up, node idle/mixed/allocated,
# sacct works), 1 otherwise.
#
# Env: STAMPBATCH_SLURM_STATE (default /var/tmp/stampbatch-slurm)
set -euo pipefail

STATE_DIR=${STAMPBATCH_SLURM_STATE:-/var/tmp/stampbatch-slurm}
RUN_DIR=$STATE_DIR/run

pid_of() {
    local pidfile=$1 comm=$2 pid='' actual='' stat=''
    [[ -r $pidfile ]] || return 1
    IFS= read -r pid <"$pidfile" || true
    pid=${pid//[^0-9]/}
    [[ -n $pid ]] || return 1
    actual=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $actual == "$comm" ]] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat:0:1} != Z ]] || return 1
    printf '%s\n' "$pid"
}

echo "state dir: $STATE_DIR"
for comm in munged mariadbd slurmdbd slurmctld slurmd; do
    if pid=$(pid_of "$RUN_DIR/$comm.pid" "$comm"); then
        printf '  %-10s running (pid %s)\n' "$comm" "$pid"
    elif [[ $comm == munged ]] && munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        printf '  %-10s running (not started by up.sh)\n' "$comm"
    else
        printf '  %-10s not running\n' "$comm"
    fi
done

problems=()
if ! command -v sinfo >/dev/null; then
    problems+=("Slurm is not installed (run tests/slurm/up.sh)")
else
    if ! scontrol ping 2>/dev/null | grep -q 'is UP'; then
        problems+=("slurmctld does not answer")
    fi
    echo "sinfo:"
    sinfo 2>&1 | sed 's/^/  /' || true
    node=$(hostname -s)
    state=$(sinfo -h -N -n "$node" -o %T 2>/dev/null || true)
    state=${state%%$'\n'*}
    case $state in
    idle | mixed | allocated | completing) ;;
    *)
        reason=$(sinfo -h -N -n "$node" -o %E 2>/dev/null || true)
        problems+=("node $node is '${state:-unknown}' (reason: ${reason%%$'\n'*})")
        ;;
    esac
    if ! sacct -n -X -o JobID >/dev/null 2>&1; then
        problems+=("sacct does not work (slurmdbd / MariaDB)")
    fi
fi

if ((${#problems[@]})); then
    for p in "${problems[@]}"; do
        echo "NOT usable: $p"
    done
    exit 1
fi
echo "usable"
