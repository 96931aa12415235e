//! Opening an image: the header and its extensions, feature checks, the backing file
//! name, the L1 table and the snapshot table, each validated and bounded by the file's
//! real length before it is read (ARCHITECTURE.md, "Untrusted input").

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, RwLock};

use crate::error::{Error, Result};
use crate::format::{
    self, AutoclearFeatures, FeatureKind, Geometry, Header, HeaderExtensions, IncompatibleFeatures,
    SnapshotEntry,
};
use crate::storage::Storage;

use super::image::{Image, ImageOptions, Meta, WrittenRuns, read_exact};
use super::l2cache::L2Cache;

impl Image {
    /// Opens the qcow2 image at `path` read-only with default options. An external data
    /// file is opened relative to the image's directory.
    pub fn open(path: impl AsRef<Path>) -> Result<Image> {
        Image::open_with(path, &ImageOptions::default())
    }

    /// Opens the qcow2 image at `path` for writing with default options, for changes to
    /// the image itself (internal snapshots, flush, close). A corrupt image is refused
    /// ([`crate::Error::MarkedCorrupt`]); a dirty one is repaired first, as QEMU does.
    /// Guest writes go through [`crate::Chain::open_writable`]: copy-on-write reads what
    /// the backing chain shows.
    pub fn open_writable(path: impl AsRef<Path>) -> Result<Image> {
        let options = ImageOptions {
            writable: true,
            ..ImageOptions::default()
        };
        Image::open_with(path, &options)
    }

    /// Opens the qcow2 image at `path` as `options` say: read-only, or for writing when
    /// [`ImageOptions::writable`].
    pub fn open_with(path: impl AsRef<Path>, options: &ImageOptions) -> Result<Image> {
        Image::open_with_inner(path.as_ref(), options)
    }

    /// Opens the image at `path` read-only for [`Image::check`] as `qemu-img check` opens
    /// it. (A snapshot table reaching past the end of the file reads as zeros there, as
    /// every open reads it: see [`Image::from_storage`]; the check reports such entries.)
    pub fn open_for_check(path: impl AsRef<Path>, options: &ImageOptions) -> Result<Image> {
        let options = ImageOptions {
            writable: false,
            ..options.clone()
        };
        Image::open_with_inner(path.as_ref(), &options)
    }

    fn open_with_inner(path: &Path, options: &ImageOptions) -> Result<Image> {
        let storage = options.open_storage(path, options.writable)?;
        let read_only = ImageOptions {
            writable: false,
            ..options.clone()
        };
        let mut image = Image::from_storage_inner(storage, path.to_path_buf(), &read_only, None)
            .map_err(|e| e.in_file(path))?;
        if image.has_external_data_file() {
            let meta = image.meta();
            let name = meta
                .extensions
                .data_file()
                .map(str::to_owned)
                .ok_or_else(|| {
                    Error::invalid(
                        "incompatible_features",
                        meta.header.incompatible_features.bits(),
                        "external data file bit set but no data file name extension",
                    )
                    .in_file(path)
                })?;
            drop(meta);
            let data_path = crate::names::resolve_relative(path, &name);
            let data = options
                .open_unnamed(&data_path, options.writable)
                .map_err(|e| {
                    match e {
                        Error::Io { source, .. } => Error::io(
                            format!("opening external data file {}", data_path.display()),
                            source,
                        ),
                        other => other.in_file(&data_path),
                    }
                    .in_file(path)
                })?;
            image.data_file = Some(data);
        }
        if options.writable {
            image.make_writable().map_err(|e| e.in_file(path))?;
        }
        Ok(image)
    }

    /// Opens the image at `path` for [`Image::repair`]: the file is opened for writing but
    /// the image is not prepared for guest writes, so a dirty or corrupt image opens
    /// as it is.
    pub fn open_for_repair(path: impl AsRef<Path>) -> Result<Image> {
        Image::open_for_repair_with(path, &ImageOptions::default())
    }

