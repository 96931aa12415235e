#!/usr/bin/env bash
# make-corpus.sh - regenerate the seed corpus of the fuzz targets from small real images
# made by qemu-img and qemu-io:
#
#   corpus/open_and_read/seed-*.qcow2    whole images (a few KiB each; 512 B clusters
#                                        except extended L2, which needs 16 KiB clusters)
#   corpus/check/seed-*.qcow2            the same images, for the check target
#   corpus/header_decode/seed-*.qcow2    their first cluster (header and extensions)
#   corpus/snapshot_table/seed-*.bin     the snapshot tables of the images that have one
#   corpus/probe/seed-*                  the first sector of an image of each format
#                                        qemu-img probes (bochs and cloop made by hand)
#   corpus/bitmaps/seed-*.qcow2          the images with persistent bitmaps (also in
#                                        open_and_read and check, their first cluster
#                                        in header_decode)
#   corpus/bitmaps/seed-dir-*            their bitmap directories, after the three bytes
#                                        the harness takes as parameters (nb_bitmaps,
#                                        cluster bits - 9)
#
# Only files named seed-* are replaced; regression inputs from fixed crashes (other names)
# are kept. Snapshot dates differ between runs, so regenerated seeds are not
# byte-identical; everything else is deterministic.
#
# Usage: fuzz/make-corpus.sh   (from anywhere; needs qemu-img, qemu-io, od, dd)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
corpus=$here/corpus
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

io() { # io IMAGE CMD... : run qemu-io commands on a qcow2 image, quietly, failing loudly
	local img=$1
	shift
	local args=()
	for c in "$@"; do args+=(-c "$c"); done
	qemu-io -f qcow2 "${args[@]}" "$img" >/dev/null
}
create() { # create NAME SIZE [OPTS] [extra qemu-img args...]
	local name=$1 size=$2 opts=${3:-cluster_size=512}
	shift 3 || shift $#
	qemu-img create -q -f qcow2 -o "$opts" "$@" "$name" "$size"
}

# Plain v3 image: data, a zeroed range and a discarded one.
create plain.qcow2 64k
io plain.qcow2 "write -P 0x11 0 4k" "write -P 0x22 9k 1k" "write -z 16k 2k" "discard 0 512"

# Version 2 (compat=0.10): no zero clusters, no extensions.
create v2.qcow2 32k compat=0.10,cluster_size=512
io v2.qcow2 "write -P 0x33 0 2k" "write -P 0x44 20k 512"

# Compressed clusters, zlib and zstd.
create compressed.qcow2 32k
io compressed.qcow2 "write -c -P 0x55 0 512" "write -c -P 0x66 4k 512" "write -P 0x77 8k 512"
create zstd.qcow2 32k cluster_size=512,compression_type=zstd
io zstd.qcow2 "write -c -P 0x88 0 512" "write -c -P 0x99 1k 512"

# Extended L2 entries (subcluster bitmaps) need clusters of at least 16 KiB.
create extl2.qcow2 64k cluster_size=16384,extended_l2=on
io extl2.qcow2 "write -P 0xaa 0 1k" "write -P 0xbb 17k 512" "write -z 33k 1k"

# Internal snapshots: two, with data changed in between.
create snapshot.qcow2 32k
io snapshot.qcow2 "write -P 0x12 0 2k"
qemu-img snapshot -c first snapshot.qcow2
io snapshot.qcow2 "write -P 0x34 1k 2k"
qemu-img snapshot -c second snapshot.qcow2
io snapshot.qcow2 "write -P 0x56 4k 512"

# A v2 image with a snapshot.
create v2-snapshot.qcow2 16k compat=0.10,cluster_size=512
io v2-snapshot.qcow2 "write -P 0x21 0 1k"
qemu-img snapshot -c only v2-snapshot.qcow2

