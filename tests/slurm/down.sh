#!/usr/bin/env bash
# Stop exactly the daemons tests/slurm/up.sh started (pid files in the state dir,
# each checked against /proc/PID/comm), in reverse start order.
#
#   down.sh           stop; state, logs and the accounting DB are kept
#   down.sh --reset   also cancel all jobs first, then wipe state, logs and the
#                     accounting database (job ids restart at 1)
#
# Env: STAMPBATCH_SLURM_STATE (default /var/tmp/stampbatch-slurm),
#      STAMPBATCH_SLURM_TIMEOUT seconds to wait for each daemon to exit (default 60)
set -euo pipefail

STATE_DIR=${STAMPBATCH_SLURM_STATE:-/var/tmp/stampbatch-slurm}
TIMEOUT=${STAMPBATCH_SLURM_TIMEOUT:-60}
RUN_DIR=$STATE_DIR/run
MARKER=$STATE_DIR/.stampbatch-slurm-state

reset=0
case ${1:-} in
'') ;;
--reset | reset) reset=1 ;;
-h | --help)
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
*) echo "down: unknown argument '$1' (use --reset)" >&2; exit 2 ;;
esac

say() { printf 'down: %s\n' "$*" >&2; }

pid_of() {
    local pidfile=$1 comm=$2 pid=''
    [[ -r $pidfile ]] || return 1
    IFS= read -r pid <"$pidfile" || true
    pid=${pid//[^0-9]/}
    [[ -n $pid ]] || return 1
    proc_is "$pid" "$comm" || return 1
    printf '%s\n' "$pid"
}

proc_is() {
    local pid=$1 comm=$2 actual='' stat=''
    actual=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $actual == "$comm" ]] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat:0:1} != Z ]]
}

[[ $(id -u) -eq 0 ]] || { echo "down: must run as root" >&2; exit 1; }
case $STATE_DIR in
/?*) ;;
*) echo "down: STAMPBATCH_SLURM_STATE must be an absolute path, got '$STATE_DIR'" >&2; exit 1 ;;
esac

if [[ -d $(dirname "$STATE_DIR") ]]; then
    exec 9>"$STATE_DIR.lock"
    flock -w 600 9 || { echo "down: could not lock $STATE_DIR.lock" >&2; exit 1; }
fi

if ((reset)) && pid_of "$RUN_DIR/slurmctld.pid" slurmctld >/dev/null; then
    # Cancel every job so no slurmstepd of the old job ids outlives the reset.
    mapfile -t jobs < <(squeue -h -o %A 2>/dev/null || true)
    if ((${#jobs[@]})); then
        say "cancelling ${#jobs[@]} job(s)"
        scancel "${jobs[@]}" 2>/dev/null || true
        for ((i = 0; i < 150; i++)); do
            [[ -z $(squeue -h -o %A 2>/dev/null || true) ]] && break
            sleep 0.1
        done
    fi
fi

# Send SIGTERM, wait (bounded), SIGKILL as a last resort.
failed=0
for comm in slurmd slurmctld slurmdbd mariadbd munged; do
    pidfile=$RUN_DIR/$comm.pid
    if ! pid=$(pid_of "$pidfile" "$comm"); then
        rm -f "$pidfile"
        continue
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < TIMEOUT * 10; i++)); do
        proc_is "$pid" "$comm" || break
        sleep 0.1
    done
    if proc_is "$pid" "$comm"; then
        say "$comm (pid $pid) ignored SIGTERM for ${TIMEOUT} s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
        if proc_is "$pid" "$comm"; then
            say "$comm (pid $pid) is still alive"
            failed=1
            continue
        fi
    fi
    say "stopped $comm (pid $pid)"
    rm -f "$pidfile"
done
((failed)) && exit 1

if ((reset)) && [[ -e $STATE_DIR ]]; then
    if [[ ! -e $MARKER ]] && [[ -n $(ls -A "$STATE_DIR") ]]; then
        echo "down: refusing to wipe $STATE_DIR: it has no $MARKER (not made by up.sh?)" >&2
        exit 1
    fi
    rm -rf -- "$STATE_DIR"
    say "wiped $STATE_DIR (Slurm state, logs, accounting database)"
fi
if ((reset)); then
    echo "slurm down (reset: state, logs and accounting DB wiped)"
else
    echo "slurm down (state kept in $STATE_DIR)"
fi