    /// [`Image::open_for_repair`] with the opener and locking of `options` (its other
    /// fields are ignored).
    pub fn open_for_repair_with(path: impl AsRef<Path>, options: &ImageOptions) -> Result<Image> {
        let path = path.as_ref();
        let options = ImageOptions {
            opener: options.opener.clone(),
            locking: options.locking,
            ..ImageOptions::default()
        };
        let storage = options.open_storage(path, true)?;
        Image::from_storage_inner(storage, path.to_path_buf(), &options, None)
            .map_err(|e| e.in_file(path))
    }

    /// Opens an image held in any [`Storage`]. `name` is used in error messages. An image
    /// with an external data file needs `data_file`.
    pub fn from_storage(
        storage: Box<dyn Storage>,
        name: impl Into<PathBuf>,
        options: &ImageOptions,
        data_file: Option<Box<dyn Storage>>,
    ) -> Result<Image> {
        let name = name.into();
        let external = data_file.is_some();
        let mut image = Image::from_storage_inner(storage, name.clone(), options, data_file)
            .map_err(|e| e.in_file(&name))?;
        if image.has_external_data_file() && !external {
            return Err(Error::InvalidArgument(
                "image has an external data file but none was given".into(),
            )
            .in_file(&name));
        }
        if options.writable {
            image.make_writable().map_err(|e| e.in_file(&name))?;
        }
        Ok(image)
    }

    fn from_storage_inner(
        storage: Box<dyn Storage>,
        name: PathBuf,
        options: &ImageOptions,
        data_file: Option<Box<dyn Storage>>,
    ) -> Result<Image> {
        let file_len = storage
            .len()
            .map_err(|e| Error::io("reading file length", e))?;
        let Headers {
            header,
            extensions,
            backing_file,
        } = Headers::read(&*storage, file_len)?;
        let geometry = Geometry::new(header.cluster_bits, header.extended_l2());
        let l1_bytes = read_exact(
            &*storage,
            "L1 table",
            header.l1_table_offset,
            u64::from(header.l1_size) * 8,
            file_len,
        )?;
        let l1 = format::decode_u64_table(&l1_bytes);
        let snapshots = read_snapshot_table(&*storage, &header, file_len)?;
        let tables = (options.l2_cache_bytes / header.cluster_size()).max(4) as usize;
        Ok(Image {
            name,
            storage,
            data_file,
            geometry,
            external_data_file: header
                .incompatible_features
                .contains(IncompatibleFeatures::EXTERNAL_DATA_FILE),
            meta: RwLock::new(Meta {
                header,
                extensions,
                backing_file,
                l1,
                snapshots,
                bitmap_tables: Vec::new(),
            }),
            l2_cache: L2Cache::new(tables),
            file_len: AtomicU64::new(file_len),
            data_written: WrittenRuns::new(geometry.cluster_size()),
            last_compressed: Mutex::new(None),
            io_lock: RwLock::new(()),
            writer: None,
            overlap: RwLock::new(Default::default()),
            bitmaps: RwLock::new(Default::default()),
        })
    }
}

/// What an image says about itself before any table is read: the header, its extensions
/// (validated, features checked) and the backing file's name. Bounded: at most one
/// cluster (2 MiB) and the name (1023 bytes) are read, whatever the header claims.
#[derive(Debug, Clone)]
pub(crate) struct Headers {
    pub(crate) header: Header,
    pub(crate) extensions: HeaderExtensions,
    pub(crate) backing_file: Option<String>,
}

