#!/usr/bin/env bash
# bench-scale.sh - qimg's merges against qemu-img's equivalents on the workloads of
# scripts/mkworkload.sh (metadata-heavy, deep, big, compressed, extended L2), on fresh
# copies, interleaved, with medians, peak RSS, clusters per second and the floors of
# bench-merge.sh (whose method this script shares; read its header for the floors).
#
# Usage: scripts/bench-scale.sh [-n RUNS] [-k] [--cold] [--small] [WORKLOAD...]
#
#   WORKLOAD...  kinds of scripts/mkworkload.sh (default: meta4k meta64k deep128 deep500
#                compressed extl2 big).
#   -n RUNS      timed runs per tool and operation (default 3, at least 3); medians.
#   -k           keep the work directory.
#   --cold       also run everything with the copy's pages evicted before each run.
#   --small      a short form for CI: each workload with few writes per layer (big is
#                skipped unless named).
#
# Operations (run in the copy's directory; mid.qcow2 is the layer under top.qcow2):
#   commit-top   qemu-img commit -d top.qcow2                qimg commit -d top.qcow2
#   commit-base  qemu-img commit -b base.qcow2 top.qcow2     qimg commit -b base.qcow2 top.qcow2
#   commit-mid   qemu-img commit -b base.qcow2 mid.qcow2,    qimg commit --top mid.qcow2
#                then rebase -u -b base.qcow2 top.qcow2        -b base.qcow2 top.qcow2
#   pull-all     qemu-img rebase -b '' top.qcow2             qimg pull top.qcow2
#   pull-base    qemu-img rebase -b base.qcow2 top.qcow2     qimg pull -b base.qcow2 top.qcow2
#   rebase-base  (qemu-img's pull-base runs, not run again)  qimg rebase -b base.qcow2 top.qcow2
# After the first round of each operation qimg's result must equal qemu-img's (qemu-img
# compare of top.qcow2 and of the image written into, check of the latter, the same
# backing file) or the script fails.
#
# Output: one table per mode, one row per workload and operation: data_mib (what the
# merge copies, from qimg's --dry-run), clusters (data bytes / cluster size), median
# seconds of each tool and speedup (qemu_s / qimg_s), clusters per second of each
# (kcps: thousands), the floor's seconds and each tool's fraction of it, peak RSS (MiB);
# cold also the copy floor. Environment: QIMG, TOUCH_GIB (default 3), TMPDIR.
set -euo pipefail

usage() {
	sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
	exit 0
}
usage_error() {
	echo "bench-scale.sh: $*" >&2
	echo "usage: scripts/bench-scale.sh [-n RUNS] [-k] [--cold] [--small] [WORKLOAD...]   (-h for help)" >&2
	exit 2
}

runs=3
keep=0
cold=0
small=0
workloads=()
while [ $# -gt 0 ]; do
	case $1 in
	-n) [ $# -ge 2 ] || usage_error "-n needs a value"; runs=$2; shift 2 ;;
	-n*) runs=${1#-n}; shift ;;
	-k) keep=1; shift ;;
	--cold) cold=1; shift ;;
	--small) small=1; shift ;;
	-h | --help) usage ;;
	-*) usage_error "unknown option $1" ;;
	*) workloads+=("$1"); shift ;;
	esac
done
if [ ${#workloads[@]} -eq 0 ]; then
	workloads=(meta4k meta64k deep128 deep500 compressed extl2)
	[ "$small" = 1 ] || workloads+=(big)
fi
case $runs in '' | *[!0-9]*) usage_error "-n needs an integer: $runs" ;; esac
[ "$runs" -ge 3 ] || usage_error "-n must be at least 3"
for w in "${workloads[@]}"; do
	case $w in meta4k | meta64k | deep128 | deep500 | big | compressed | extl2) ;;
	*) usage_error "unknown workload: $w" ;; esac
done

root=$(cd "$(dirname "$0")/.." && pwd)
mkworkload=$root/scripts/mkworkload.sh
bench_name=bench-scale.sh
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
	commit-mid/qemu-img) echo "sh -c 'qemu-img commit -q -b base.qcow2 mid.qcow2 && qemu-img rebase -q -u -b base.qcow2 -F qcow2 top.qcow2'" ;;
	commit-mid/qimg) echo "$QIMG commit -q --top mid.qcow2 -b base.qcow2 top.qcow2" ;;
	pull-all/qemu-img) echo "qemu-img rebase -q -b '' top.qcow2" ;;
	pull-all/qimg) echo "$QIMG pull top.qcow2" ;;
	pull-base/qemu-img) echo "qemu-img rebase -q -b base.qcow2 -F qcow2 top.qcow2" ;;
	pull-base/qimg) echo "$QIMG pull -b base.qcow2 top.qcow2" ;;
	rebase-base/qimg) echo "$QIMG rebase -q -b base.qcow2 -F qcow2 top.qcow2" ;;
	esac
}
# The qimg dry run that counts OP's bytes, and the image OP writes into.
dry_run_of() {
	case $1 in
	commit-top) echo "commit --dry-run top.qcow2" ;;
	commit-base) echo "commit --dry-run -b base.qcow2 top.qcow2" ;;
	commit-mid) echo "commit --dry-run --top mid.qcow2 -b base.qcow2 top.qcow2" ;;
	pull-all) echo "pull --dry-run top.qcow2" ;;
	pull-base) echo "pull --dry-run -b base.qcow2 top.qcow2" ;;
	rebase-base) echo "rebase --dry-run -b base.qcow2 -F qcow2 top.qcow2" ;;
	esac
}
destination_of() {
	case $1 in
	commit-top) echo mid.qcow2 ;;
	commit-base | commit-mid) echo base.qcow2 ;;
	pull-* | rebase-*) echo top.qcow2 ;;
	esac
}
ops=(commit-top commit-base commit-mid pull-all pull-base rebase-base)

