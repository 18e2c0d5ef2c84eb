#!/usr/bin/env bash
# Build the stampbatch container image with Apptainer (or SingularityCE).
#
#   containers/build.sh [--force] [--notest] [IMAGE.sif [DEF_FILE]] [-- EXTRA_BUILD_ARGS...]
#
#   IMAGE.sif  output image (default: stampbatch.sif in the repository root)
#   DEF_FILE   recipe (default: Singularity.def in the repository root)
#   --force    overwrite an existing image (apptainer otherwise asks)
#   --notest   skip the recipe's %test (simulate -> train one epoch -> score round trip)
#
# The binary is the first of `apptainer`, `singularity` found on PATH (override with
# STAMPBATCH_APPTAINER=/path/to/binary). Not root -> `--fakeroot` is added: that needs an
# entry for you in /etc/subuid (ask the admins) or a build node where it is set up.
# The build runs from the repository root, where the recipe's %files paths point.
# Big builds want space: APPTAINER_TMPDIR and APPTAINER_CACHEDIR (e.g. on /scratch).
set -euo pipefail

prog=containers/build.sh
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

die() {
    printf '%s: error: %s\n' "$prog" "$*" >&2
    exit 2
}

usage() {
    sed -n '2,16s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

# absolute PATH (relative ones are taken from where the script was called)
absolute() {
    case $1 in
    /*) printf '%s\n' "$1" ;;
    *) printf '%s/%s\n' "$PWD" "$1" ;;
    esac
}

flags=()
positional=()
extra=()
while (($#)); do
    case $1 in
    -h | --help) usage; exit 0 ;;
    --force) flags+=(--force) ;;
    --notest) flags+=(--notest) ;;
    --) shift; extra=("$@"); break ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *) positional+=("$1") ;;
    esac
    shift
done
((${#positional[@]} <= 2)) || die "too many arguments: ${positional[*]} (see --help)"

image=$(absolute "${positional[0]:-$repo/stampbatch.sif}")
def=$(absolute "${positional[1]:-$repo/Singularity.def}")
[[ -f $def ]] || die "recipe $def does not exist"
[[ -d $(dirname "$image") ]] || die "directory $(dirname "$image") for the image does not exist"

runtime=${STAMPBATCH_APPTAINER:-}
if [[ -z $runtime ]]; then
    runtime=$(command -v apptainer || command -v singularity || true)
fi
if [[ -z $runtime ]] || ! command -v "$runtime" >/dev/null 2>&1; then
    printf '%s: error: neither apptainer nor singularity is on PATH; install Apptainer or load its module (e.g. module load apptainer), or build where it exists\n' \
        "$prog" >&2
    exit 127
fi

if [[ $(id -u) != 0 ]]; then
    flags+=(--fakeroot)
fi

cd "$repo"
cmd=("$runtime" build "${flags[@]}" "${extra[@]}" "$image" "$def")
printf '+ (cd %q &&%s)\n' "$repo" "$(printf ' %q' "${cmd[@]}")" >&2
exec "${cmd[@]}"
