#!/usr/bin/env bash
# bench-convert.sh - time `qimg convert` against `qemu-img convert` on the same
# three-layer backing chain (built by scripts/mkchain.sh), to raw and to qcow2.
#
# Usage: scripts/bench-convert.sh [-n RUNS] [-m MODES] [-k] [SCALE...]
#
#   SCALE...  chain sizes in GiB to bench, each an integer >= 1 (default: 1).
#             `scripts/bench-convert.sh 1 4` benches the small and the large chain.
#   -n RUNS   timed runs per tool, mode and scale (default 3, at least 3); the median is
#             reported.
#   -m MODES  comma-separated output modes (default raw):
#               raw       convert -O raw
#               qcow2     convert -O qcow2
#               qcow2-c   convert -c -O qcow2 (compressed clusters, zlib)
#             `scripts/bench-convert.sh -m qcow2,qcow2-c` benches both qcow2 modes.
#   -k        keep the work directory (chains and logs) instead of deleting it.
#
# Environment:
#   QIMG       qimg binary to use; when unset the script builds
#              `cargo build --release --example qimg` and uses target/release/examples/qimg
#   TOUCH_GIB  GiB of memory a throwaway process touches before every timed run (default 3)
#   TMPDIR     where the work directory is created (a SCALE 4 run needs ~12 GiB free)
#   VERIFY     1 (default): check once per scale and mode that both tools wrote the same
#              bytes (raw) or images with the same content that qemu-img check finds clean
#              (qcow2, whose layouts may differ)
#
# Method: per scale, one chain is built and both tools convert that same top.qcow2. Runs
# are interleaved and the order alternates every round (qemu-img first, then qimg first,
# ...), so drift on a shared machine hits both tools alike. The chain files are read once
# untimed so both tools start from a warm page cache. Before each timed run a throwaway
# process touches TOUCH_GIB of memory: on these VMs first-touched memory is expensive
# (page reporting hands freed pages back to the host), and touching it beforehand keeps
# that cost off whichever tool happens to run first. The output is deleted after every
# run. Nothing system-wide is dropped or changed.
#
# Output (stdout): a header line, then one row per scale, mode and tool:
#   scale  mode     tool      runs  median_s  min_s  max_s  user_s  sys_s  peak_rss_mib  ratio
#   1      raw      qemu-img  3     1.52      1.50   1.60   0.20    0.90   25.1          -
#   1      raw      qimg      3     1.20      ...                                        1.27
# user_s/sys_s are medians; peak_rss_mib is the largest of the runs; ratio is
# median(qemu-img) / median(qimg), so > 1 means qimg is faster. Progress goes to stderr.
set -euo pipefail

usage() {
	sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
	exit 0
}
usage_error() {
	echo "bench-convert.sh: $*" >&2
	echo "usage: scripts/bench-convert.sh [-n RUNS] [-m MODES] [-k] [SCALE...]   (-h for help)" >&2
	exit 2
}

runs=3
keep=0
modes=raw
while getopts "n:m:kh" opt; do
	case $opt in
	n) runs=$OPTARG ;;
	m) modes=$OPTARG ;;
	k) keep=1 ;;
	h) usage ;;
	*) usage_error "unknown option" ;;
	esac
done
shift $((OPTIND - 1))
scales=("$@")
[ ${#scales[@]} -gt 0 ] || scales=(1)

case $runs in '' | *[!0-9]*) usage_error "-n needs an integer: $runs" ;; esac
[ "$runs" -ge 3 ] || usage_error "-n must be at least 3"
for s in "${scales[@]}"; do
	case $s in '' | *[!0-9]* | 0) usage_error "SCALE must be an integer >= 1: $s" ;; esac
done
IFS=, read -r -a mode_list <<<"$modes"
[ ${#mode_list[@]} -gt 0 ] || usage_error "-m needs at least one mode"
for m in "${mode_list[@]}"; do
	case $m in raw | qcow2 | qcow2-c) ;; *) usage_error "unknown mode: $m (raw, qcow2, qcow2-c)" ;; esac
done

root=$(cd "$(dirname "$0")/.." && pwd)
mkchain=$root/scripts/mkchain.sh
touch_gib=${TOUCH_GIB:-3}
verify=${VERIFY:-1}
command -v qemu-img >/dev/null || { echo "bench-convert.sh: qemu-img not found" >&2; exit 1; }

log() { echo "bench-convert.sh: $*" >&2; }

# Peak RSS comes from GNU time; install it only if it is missing.
if [ ! -x /usr/bin/time ]; then
	log "/usr/bin/time missing, installing the 'time' package"
	apt-get install -y time >&2 || { log "could not install 'time'"; exit 1; }
fi

if [ -z "${QIMG:-}" ]; then
	log "building qimg (cargo build --release --example qimg)"
	(cd "$root" && cargo build --release --example qimg >&2)
	QIMG=$root/target/release/examples/qimg
