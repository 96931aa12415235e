#!/usr/bin/env bash
# mkworkload.sh KIND DIR [WRITES] - build a deterministic backing chain for the merge
# benchmarks at scale (scripts/bench-scale.sh). Every chain ends in DIR/top.qcow2, whose
# backing file is DIR/mid.qcow2, with DIR/base.qcow2 at the bottom:
#
#   base.qcow2 <- [l0001.qcow2 <- ... <-] mid.qcow2 <- top.qcow2
#
# KIND:
#   meta4k      256 GiB virtual disk, 4 KiB clusters, 3 layers; each layer gets WRITES
#               (default 20000) 4 KiB writes at random 4 KiB-aligned offsets over the
#               whole disk: one cluster and, mostly, one L2 table each — metadata-heavy.
#   meta64k     the same with 64 KiB clusters: each overlay write also copies 60 KiB of
#               its cluster up from below (copy-on-write).
#   deep128     128 layers (base, 126 between, top), 4 GiB, 64 KiB clusters; each layer
#               gets WRITES (default 64) writes of 4-256 KiB anywhere in the first 1 GiB,
#               so layers overlap often.
#   deep500     500 layers, the same with WRITES default 16.
#   big         scripts/mkchain.sh at SCALE 16 (16 GiB, ~15 GiB of data); WRITES unused.
#   compressed  scripts/mkchain.sh at SCALE 1 whose base is then rewritten compressed
#               (`qemu-img convert -c`, zlib), under mid and top as mkchain left them.
#   extl2       4 GiB, 64 KiB clusters with extended L2 entries (2 KiB subclusters), 3
#               layers; each gets WRITES (default 20000) writes of 2-8 KiB at 2 KiB-aligned
#               offsets: subcluster allocation, partly inside clusters below.
# Offsets print with %.0f: mawk clamps %d to 2^31 - 1.
# Data is never all zeros: each layer writes one pattern byte per request from its own
# range, so layers differ where they overlap.
#
# Deterministic: a Park-Miller generator (exact in awk's doubles) with a fixed seed per
# layer drives everything, and one qemu-io process per image applies the commands in
# order from stdin (cache mode unsafe: no flush per allocation; the script syncs at the
# end), so the same KIND and WRITES give byte-identical images. Only
# qemu-img, qemu-io, awk and coreutils are used (and scripts/mkchain.sh for big and
# compressed).
set -euo pipefail

usage() {
	echo "usage: scripts/mkworkload.sh meta4k|meta64k|deep128|deep500|big|compressed|extl2 DIR [WRITES]" >&2
	exit 2
}
kind=${1:-}
dir=${2:-}
[ -n "$kind" ] && [ -n "$dir" ] || usage
writes=${3:-}
case $writes in *[!0-9]*) usage ;; esac

mkchain=$(cd "$(dirname "$0")" && pwd)/mkchain.sh
mkdir -p "$dir"
cd "$dir"
rm -f ./*.qcow2

# gen SEED WRITES CLUSTER_ALIGN MIN MAX SPAN PATTERN_LO PATTERN_HI: qemu-io commands on
# stdout: WRITES writes of MIN..MAX bytes (multiples of CLUSTER_ALIGN) at CLUSTER_ALIGN-
# aligned offsets below SPAN.
gen() {
	awk -v seed="$1" -v n="$2" -v align="$3" -v min="$4" -v max="$5" -v span="$6" \
		-v plo="$7" -v phi="$8" '
	function rnd() { x = (x * 16807) % 2147483647; return x }
	function urand(m) { return rnd() % m }
	BEGIN {
		x = seed
		for (i = 0; i < 16; i++) rnd()
		slots = span / align
		for (i = 0; i < n; i++) {
			len = min + urand((max - min) / align + 1) * align
			# Offsets in two steps: slots may exceed the generator range (2^31).
			slot = (urand(65536) * 32768 + urand(32768)) % (slots - len / align + 1)
			printf "write -q -P %d %.0f %.0f\n", plo + urand(phi - plo + 1), slot * align, len
		}
	}'
}

# apply IMAGE: run the commands on stdin against IMAGE; fail loudly on any qemu-io error.
apply() {
	local err
	err=$(qemu-io -t unsafe -f qcow2 "$1" 2>&1 >/dev/null) || { echo "$err" >&2; return 1; }
	if [ -n "$err" ]; then echo "mkworkload.sh: qemu-io on $1: $err" >&2; return 1; fi
}

# layers COUNT OPTS SIZE WRITES ALIGN MIN MAX SPAN: a chain of COUNT layers (base, l0001..,
# mid, top), each created with OPTS and given its writes.
layers() {
	local count=$1 opts=$2 size=$3 n=$4 align=$5 min=$6 max=$7 span=$8 i name prev=""
	for ((i = 0; i < count; i++)); do
		if ((i == 0)); then
			name=base.qcow2
		elif ((i == count - 1)); then
			name=top.qcow2
		elif ((i == count - 2)); then
			name=mid.qcow2
		else
			name=$(printf 'l%04d.qcow2' "$i")
		fi
		if [ -z "$prev" ]; then
			qemu-img create -q -f qcow2 -o "$opts" "$name" "$size"
		else
			qemu-img create -q -f qcow2 -o "$opts" -b "$prev" -F qcow2 "$name"
		fi
		# Pattern bytes cycle through 1..255 in ranges of 85, one range per layer.
		local lo=$((1 + (i % 3) * 85))
		gen $((1000 + i)) "$n" "$align" "$min" "$max" "$span" "$lo" $((lo + 84)) | apply "$name"
		prev=$name
	done
}

case $kind in
meta4k) layers 3 cluster_size=4096 256G "${writes:-20000}" 4096 4096 4096 $((256 << 30)) ;;
meta64k) layers 3 cluster_size=65536 256G "${writes:-20000}" 4096 4096 4096 $((256 << 30)) ;;
deep128) layers 128 cluster_size=65536 4G "${writes:-64}" 4096 4096 262144 $((1 << 30)) ;;
deep500) layers 500 cluster_size=65536 4G "${writes:-16}" 4096 4096 262144 $((1 << 30)) ;;
extl2)
	layers 3 cluster_size=65536,extended_l2=on 4G "${writes:-20000}" 2048 2048 8192 $((4 << 30))
	;;
big) "$mkchain" . 16 ;;
compressed)
	"$mkchain" . 1
	qemu-img convert -c -f qcow2 -O qcow2 -o cluster_size=65536 base.qcow2 base.c.qcow2
	mv base.c.qcow2 base.qcow2
	;;
*) usage ;;
esac

sync
# The layers the benchmarks change (each check opens the chain below: checking all 500
# layers of deep500 takes minutes).
for f in base.qcow2 mid.qcow2 top.qcow2; do
	qemu-img check -q "$f"
done
