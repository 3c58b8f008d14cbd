# shellcheck shell=bash
# Shared by the bench/*.sh scripts (sourced, not run). Each script: `set -euo pipefail`,
# then `. "$(dirname "$0")/lib.sh"`, which goes to the repository root, builds the
# release binary as users install it (scripts/build: the static musl build on Linux)
# and sets:
#   bin       that chan-run
#   true_bin  the absolute path of `true` (so no side pays a PATH search)
#   QUICK     1 for a short smoke run (fewer rounds), else 0
# and provides:
#   mkwork VAR BASE NAME  sets VAR to a fresh directory under BASE, removed on exit
#   need CMD PACKAGE    apt-get install PACKAGE when CMD is missing
#   record JSON         append one result line to $BENCH_RESULTS (run-all.sh reads them)
#   fstype DIR          the filesystem type of DIR (tmpfs, ext2/ext3, ...)
# shellcheck disable=SC2034 # the variables are for the scripts that source this
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
work= # set by `mkwork work ...`
QUICK=${QUICK:-0}
bin=${BENCH_BIN:-$(scripts/build)}
true_bin=$(type -P true)
bench_dir=$PWD/bench
_bench_work=()
_bench_cleanup() {
  local d
  for d in "${_bench_work[@]}"; do rm -rf "$d"; done
}
trap _bench_cleanup EXIT
mkwork() { # mkwork VAR BASE NAME
  local d
  d=$(mktemp -d "$2/chan-run-$3.XXXXXX")
  _bench_work+=("$d")
  printf -v "$1" %s "$d"
}
need() { # need CMD PACKAGE
  command -v "$1" >/dev/null && return
  echo "installing $2 (for $1)" >&2
  { apt-get update -qq && apt-get install -y -qq "$2"; } >/dev/null
}
record() { # record JSON-OBJECT
  if [ -n "${BENCH_RESULTS:-}" ]; then echo "$1" >>"$BENCH_RESULTS"; fi
}
fstype() { findmnt -n -o FSTYPE -T "$1" 2>/dev/null | head -1 | grep . || stat -f -c %T "$1"; }
