#!/usr/bin/env bash
# Run a stampbatch command inside the container image.
#
#   containers/run.sh [--image IMAGE.sif] [--data DIR] [--runs DIR] [--bind SPEC]... [--] COMMAND [ARGS...]
#
#   e.g. containers/run.sh --data /scratch/me/survey --runs /scratch/me/runs -- \
#            score /scratch/me/survey/cands.h5 --model /scratch/me/runs/vgg6
#
#   --image IMAGE.sif  the image (default: $STAMPBATCH_IMAGE, else stampbatch.sif in the repository root)
#   --data DIR         bind DIR (candidate / training files) at the same path inside the container
#   --runs DIR         bind DIR (trained models, run directories) at the same path
#   --bind SPEC        any apptainer bind spec, SRC[:DEST[:ro]]; repeatable
#
# Environment: STAMPBATCH_BINDS (comma-separated bind specs, added to the flags above),
# STAMPBATCH_NV (auto | 1 | 0; auto adds --nv when `nvidia-smi` finds a GPU),
# STAMPBATCH_APPTAINER (the binary; default: apptainer, else singularity on PATH).
# Apptainer already binds $HOME, the current directory and /tmp; data elsewhere (/scratch,
# /lustre, /project ...) must be bound or the container cannot see it.
set -euo pipefail

prog=containers/run.sh
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

die() {
    printf '%s: error: %s\n' "$prog" "$*" >&2
    exit 2
}

usage() {
    sed -n '2,20s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

image=${STAMPBATCH_IMAGE:-$repo/stampbatch.sif}
binds=()
while (($#)); do
    case $1 in
    -h | --help) usage; exit 0 ;;
    --image) (($# >= 2)) || die "--image needs a value"; image=$2; shift ;;
    --data | --runs)
        (($# >= 2)) || die "$1 needs a directory"
        [[ -d $2 ]] || die "$1 $2 is not a directory"
        binds+=("$(cd "$2" && pwd)")
        shift
        ;;
    --bind | -B) (($# >= 2)) || die "$1 needs a value"; binds+=("$2"); shift ;;
    --) shift; break ;;
    -*) die "unknown option '$1' (put stampbatch's own options after --; see --help)" ;;
    *) break ;;
    esac
    shift
done
(($#)) || die "no stampbatch command given (e.g. $prog -- score cands.h5 --model runs/vgg6)"

if [[ -n ${STAMPBATCH_BINDS:-} ]]; then
    IFS=, read -r -a more <<<"$STAMPBATCH_BINDS"
    for spec in "${more[@]}"; do
        [[ -n $spec ]] && binds+=("$spec")
    done
fi

runtime=${STAMPBATCH_APPTAINER:-}
if [[ -z $runtime ]]; then
    runtime=$(command -v apptainer || command -v singularity || true)
fi
if [[ -z $runtime ]] || ! command -v "$runtime" >/dev/null 2>&1; then
    printf '%s: error: neither apptainer nor singularity is on PATH; install Apptainer or load its module (e.g. module load apptainer)\n' \
        "$prog" >&2
    exit 127
fi
[[ -f $image ]] || die "image $image does not exist (build it with containers/build.sh, or set STAMPBATCH_IMAGE)"

opts=()
case ${STAMPBATCH_NV:-auto} in
1 | yes | true) opts+=(--nv) ;;
0 | no | false) ;;
auto)
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        opts+=(--nv)
    fi
    ;;
*) die "STAMPBATCH_NV must be auto, 1 or 0, not '$STAMPBATCH_NV'" ;;
esac
for spec in "${binds[@]}"; do
    opts+=(--bind "$spec")
done

exec "$runtime" run "${opts[@]}" "$image" "$@"
