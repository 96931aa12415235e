#!/usr/bin/env bash
# bench-merge.sh - time qimg's merges (commit, pull) against qemu-img's on fresh copies of
# the same three-layer backing chain (built by scripts/mkchain.sh), next to a floor:
# the same number of data bytes written durably by four parallel O_DIRECT dd writers.
#
# Usage: scripts/bench-merge.sh [-n RUNS] [-k] [--cold] [SCALE...]
#
#   SCALE...  chain sizes in GiB, each an integer >= 1 (default: 1).
#             `scripts/bench-merge.sh 1 4` benches the small and the larger chain.
#   -n RUNS   timed runs per tool, operation and scale (default 3, at least 3); medians.
#   -k        keep the work directory (chain, logs) instead of deleting it.
#   --cold    after the warm table, the same again with the chain copy's pages evicted
#             from the page cache before each run (sync, then posix_fadvise DONTNEED on
#             each file; nothing system-wide is dropped or changed).
#
# Operations (each tool runs in the copy's directory):
#   commit-top   qemu-img commit -d top.qcow2               qimg commit -d top.qcow2
#   commit-base  qemu-img commit -b base.qcow2 top.qcow2    qimg commit -b base.qcow2 top.qcow2
#   pull-all     qemu-img rebase -b '' top.qcow2            qimg pull top.qcow2
#   pull-base    qemu-img rebase -b base.qcow2 -F qcow2 top qimg pull -b base.qcow2 top.qcow2
#
# Environment:
#   QIMG       qimg binary; when unset the script builds `cargo build --release --example
#              qimg` and uses target/release/examples/qimg
#   TOUCH_GIB  GiB of memory a throwaway process touches before every timed run (default 3)
#   TMPDIR     where the work directory goes (SCALE 4 needs ~10 GiB free). On a file
#              system that shares extents qimg's merges copy data by reflink (see
#              ops::StorageCopy); to measure that here, as root, with xfsprogs:
#                truncate -s 14G /work/xfs.img && mkfs.xfs -q -m reflink=1 /work/xfs.img
#                mkdir -p /mnt/xfs && mount -o loop /work/xfs.img /mnt/xfs
#                TMPDIR=/mnt/xfs scripts/bench-merge.sh --cold 1 4
#
# Method: per scale, one chain is built once. Before every timed run the chain is copied
# afresh (cp --sparse=always, then sync so no dirty page of the copy is left for the tool
# to write back; not timed), and a throwaway process touches TOUCH_GIB of memory (as in
# bench-convert.sh: first-touched memory is expensive on these VMs). Runs are interleaved
# and the order alternates each round. After the first round of each operation qimg's
# result must compare equal to qemu-img's (qemu-img compare of the top image and of the
# image written into, qemu-img check of the latter) or the script fails. The bytes an
# operation must copy come from `qimg ... --dry-run` on the pristine chain.
# The floor writes that many bytes (rounded up to 16 MiB) from /dev/zero into a new file
# with four `dd oflag=direct bs=4M conv=notrunc,fsync` writers on disjoint quarters.
# Cold, a merge must also read its data from the disk: the copy floor reads that many
# bytes of a file that is not in the page cache and writes them durably, with four `dd
# iflag=direct oflag=direct bs=4M conv=notrunc,fsync` copiers on disjoint quarters. Where
# reads and writes share the disk's bandwidth it takes about twice the floor's time.
#
# Output (stdout): one table per mode (warm, then cold with --cold), one row per scale and
# operation:
#   data_mib       bytes of data the operation copies
#   qemu_s qimg_s  median wall seconds; speedup = qemu_s / qimg_s (> 1: qimg faster)
#   floor_s        median seconds of the floor for the same bytes
#   qemu_floor qimg_floor  each tool's throughput as a fraction of the floor's (floor_s / s)
#   qemu_rss qimg_rss      peak RSS in MiB over the runs (GNU time's %M, as `time -v`)
#   copy_s qemu_copy qimg_copy  (cold only) median seconds of the copy floor, and each
#                          tool's throughput as a fraction of it
# Progress goes to stderr.
set -euo pipefail

usage() {
	sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
	exit 0
}
usage_error() {
	echo "bench-merge.sh: $*" >&2
	echo "usage: scripts/bench-merge.sh [-n RUNS] [-k] [--cold] [SCALE...]   (-h for help)" >&2
	exit 2
}

runs=3
keep=0
cold=0
scales=()
while [ $# -gt 0 ]; do
	case $1 in
	-n) [ $# -ge 2 ] || usage_error "-n needs a value"; runs=$2; shift 2 ;;
	-n*) runs=${1#-n}; shift ;;
	-k) keep=1; shift ;;
	--cold) cold=1; shift ;;
	-h | --help) usage ;;
	-*) usage_error "unknown option $1" ;;
	*) scales+=("$1"); shift ;;
	esac
done
[ ${#scales[@]} -gt 0 ] || scales=(1)
case $runs in '' | *[!0-9]*) usage_error "-n needs an integer: $runs" ;; esac
[ "$runs" -ge 3 ] || usage_error "-n must be at least 3"
for s in "${scales[@]}"; do
	case $s in '' | *[!0-9]* | 0) usage_error "SCALE must be an integer >= 1: $s" ;; esac
done

root=$(cd "$(dirname "$0")/.." && pwd)
mkchain=$root/scripts/mkchain.sh
bench_name=bench-merge.sh
# shellcheck source=scripts/bench-lib.sh
source "$root/scripts/bench-lib.sh"

