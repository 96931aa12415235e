//! Bounded memory (issue #6): claims in a hostile image are checked against the file's
//! real size before anything is allocated. A counting allocator measures what opening an
//! image allocates; it is the global allocator, which serves every test of a binary, so
//! these tests have a binary of their own (the qimg runs on hostile images are in
//! `tests/hostile/`).

mod common;
// Only the header parsing and byte helpers are used here.
#[allow(dead_code)]
#[path = "hostile/layout.rs"]
mod layout;

use std::alloc::{GlobalAlloc, Layout as AllocLayout, System};
use std::cell::Cell;
use std::time::{Duration, Instant};

use common::{HeaderField, Scratch};
use layout::{Layout, put, put_field};

/// Counts the bytes this thread has allocated and not freed, and the peak.
struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn count(delta: isize) {
    // `try_with`: the thread-local may be gone while a thread shuts down.
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every call is forwarded to the system allocator unchanged; the counters are
// thread-local cells that allocate nothing.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: AllocLayout) -> *mut u8 {
        count(layout.size() as isize);
        // SAFETY: the caller's contract is passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: AllocLayout) -> *mut u8 {
        count(layout.size() as isize);
        // SAFETY: the caller's contract is passed on.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: AllocLayout) {
        count(-(layout.size() as isize));
        // SAFETY: the caller's contract is passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: AllocLayout, new_size: usize) -> *mut u8 {
        count(new_size as isize - layout.size() as isize);
        // SAFETY: the caller's contract is passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The most bytes `f` had allocated at once on this thread (beyond what was live before).
fn peak_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    let peak = PEAK.with(Cell::get) - base;
    (out, peak.max(0) as usize)
}

/// A small valid image (64 KiB clusters) made by qemu-img, as bytes.
fn small_image(s: &Scratch, name: &str, options: &str) -> Vec<u8> {
    s.create(name, options, 1 << 20);
    std::fs::read(s.path(name)).unwrap()
}

/// Opens `bytes` from memory, read-only or for writing; returns the error message and
/// the peak allocation.
fn open_in_memory(bytes: Vec<u8>, writable: bool) -> (Result<(), String>, usize) {
    use qcow2_engine::storage::MemStorage;
    use qcow2_engine::{Image, ImageOptions};
    let storage = Box::new(MemStorage::from_bytes(bytes));
    peak_allocation(|| {
        let options = ImageOptions {
            writable,
            ..ImageOptions::default()
        };
        Image::from_storage(storage, "claims.qcow2", &options, None)
            .map(drop)
            .map_err(|e| e.report().to_string())
    })
}

#[test]
fn claims_larger_than_the_file_fail_fast_without_allocating_them() {
    let s = Scratch::new();
    let base = small_image(&s, "small.qcow2", "cluster_size=64k");
    let base_len = base.len();
    let mut claims: Vec<(&str, Vec<u8>, bool)> = Vec::new();
    let mut with = |what, writable, f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = base.clone();
        f(&mut b);
        claims.push((what, b, writable));
    };
    with("a 32 MiB L1 table", false, &|b| {
        put_field(b, HeaderField::L1Size, 4 << 20)
    });
    with("a 32 MiB L1 table at the last 56-bit offset", false, &|b| {
        put_field(b, HeaderField::L1Size, 4 << 20);
        put_field(b, HeaderField::L1TableOffset, (1 << 56) - 0x10000);
    });
    with("an 8 MiB refcount table (opened for writing)", true, &|b| {
        put_field(b, HeaderField::RefcountTableClusters, 128)
    });
    with("a bitmap directory over QEMU's 64 MiB limit", false, &|b| {
        let end = Layout::parse(b).end_marker.unwrap();
        put(b, end, 4, 0x2385_2875);
        put(b, end + 4, 4, 24);
        put(b, end + 8, 4, 1);
        put(b, end + 16, 8, 64 << 20);
        put(b, end + 24, 8, 0x10000);
        put(b, end + 32, 8, 0);
        put_field(b, HeaderField::AutoclearFeatures, 1);
    });
    for (what, bytes, writable) in claims {
        let len = bytes.len();
        let started = Instant::now();
        let (result, peak) = open_in_memory(bytes, writable);
        let elapsed = started.elapsed();
        eprintln!("{what}: {result:?}, peak {peak} bytes, {elapsed:?}");
        assert!(result.is_err(), "{what}: opened");
        // What may be allocated: copies of what the file holds, a few clusters more.
        assert!(
            peak < 4 * len.max(base_len) + (1 << 20),
            "{what}: {peak} bytes allocated for a {len}-byte file"
        );
        assert!(elapsed < Duration::from_secs(2), "{what}: took {elapsed:?}");
    }
}

