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
touch_gib=${TOUCH_GIB:-3}
for tool in qemu-img python3 dd; do
	command -v "$tool" >/dev/null || { echo "bench-scale.sh: $tool not found" >&2; exit 1; }
done

log() { echo "bench-scale.sh: $*" >&2; }
die() { log "$*"; exit 1; }

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

work=$(mktemp -d "${TMPDIR:-/tmp}/bench-scale.XXXXXX")
cleanup() {
	if [ "$keep" = 1 ]; then log "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

touch_memory() {
	[ "$touch_gib" -gt 0 ] || return 0
	python3 -c "b = bytearray($touch_gib << 30)"
}

# evict FILE...: drop the files' clean pages from the page cache (after a sync).
evict() {
	sync
	python3 - "$@" <<-'EOF'
		import os, sys
		for name in sys.argv[1:]:
		    fd = os.open(name, os.O_RDONLY)
		    try:
		        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
		    finally:
		        os.close(fd)
	EOF
}

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

# timed TOOL OP DIR: run OP with TOOL in DIR (a fresh copy); append "elapsed user sys
# maxrss_kib" to $work/$mode.$workload.$op.$tool.
timed() {
	local tool=$1 op=$2 dir=$3 t=$work/time.out cmd
	cmd=$(command_of "$op" "$tool")
	touch_memory
	if ! (cd "$dir" && eval "/usr/bin/time -f '%e %U %S %M' -o '$t' $cmd" >"$work/$tool.log" 2>&1); then
		log "$tool failed: $cmd"
		cat "$work/$tool.log" >&2
		exit 1
	fi
	tail -n 1 "$t" >>"$work/$mode.$workload.$op.$tool"
}

# floor BYTES: four parallel O_DIRECT writers put BYTES (rounded up to 16 MiB) into a new
# file and fsync; append its elapsed seconds to $work/$mode.$workload.$op.floor.
floor() {
	local bytes=$1 out=$work/floor.bin blocks start end
	blocks=$(((bytes + (16 << 20) - 1) / (16 << 20))) # 4 MiB blocks per writer
	[ "$blocks" -gt 0 ] || blocks=1
	rm -f "$out"
	touch_memory
	start=$(date +%s.%N)
	for w in 0 1 2 3; do
		dd if=/dev/zero of="$out" bs=4M count="$blocks" seek=$((w * blocks)) \
			oflag=direct conv=notrunc,fsync status=none &
	done
	wait
	end=$(date +%s.%N)
	rm -f "$out"
	awk -v a="$start" -v b="$end" 'BEGIN { printf "%.3f\n", b - a }' >>"$work/$mode.$workload.$op.floor"
}

# copy_floor BYTES: four parallel O_DIRECT copiers read BYTES (rounded up to 16 MiB) of
# $work/source.bin (evicted first) and write them into a new file, then fsync; append the
# elapsed seconds to $work/$mode.$workload.$op.copy.
copy_floor() {
	local bytes=$1 out=$work/copy.bin blocks start end
	blocks=$(((bytes + (16 << 20) - 1) / (16 << 20)))
	[ "$blocks" -gt 0 ] || blocks=1
	if [ ! -f "$work/source.bin" ] || [ "$(stat -c %s "$work/source.bin")" -lt $((4 * blocks * (4 << 20))) ]; then
		dd if=/dev/urandom of="$work/source.bin" bs=4M count=$((4 * blocks)) status=none
	fi
	rm -f "$out"
	evict "$work/source.bin"
	touch_memory
	start=$(date +%s.%N)
	for w in 0 1 2 3; do
		dd if="$work/source.bin" of="$out" bs=4M count="$blocks" skip=$((w * blocks)) \
			seek=$((w * blocks)) iflag=direct oflag=direct conv=notrunc,fsync status=none &
	done
	wait
	end=$(date +%s.%N)
	rm -f "$out"
	awk -v a="$start" -v b="$end" 'BEGIN { printf "%.3f\n", b - a }' >>"$work/$mode.$workload.$op.copy"
}

# verify OP: qimg's result in $work/first.qimg equals qemu-img's in $work/first.qemu-img.
verify() {
	local op=$1 dst
	dst=$(destination_of "$op")
	for f in top.qcow2 "$dst"; do
		qemu-img compare -q "$work/first.qimg/$f" "$work/first.qemu-img/$f" ||
			die "$mode $workload $op: qimg's $f differs from qemu-img's"
	done
	qemu-img check -q "$work/first.qimg/$dst" || die "$mode $workload $op: qimg's $dst fails qemu-img check"
	local a b
	a=$(qemu-img info --output=json "$work/first.qimg/top.qcow2" | grep '"backing-filename"' || true)
	b=$(qemu-img info --output=json "$work/first.qemu-img/top.qcow2" | grep '"backing-filename"' || true)
	[ "$a" = "$b" ] || die "$mode $workload $op: backing files differ: qimg '$a', qemu-img '$b'"
	log "$mode $workload $op: qimg's result compares equal to qemu-img's"
}

median() { sort -g | awk '{ v[NR] = $1 } END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%.2f", m }'; }
peak_mib() { sort -g | tail -n 1 | awk '{ printf "%.0f", $1 / 1024 }'; }

python3 -c "b = bytearray($touch_gib << 30)" 2>/dev/null || die "cannot touch $touch_gib GiB (set TOUCH_GIB)"
log "touching $touch_gib GiB before each run"

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