# fresh DIR: a clean copy of the chain in DIR, written back to disk; evicted when cold.
fresh() {
	local dir=$1 f
	rm -rf "$dir"
	mkdir -p "$dir"
	cp --sparse=always "$chain"/*.qcow2 "$dir/"
	sync
	if [ "$mode" = cold ]; then evict "$dir"/*.qcow2; fi
}


modes=(warm)
[ "$cold" = 1 ] && modes+=(cold)
declare -A data_bytes=() cluster_size=()
# Writes per layer in --small mode (mkworkload.sh's WRITES).
small_writes() {
	case $1 in
	meta4k | meta64k | extl2) echo 1000 ;;
	deep128) echo 8 ;;
	deep500) echo 2 ;;
	*) echo "" ;;
	esac
}
for workload in "${workloads[@]}"; do
	chain=$work/chain.$workload
	log "$workload: building the chain in $chain"
	writes=""
	[ "$small" = 1 ] && writes=$(small_writes "$workload")
	# shellcheck disable=SC2086 # an empty WRITES is no argument
	"$mkworkload" "$workload" "$chain" $writes >&2
	cluster_size[$workload]=$(qemu-img info --output=json "$chain/top.qcow2" | awk -F'[:,]' '/"cluster-size"/ { print $2 + 0; exit }')
	for op in "${ops[@]}"; do
		# shellcheck disable=SC2046 # the dry run's words are its arguments
		data_bytes[$workload.$op]=$(cd "$chain" && "$QIMG" $(dry_run_of "$op") | awk '/data bytes:/ { print $3 }')
		log "$workload: $op copies ${data_bytes[$workload.$op]} data bytes"
	done
	for mode in "${modes[@]}"; do
		for op in "${ops[@]}"; do
			key=$mode.$workload.$op
			for ((i = 1; i <= runs; i++)); do
				if ((i % 2)); then order=(qemu-img qimg floor); else order=(qimg qemu-img floor); fi
				[ "$mode" = cold ] && order+=(copy)
				for tool in "${order[@]}"; do
					# qemu-img's safe rebase is its pull-base: timed there, not again.
					[ "$op/$tool" = rebase-base/qemu-img ] && continue
					log "$mode $workload $op: run $i/$runs: $tool"
					case $tool in
					floor) floor "${data_bytes[$workload.$op]}" ;;
					copy) copy_floor "${data_bytes[$workload.$op]}" ;;
					*)
						fresh "$work/run"
						timed "$tool" "$op" "$work/run"
						if [ "$i" = 1 ]; then
							rm -rf "$work/first.$tool"
							mv "$work/run" "$work/first.$tool"
						fi
						;;
					esac
				done
				if [ "$i" = 1 ]; then
					if [ "$op" = rebase-base ]; then
						# Against qemu-img's pull-base result, kept for this.
						rm -rf "$work/first.qemu-img"
						mv "$work/pull-base.qemu-img" "$work/first.qemu-img"
					fi
					verify "$op"
					if [ "$op" = pull-base ]; then
						rm -rf "$work/pull-base.qemu-img"
						mv "$work/first.qemu-img" "$work/pull-base.qemu-img"
					fi
					rm -rf "$work/first.qimg" "$work/first.qemu-img"
				fi
			done
			if [ "$op" = rebase-base ]; then
				cp "$work/$mode.$workload.pull-base.qemu-img" "$work/$mode.$workload.$op.qemu-img"
			fi
		done
	done
	rm -rf "$chain" "$work/run" "$work/source.bin"
done

for mode in "${modes[@]}"; do
	echo "== $mode page cache ($runs runs each, medians)"
	printf "%-10s %-11s %8s %9s %8s %8s %7s %9s %9s %7s %10s %10s %8s %8s" \
		workload op data_mib clusters qemu_s qimg_s speedup qemu_kcps qimg_kcps floor_s \
		qemu_floor qimg_floor qemu_rss qimg_rss
	if [ "$mode" = cold ]; then printf " %7s %9s %9s" copy_s qemu_copy qimg_copy; fi
	echo
	for workload in "${workloads[@]}"; do
		for op in "${ops[@]}"; do
			base=$work/$mode.$workload.$op
			q=$(cut -d' ' -f1 "$base.qemu-img" | median)
			m=$(cut -d' ' -f1 "$base.qimg" | median)
			f=$(median <"$base.floor")
			qr=$(cut -d' ' -f4 "$base.qemu-img" | peak_mib)
			mr=$(cut -d' ' -f4 "$base.qimg" | peak_mib)
			awk -v w="$workload" -v op="$op" -v d="${data_bytes[$workload.$op]}" \
				-v cs="${cluster_size[$workload]}" -v q="$q" -v m="$m" -v f="$f" -v qr="$qr" \
				-v mr="$mr" 'function div(a, b) { return b > 0 ? sprintf("%.2f", a / b) : "inf" }
				BEGIN { c = d / cs
					printf "%-10s %-11s %8.0f %9.0f %8.2f %8.2f %7s %9s %9s %7.2f %10s %10s %8s %8s",
						w, op, d / 1048576, c, q, m, div(q, m), div(c / 1000, q), div(c / 1000, m),
						f, div(f, q), div(f, m), qr, mr }'
			if [ "$mode" = cold ]; then
				c=$(median <"$base.copy")
				awk -v q="$q" -v m="$m" -v c="$c" 'function div(a, b) { return b > 0 ? sprintf("%.2f", a / b) : "inf" }
					BEGIN { printf " %7.2f %9s %9s", c, div(c, q), div(c, m) }'
			fi
			echo
		done
	done
done