/// A snapshot table reaching past the end of the file reads as zeros there, as QEMU reads
/// it (`bdrv_pread` past the end of a file gives zeros; `qemu-img info` opens these
/// images): such claims open, in memory bounded by QEMU's limits on the table (65536
/// entries, read in 1 MiB pieces), not by the file's size.
#[test]
fn snapshot_tables_past_the_end_open_as_in_qemu_in_bounded_memory() {
    let s = Scratch::new();
    let base = small_image(&s, "small.qcow2", "cluster_size=64k");
    let mut claims: Vec<(&str, Vec<u8>, usize)> = Vec::new();
    let mut with = |what, count, f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = base.clone();
        f(&mut b);
        claims.push((what, b, count));
    };
    with("65536 snapshots from inside the file", 65536, &|b| {
        put_field(b, HeaderField::NbSnapshots, 65536);
        put_field(b, HeaderField::SnapshotsOffset, 0x10000);
    });
    with("65536 snapshots wholly past the end", 65536, &|b| {
        put_field(b, HeaderField::NbSnapshots, 65536);
        put_field(b, HeaderField::SnapshotsOffset, 0x7fff_0000);
    });
    with("a snapshot of 129 KiB", 1, &|b| {
        // The entry starts 64 KiB before the end of the file and needs 129 KiB. (It
        // lies on the refcount block: its L1 offset is made aligned, as qimg checks.)
        put_field(b, HeaderField::NbSnapshots, 1);
        put_field(b, HeaderField::SnapshotsOffset, 0x20000);
        put(b, 0x20000, 8, 0);
        put(b, 0x20000 + 12, 2, 0xffff);
        put(b, 0x20000 + 14, 2, 0xffff);
        put(b, 0x20000 + 36, 4, 1024);
    });
    for (what, bytes, count) in claims {
        s.write_file("claim.qcow2", &bytes);
        let qemu = s.output("qemu-img", &["info", "--output=json", "claim.qcow2"]);
        assert!(qemu.status.success(), "{what}: qemu-img refuses it too");
        let snapshots: serde_json::Value = serde_json::from_slice(&qemu.stdout).unwrap();
        assert_eq!(snapshots["snapshots"].as_array().unwrap().len(), count);
        let started = Instant::now();
        let (result, peak) = open_in_memory(bytes, false);
        let elapsed = started.elapsed();
        eprintln!("{what}: {result:?}, peak {peak} bytes, {elapsed:?}");
        assert_eq!(result, Ok(()), "{what}");
        assert!(peak < 16 << 20, "{what}: {peak} bytes allocated");
        assert!(elapsed < Duration::from_secs(2), "{what}: took {elapsed:?}");
    }
}

#[test]
fn snapshot_table_past_64_mib_is_refused_with_its_own_message() {
    use qcow2_engine::Chain;
    let s = Scratch::new();
    let mut b = small_image(&s, "many.qcow2", "cluster_size=64k");
    // 1030 entries with 65535-byte names of 'a': 67.5 MB of table, past QEMU's 64 MiB.
    let table = 0x100000u64;
    let entry = (40u64 + 0xffff).div_ceil(8) * 8;
    let count = 1030u64;
    b.resize((table + entry * count) as usize, 0);
    for i in 0..count {
        let at = table + entry * i;
        put(&mut b, at, 8, 0x30000);
        put(&mut b, at + 8, 4, 1);
        put(&mut b, at + 14, 2, 0xffff);
        b[(at + 40) as usize..(at + 40 + 0xffff) as usize].fill(b'a');
    }
    put_field(&mut b, HeaderField::NbSnapshots, count);
    put_field(&mut b, HeaderField::SnapshotsOffset, table);
    s.write_file("many.qcow2", &b);
    let err = Chain::open(s.path("many.qcow2"))
        .unwrap_err()
        .report()
        .to_string();
    assert!(err.contains("64 MiB"), "{err}");
    // One entry fewer than the limit needs opens.
    put_field(&mut b, HeaderField::NbSnapshots, 1023);
    s.write_file("many.qcow2", &b);
    let chain = Chain::open(s.path("many.qcow2")).unwrap();
    assert_eq!(chain.top().as_qcow2().unwrap().snapshots().len(), 1023);
}

