#!/usr/bin/env bash
# Bring up a real single-node Slurm (slurmctld + slurmd + munge + slurmdbd with a
# private MariaDB) on this Debian machine, for the test suite and the demo.
#
# Idempotent: when everything already runs this is a fast no-op. Recovers from
# SIGKILLed daemons (stale pid files, stale munge socket, InnoDB recovery).
# Facts behind every choice: /work/shared/notes/slurm-single-node.md
#
# Env: STAMPBATCH_SLURM_STATE   state dir (default /var/tmp/stampbatch-slurm)
#      STAMPBATCH_SLURM_TIMEOUT seconds to wait for each daemon / the node (default 60)
set -euo pipefail

STATE_DIR=${STAMPBATCH_SLURM_STATE:-/var/tmp/stampbatch-slurm}
TIMEOUT=${STAMPBATCH_SLURM_TIMEOUT:-60}
RUN_DIR=$STATE_DIR/run
LOG_DIR=$STATE_DIR/log
DB_DIR=$STATE_DIR/mysql
GPU_DIR=$STATE_DIR/fakegpu
MARKER=$STATE_DIR/.stampbatch-slurm-state
DB_PORT=3307
DB_SOCK=$RUN_DIR/mysqld.sock
DB_USER=slurm
DB_PASS=slurmdbpass          # private MariaDB, bound to 127.0.0.1 only
CLUSTER=stampbatch
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
POLICY_RC=/usr/sbin/policy-rc.d

T0=$(date +%s.%N)
created_policy=0

say() { printf 'up: %s\n' "$*" >&2; }

elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

# fail DAEMON MESSAGE [LOG...]: report which daemon failed, with the tail of its logs.
fail() {
    local daemon=$1 msg=$2 log
    shift 2
    printf 'up: FAILED: %s: %s (after %s s)\n' "$daemon" "$msg" "$(elapsed)" >&2
    for log in "$@"; do
        if [[ -s $log ]]; then
            printf -- '--- last 25 lines of %s ---\n' "$log" >&2
            tail -n 25 "$log" >&2
        fi
    done
    exit 1
}

cleanup() {
    if ((created_policy)); then
        rm -f "$POLICY_RC"
    fi
}
trap cleanup EXIT

# pid_of PIDFILE COMM: print the pid in PIDFILE if that process is alive and named COMM.
pid_of() {
    local pidfile=$1 comm=$2 pid=''
    [[ -r $pidfile ]] || return 1
    IFS= read -r pid <"$pidfile" || true
    pid=${pid//[^0-9]/}
    [[ -n $pid ]] || return 1
    proc_is "$pid" "$comm" || return 1
    printf '%s\n' "$pid"
}

# proc_is PID COMM: true if PID is a live (non-zombie) process named COMM.
proc_is() {
    local pid=$1 comm=$2 actual='' stat=''
    actual=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $actual == "$comm" ]] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat:0:1} != Z ]]
}

# spawn CMD...: close every fd but 0-2, then exec CMD. Call it only in a child,
# "(spawn CMD)" or "spawn CMD &", so daemons hold neither the lock (fd 9) nor pipes
# of whoever called up.sh (a CI runner waiting for EOF), and no waiting bash stays
# behind holding them.
spawn() {
    local fd
    for fd in /proc/"$BASHPID"/fd/*; do
        fd=${fd##*/}
        if ((fd > 2)); then
            exec {fd}>&- || true
        fi
    done
    exec "$@"
}

# stop_daemon COMM PIDFILE: SIGTERM the daemon named in PIDFILE (if it is ours), wait, SIGKILL.
stop_daemon() {
    local comm=$1 pidfile=$2 pid i
    if ! pid=$(pid_of "$pidfile" "$comm"); then
        rm -f "$pidfile"
        return 0
    fi
    say "restarting $comm (config changed): stopping pid $pid"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < TIMEOUT * 10; i++)); do
        proc_is "$pid" "$comm" || break
        sleep 0.1
    done
    if proc_is "$pid" "$comm"; then
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.2
    fi
    rm -f "$pidfile"
}

# write_if_changed DEST MODE < content: returns 0 when DEST was (re)written.
write_if_changed() {
    local dest=$1 mode=$2 tmp
    tmp=$(mktemp "$dest.XXXXXX")
    cat >"$tmp"
    chmod "$mode" "$tmp"
    if [[ -f $dest ]] && cmp -s "$tmp" "$dest" && [[ $(stat -c %a "$dest") == "$mode" ]]; then
        rm -f "$tmp"
        return 1
    fi
    mv -f "$tmp" "$dest"
    return 0
}