fi
[ -x "$QIMG" ] || { echo "bench-convert.sh: qimg not executable: $QIMG" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/bench-convert.XXXXXX")
cleanup() {
	if [ "$keep" = 1 ]; then log "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Touch TOUCH_GIB of memory in a throwaway process (python3 if present, else awk's
# string doubling builds a string of that size, which touches every page).
if command -v python3 >/dev/null; then
	toucher=(python3 -c "b = bytearray($touch_gib << 30)")
else
	toucher=(awk -v n=$((touch_gib << 30)) 'BEGIN { s = "x"; while (length(s) < n) s = s s }')
fi
touch_memory() {
	[ "$touch_gib" -gt 0 ] || return 0
	"${toucher[@]}"
}

# timed TOOL MODE OUT: convert $chain/top.qcow2 to OUT with TOOL in MODE; append
# "elapsed user sys maxrss_kib" to $work/TOOL.$scale.MODE.
timed() {
	local tool=$1 mode=$2 out=$3 t=$work/time.out
	local -a cmd args
	case $mode in
	raw) args=(-O raw) ;;
	qcow2) args=(-O qcow2) ;;
	qcow2-c) args=(-c -O qcow2) ;;
	esac
	case $tool in
	qemu-img) cmd=(qemu-img convert "${args[@]}" "$chain/top.qcow2" "$out") ;;
	qimg) cmd=("$QIMG" convert "${args[@]}" "$chain/top.qcow2" "$out") ;;
	esac
	rm -f "$out"
	touch_memory
	if ! /usr/bin/time -f "%e %U %S %M" -o "$t" "${cmd[@]}" >"$work/$tool.log" 2>&1; then
		log "$tool failed:"
		cat "$work/$tool.log" >&2
		exit 1
	fi
	[ -f "$out" ] || { log "$tool exited 0 but wrote no $out"; exit 1; }
	tail -n 1 "$t" >>"$work/$tool.$scale.$mode"
}

# verify MODE OUT: on the first round, keep the first tool's output as ref.MODE; compare
# the second's with it (byte for byte for raw; content and qemu-img check for qcow2).
verify() {
	local mode=$1 out=$2 ref=$work/ref.$1
	if [ ! -e "$ref" ]; then
		mv "$out" "$ref"
		return
	fi
	case $mode in
	raw) cmp "$ref" "$out" >&2 || { log "scale $scale: $mode outputs differ"; exit 1; } ;;
	*)
		qemu-img compare -q "$ref" "$out" >&2 || { log "scale $scale: $mode outputs differ"; exit 1; }
		qemu-img check -q "$ref" >&2 || { log "scale $scale: $mode: qemu-img check failed"; exit 1; }
		qemu-img check -q "$out" >&2 || { log "scale $scale: $mode: qemu-img check failed"; exit 1; }
		;;
	esac
	rm -f "$ref"
}

# median of the numbers on stdin
median() { sort -g | awk '{ v[NR] = $1 } END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%.2f", m }'; }

# Measure the memory toucher once, so the log shows what it costs and that it touched
# the memory (its peak RSS).
if [ "$touch_gib" -gt 0 ]; then
	/usr/bin/time -f "%e %S %M" -o "$work/touch.out" "${toucher[@]}"
	read -r e s m <"$work/touch.out"
	log "touching $touch_gib GiB before each run: ${e} s (${s} s system), peak RSS $((m >> 10)) MiB"
fi

row() { printf "%-6s %-8s %-9s %-5s %-9s %-7s %-7s %-7s %-7s %-13s %s\n" "$@"; }
row scale mode tool runs median_s min_s max_s user_s sys_s peak_rss_mib ratio
for scale in "${scales[@]}"; do
	chain=$work/chain$scale
	log "scale $scale: building chain in $chain"
	"$mkchain" "$chain" "$scale" >&2
	cat "$chain"/*.qcow2 >/dev/null # warm the page cache for both tools alike
	for mode in "${mode_list[@]}"; do
		out=$work/out.$mode
		for ((i = 1; i <= runs; i++)); do
			if ((i % 2)); then order=(qemu-img qimg); else order=(qimg qemu-img); fi
			for tool in "${order[@]}"; do
				log "scale $scale: $mode: run $i/$runs: $tool"
				timed "$tool" "$mode" "$out"
				if [ "$i" = 1 ] && [ "$verify" = 1 ]; then verify "$mode" "$out"; fi
				rm -f "$out"
			done
		done
		declare -A med=()
		for tool in qemu-img qimg; do
			f=$work/$tool.$scale.$mode
			med[$tool]=$(cut -d' ' -f1 "$f" | median)
			min=$(cut -d' ' -f1 "$f" | sort -g | head -n 1)
			max=$(cut -d' ' -f1 "$f" | sort -g | tail -n 1)
			user=$(cut -d' ' -f2 "$f" | median)
			sys=$(cut -d' ' -f3 "$f" | median)
			rss=$(cut -d' ' -f4 "$f" | sort -g | tail -n 1 | awk '{ printf "%.1f", $1 / 1024 }')
			ratio=-
			if [ "$tool" = qimg ]; then
				ratio=$(awk -v a="${med[qemu-img]}" -v b="${med[qimg]}" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "inf" }')
			fi
			row "$scale" "$mode" "$tool" "$runs" "${med[$tool]}" "$min" "$max" "$user" "$sys" "$rss" "$ratio"
		done
		unset med
	done
	rm -rf "$chain"
done