#[test]
fn extension_area_full_of_extensions_fails_fast() {
    use qcow2_engine::Chain;
    let s = Scratch::new();
    // 2 MiB clusters: room for 262144 empty extensions, each of another type.
    let mut b = small_image(&s, "exts.qcow2", "cluster_size=2M");
    let end = Layout::parse(&b).end_marker.unwrap();
    let mut at = end;
    let mut kind = 0x1000_0000u64;
    while at + 8 <= 2 << 20 {
        put(&mut b, at, 4, kind);
        put(&mut b, at + 4, 4, 0);
        at += 8;
        kind += 1;
    }
    s.write_file("exts.qcow2", &b);
    let started = Instant::now();
    let err = Chain::open(s.path("exts.qcow2"))
        .unwrap_err()
        .report()
        .to_string();
    assert!(err.contains("1024 header extensions"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(1));
}

/// Opens `bytes` from memory, read-only or for writing, lists its bitmaps and loads each;
/// returns the first error and the peak allocation.
fn open_with_bitmaps(bytes: Vec<u8>, writable: bool) -> (Result<usize, String>, usize) {
    use qcow2_engine::storage::MemStorage;
    use qcow2_engine::{Image, ImageOptions};
    let storage = Box::new(MemStorage::from_bytes(bytes));
    peak_allocation(|| {
        let options = ImageOptions {
            writable,
            ..ImageOptions::default()
        };
        let image = Image::from_storage(storage, "claims.qcow2", &options, None)
            .map_err(|e| e.report().to_string())?;
        let listed = image.bitmaps().map_err(|e| e.report().to_string())?;
        for info in &listed {
            image
                .load_bitmap(&info.name)
                .map_err(|e| e.report().to_string())?;
        }
        Ok(listed.len())
    })
}

/// A bitmap directory claiming QEMU's maximum sizes — 65535 bitmaps, a 64 MiB directory, a
/// bitmap table of QEMU's 0x8000000 entries or of 512 MiB of clusters — allocates no more
/// than the file holds, opened for writing (which loads enabled bitmaps) or read-only
/// (listed and loaded here). The one claim that may cost more is a bitmap whose table
/// really covers 512 MiB of bitmap data: QEMU's limit for one bitmap, which its disk needs.
#[test]
fn bitmap_directory_claiming_maximum_sizes_allocates_what_the_file_holds() {
    let s = Scratch::new();
    // One enabled bitmap at 4 KiB over a 1 MiB disk: a table of 1 entry.
    let mut base = small_image(&s, "bitmap.qcow2", "cluster_size=64k");
    s.qemu_img(&["bitmap", "--add", "-g", "4k", "bitmap.qcow2", "b0"]);
    base.clone_from(&std::fs::read(s.path("bitmap.qcow2")).unwrap());
    let bitmaps = Layout::parse(&base).bitmaps.expect("a bitmaps extension");
    let (ext, entry) = (bitmaps.ext_data, bitmaps.entries[0].at);
    let mut claims: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut with = |what, f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = base.clone();
        f(&mut b);
        claims.push((what, b));
    };
    with(
        "65535 bitmaps in a directory of QEMU's maximum size",
        &|b| {
            put(b, ext, 4, 65535);
            put(b, ext + 8, 8, 1024 * 65535);
        },
    );
    with("65535 bitmaps in the one entry's directory", &|b| {
        put(b, ext, 4, 65535)
    });
    with("a directory of 64 MiB + 1", &|b| {
        put(b, ext + 8, 8, (64 << 20) + 1)
    });
    with("a table of QEMU's 0x8000000 entries", &|b| {
        put(b, entry + 8, 4, 0x800_0000)
    });
    with("a table of 512 MiB of clusters, for another disk", &|b| {
        put(b, entry + 8, 4, 0x2000)
    });
    with("a table of 512 MiB of clusters at the last offset", &|b| {
        put(b, entry, 8, (1 << 56) - 0x10000);
        put(b, entry + 8, 4, 0x2000);
    });
    with("a name of 65535 bytes", &|b| put(b, entry + 18, 2, 0xffff));
    with("extra data of 4 GiB", &|b| {
        put(b, entry + 20, 4, 0xffff_ffff)
    });
    for (what, bytes) in claims {
        let len = bytes.len();
        for writable in [true, false] {
            let started = Instant::now();
            let (result, peak) = open_with_bitmaps(bytes.clone(), writable);
            let elapsed = started.elapsed();
            eprintln!("{what} (writable {writable}): {result:?}, peak {peak} bytes, {elapsed:?}");
            assert!(result.is_err(), "{what}: opened and loaded");
            assert!(
                peak < 4 * len + (1 << 20),
                "{what}: {peak} bytes allocated for a {len}-byte file"
            );
            assert!(elapsed < Duration::from_secs(2), "{what}: took {elapsed:?}");
        }
    }

    // A bitmap whose table really is 512 MiB of clusters: 8192 entries of 64 KiB at 512
    // bytes a bit cover a 2 TiB disk. Loading it may take QEMU's 512 MiB, no more: opening
    // for writing loads it (and `load_bitmap` would return a copy, so only the open is
    // measured then); read-only, `load_bitmap` loads it.
    s.create("big.qcow2", "cluster_size=64k", 2 << 40);
    s.qemu_img(&["bitmap", "--add", "-g", "512", "big.qcow2", "big"]);
    let big = std::fs::read(s.path("big.qcow2")).unwrap();
    let table = Layout::parse(&big).bitmaps.unwrap().entries[0].table_size;
    assert_eq!(table, 0x2000);
    for writable in [true, false] {
        let (result, peak) = if writable {
            let (result, peak) = open_in_memory(big.clone(), true);
            (result.map(|()| 1), peak)
        } else {
            open_with_bitmaps(big.clone(), false)
        };
        eprintln!("a 512 MiB bitmap (writable {writable}): {result:?}, peak {peak} bytes");
        assert_eq!(result, Ok(1));
        assert!(
            peak < 4 * big.len() + (512 << 20) + (1 << 20),
            "{peak} bytes allocated for a {}-byte file",
            big.len()
        );
    }
}