impl Headers {
    /// Reads and checks the headers of the qcow2 image in `storage` (`file_len` bytes).
    pub(crate) fn read(storage: &dyn Storage, file_len: u64) -> Result<Headers> {
        // The header and its extensions live in the first cluster; read what is there
        // (at most 2 MiB) and let decode say what is missing.
        let first = read_exact(storage, "header", 0, file_len.min(512), file_len)?;
        let probe = Header::decode(&first);
        let header = match probe {
            Ok(h) => h,
            Err(Error::Truncated { .. }) if file_len > 512 => Header::decode(&read_exact(
                storage,
                "header",
                0,
                file_len.min(1 << format::MAX_CLUSTER_BITS),
                file_len,
            )?)?,
            Err(e) => return Err(e),
        };
        let cluster_size = header.cluster_size();
        let first_cluster = read_exact(
            storage,
            "header cluster",
            0,
            file_len.min(cluster_size),
            file_len,
        )?;
        let ext_end = if header.backing_file_offset != 0 {
            header.backing_file_offset
        } else {
            cluster_size
        };
        let ext_start = u64::from(header.header_length);
        // Version 2 images have extensions too (after the 72-byte header), as QEMU reads them.
        let extensions = if ext_end > ext_start {
            let area_end = (ext_end as usize).min(first_cluster.len());
            let area = first_cluster
                .get(ext_start as usize..area_end)
                .unwrap_or(&[]);
            HeaderExtensions::decode(area, ext_start)?
        } else {
            HeaderExtensions::default()
        };
        extensions.validate(&header)?;
        check_features(&header, &extensions)?;
        // An empty name is no backing file, as QEMU reads it.
        let backing_file = if header.backing_file_offset != 0 && header.backing_file_size != 0 {
            let raw = read_exact(
                storage,
                "backing file name",
                header.backing_file_offset,
                header.backing_file_size.into(),
                file_len,
            )?;
            if raw.contains(&0) {
                // QEMU would cut the name at the NUL; a name holding one is not a path.
                return Err(Error::invalid(
                    "backing file name",
                    header.backing_file_offset,
                    "contains a NUL byte",
                ));
            }
            Some(String::from_utf8(raw).map_err(|_| {
                Error::invalid(
                    "backing file name",
                    header.backing_file_offset,
                    "not valid UTF-8",
                )
            })?)
        } else {
            None
        };
        Ok(Headers {
            header,
            extensions,
            backing_file,
        })
    }

    /// The names of the image's internal snapshots, read from its snapshot table.
    pub(crate) fn snapshot_names(
        &self,
        storage: &dyn Storage,
        file_len: u64,
    ) -> Result<Vec<String>> {
        Ok(read_snapshot_table(storage, &self.header, file_len)?
            .into_iter()
            .map(|s| s.name)
            .collect())
    }
}

fn check_features(header: &Header, extensions: &HeaderExtensions) -> Result<()> {
    let unknown = header.incompatible_features.bits() & !IncompatibleFeatures::SUPPORTED.bits();
    if unknown != 0 {
        let bit = unknown.trailing_zeros();
        let name = extensions
            .feature_name(FeatureKind::Incompatible, bit)
            .map(str::to_owned)
            .unwrap_or_else(|| format!("unknown incompatible feature bit {bit}"));
        return Err(Error::UnsupportedFeature { name });
    }
    if header.crypt_method != 0 {
        return Err(Error::Encrypted {
            method: header.crypt_method,
        });
    }
    let external = header
        .incompatible_features
        .contains(IncompatibleFeatures::EXTERNAL_DATA_FILE);
    if header
        .autoclear_features
        .contains(AutoclearFeatures::DATA_FILE_RAW)
        && !external
    {
        // QEMU ignores (and clears on write) the raw bit without a data file.
    }
    if external && header.nb_snapshots != 0 {
        return Err(Error::invalid(
            "nb_snapshots",
            header.nb_snapshots.into(),
            "internal snapshots are not allowed with an external data file",
        ));
    }
    Ok(())
}

