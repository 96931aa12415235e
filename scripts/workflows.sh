#!/usr/bin/env bash
# workflows.sh - the snapshot workflows of our users (libvirt, Proxmox and ZStack external
# snapshots, with internal snapshots beside them), end to end with qimg, each step checked
# against qemu-img: what every image shows (qemu-img compare against raw copies taken
# before the step), qemu-img check, and the backing file each image names.
#
# Usage: scripts/workflows.sh [QIMG]   (default: target/release/examples/qimg, built if
# missing). Runs in a temporary directory; exits non-zero at the first step that fails.
# tests/workflows.rs runs it.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
qimg=${1:-$root/target/release/examples/qimg}
if [ ! -x "$qimg" ]; then
	(cd "$root" && cargo build --release --example qimg >&2)
fi
qimg=$(cd "$(dirname "$qimg")" && pwd)/$(basename "$qimg")
work=$(mktemp -d "${TMPDIR:-/tmp}/workflows.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"

step() { echo "== $*"; }
fail() { echo "workflows.sh: $*" >&2; exit 1; }
# view IMAGE NAME: keep what IMAGE shows now as NAME.raw.
view() { qemu-img convert -U -O raw "$1" "$2.raw"; }
# shows IMAGE NAME: IMAGE must show what NAME.raw holds, and pass qemu-img check.
shows() {
	qemu-img compare -q "$1" "$2.raw" || fail "$1 does not show what $2 showed"
	qemu-img check -q "$1" || fail "qemu-img check $1 failed"
}
# backing IMAGE [NAME]: IMAGE's backing file must be NAME (none when absent).
backing() {
	local got
	got=$(qemu-img info --output=json "$1" | python3 -c \
		'import json,sys; print(json.load(sys.stdin).get("backing-filename", ""))')
	[ "$got" = "${2:-}" ] || fail "$1 is backed by '$got', not '${2:-}'"
}

step "a VM disk with data and an internal snapshot"
"$qimg" create -q -f qcow2 disk.qcow2 64M
"$qimg" io -c "write -q -P 1 0 4M" -c "write -q -z 8M 1M" disk.qcow2
"$qimg" snapshot -c installed disk.qcow2
qemu-img snapshot -l disk.qcow2 | grep -q installed || fail "qemu-img does not list the snapshot"
qemu-img convert -l snapshot.name=installed -O raw disk.qcow2 installed.raw
"$qimg" io -c "write -q -P 9 1M 1M" disk.qcow2

step "three external snapshots, the VM writing to the newest each time"
prev=disk.qcow2
for n in 1 2 3; do
	"$qimg" create -q -f qcow2 -b "$prev" -F qcow2 "snap$n.qcow2"
	"$qimg" io -c "write -q -P $((n + 1)) $((n * 2))M 3M" -c "discard -q $((n * 5))M 64k" "snap$n.qcow2"
	backing "snap$n.qcow2" "$prev"
	prev=snap$n.qcow2
done
for i in disk snap1 snap2 snap3; do view "$i.qcow2" "$i"; done

step "the tree lists the chain, the internal snapshot under its image"
"$qimg" tree --output=json . | python3 -c '
import json, sys
roots = json.load(sys.stdin)
disk = [r for r in roots if r["filename"] == "./disk.qcow2"][0]
assert disk["snapshots"] == ["installed"], disk
names, node = [], disk
while node["children"]:
    assert len(node["children"]) == 1, node
    node = node["children"][0]
    names.append(node["filename"])
assert names == ["./snap1.qcow2", "./snap2.qcow2", "./snap3.qcow2"], names
' || fail "qimg tree shows another forest"

step "delete a middle snapshot (snap2): snap3 shows the same, on snap1"
"$qimg" remove -q snap2.qcow2
[ ! -e snap2.qcow2 ] || fail "snap2.qcow2 is still there"
backing snap3.qcow2 snap1.qcow2
shows snap3.qcow2 snap3
shows snap1.qcow2 snap2

step "delete the oldest snapshot (snap1): everything above shows the same, on disk"
"$qimg" remove -q snap1.qcow2
backing snap3.qcow2 disk.qcow2
shows snap3.qcow2 snap3
shows disk.qcow2 snap2

step "revert to the last snapshot: drop the top, start a new one on its backing file"
view disk.qcow2 reverted
rm snap3.qcow2
"$qimg" create -q -f qcow2 -b disk.qcow2 -F qcow2 snap4.qcow2
shows snap4.qcow2 reverted
"$qimg" io -c "write -q -P 7 0 64k" snap4.qcow2
qemu-img check -q snap4.qcow2 || fail "qemu-img check snap4.qcow2 failed"

step "a snapshot nothing uses is refused, not deleted"
if "$qimg" remove snap4.qcow2 2>/dev/null; then fail "removing the active image succeeded"; fi
[ -e snap4.qcow2 ] || fail "a refused remove deleted snap4.qcow2"

step "the internal snapshot still holds what it held, and reverting to it works"
rm snap4.qcow2
qemu-img convert -l snapshot.name=installed -O raw disk.qcow2 installed-now.raw
cmp -s installed.raw installed-now.raw || fail "the internal snapshot changed"
"$qimg" snapshot -a installed disk.qcow2
shows disk.qcow2 installed
echo "workflows.sh: every step matched qemu-img"