# The command line of operation OP for TOOL (run inside the chain copy).
command_of() {
	local op=$1 tool=$2
	case $op/$tool in
	commit-top/qemu-img) echo "qemu-img commit -q -d top.qcow2" ;;
	commit-top/qimg) echo "$QIMG commit -q -d top.qcow2" ;;
	commit-base/qemu-img) echo "qemu-img commit -q -b base.qcow2 top.qcow2" ;;
	commit-base/qimg) echo "$QIMG commit -q -b base.qcow2 top.qcow2" ;;
	pull-all/qemu-img) echo "qemu-img rebase -q -b '' top.qcow2" ;;
	pull-all/qimg) echo "$QIMG pull top.qcow2" ;;
	pull-base/qemu-img) echo "qemu-img rebase -q -b base.qcow2 -F qcow2 top.qcow2" ;;
	pull-base/qimg) echo "$QIMG pull -b base.qcow2 top.qcow2" ;;
	esac
}
# The qimg dry run that counts OP's bytes, and the image OP writes into.
dry_run_of() {
	case $1 in
	commit-top) echo "commit --dry-run top.qcow2" ;;
	commit-base) echo "commit --dry-run -b base.qcow2 top.qcow2" ;;
	pull-all) echo "pull --dry-run top.qcow2" ;;
	pull-base) echo "pull --dry-run -b base.qcow2 top.qcow2" ;;
	esac
}
destination_of() {
	case $1 in
	commit-top) echo mid.qcow2 ;;
	commit-base) echo base.qcow2 ;;
	pull-*) echo top.qcow2 ;;
	esac
}
ops=(commit-top commit-base pull-all pull-base)

# fresh DIR: a clean copy of the chain in DIR, written back to disk; evicted when cold.
fresh() {
	local dir=$1 f
	rm -rf "$dir"
	mkdir -p "$dir"
	for f in base.qcow2 mid.qcow2 top.qcow2; do
		cp --sparse=always "$chain/$f" "$dir/$f"
	done
	sync
	if [ "$mode" = cold ]; then evict "$dir"/*.qcow2; fi
}


modes=(warm)
[ "$cold" = 1 ] && modes+=(cold)
declare -A data_bytes=()
for scale in "${scales[@]}"; do
	chain=$work/chain$scale
	log "scale $scale: building the chain in $chain"
	"$mkchain" "$chain" "$scale" >&2
	for op in "${ops[@]}"; do
		# shellcheck disable=SC2046 # the dry run's words are its arguments
		data_bytes[$scale.$op]=$(cd "$chain" && "$QIMG" $(dry_run_of "$op") | awk '/data bytes:/ { print $3 }')
		log "scale $scale: $op copies ${data_bytes[$scale.$op]} data bytes"
	done
	for mode in "${modes[@]}"; do
		for op in "${ops[@]}"; do
			key=$mode.$scale.$op
			for ((i = 1; i <= runs; i++)); do
				if ((i % 2)); then order=(qemu-img qimg floor); else order=(qimg qemu-img floor); fi
				[ "$mode" = cold ] && order+=(copy)
				for tool in "${order[@]}"; do
					log "$mode scale $scale $op: run $i/$runs: $tool"
					if [ "$tool" = floor ]; then
						floor "${data_bytes[$scale.$op]}"
						continue
					fi
					if [ "$tool" = copy ]; then
						copy_floor "${data_bytes[$scale.$op]}"
						continue
					fi
					fresh "$work/run"
					timed "$tool" "$op" "$work/run"
					if [ "$i" = 1 ]; then
						rm -rf "$work/first.$tool"
						mv "$work/run" "$work/first.$tool"
					fi
				done
				if [ "$i" = 1 ]; then
					verify "$op"
					rm -rf "$work/first.qimg" "$work/first.qemu-img"
				fi
			done
		done
	done
	rm -rf "$chain" "$work/run" "$work/source.bin"
done

for mode in "${modes[@]}"; do
	echo "== $mode page cache ($runs runs each, medians)"
	printf "%-6s %-12s %9s %8s %8s %8s %8s %10s %10s %9s %9s" \
		scale op data_mib qemu_s qimg_s speedup floor_s qemu_floor qimg_floor qemu_rss qimg_rss
	if [ "$mode" = cold ]; then printf " %7s %9s %9s" copy_s qemu_copy qimg_copy; fi
	echo
	for scale in "${scales[@]}"; do
		for op in "${ops[@]}"; do
			base=$work/$mode.$scale.$op
			q=$(cut -d' ' -f1 "$base.qemu-img" | median)
			m=$(cut -d' ' -f1 "$base.qimg" | median)
			f=$(median <"$base.floor")
			qr=$(cut -d' ' -f4 "$base.qemu-img" | peak_mib)
			mr=$(cut -d' ' -f4 "$base.qimg" | peak_mib)
			awk -v s="$scale" -v op="$op" -v d="${data_bytes[$scale.$op]}" -v q="$q" -v m="$m" \
				-v f="$f" -v qr="$qr" -v mr="$mr" 'function div(a, b) { return b > 0 ? sprintf("%.2f", a / b) : "inf" }
				BEGIN { printf "%-6s %-12s %9.0f %8.2f %8.2f %8s %8.2f %10s %10s %9s %9s",
					s, op, d / 1048576, q, m, div(q, m), f, div(f, q), div(f, m), qr, mr }'
			if [ "$mode" = cold ]; then
				c=$(median <"$base.copy")
				awk -v q="$q" -v m="$m" -v c="$c" 'function div(a, b) { return b > 0 ? sprintf("%.2f", a / b) : "inf" }
					BEGIN { printf " %7.2f %9s %9s", c, div(c, q), div(c, m) }'
			fi
			echo
		done
	done
done