/// Reads the snapshot table. What lies past the end of the file reads as zeros, as
/// QEMU's `qcow2_read_snapshots` reads it (`bdrv_pread` past the end of a file returns
/// zeros): an entry cut short by a truncation opens with the rest of its fields zero, and
/// an entry wholly past the end is empty (no ID, no name, no L1 table), as `qemu-img
/// snapshot -l` and `qemu-img info` list them. Memory stays bounded: at most 65536
/// entries, read from at most QEMU's 64 MiB in 1 MiB pieces.
fn read_snapshot_table(
    storage: &dyn Storage,
    header: &Header,
    file_len: u64,
) -> Result<Vec<SnapshotEntry>> {
    let count = header.nb_snapshots as usize;
    if count == 0 {
        return Ok(Vec::new());
    }
    // Each entry takes at least 40 bytes; check the minimum fits QEMU's limit before
    // reading anything.
    let min_len = count as u64 * 40;
    let offset = header.snapshots_offset;
    let limit = offset.saturating_add(format::MAX_SNAPSHOT_TABLE_BYTES);
    if offset.checked_add(min_len).is_none_or(|end| end > limit) {
        return Err(Error::Truncated {
            structure: "snapshot table",
            offset,
            len: min_len,
            file_len,
        });
    }
    // Nothing past QEMU's 64 MiB limit is ever needed.
    let readable = (limit - offset).min(format::MAX_SNAPSHOT_TABLE_BYTES);
    let read = |at: u64, len: u64| -> Result<Vec<u8>> {
        let inside = file_len.saturating_sub(at).min(len);
        let mut buf = if inside > 0 {
            read_exact(storage, "snapshot table", at, inside, file_len)?
        } else {
            Vec::new()
        };
        buf.resize(len as usize, 0);
        Ok(buf)
    };
    // The largest entry: fixed part, maximal extra data, ID and name, padding.
    const MAX_ENTRY: u64 = 40 + format::MAX_SNAPSHOT_EXTRA_DATA as u64 + 2 * 0xffff + 8;
    // Read in pieces, so memory follows what the entries really use.
    const PIECE: u64 = 1 << 20;
    let mut snapshots = Vec::with_capacity(count.min(1024));
    let (mut pos, mut buf_start) = (0u64, 0u64);
    let mut buf = Vec::new();
    for _ in 0..count {
        let buf_end = buf_start + buf.len() as u64;
        if buf_end < readable && buf_end - pos < MAX_ENTRY {
            buf_start = pos;
            let want = (readable - pos).min(PIECE);
            buf = read(offset + pos, want)?;
        }
        let chunk = &buf[(pos - buf_start) as usize..];
        let (entry, used) = match SnapshotEntry::decode(chunk, offset + pos) {
            Ok(decoded) => decoded,
            // The entry needs bytes past QEMU's limit on the table.
            Err(Error::Truncated { len, .. }) => {
                return Err(Error::invalid(
                    "snapshot table size",
                    pos + len,
                    "snapshot table larger than QEMU's 64 MiB limit",
                ));
            }
            Err(e) => return Err(e),
        };
        if entry.l1_table_offset % header.cluster_size() != 0 {
            return Err(Error::corrupt(
                "snapshot table",
                offset + pos,
                format!(
                    "snapshot {} has unaligned L1 table offset {:#x}",
                    short_id(&entry.id),
                    entry.l1_table_offset
                ),
            ));
        }
        if u64::from(entry.l1_size) * 8 > format::MAX_L1_BYTES {
            return Err(Error::corrupt(
                "snapshot table",
                offset + pos,
                format!(
                    "snapshot {} has an L1 table larger than 32 MiB",
                    short_id(&entry.id)
                ),
            ));
        }
        pos += used as u64;
        snapshots.push(entry);
    }
    Ok(snapshots)
}

/// A snapshot ID for a message: quoted, and cut after 32 characters (a hostile table may
/// hold 64 KiB IDs).
fn short_id(id: &str) -> String {
    match id.char_indices().nth(32) {
        Some((cut, _)) => format!("{:?}...", &id[..cut]),
        None => format!("{id:?}"),
    }
}