# An overlay: backing file name and backing format extension (the backing file is not
# opened by the harness).
create backing-base.qcow2 32k
create overlay.qcow2 32k cluster_size=512 -b backing-base.qcow2 -F qcow2
io overlay.qcow2 "write -P 0x42 1k 1k"

# Refcount widths other than 16 bits, and lazy refcounts.
create refcount1.qcow2 16k cluster_size=512,refcount_bits=1
io refcount1.qcow2 "write -P 0x61 0 1k"
create refcount64.qcow2 16k cluster_size=512,refcount_bits=64,lazy_refcounts=on
io refcount64.qcow2 "write -P 0x62 512 1k"

# An external data file: the header names it (opening in memory without it fails cleanly).
create datafile.qcow2 16k cluster_size=512,data_file=datafile.raw
io datafile.qcow2 "write -P 0x63 0 1k"

# Persistent bitmaps (qemu-img bitmap; qemu-io loads the enabled ones, records its writes
# and stores them on exit): enabled and disabled, granularities 512 and 64k, dirty data.
create bitmaps.qcow2 64k
io bitmaps.qcow2 "write -P 0x71 0 4k"
qemu-img bitmap --add -g 512 bitmaps.qcow2 fine
qemu-img bitmap --add -g 64k bitmaps.qcow2 coarse
io bitmaps.qcow2 "write -P 0x72 8k 1k" "write -z 40k 512"
qemu-img bitmap --disable bitmaps.qcow2 coarse
qemu-img bitmap --add --disable bitmaps.qcow2 off
qemu-img bitmap --merge fine bitmaps.qcow2 off
io bitmaps.qcow2 "write -P 0x73 20k 2k" "discard 60k 4k"
# Many bitmaps, long names, cleared and merged ones, over dirty data past a cluster of
# bitmap data (4096 bits at 512 bytes: 2 MiB of disk).
create bitmaps-many.qcow2 3m
qemu-img bitmap --add -g 512 bitmaps-many.qcow2 a
qemu-img bitmap --add -g 4k bitmaps-many.qcow2 "a longer bitmap name, past one entry's padding"
qemu-img bitmap --add -g 64k --disable bitmaps-many.qcow2 b
io bitmaps-many.qcow2 "write -P 0x74 0 1k" "write -P 0x75 2100k 64k" "write -z 3000k 8k"
qemu-img bitmap --clear bitmaps-many.qcow2 a
qemu-img bitmap --merge "a longer bitmap name, past one entry's padding" bitmaps-many.qcow2 b
io bitmaps-many.qcow2 "write -P 0x76 1m 512"
# An enabled bitmap left in use: qemu-io killed while it has the image open.
create bitmaps-in-use.qcow2 64k
qemu-img bitmap --add -g 512 bitmaps-in-use.qcow2 on
qemu-img bitmap --add -g 64k --disable bitmaps-in-use.qcow2 off
io bitmaps-in-use.qcow2 "write -P 0x77 0 4k"
qemu-io -f qcow2 -c "write -P 0x78 4k 4k" -c "sigraise 9" bitmaps-in-use.qcow2 \
	>/dev/null 2>&1 || true
# Bitmaps in an image with internal snapshots and 4 KiB clusters.
create bitmaps-snapshot.qcow2 64k cluster_size=4096
qemu-img bitmap --add bitmaps-snapshot.qcow2 on
io bitmaps-snapshot.qcow2 "write -P 0x79 0 8k"
qemu-img snapshot -c snap bitmaps-snapshot.qcow2
io bitmaps-snapshot.qcow2 "write -P 0x7a 4k 8k"

images=(plain v2 compressed zstd extl2 snapshot v2-snapshot overlay refcount1 refcount64 datafile)
bitmap_images=(bitmaps bitmaps-many bitmaps-in-use bitmaps-snapshot)
for target in open_and_read header_decode snapshot_table check bitmaps; do
	mkdir -p "$corpus/$target"
	rm -f "$corpus/$target"/seed-*
