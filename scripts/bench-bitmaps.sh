#!/usr/bin/env bash
# bench-bitmaps.sh - the cost of keeping persistent bitmaps, qimg against qemu-img on
# copies of the same image in one run:
#
#   roundtrip  `bitmap --enable IMG b` on a 1 TiB image whose bitmap `b` (64 KiB
#              granularity, 2 MiB of bits) has scattered dirty granules: open for
#              writing (load, mark in use), enable, close (store): the open/close cost
#              of a bitmap over a big disk.
#   writes     `io` of 2000 scattered 4 KiB writes into the same image with `b` enabled
#              (each write marks it; the bitmap is stored on close).
#
# Usage: scripts/bench-bitmaps.sh [-n RUNS]     (RUNS >= 3, default 5)
#
# Method: the image is built once (qemu-img, qemu-io); before every timed run it is copied
# afresh (not timed) and a throwaway process touches TOUCH_GIB (default 1) GiB of memory;
# qimg and qemu-img alternate which goes first. After each run both copies must list the
# same bitmaps and pass qemu-img check, or the script fails. Prints the median seconds of
# each and the ratio qimg/qemu-img (below 1: qimg is faster).
# Environment: QIMG (a built qimg; default: cargo build --release --example qimg),
# TMPDIR, TOUCH_GIB.
set -euo pipefail

runs=5
if [ "${1:-}" = "-n" ]; then runs=$2; shift 2; fi
case $runs in '' | *[!0-9]*) echo "bench-bitmaps.sh: -n needs an integer" >&2; exit 2 ;; esac
[ "$runs" -ge 3 ] || { echo "bench-bitmaps.sh: -n must be at least 3" >&2; exit 2; }

root=$(cd "$(dirname "$0")/.." && pwd)
log() { echo "bench-bitmaps.sh: $*" >&2; }
if [ -z "${QIMG:-}" ]; then
	log "building qimg"
	(cd "$root" && cargo build --release --example qimg >&2)
	QIMG=$root/target/release/examples/qimg
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/bench-bitmaps.XXXXXX")
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT TERM

log "building a 1 TiB image with a bitmap"
img=$work/img.qcow2
qemu-img create -q -f qcow2 "$img" 1T
qemu-img bitmap --add -g 64k "$img" b
# 2000 scattered writes, deterministic (an LCG over 4 KiB blocks of the disk).
writes=$work/writes
x=12345
: >"$writes"
for _ in $(seq 2000); do
	x=$(( (x * 1103515245 + 12345) % 2147483648 ))
	echo "write -P 7 $(( (x % 268435456) * 4096 )) 4k" >>"$writes"
done
args=()
while read -r c; do args+=(-c "$c"); done <"$writes"
qemu-io -f qcow2 "${args[@]}" "$img" >/dev/null
qemu-img bitmap --disable "$img" b

touch_memory() {
	python3 -c "b = bytearray(${TOUCH_GIB:-1} << 30); b[::4096] = b'x' * len(b[::4096])"
}

# timed TOOL CASE: seconds of one run on a fresh copy.
timed() {
	local tool=$1 case=$2 copy=$work/$1.qcow2
	cp --sparse=always "$img" "$copy"
	sync
	touch_memory
	local start end
	start=$(date +%s.%N)
	case $case in
	roundtrip)
		if [ "$tool" = qimg ]; then "$QIMG" bitmap --enable "$copy" b; else qemu-img bitmap --enable "$copy" b; fi
		;;
	writes)
		if [ "$tool" = qimg ]; then
			"$QIMG" bitmap --enable "$copy" b
			start=$(date +%s.%N)
			"$QIMG" io -f qcow2 "${args[@]}" "$copy" >/dev/null
		else
			qemu-img bitmap --enable "$copy" b
			start=$(date +%s.%N)
			qemu-io -f qcow2 "${args[@]}" "$copy" >/dev/null
		fi
		;;
	esac
	end=$(date +%s.%N)
	echo "$end - $start" | bc
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

printf '%-10s %10s %10s %8s\n' case qemu-img qimg ratio
for case in roundtrip writes; do
	q=() o=()
	for i in $(seq "$runs"); do
		if [ $((i % 2)) = 1 ]; then
			q+=("$(timed qemu-img $case)")
			o+=("$(timed qimg $case)")
		else
			o+=("$(timed qimg $case)")
			q+=("$(timed qemu-img $case)")
		fi
		a=$(qemu-img info --output=json "$work/qemu-img.qcow2" | python3 -c 'import json,sys; print(json.load(sys.stdin)["format-specific"]["data"]["bitmaps"])')
		b=$(qemu-img info --output=json "$work/qimg.qcow2" | python3 -c 'import json,sys; print(json.load(sys.stdin)["format-specific"]["data"]["bitmaps"])')
		[ "$a" = "$b" ] || { log "$case: bitmap lists differ: $a / $b"; exit 1; }
		qemu-img check -q "$work/qimg.qcow2" || { log "$case: qimg's copy fails qemu-img check"; exit 1; }
	done
	qm=$(printf '%s\n' "${q[@]}" | median)
	om=$(printf '%s\n' "${o[@]}" | median)
	printf '%-10s %10.3f %10.3f %8.2f\n' "$case" "$qm" "$om" "$(echo "$om / $qm" | bc -l)"
done
