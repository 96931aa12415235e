#!/usr/bin/env bash
# bench-io.sh - `qimg bench` against `qemu-img bench` on copies of the same images in one
# run: the engine's request path (open, lookup, read/write, allocation) measured by the
# same request streams.
#
#   overwrite   -w into a fully allocated 1 GiB image (in-place writes)
#   allocate    -w into an empty 1 GiB image, one request per 64 KiB cluster (allocating)
#   read        reads of the fully allocated image
#   chain-read  reads through the 3-layer chain of mkchain.sh (SCALE 1): data from every
#               layer, zeros, unallocated ranges
# each with 4 KiB and 64 KiB requests at depth 1 and 16. Scattered streams use qemu-img's
# step (-S 1M plus the request size: every request in another cluster); allocating ones
# step a cluster.
#
# Usage: scripts/bench-io.sh [-n RUNS]     (RUNS >= 3, default 3)
#
# Method: images are built once; writing cases get a fresh copy before every run (not
# timed); a throwaway process touches TOUCH_GIB (default 1) GiB of memory before each
# run; the tools alternate which goes first. The time is the one each tool reports ("Run
# completed in S seconds"). Prints the median seconds of each and the speedup
# (qemu-img / qimg: above 1, qimg is faster). Cache mode: the default (writeback) for
# both. Environment: QIMG, TMPDIR,
# TOUCH_GIB.
set -euo pipefail

runs=3
if [ "${1:-}" = "-n" ]; then runs=$2; shift 2; fi
case $runs in '' | *[!0-9]*) echo "bench-io.sh: -n needs an integer" >&2; exit 2 ;; esac
[ "$runs" -ge 3 ] || { echo "bench-io.sh: -n must be at least 3" >&2; exit 2; }

root=$(cd "$(dirname "$0")/.." && pwd)
mkchain=$root/scripts/mkchain.sh
log() { echo "bench-io.sh: $*" >&2; }
if [ -z "${QIMG:-}" ]; then
	log "building qimg"
	(cd "$root" && cargo build --release --example qimg >&2)
	QIMG=$root/target/release/examples/qimg
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/bench-io.XXXXXX")
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT TERM

log "building the images"
qemu-img create -q -f qcow2 "$work/empty.qcow2" 1G
qemu-img create -q -f qcow2 "$work/full.qcow2" 1G
qemu-io -f qcow2 -c "write -P 7 0 1G" "$work/full.qcow2" >/dev/null
have_chain=0
if [ -f "$mkchain" ]; then
	bash "$mkchain" "$work/chain" 1 >&2
	have_chain=1
else
	log "skipping chain-read: $mkchain not found"
fi

touch_memory() {
	python3 -c "b = bytearray(${TOUCH_GIB:-1} << 30); b[::4096] = b'x' * len(b[::4096])"
}

# one TOOL IMAGE ARGS...: seconds reported by one run (writing runs on a fresh copy).
one() {
	local tool=$1 image=$2
	shift 2
	local target=$image
	case " $* " in *" -w "*)
		target=$work/run.qcow2
		cp --sparse=always "$image" "$target"
		;;
	esac
	sync
	touch_memory
	local bin=qemu-img
	[ "$tool" = qimg ] && bin=$QIMG
	"$bin" bench "$@" "$target" | sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p'
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

printf '%-22s %10s %10s %8s\n' case qemu-img qimg speedup
row() {
	local name=$1 image=$2
	shift 2
	local q=() o=()
	for i in $(seq "$runs"); do
		if [ $((i % 2)) = 1 ]; then
			q+=("$(one qemu-img "$image" "$@")")
			o+=("$(one qimg "$image" "$@")")
		else
			o+=("$(one qimg "$image" "$@")")
			q+=("$(one qemu-img "$image" "$@")")
		fi
	done
	local qm om
	qm=$(printf '%s\n' "${q[@]}" | median)
	om=$(printf '%s\n' "${o[@]}" | median)
	printf '%-22s %10.3f %10.3f %8.2f\n' "$name" "$qm" "$om" "$(echo "$qm / $om" | bc -l)"
}

for size in 4k 64k; do
	# 1 MiB plus one request: every request in another cluster, aligned to its size, so
	# that wrapping at the end never makes one cross it.
	scatter=$((1048576 + $([ "$size" = 4k ] && echo 4096 || echo 65536)))
	for depth in 1 16; do
		count=50000
		[ "$size" = 64k ] && count=10000
		row "overwrite $size d$depth" "$work/full.qcow2" -w -c "$count" -d "$depth" -s "$size" -S "$scatter"
		row "allocate $size d$depth" "$work/empty.qcow2" -w -c 16384 -d "$depth" -s "$size" -S 64k
		row "read $size d$depth" "$work/full.qcow2" -c "$count" -d "$depth" -s "$size" -S "$scatter"
		if [ "$have_chain" = 1 ]; then
			row "chain-read $size d$depth" "$work/chain/top.qcow2" -c "$count" -d "$depth" -s "$size" -S "$scatter"
		fi
	done
done
