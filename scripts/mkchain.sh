#!/usr/bin/env bash
# mkchain.sh DIR [SCALE] - build a deterministic qcow2 backing chain for merge benchmarks:
#
#   DIR/base.qcow2  <-  DIR/mid.qcow2  <-  DIR/top.qcow2
#
# SCALE (integer >= 1, default 1) is the virtual size in GiB; all amounts scale with it.
#   SCALE=1  ~1.0 GiB of data in the chain, builds in a few seconds   ("small")
#   SCALE=8  ~7.5 GiB of data in the chain, builds in well under a minute ("large")
#
# Contents (64 KiB clusters, N = SCALE * 16384 clusters):
#   base: one sequential run in each 128 MiB region, 0-96 MiB long (3/8 of N on average),
#         written as <=16 MiB requests, plus N/16 scattered single-cluster (64 KiB) writes.
#   mid, top (each): writes in random (not sorted) order, so host layout is scattered:
#         25% of N dirty in runs of 1-64 clusters, 2% zeroed with 'write -z' (runs of 1-16),
#         1% discarded (runs of 1-16; in an overlay that becomes a zero cluster),
#         N/64 unaligned 4 KiB writes inside a cluster (copy-on-write from the backing file).
# Data is never all zeros: every write uses a pattern byte, from a disjoint range per layer
# (base 0x01-0x55, mid 0x56-0xaa, top 0xab-0xff), so layers always differ where they overlap.
#
# Offsets and lengths print with %.0f: mawk (Debian's awk) clamps %d to 2^31 - 1, which in
# the shared copy this one comes from put every write past 2 GiB (half of SCALE 4's) at
# offset 2147483647.
#
# Deterministic: a Park-Miller generator (exact in awk's doubles) with fixed seeds drives
# everything, and qemu-io applies the commands in order, so the same SCALE gives
# byte-identical images. Only qemu-img, qemu-io, awk and coreutils are used.
# Commands are fed to one qemu-io process on stdin (one process per image), which is far
# faster than one qemu-io per command and has no argv length limit, unlike many -c options.
set -euo pipefail

dir=${1:?usage: mkchain.sh DIR [SCALE]}
scale=${2:-1}
case $scale in '' | *[!0-9]* | 0) echo "mkchain.sh: SCALE must be an integer >= 1" >&2; exit 2 ;; esac

mkdir -p "$dir"
cd "$dir"
rm -f base.qcow2 mid.qcow2 top.qcow2

clusters=$((scale * 16384))

# gen KIND SEED PATTERN_LO PATTERN_HI: print qemu-io commands on stdout.
gen() {
	awk -v kind="$1" -v seed="$2" -v plo="$3" -v phi="$4" -v N="$clusters" '
	function rnd() { x = (x * 16807) % 2147483647; return x }
	function urand(n) { return rnd() % n }
	function pat() { return plo + urand(phi - plo + 1) }
	BEGIN {
		CL = 65536; x = seed
		for (i = 0; i < 16; i++) rnd()
		if (kind == "base") {
			# one sequential run per 128 MiB region (no overlaps), 0..75% of the region long
			for (r = 0; r < N / 2048; r++) {
				len = urand(1537)
				start = r * 2048 + urand(2048 - len + 1)
				for (c = 0; c < len; c += 256) {
					l = len - c; if (l > 256) l = 256
					printf "write -q -P %d %.0f %.0f\n", pat(), (start + c) * CL, l * CL
				}
			}
			for (i = 0; i < int(N / 16); i++)
				printf "write -q -P %d %.0f %.0f\n", pat(), urand(N) * CL, CL
			exit
		}
		dt = int(N / 4); zt = int(N / 50); xt = int(N / 100); st = int(N / 64)
		d = z = xd = s = 0
		while (d < dt || z < zt || xd < xt || s < st) {
			r = urand(1000)
			if (r < 900) {
				if (d >= dt) continue
				len = 1 + urand(64); if (len > dt - d) len = dt - d
				printf "write -q -P %d %.0f %.0f\n", pat(), urand(N - len + 1) * CL, len * CL
				d += len
			} else if (r < 940) {
				if (z >= zt) continue
				len = 1 + urand(16)
				printf "write -q -z %.0f %.0f\n", urand(N - len + 1) * CL, len * CL
				z += len
			} else if (r < 960) {
				if (xd >= xt) continue
				len = 1 + urand(16)
				printf "discard -q %.0f %.0f\n", urand(N - len + 1) * CL, len * CL
				xd += len
			} else {
				if (s >= st) continue
				printf "write -q -P %d %.0f %.0f\n", pat(), urand(N) * CL + (1 + urand(15)) * 4096, 4096
				s++
			}
		}
	}'
}

# apply IMAGE: run the commands on stdin against IMAGE; fail loudly on any qemu-io error.
apply() {
	local err
	err=$(qemu-io -f qcow2 "$1" 2>&1 >/dev/null) || { echo "$err" >&2; return 1; }
	if [ -n "$err" ]; then echo "mkchain.sh: qemu-io on $1: $err" >&2; return 1; fi
}

qemu-img create -q -f qcow2 -o cluster_size=65536 base.qcow2 "${scale}G"
gen base 1 1 85 | apply base.qcow2
qemu-img create -q -f qcow2 -o cluster_size=65536 -b base.qcow2 -F qcow2 mid.qcow2
gen overlay 2 86 170 | apply mid.qcow2
qemu-img create -q -f qcow2 -o cluster_size=65536 -b mid.qcow2 -F qcow2 top.qcow2
gen overlay 3 171 255 | apply top.qcow2

for f in base.qcow2 mid.qcow2 top.qcow2; do
	qemu-img check -q "$f"
done
