#!/usr/bin/env bash
# The main job: build a sample backing chain with qimg, look at it, then merge it down to
# one standalone image with qimg commit and qimg pull, proving at every step that what
# the guest sees is unchanged.
#
#   base.qcow2 <- mid.qcow2 <- top.qcow2   (in DIR, default ./demo)
#
# 1. qimg create makes the three images and writes data, zeroed and discarded ranges into
#    every layer (qimg io); qimg snapshot takes an internal snapshot of the base.
# 2. qimg info --backing-chain, map and checksum describe the chain; qimg's raw
#    conversion is checked against qemu-img's.
# 3. qimg commit -p top.qcow2      pushes top's data into mid (top is emptied)
#    qimg pull -p -b base.qcow2    pulls mid's data up into top, which now sits on base
#    qimg pull -p top.qcow2        pulls the rest: top stands alone
#    After each step: info, map, the checksum (must equal the first one) and qemu-img check.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-demo}

for tool in qemu-img cargo; do
	command -v "$tool" >/dev/null || { echo "demo.sh: $tool is missing (apt-get install qemu-utils)" >&2; exit 1; }
done

echo "== building qimg"
cargo build --quiet --release --example qimg --manifest-path "$root/Cargo.toml"
qimg=$root/target/release/examples/qimg

mkdir -p "$dir"
cd "$dir"
rm -f base.qcow2 mid.qcow2 top.qcow2 qimg.raw qemu.raw

# io IMAGE COMMAND...: run qemu-io-style commands on IMAGE with qimg io, showing them.
writer=("$qimg" io -f qcow2)
io() {
	local image=$1 c
	shift
	local -a args=()
	local shown="${writer[*]//$qimg/qimg}"
	for c in "$@"; do
		args+=(-c "$c")
		shown+=" -c '$c'"
	done
	echo "+ $shown $image"
	"${writer[@]}" "${args[@]}" "$image" >/dev/null
}

# show COMMAND...: print the command (qimg by its short name), then run it.
show() {
	local shown=("${@//$qimg/qimg}")
	echo "+ ${shown[*]}"
	"$@"
}

echo "== building the sample chain in $(pwd) with qimg"
show "$qimg" create -q -f qcow2 base.qcow2 64M
io base.qcow2 'write -P 0x11 0 8M' 'write -P 0x12 32M 4M'
show "$qimg" snapshot -c installed base.qcow2
io base.qcow2 'write -P 0x13 40M 1M'
show "$qimg" create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2
io mid.qcow2 'write -P 0x21 4M 2M' 'write -z 33M 1M' 'write -P 0x22 48M 2M'
show "$qimg" create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2
io top.qcow2 'write -P 0x31 5M 64k' 'discard 0 64k' 'write -P 0x32 60M 3M' 'write -z 49M 512k'

echo
echo "== qimg info --backing-chain top.qcow2"
"$qimg" info --backing-chain top.qcow2
echo
echo "== qimg snapshot -l base.qcow2"
"$qimg" snapshot -l base.qcow2
echo
echo "== qimg map top.qcow2"
"$qimg" map top.qcow2
echo
echo "== qimg convert -O raw top.qcow2 qimg.raw, compared with qemu-img's conversion"
"$qimg" convert -O raw top.qcow2 qimg.raw
qemu-img convert -O raw top.qcow2 qemu.raw
cmp qimg.raw qemu.raw && echo "identical: $(stat -c %s qimg.raw) bytes"
rm -f qimg.raw
# qemu.raw stays as an independent witness of what the guest saw before the merges.

checksum() { "$qimg" checksum --output=json "$1" | sed -n 's/.*"checksum": "\([0-9a-f]*\)".*/\1/p'; }
before=$(checksum top.qcow2)
echo
echo "== what the guest sees: qimg checksum top.qcow2 = $before"

# after STEP: show the chain, prove the guest-visible content unchanged, check every image.
after() {
	echo
	echo "== after $1: qimg info --backing-chain top.qcow2"
	"$qimg" info --backing-chain top.qcow2
	echo
	echo "== after $1: qimg map top.qcow2"
	"$qimg" map top.qcow2
	local now
	now=$(checksum top.qcow2)
	echo
	if [ "$now" != "$before" ]; then
		echo "demo.sh: after $1 the checksum of top.qcow2 is $now, was $before" >&2
		exit 1
	fi
	echo "== after $1: qimg checksum top.qcow2 = $now (unchanged)"
	qemu-img compare -q top.qcow2 qemu.raw && echo "   qemu-img compare top.qcow2 (before-merge raw copy): identical"
	for f in base.qcow2 mid.qcow2 top.qcow2; do
		[ -e "$f" ] && qemu-img check -q "$f"
	done
	echo "   qemu-img check: every image clean"
}

echo
echo "== qimg commit -p top.qcow2   (top's data into mid; top emptied)"
"$qimg" commit --dry-run top.qcow2
"$qimg" commit -p top.qcow2
after "commit"

echo
echo "== qimg pull -p -b base.qcow2 top.qcow2   (mid's data up into top; top now on base)"
"$qimg" pull -p -b base.qcow2 top.qcow2
after "pull -b base.qcow2"

echo
echo "== qimg pull -p top.qcow2   (everything else up into top; top stands alone)"
"$qimg" pull --dry-run top.qcow2
"$qimg" pull -p top.qcow2
after "pull"
echo
echo "top.qcow2 is standalone and shows what the three-layer chain showed."
echo "(mid.qcow2 is no longer referenced; base.qcow2 keeps its snapshot 'installed'.)"
rm -f qemu.raw
