# bench-lib.sh - what bench-merge.sh and bench-scale.sh share, sourced by them after
# they parse their arguments. The sourcing script sets bench_name (its name, for messages
# and the work directory), keep (1: keep the work directory), root (the repository) and,
# before each timed run, key (the run's label, e.g. "warm.1.commit-top": results go to
# $work/$key.TOOL, $work/$key.floor and $work/$key.copy), and defines command_of OP TOOL
# (the command line) and destination_of OP (the image OP writes into). It gets log, die,
# QIMG (built when unset), work (a temporary directory, removed on exit unless keep),
# touch_memory, evict, timed, floor, copy_floor, verify, median and peak_mib; see each.
# TOUCH_GIB: memory a throwaway process touches before every timed run (default 3).

touch_gib=${TOUCH_GIB:-3}
for tool in qemu-img python3 dd; do
	command -v "$tool" >/dev/null || { echo "$bench_name: $tool not found" >&2; exit 1; }
done

log() { echo "$bench_name: $*" >&2; }
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

work=$(mktemp -d "${TMPDIR:-/tmp}/$bench_name.XXXXXX")
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

# timed TOOL OP DIR: run OP with TOOL in DIR (a fresh copy); append "elapsed user sys
# maxrss_kib" to $work/$key.$tool.
timed() {
	local tool=$1 op=$2 dir=$3 t=$work/time.out cmd
	cmd=$(command_of "$op" "$tool")
	touch_memory
	if ! (cd "$dir" && eval "/usr/bin/time -f '%e %U %S %M' -o '$t' $cmd" >"$work/$tool.log" 2>&1); then
		log "$tool failed: $cmd"
		cat "$work/$tool.log" >&2
		exit 1
	fi
	tail -n 1 "$t" >>"$work/$key.$tool"
}

# floor BYTES: four parallel O_DIRECT writers put BYTES (rounded up to 16 MiB) into a new
# file and fsync; append its elapsed seconds to $work/$key.floor.
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
	awk -v a="$start" -v b="$end" 'BEGIN { printf "%.3f\n", b - a }' >>"$work/$key.floor"
}

# copy_floor BYTES: four parallel O_DIRECT copiers read BYTES (rounded up to 16 MiB) of
# $work/source.bin (evicted first) and write them into a new file, then fsync; append the
# elapsed seconds to $work/$key.copy.
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
	awk -v a="$start" -v b="$end" 'BEGIN { printf "%.3f\n", b - a }' >>"$work/$key.copy"
}

# verify OP: qimg's result in $work/first.qimg equals qemu-img's in $work/first.qemu-img.
verify() {
	local op=$1 dst
	dst=$(destination_of "$op")
	for f in top.qcow2 "$dst"; do
		qemu-img compare -q "$work/first.qimg/$f" "$work/first.qemu-img/$f" ||
			die "$key: qimg's $f differs from qemu-img's"
	done
	qemu-img check -q "$work/first.qimg/$dst" || die "$key: qimg's $dst fails qemu-img check"
	local a b
	a=$(qemu-img info --output=json "$work/first.qimg/top.qcow2" | grep '"backing-filename"' || true)
	b=$(qemu-img info --output=json "$work/first.qemu-img/top.qcow2" | grep '"backing-filename"' || true)
	[ "$a" = "$b" ] || die "$key: backing files differ: qimg '$a', qemu-img '$b'"
	log "$key: qimg's result compares equal to qemu-img's"
}

median() { sort -g | awk '{ v[NR] = $1 } END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%.2f", m }'; }
peak_mib() { sort -g | tail -n 1 | awk '{ printf "%.0f", $1 / 1024 }'; }

python3 -c "b = bytearray($touch_gib << 30)" 2>/dev/null || die "cannot touch $touch_gib GiB (set TOUCH_GIB)"
log "touching $touch_gib GiB before each run"
