#!/usr/bin/env bash
# bench-check.sh - time `qimg check` against `qemu-img check` on the three images of the
# scripts/mkchain.sh chain, and snapshot create and delete on (copies of) its top image.
#
# Usage: scripts/bench-check.sh [-n RUNS] [-k] [SCALE]
#
#   SCALE     chain size in GiB, an integer >= 1 (default: 4).
#   -n RUNS   timed runs per tool and operation (default 5, at least 3); medians.
#   -k        keep the work directory.
#
# Operations:
#   check-base/mid/top  qemu-img check IMG           qimg check IMG      (read-only, warm)
#   snapshot-create     qemu-img snapshot -c s top   qimg snapshot -c s top  (fresh copy)
#   snapshot-delete     qemu-img snapshot -d s top   qimg snapshot -d s top  (fresh copy
#                       holding a snapshot taken by qemu-img, the top written after it)
#
# Environment: QIMG (qimg
# binary; built with `cargo build --release --example qimg` when unset), TOUCH_GIB (memory
# a throwaway process touches before each timed run, default 3), TMPDIR.
#
# Method: the chain is built once. Runs are interleaved, their order alternating each
# round; before each timed run a throwaway process touches TOUCH_GIB of memory (first-touch
# of memory is expensive on these VMs), and snapshot runs get a fresh copy (cp, sync; not
# timed). After the first round, both tools' results must pass `qemu-img check`.
#
# Output (stdout): one row per operation: median wall seconds of each tool, speedup
# (qemu_s / qimg_s, > 1: qimg faster), peak RSS in MiB (GNU time's %M).
set -euo pipefail

usage() {
	sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
	exit 0
}
usage_error() {
	echo "bench-check.sh: $*" >&2
	echo "usage: scripts/bench-check.sh [-n RUNS] [-k] [SCALE]   (-h for help)" >&2
	exit 2
}

runs=5
keep=0
scale=4
while [ $# -gt 0 ]; do
	case $1 in
	-n) [ $# -ge 2 ] || usage_error "-n needs a value"; runs=$2; shift 2 ;;
	-k) keep=1; shift ;;
	-h | --help) usage ;;
	-*) usage_error "unknown option $1" ;;
	*) scale=$1; shift ;;
	esac
done
case $runs in '' | *[!0-9]*) usage_error "-n needs an integer: $runs" ;; esac
[ "$runs" -ge 3 ] || usage_error "-n must be at least 3"
case $scale in '' | *[!0-9]* | 0) usage_error "SCALE must be an integer >= 1: $scale" ;; esac

root=$(cd "$(dirname "$0")/.." && pwd)
mkchain=$root/scripts/mkchain.sh
touch_gib=${TOUCH_GIB:-3}
log() { echo "bench-check.sh: $*" >&2; }
die() { log "$*"; exit 1; }
for tool in qemu-img python3; do
	command -v "$tool" >/dev/null || die "$tool not found"
done
if [ ! -x /usr/bin/time ]; then
	log "/usr/bin/time missing, installing the 'time' package"
	apt-get install -y time >&2 || die "could not install 'time'"
fi
if [ -z "${QIMG:-}" ]; then
	log "building qimg (cargo build --release --example qimg)"
	(cd "$root" && cargo build --release --example qimg >&2)
	QIMG=$root/target/release/examples/qimg
fi
[ -x "$QIMG" ] || die "qimg not executable: $QIMG"
QIMG=$(cd "$(dirname "$QIMG")" && pwd)/$(basename "$QIMG")

work=$(mktemp -d "${TMPDIR:-/tmp}/bench-check.XXXXXX")
cleanup() { if [ "$keep" = 1 ]; then log "kept $work"; else rm -rf "$work"; fi; }
trap cleanup EXIT
trap 'exit 130' INT TERM

touch_memory() {
	[ "$touch_gib" -gt 0 ] || return 0
	python3 -c "b = bytearray($touch_gib << 30)"
}

chain=$work/chain
log "building the scale-$scale chain"
bash "$mkchain" "$chain" "$scale" >&2
# The image snapshot-delete starts from: top with a snapshot, written after it.
cp --sparse=always "$chain/top.qcow2" "$chain/top-snap.qcow2"
qemu-img snapshot -c s "$chain/top-snap.qcow2"
qemu-io -c "write -P 7 0 256M" "$chain/top-snap.qcow2" >/dev/null

command_of() {
	local op=$1 tool=$2 bin
	if [ "$tool" = qimg ]; then bin=$QIMG; else bin=qemu-img; fi
	case $op in
	check-*) echo "$bin check $chain/${op#check-}.qcow2" ;;
	snapshot-create) echo "$bin snapshot -c s $chain/run-top.qcow2" ;;
	snapshot-delete) echo "$bin snapshot -d s $chain/run-top.qcow2" ;;
	esac
}

prepare() {
	case $1 in
	snapshot-create) cp --sparse=always "$chain/top.qcow2" "$chain/run-top.qcow2"; sync ;;
	snapshot-delete) cp --sparse=always "$chain/top-snap.qcow2" "$chain/run-top.qcow2"; sync ;;
	esac
}

# timed OP TOOL: append "elapsed_us maxrss_kib" to $work/OP.TOOL; a check's exit code is
# its verdict, not a failure (the chain images are clean: anything but 0 fails).
timed() {
	local op=$1 tool=$2 t=$work/time.out cmd start end
	cmd=$(command_of "$op" "$tool")
	prepare "$op"
	touch_memory
	start=$(date +%s%N)
	if ! /usr/bin/time -f '%M' -o "$t" $cmd >"$work/$tool.log" 2>&1; then
		log "$tool failed: $cmd"
		cat "$work/$tool.log" >&2
		exit 1
	fi
	end=$(date +%s%N)
	# GNU time's %e has 10 ms steps; these runs take milliseconds.
	echo "$(((end - start) / 1000)) $(tail -n 1 "$t")" >>"$work/$op.$tool"
	if [ "$op" != "${op#snapshot-}" ]; then
		qemu-img check -q "$chain/run-top.qcow2" || die "$tool $op left an image qemu-img check rejects"
	fi
}

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

ops=(check-base check-mid check-top snapshot-create snapshot-delete)
for op in "${ops[@]}"; do
	log "$op: $runs rounds"
	for ((r = 0; r < runs; r++)); do
		if ((r % 2 == 0)); then order="qemu-img qimg"; else order="qimg qemu-img"; fi
		for tool in $order; do timed "$op" "$tool"; done
	done
done

printf '%-16s %8s %8s %8s %9s %9s\n' op qemu_s qimg_s speedup qemu_rss qimg_rss
for op in "${ops[@]}"; do
	q=$(cut -d' ' -f1 "$work/$op.qemu-img" | median)
	m=$(cut -d' ' -f1 "$work/$op.qimg" | median)
	qr=$(cut -d' ' -f2 "$work/$op.qemu-img" | sort -n | tail -1)
	mr=$(cut -d' ' -f2 "$work/$op.qimg" | sort -n | tail -1)
	awk -v op="$op" -v q="$q" -v m="$m" -v qr="$qr" -v mr="$mr" 'BEGIN {
		s = (m > 0) ? q / m : 0
		printf "%-16s %8.4f %8.4f %8.2f %9.1f %9.1f\n", op, q / 1e6, m / 1e6, s, qr / 1024, mr / 1024
	}'
done