# wait_until DAEMON PIDFILE CHECK LOG...: poll CHECK (a function) until it succeeds;
# fail early if the daemon's process is gone, fail at TIMEOUT otherwise.
wait_until() {
    local daemon=$1 pidfile=$2 check=$3 i
    shift 3
    for ((i = 0; i < TIMEOUT * 10; i++)); do
        if "$check"; then
            return 0
        fi
        # Daemons that fork write their pid file a moment later: allow 3 s.
        if ((i > 30)) && ! pid_of "$pidfile" "$daemon" >/dev/null; then
            fail "$daemon" "process exited during start-up" "$@"
        fi
        sleep 0.1
    done
    fail "$daemon" "not ready after ${TIMEOUT} s" "$@"
}

[[ $(id -u) -eq 0 ]] || { echo "up: must run as root" >&2; exit 1; }
case $STATE_DIR in
/?*) ;;
*) echo "up: STAMPBATCH_SLURM_STATE must be an absolute path, got '$STATE_DIR'" >&2; exit 1 ;;
esac

# One bring-up at a time (parallel test workers may all call up.sh).
mkdir -p "$(dirname "$STATE_DIR")"
exec 9>"$STATE_DIR.lock"
flock -w 600 9 || { echo "up: could not lock $STATE_DIR.lock" >&2; exit 1; }

mkdir -p "$STATE_DIR" "$STATE_DIR/state/ctld" "$STATE_DIR/state/d" "$RUN_DIR" "$LOG_DIR" "$GPU_DIR"
touch "$MARKER"

# ---------------------------------------------------------------- packages
missing=()
installed=$(dpkg-query -W -f='${Package} ${Status}\n' "${PACKAGES[@]}" 2>/dev/null || true)
for pkg in "${PACKAGES[@]}"; do
    if ! grep -qx "$pkg install ok installed" <<<"$installed"; then
        missing+=("$pkg")
    fi
