#!/usr/bin/env bash
# The main job: build a sample backing chain, then let qimg describe and read it.
#
#   base.qcow2 <- mid.qcow2 <- top.qcow2   (in DIR, default ./demo)
#
# The chain is made with qemu-img/qemu-io (qimg's write path is a later milestone): data,
# zeroed and discarded ranges in every layer, and an internal snapshot in the base. qimg
# then prints `info --backing-chain`, `map`, a `checksum` of what the guest sees, and
# checks that a raw conversion by qimg equals qemu-img's.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-demo}

for tool in qemu-img qemu-io cargo; do
	command -v "$tool" >/dev/null || { echo "demo.sh: $tool is missing (apt-get install qemu-utils)" >&2; exit 1; }
done

echo "== building qimg"
cargo build --quiet --release --example qimg --manifest-path "$root/Cargo.toml"
qimg=$root/target/release/examples/qimg

mkdir -p "$dir"
cd "$dir"
rm -f base.qcow2 mid.qcow2 top.qcow2 qimg.raw qemu.raw

echo "== building the sample chain in $(pwd)"
qemu-img create -q -f qcow2 base.qcow2 64M
qemu-io -f qcow2 -c 'write -q -P 0x11 0 8M' -c 'write -q -P 0x12 32M 4M' base.qcow2
qemu-img snapshot -c installed base.qcow2
qemu-io -f qcow2 -c 'write -q -P 0x13 40M 1M' base.qcow2
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2
qemu-io -f qcow2 -c 'write -q -P 0x21 4M 2M' -c 'write -q -z 33M 1M' mid.qcow2
qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2
qemu-io -f qcow2 -c 'write -q -P 0x31 5M 64k' -c 'discard -q 0 64k' -c 'write -q -P 0x32 60M 3M' top.qcow2

echo
echo "== qimg info --backing-chain top.qcow2"
"$qimg" info --backing-chain top.qcow2
echo
echo "== qimg map top.qcow2"
"$qimg" map top.qcow2
echo
echo "== qimg checksum top.qcow2"
"$qimg" checksum top.qcow2
echo
echo "== qimg convert -O raw top.qcow2 qimg.raw, compared with qemu-img's conversion"
"$qimg" convert -O raw top.qcow2 qimg.raw
qemu-img convert -O raw top.qcow2 qemu.raw
cmp qimg.raw qemu.raw && echo "identical: $(stat -c %s qimg.raw) bytes"
"$qimg" checksum qimg.raw
rm -f qimg.raw qemu.raw