done

be() { # be FILE OFFSET LEN : a big-endian unsigned integer from FILE
	local hex
	hex=$(od -An -tx1 -j "$2" -N "$3" "$1" | tr -d ' \n')
	echo $((16#$hex))
}

for name in "${images[@]}"; do
	img=$name.qcow2
	qemu-img check -q "$img"
	cp "$img" "$corpus/open_and_read/seed-$name.qcow2"
	cp "$img" "$corpus/check/seed-$name.qcow2"
	cluster=$((1 << $(be "$img" 20 4)))
	head -c "$cluster" "$img" >"$corpus/header_decode/seed-$name.qcow2"
	if [ "$(be "$img" 60 4)" -gt 0 ]; then
		# The table is far smaller than a cluster here; take the whole cluster.
		dd if="$img" of="$corpus/snapshot_table/seed-$name.bin" bs="$cluster" \
			skip=$(($(be "$img" 64 8) / cluster)) count=1 status=none
	fi
done

for name in "${bitmap_images[@]}"; do
	img=$name.qcow2
	qemu-img check -q "$img"
	for target in open_and_read check bitmaps; do
		cp "$img" "$corpus/$target/seed-$name.qcow2"
	done
	head -c $((1 << $(be "$img" 20 4))) "$img" >"$corpus/header_decode/seed-$name.qcow2"
	# The bitmap directory: find the bitmaps extension (0x23852875) after the header.
	cluster_bits=$(be "$img" 20 4)
	at=$(be "$img" 100 4)
	while :; do
		type=$(be "$img" "$at" 4)
		len=$(be "$img" $((at + 4)) 4)
		[ "$type" -ne 0 ] || { echo "$img: no bitmaps extension" >&2; exit 1; }
		[ "$type" -ne $((0x23852875)) ] || break
		at=$((at + 8 + (len + 7) / 8 * 8))
	done
	nb=$(be "$img" $((at + 8)) 4)
	size=$(be "$img" $((at + 16)) 8)
	offset=$(be "$img" $((at + 24)) 8)
	{
		printf "\\x$(printf %02x $((nb >> 8)))\\x$(printf %02x $((nb & 255)))"
		printf "\\x$(printf %02x $((cluster_bits - 9)))"
		dd if="$img" bs=1 skip="$offset" count="$size" status=none
	} >"$corpus/bitmaps/seed-dir-$name"
done

# Probe seeds: the first sector (all probing reads) of an image of each format qemu-img
# probes; qemu-img creates all but dmg (known by name only), cloop and bochs, whose
# headers are written here as their QEMU drivers read them.
mkdir -p "$corpus/probe"
rm -f "$corpus/probe"/seed-*
probe_seed() { # probe_seed NAME FILE : the first 512 bytes of FILE
	head -c 512 "$2" >"$corpus/probe/seed-$1"
}
for fmt in qcow vmdk vdi vhdx vpc qed parallels; do
	qemu-img create -q -f "$fmt" "probe.$fmt" 1M
	probe_seed "$fmt" "probe.$fmt"
done
qemu-img create -q -f vmdk -o subformat=monolithicFlat probe-flat.vmdk 1M
probe_seed vmdk-descriptor probe-flat.vmdk
qemu-img create -q --object secret,id=sec0,data=abc -f luks -o key-secret=sec0 probe.luks 1M
probe_seed luks probe.luks
probe_seed qcow2 plain.qcow2
printf '#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n' \
	>probe.cloop
probe_seed cloop probe.cloop
{
	printf 'Bochs Virtual HD Image\0\0\0\0\0\0\0\0\0\0'
	printf 'Redolog\0\0\0\0\0\0\0\0\0Growing\0\0\0\0\0\0\0\0\0'
	printf '\0\0\2\0'
} >probe.bochs
probe_seed bochs probe.bochs

ls -l "$corpus"/*/seed-* | awk '{ print $5, $NF }'