done
if ((${#missing[@]})); then
    say "installing ${missing[*]} (log: $LOG_DIR/apt.log)"
    if [[ ! -e $POLICY_RC ]]; then
        # apt must not try to start services (no systemd here; we start them ourselves).
        printf '#!/bin/sh\nexit 101\n' >"$POLICY_RC"
        chmod 755 "$POLICY_RC"
        created_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >>"$LOG_DIR/apt.log" 2>&1 || fail apt "apt-get update failed" "$LOG_DIR/apt.log"
    apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$LOG_DIR/apt.log" 2>&1 ||
        fail apt "apt-get install failed" "$LOG_DIR/apt.log"
    if ((created_policy)); then
        rm -f "$POLICY_RC"
        created_policy=0
    fi
fi

# ---------------------------------------------------------------- host name
NODE=$(hostname -s)
if ! getent hosts "$NODE" >/dev/null; then
    say "adding '127.0.0.1 $NODE' to /etc/hosts"
    printf '127.0.0.1\t%s\n' "$NODE" >>/etc/hosts
fi

# ---------------------------------------------------------------- hardware
hw=$(slurmd -C 2>/dev/null | head -n 1 || true)
CPUS='' BOARDS='' SOCKETS='' CORES='' THREADS='' MEM=''
for kv in $hw; do
    case $kv in
    CPUs=*) CPUS=${kv#*=} ;;
    Boards=*) BOARDS=${kv#*=} ;;
    SocketsPerBoard=*) SOCKETS=${kv#*=} ;;
    CoresPerSocket=*) CORES=${kv#*=} ;;
    ThreadsPerCore=*) THREADS=${kv#*=} ;;
    RealMemory=*) MEM=${kv#*=} ;;
    esac
done
[[ -n $CPUS && -n $BOARDS && -n $SOCKETS && -n $CORES && -n $THREADS && -n $MEM ]] ||
    fail slurmd "cannot parse 'slurmd -C' output: '$hw'"
# RealMemory above what slurmd sees makes the node INVAL: leave 1 GiB, and round down
# to 512 MB so tiny fluctuations between boots do not change the config.
MEM=$(((MEM - 1024) / 512 * 512))
((MEM >= 1024)) || MEM=1024

# ---------------------------------------------------------------- fake GPUs
# File-less GPUs are dropped by slurmd, regular files are rejected: use character
# devices with /dev/null's numbers (notes, item 5).
for i in 0 1; do
    dev=$GPU_DIR/nvidia$i
    if [[ ! -c $dev ]]; then
        rm -f "$dev"
        mknod -m 666 "$dev" c 1 3
    fi
done

# ---------------------------------------------------------------- config
mkdir -p /etc/slurm
ctl_changed=0
dbd_changed=0
if write_if_changed /etc/slurm/slurm.conf 644 <<EOF; then ctl_changed=1; fi
# Generated by tests/slurm/up.sh -- do not edit; re-run up.sh instead.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStorageTRES=gres/gpu
JobCompType=jobcomp/none
MailProg=/bin/true
ReturnToService=2
KillWait=5
StateSaveLocation=$STATE_DIR/state/ctld
SlurmdSpoolDir=$STATE_DIR/state/d
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,bf_interval=2,sched_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$CPUS Boards=$BOARDS SocketsPerBoard=$SOCKETS CoresPerSocket=$CORES ThreadsPerCore=$THREADS RealMemory=$MEM Gres=gpu:2 State=UNKNOWN
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
PartitionName=debug  Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=30
PartitionName=urgent Nodes=ALL Default=NO  MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
EOF
if write_if_changed /etc/slurm/gres.conf 644 <<EOF; then ctl_changed=1; fi
# Generated by tests/slurm/up.sh: two fake GPUs (character devices, see notes item 5).
AutoDetect=off
NodeName=$NODE Name=gpu File=$GPU_DIR/nvidia[0-1]
EOF
if write_if_changed /etc/slurm/slurmdbd.conf 600 <<EOF; then dbd_changed=1; fi
# Generated by tests/slurm/up.sh (mode 600: holds StoragePass).
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
LogFile=$LOG_DIR/slurmdbd.log
PidFile=$RUN_DIR/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
if ((ctl_changed)); then
    stop_daemon slurmd "$RUN_DIR/slurmd.pid"
    stop_daemon slurmctld "$RUN_DIR/slurmctld.pid"
fi
if ((dbd_changed)); then
    stop_daemon slurmdbd "$RUN_DIR/slurmdbd.pid"
fi

# ---------------------------------------------------------------- munged
munge_works() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! pid_of "$RUN_DIR/munged.pid" munged >/dev/null && ! munge_works; then
    say "starting munged"
    rm -f "$RUN_DIR/munged.pid"
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile=/etc/munge/munge.key
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 /run/munge
    # munged refuses to run as root; --force clears a stale socket lock after a SIGKILL.
    (spawn runuser -u munge -- munged --force) </dev/null >>"$LOG_DIR/munged.stderr" 2>&1 ||
        fail munged "munged did not start" "$LOG_DIR/munged.stderr" /var/log/munge/munged.log
    for ((i = 0; i < 50; i++)); do
        if pid=$(pid_of /run/munge/munged.pid munged); then
            # Remember that this munged is ours (down.sh stops only what up.sh started).
            printf '%s\n' "$pid" >"$RUN_DIR/munged.pid"
            break
        fi
        sleep 0.1
    done
    wait_until munged "$RUN_DIR/munged.pid" munge_works "$LOG_DIR/munged.stderr" /var/log/munge/munged.log
fi

# ---------------------------------------------------------------- mariadbd
db() { mariadb --no-defaults --socket="$DB_SOCK" -uroot "$@"; }
db_works() { db -Nse 'SELECT 1' >/dev/null 2>&1; }
db_started=0
if ! pid_of "$RUN_DIR/mariadbd.pid" mariadbd >/dev/null; then
    rm -f "$RUN_DIR/mariadbd.pid"
    if [[ ! -e $STATE_DIR/mysql.initialized ]]; then
        say "initialising MariaDB datadir $DB_DIR"
        rm -rf "$DB_DIR" "$STATE_DIR/mysql.user-ok"
        mariadb-install-db --no-defaults --datadir="$DB_DIR" --user=root \
            --auth-root-authentication-method=socket --skip-test-db \
            </dev/null >>"$LOG_DIR/mariadb-install.log" 2>&1 ||
            fail mariadbd "mariadb-install-db failed" "$LOG_DIR/mariadb-install.log"
        touch "$STATE_DIR/mysql.initialized"
    fi
    say "starting mariadbd (127.0.0.1:$DB_PORT)"
    spawn setsid mariadbd --no-defaults --user=root --datadir="$DB_DIR" \
        --pid-file="$RUN_DIR/mariadbd.pid" --socket="$DB_SOCK" \
        --bind-address=127.0.0.1 --port="$DB_PORT" --skip-name-resolve \
        --innodb-buffer-pool-size=128M --innodb-log-file-size=64M \
        --innodb-lock-wait-timeout=900 --log-error="$LOG_DIR/mariadb.log" \
        </dev/null >>"$LOG_DIR/mariadbd.stderr" 2>&1 &
    db_started=1
fi
wait_until mariadbd "$RUN_DIR/mariadbd.pid" db_works "$LOG_DIR/mariadb.log" "$LOG_DIR/mariadbd.stderr"
if [[ ! -e $STATE_DIR/mysql.user-ok ]]; then
    db -e "CREATE USER IF NOT EXISTS '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
           GRANT ALL ON slurm_acct_db.* TO '$DB_USER'@'127.0.0.1'; FLUSH PRIVILEGES;" \
        2>>"$LOG_DIR/mariadb.log" || fail mariadbd "could not create the DB user" "$LOG_DIR/mariadb.log"
    touch "$STATE_DIR/mysql.user-ok"
fi
((db_started)) && say "mariadbd ready"

# ---------------------------------------------------------------- slurm daemons
dbd_works() { (exec 3<>/dev/tcp/127.0.0.1/6819) 2>/dev/null; }
ctld_works() { scontrol ping 2>/dev/null | grep -q 'is UP'; }
slurmd_works() { pid_of "$RUN_DIR/slurmd.pid" slurmd >/dev/null; }

# start_slurm DAEMON CHECK: start a self-daemonising Slurm daemon unless it runs.
start_slurm() {
    local daemon=$1 check=$2 pidfile=$RUN_DIR/$1.pid
    if pid_of "$pidfile" "$daemon" >/dev/null; then
        return 0
    fi
    # A stale pid file could name an unrelated process (slurmd signals the pid it finds).
    rm -f "$pidfile"
    say "starting $daemon"
    started_slurm=1
    (spawn "$daemon") </dev/null >>"$LOG_DIR/$daemon.stderr" 2>&1 ||
        fail "$daemon" "exited with status $?" "$LOG_DIR/$daemon.stderr" "$LOG_DIR/$daemon.log"
    wait_until "$daemon" "$pidfile" "$check" "$LOG_DIR/$daemon.log" "$LOG_DIR/$daemon.stderr"
}
started_slurm=0
start_slurm slurmdbd dbd_works
start_slurm slurmctld ctld_works
start_slurm slurmd slurmd_works

# ---------------------------------------------------------------- node + accounting
node_state() {
    local s
    s=$(sinfo -h -N -n "$NODE" -o %T 2>/dev/null || true)
    printf '%s\n' "${s%%$'\n'*}"
}
state=''
last_resume=-100
for ((i = 0; i < TIMEOUT * 10; i++)); do
    state=$(node_state)
    case $state in
    idle | mixed | allocated | completing) break ;;
    drain | drained | draining | down | inval | fail | failing)
        # A node drained once stays drained across restarts (notes item 6).
        if ((i - last_resume >= 50)); then
            say "node $NODE is $state ($(sinfo -h -N -n "$NODE" -o %E 2>/dev/null | head -n 1 || true)): resuming"
            scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
            last_resume=$i
        fi
        ;;
    esac
    sleep 0.1
done
case $state in
idle | mixed | allocated | completing) ;;
*)
    reason=$(sinfo -h -N -n "$NODE" -o %E 2>/dev/null | head -n 1 || true)
    fail slurmd "node $NODE is '${state:-unknown}' after ${TIMEOUT} s (reason: ${reason:-none})" \
        "$LOG_DIR/slurmd.log" "$LOG_DIR/slurmctld.log"
    ;;
esac

acct_works() {
    sacct -n -X -o JobID >/dev/null 2>&1 || return 1
    # After a (re)start slurmctld registers the cluster with slurmdbd by itself; until
    # then jobs would not be recorded.
    ((started_slurm == 0)) ||
        sacctmgr -n -P list cluster format=Cluster 2>/dev/null | grep -qx "$CLUSTER"
}
for ((i = 0; i < TIMEOUT * 10; i++)); do
    acct_works && break
    sleep 0.1
done
acct_works || fail slurmdbd "sacct does not work after ${TIMEOUT} s" \
    "$LOG_DIR/slurmdbd.log" "$LOG_DIR/slurmctld.log" "$LOG_DIR/mariadb.log"

printf 'slurm up: node %s %s (%s CPUs, %s MB, gpu:2), partitions debug (default) + urgent, sacct ok, state %s [%s s]\n' \
    "$NODE" "$state" "$CPUS" "$MEM" "$STATE_DIR" "$(elapsed)"
