#!/usr/bin/env bash
# bench-remove.sh - time `qimg remove` of the middle layer of the standard 3-layer chain
# against the merge it amounts to, on fresh copies of the same chain in one run:
#
#   down  remove mid.qcow2 (base's only user: its data goes down)  vs  qimg commit --top mid.qcow2 top.qcow2; rm mid.qcow2
#   up    remove mid.qcow2 beside a sibling on base (data goes up)  vs  qimg pull -b base.qcow2 top.qcow2; rm mid.qcow2
#
# (remove deletes the layer, and deleting a file of hundreds of MiB takes a good part of
# a second on ext4, so the merge is timed with the same deletion.)
#
# Usage: scripts/bench-remove.sh [-n RUNS] [SCALE]     (SCALE GiB, default 1; RUNS >= 3, default 3)
#
# Method: the chain is built once by scripts/mkchain.sh; before every timed run it is
# copied afresh (cp --sparse=always, sync; not timed) and a throwaway process touches
# TOUCH_GIB (default 3) GiB of memory; the two commands alternate which goes first. After
# each remove, top.qcow2 must compare equal to the pristine chain's top (qemu-img compare)
# or the script fails. Prints, per case, the median seconds of each and their ratio
# (remove_s / merge_s: at most about 1 means remove costs no more than the merge).
# KEEP=1 compares `remove --keep` with the merge alone (no deletion on either side).
# Environment: QIMG (a built qimg;
# default: cargo build --release --example qimg), TMPDIR, TOUCH_GIB.
set -euo pipefail

runs=3
if [ "${1:-}" = "-n" ]; then runs=$2; shift 2; fi
scale=${1:-1}
case $runs in '' | *[!0-9]*) echo "bench-remove.sh: -n needs an integer" >&2; exit 2 ;; esac
[ "$runs" -ge 3 ] || { echo "bench-remove.sh: -n must be at least 3" >&2; exit 2; }
case $scale in '' | *[!0-9]* | 0) echo "bench-remove.sh: SCALE must be an integer >= 1" >&2; exit 2 ;; esac

root=$(cd "$(dirname "$0")/.." && pwd)
mkchain=$root/scripts/mkchain.sh
log() { echo "bench-remove.sh: $*" >&2; }
if [ -z "${QIMG:-}" ]; then
	log "building qimg"
	(cd "$root" && cargo build --release --example qimg >&2)
	QIMG=$root/target/release/examples/qimg
fi
QIMG=$(cd "$(dirname "$QIMG")" && pwd)/$(basename "$QIMG")

work=$(mktemp -d "${TMPDIR:-/tmp}/bench-remove.XXXXXX")
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT TERM

log "building a ${scale} GiB chain"
bash "$mkchain" "$work/chain" "$scale" >&2
qemu-img convert -O raw "$work/chain/top.qcow2" "$work/top.raw"

# fresh CASE: a copy of the chain in $work/run (with a sibling on base for `up`).
fresh() {
	rm -rf "$work/run"
	mkdir "$work/run"
	for f in base.qcow2 mid.qcow2 top.qcow2; do
		cp --sparse=always "$work/chain/$f" "$work/run/$f"
	done
	if [ "$1" = up ]; then
		qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$work/run/sibling.qcow2"
	fi
	sync
	python3 -c "b = bytearray(${TOUCH_GIB:-3} << 30)"
}

# timed CMD...: runs CMD in $work/run, prints its wall seconds.
timed() {
	local start end
	start=$(date +%s.%N)
	(cd "$work/run" && "$@" >/dev/null)
	end=$(date +%s.%N)
	echo "$end - $start" | bc
}

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

rm_mid="&& rm mid.qcow2"
[ -z "${KEEP:-}" ] || rm_mid=""
printf '%-6s %-8s %10s %10s %8s\n' case scale remove_s merge_s ratio
for case in down up; do
	removes=()
	merges=()
	for i in $(seq "$runs"); do
		for order in $( [ $((i % 2)) = 1 ] && echo "remove merge" || echo "merge remove"); do
			fresh "$case"
			if [ "$order" = remove ]; then
				log "$case run $i: remove"
				removes+=("$(timed "$QIMG" remove -q ${KEEP:+--keep} mid.qcow2)")
				qemu-img compare -q "$work/run/top.qcow2" "$work/top.raw" ||
					{ log "$case: top.qcow2 changed"; exit 1; }
			elif [ "$case" = down ]; then
				log "$case run $i: commit --top"
				merges+=("$(timed bash -c "'$QIMG' commit -q --top mid.qcow2 top.qcow2 $rm_mid")")
			else
				log "$case run $i: pull -b"
				merges+=("$(timed bash -c "'$QIMG' pull -q -b base.qcow2 top.qcow2 $rm_mid")")
			fi
		done
	done
	r=$(printf '%s\n' "${removes[@]}" | median)
	m=$(printf '%s\n' "${merges[@]}" | median)
	printf '%-6s %-8s %10.2f %10.2f %8.2f\n' "$case" "$scale" "$r" "$m" "$(echo "$r / $m" | bc -l)"
done
