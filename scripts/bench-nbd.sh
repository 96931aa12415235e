#!/usr/bin/env bash
# bench-nbd.sh - `qimg nbd` against `qemu-nbd` serving copies of the same images, measured
# by the same clients over Unix sockets:
#
#   randread-4k     fio, 4 KiB random reads, iodepth 16, on a fully allocated image
#   randwrite-4k    fio, 4 KiB random writes, iodepth 16, on the allocated image
#   alloc-write-4k  fio, 4 KiB random writes, iodepth 16, on an empty overlay over the
#                   3-layer chain of mkchain.sh (allocating writes, copy-on-write)
#   seqread-1m      fio, 1 MiB sequential reads, iodepth 4, on the allocated image
#   nbdcopy         nbdcopy of the whole chain export to /dev/null
#
# Usage: scripts/bench-nbd.sh [-n RUNS]   (RUNS >= 3, default 3; SHORT=1: one run of 2 s
#                                         per case on a 256 MiB image, for CI)
#
# Method: images built once; writing cases get fresh copies before every run (not
# timed); the servers alternate which goes first; each server runs with -t on its own
# copy and is stopped after each run. fio reports IOPS (and MiB/s for seqread); nbdcopy
# is timed. Prints the median of each and the ratio qimg / qemu-nbd (IOPS: above 1, qimg
# is faster; for nbdcopy seconds, qemu-nbd / qimg). Environment: QIMG, TMPDIR, RUNTIME
# (seconds per fio run, default 10).
set -euo pipefail

runs=3
if [ "${1:-}" = "-n" ]; then runs=$2; shift 2; fi
case $runs in '' | *[!0-9]*) echo "bench-nbd.sh: -n needs an integer" >&2; exit 2 ;; esac
runtime=${RUNTIME:-10}
size_mib=1024
if [ -n "${SHORT:-}" ]; then runs=1; runtime=2; size_mib=256; fi
[ -n "${SHORT:-}" ] || [ "$runs" -ge 3 ] || { echo "bench-nbd.sh: -n must be at least 3" >&2; exit 2; }

root=$(cd "$(dirname "$0")/.." && pwd)
mkchain=$root/scripts/mkchain.sh
log() { echo "bench-nbd.sh: $*" >&2; }
if [ -z "${QIMG:-}" ]; then
	log "building qimg"
	(cd "$root" && cargo build --release --example qimg >&2)
	QIMG=$root/target/release/examples/qimg
fi
for tool in qemu-nbd fio nbdcopy qemu-img qemu-io; do
	command -v $tool >/dev/null || { log "$tool is missing"; exit 2; }
done

work=$(mktemp -d "${TMPDIR:-/tmp}/bench-nbd.XXXXXX")
server_pid=
cleanup() {
	[ -z "$server_pid" ] || kill "$server_pid" 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT
cd "$work"

log "building images in $work"
qemu-img create -q -f qcow2 full.qcow2 ${size_mib}M
qemu-io -f qcow2 -c "write -P 7 0 ${size_mib}M" full.qcow2 >/dev/null
mkdir chain
if [ -n "${SHORT:-}" ]; then
	# A small 3-layer chain without mkchain.sh's gigabyte.
	qemu-img create -q -f qcow2 chain/base.qcow2 ${size_mib}M
	qemu-io -f qcow2 -c "write -P 1 0 $((size_mib / 2))M" chain/base.qcow2 >/dev/null
	qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 chain/mid.qcow2
	qemu-io -f qcow2 -c "write -P 2 $((size_mib / 4))M $((size_mib / 4))M" chain/mid.qcow2 >/dev/null
	qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 chain/top.qcow2
else
	"$mkchain" chain 1 >/dev/null
fi
qemu-img create -q -f qcow2 -b top.qcow2 -F qcow2 chain/overlay.qcow2

# start TOOL FILE [ARGS]: serves FILE on $work/s.sock with -t; sets server_pid.
start() {
	local tool=$1 file=$2
	shift 2
	rm -f s.sock
	if [ "$tool" = qimg ]; then
		"$QIMG" nbd -t -f qcow2 -k "$work/s.sock" "$@" "$file" &
	else
		qemu-nbd -t -f qcow2 -k "$work/s.sock" "$@" "$file" &
	fi
	server_pid=$!
	for _ in $(seq 200); do [ -S s.sock ] && break; sleep 0.05; done
	[ -S s.sock ] || { log "$tool did not listen"; exit 1; }
	sleep 0.1
}
stop() {
	kill "$server_pid"
	wait "$server_pid" 2>/dev/null || true
	server_pid=
}

# fio_case RW BS DEPTH: prints the IOPS of one fio run against the socket.
fio_case() {
	fio --name=b --ioengine=nbd --uri="nbd+unix:///?socket=$work/s.sock" --rw="$1" \
		--bs="$2" --iodepth="$3" --size=${size_mib}M --runtime="$runtime" --time_based \
		--randrepeat=1 --output-format=json 2>/dev/null |
		awk -F: '/"iops"/ { gsub(/[ ,]/, "", $2); s += $2 } END { printf "%.0f\n", s }'
}

median() { sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

# run_case NAME SOURCE FILE RW BS DEPTH: medians of both tools and the ratio.
run_case() {
	local name=$1 src=$2 file=$3 rw=$4 bs=$5 depth=$6
	: >"qimg.$name" ; : >"qemu.$name"
	for i in $(seq "$runs"); do
		local order="qimg qemu"
		[ $((i % 2)) -eq 0 ] && order="qemu qimg"
		for tool in $order; do
			rm -rf run && cp -r "$src" run
			start "$([ $tool = qimg ] && echo qimg || echo qemu-nbd)" "run/$file"
			fio_case "$rw" "$bs" "$depth" >>"$tool.$name"
			stop
		done
	done
	local a b
	a=$(median <"qimg.$name")
	b=$(median <"qemu.$name")
	printf "%-16s qimg %10s IOPS   qemu-nbd %10s IOPS   ratio %s\n" "$name" "$a" "$b" \
		"$(awk -v a="$a" -v b="$b" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')"
}

mkdir full && mv full.qcow2 full/
run_case randread-4k full full.qcow2 randread 4k 16
run_case randwrite-4k full full.qcow2 randwrite 4k 16
run_case alloc-write-4k chain overlay.qcow2 randwrite 4k 16
run_case seqread-1m full full.qcow2 read 1M 4

: >qimg.copy ; : >qemu.copy
for i in $(seq "$runs"); do
	order="qimg qemu"
	[ $((i % 2)) -eq 0 ] && order="qemu qimg"
	for tool in $order; do
		start "$([ $tool = qimg ] && echo qimg || echo qemu-nbd)" "$work/chain/top.qcow2" -r -e 4
		t0=$(date +%s.%N)
		nbdcopy "nbd+unix:///?socket=$work/s.sock" null:
		t1=$(date +%s.%N)
		stop
		awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f\n", b - a }' >>"$tool.copy"
	done
done
a=$(median <qimg.copy)
b=$(median <qemu.copy)
printf "%-16s qimg %10s s      qemu-nbd %10s s      ratio %s\n" nbdcopy "$a" "$b" \
	"$(awk -v a="$a" -v b="$b" 'BEGIN { if (a > 0) printf "%.2f", b / a; else print "-" }')"
