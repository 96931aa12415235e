//! What a server exports: the chain, its flags and metadata contexts, and each command
//! carried out on it (the protocol's checks, the engine's calls, errno on failure).

use std::sync::Arc;

use crate::chain::Chain;
use crate::error::{Error, Result};
use crate::layers::Layer;
use crate::nbd::codec::{
    Command, Request, StatusExtent, command_flags, errno, status, transmission_flags,
};
use crate::ops::{MapHints, map_range_with};
use crate::qcow2::{DirtyBitmap, Mapping};

/// Largest read or write payload, and the block size limit advertised (qemu-nbd's
/// `NBD_MAX_BUFFER_SIZE`).
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// Most extents in one block status chunk (QEMU's `NBD_MAX_BLOCK_STATUS_EXTENTS`), so a
/// reply stays bounded whatever the request's length.
pub const MAX_EXTENTS: usize = (1 << 20) / 8;

/// How a server exports its chain (qemu-nbd's options).
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// The export's name (`-x`; default empty, as qemu-nbd).
    pub name: String,
    /// Its description (`-D`).
    pub description: String,
    /// Refuse writes (`-r`).
    pub read_only: bool,
    /// Offer `qemu:allocation-depth` (`-A`).
    pub allocation_depth: bool,
    /// Persistent bitmaps of the top image offered as `qemu:dirty-bitmap:NAME` (`-B`).
    pub bitmaps: Vec<String>,
    /// Trims and zero writes may free clusters (`--discard=unmap`; qemu-nbd's default
    /// `ignore` makes a trim do nothing).
    pub discard: bool,
    /// Most clients at once (`-e`; 0: no limit).
    pub max_connections: usize,
    /// Keep serving once the last client leaves (`-t`).
    pub persistent: bool,
    /// Requests of one connection carried out at once (0: one at a time, in the
    /// connection's own thread).
    pub workers: usize,
}

impl Default for ExportOptions {
    fn default() -> ExportOptions {
        ExportOptions {
            name: String::new(),
            description: String::new(),
            read_only: false,
            allocation_depth: false,
            bitmaps: Vec::new(),
            discard: false,
            max_connections: 1,
            persistent: false,
            workers: 4,
        }
    }
}

/// A metadata context a client may select.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Context {
    /// `base:allocation`.
    Allocation,
    /// `qemu:allocation-depth`.
    Depth,
    /// `qemu:dirty-bitmap:NAME`, by index in [`Export::bitmaps`].
    Bitmap(usize),
}

/// The export a server holds.
pub(crate) struct Export {
    pub(crate) chain: Arc<Chain>,
    pub(crate) options: ExportOptions,
    /// The bitmaps offered, as loaded when serving started (an enabled bitmap is only
    /// offered read-only, as QEMU refuses it on a writable export, so none changes).
    pub(crate) bitmaps: Vec<(String, DirtyBitmap)>,
    hints: MapHints,
}

/// A command's outcome: nothing, data read (after the prefix asked for), extents per
/// context, or an errno.
pub(crate) enum Outcome {
    Done,
    Data(Vec<u8>),
    Status(Vec<(u32, Vec<StatusExtent>)>),
    Failed(u32, String),
}

fn failed(code: u32, message: impl Into<String>) -> Outcome {
    Outcome::Failed(code, message.into())
}

/// The protocol's errno for an engine error.
pub(crate) fn errno_of(error: &Error) -> u32 {
    match error.root() {
        Error::OutOfRange { .. } | Error::InvalidArgument(_) => errno::EINVAL,
        Error::ReadOnly { .. } | Error::MarkedCorrupt => errno::EPERM,
        Error::Unsupported(_) => errno::ENOTSUP,
        Error::Io { source, .. } => match source.raw_os_error() {
            Some(28) | Some(122) => errno::ENOSPC,
            Some(27) => errno::EOVERFLOW,
            Some(12) => errno::ENOMEM,
            _ if source.kind() == std::io::ErrorKind::StorageFull => errno::ENOSPC,
            _ => errno::EIO,
        },
        _ => errno::EIO,
    }
}

impl Export {
    /// Checks the options against the chain and loads the bitmaps.
    pub(crate) fn new(chain: Arc<Chain>, options: ExportOptions) -> Result<Export> {
        let name_error = |what: String| Error::InvalidArgument(what).in_file(chain.top().name());
        if options.name.len() > crate::nbd::codec::MAX_STRING {
            return Err(name_error("export name longer than 4096 bytes".into()));
        }
        if options.description.len() > crate::nbd::codec::MAX_STRING {
            return Err(name_error(
                "export description longer than 4096 bytes".into(),
            ));
        }
        if !options.read_only {
            chain.ensure_writable()?;
        }
        let mut bitmaps = Vec::new();
        for name in &options.bitmaps {
            let Some(image) = chain.top().as_qcow2() else {
                return Err(name_error(format!("Bitmap '{name}' is not found")));
            };
            let info = image
                .bitmaps()?
                .into_iter()
                .find(|b| &b.name == name)
                .ok_or_else(|| name_error(format!("Bitmap '{name}' is not found")))?;
            if info.enabled && !options.read_only {
                return Err(name_error(format!(
                    "Enabled bitmap '{name}' incompatible with writable export"
                )));
            }
            bitmaps.push((name.clone(), image.load_bitmap(name)?));
        }
        let hints = MapHints::learn(&chain);
        Ok(Export {
            chain,
            options,
            bitmaps,
            hints,
        })
    }

    /// The export's size.
    pub(crate) fn size(&self) -> u64 {
        self.chain.size()
    }

    /// Transmission flags for a client (`DF` only with structured replies).
    pub(crate) fn flags(&self, structured: bool) -> u16 {
        use transmission_flags as f;
        let mut flags = f::HAS_FLAGS | f::SEND_FLUSH | f::SEND_FUA | f::SEND_CACHE;
        // One chain serves every connection, so a flush on one covers the writes of all.
        // As qemu-nbd, not offered when only one client may connect: a client such as
        // nbdcopy would open more connections than the server accepts.
        if self.options.max_connections != 1 {
            flags |= f::CAN_MULTI_CONN;
        }
        if self.options.read_only {
            flags |= f::READ_ONLY;
        } else {
            flags |= f::SEND_TRIM | f::SEND_WRITE_ZEROES | f::SEND_FAST_ZERO;
        }
        if structured {
            flags |= f::SEND_DF;
        }
        flags
    }

    /// Every context this export offers, with its name.
    pub(crate) fn contexts(&self) -> Vec<(Context, String)> {
        let mut out = vec![(Context::Allocation, "base:allocation".to_owned())];
        if self.options.allocation_depth {
            out.push((Context::Depth, "qemu:allocation-depth".to_owned()));
        }
        for (i, (name, _)) in self.bitmaps.iter().enumerate() {
            out.push((Context::Bitmap(i), format!("qemu:dirty-bitmap:{name}")));
        }
        out
    }

    /// The contexts a query selects (as QEMU reads them: `base:` and `qemu:` select
    /// their namespace, `qemu:dirty-bitmap:` every bitmap, otherwise exact names).
    pub(crate) fn select(&self, query: &str) -> Vec<(Context, String)> {
        self.contexts()
            .into_iter()
            .filter(|(_, name)| match query {
                "base:" | "qemu:" | "qemu:dirty-bitmap:" => name.starts_with(query),
                q => name == q,
            })
            .collect()
    }

    /// Carries out one request (its payload for a write). `contexts` are the ones the
    /// client selected, by id - 1. Data read comes after `prefix` bytes left for the
    /// reply's header, so that it is sent without a copy.
    pub(crate) fn execute(
        &self,
        request: &Request,
        payload: &[u8],
        contexts: &[Context],
        prefix: usize,
    ) -> Outcome {
        let size = self.size();
        let offset = request.offset;
        let len = u64::from(request.length);
        let writes = matches!(
            request.command,
            Command::Write | Command::Trim | Command::WriteZeroes
        );
        if request.flags & !command_flags::KNOWN != 0 {
            return failed(errno::EINVAL, "unknown command flags");
        }
        if matches!(request.command, Command::Other(_) | Command::Disconnect) {
            return failed(errno::EINVAL, "unknown command");
        }
        if writes && self.options.read_only {
            return failed(errno::EPERM, "the export is read-only");
        }
        if request.command != Command::Flush && offset.checked_add(len).is_none_or(|e| e > size) {
            // As qemu-nbd: a write past the end has no space, anything else is invalid.
            let code = if matches!(request.command, Command::Write | Command::WriteZeroes) {
                errno::ENOSPC
            } else {
                errno::EINVAL
            };
            return failed(code, "request past the end of the export");
        }
        let fua = request.flags & command_flags::FUA != 0;
        let result = match request.command {
            Command::Read => {
                if request.length > MAX_PAYLOAD {
                    return failed(errno::EINVAL, "read longer than 32 MiB");
                }
                let mut buf = vec![0u8; prefix + request.length as usize];
                return match self.chain.read_at(&mut buf[prefix..], offset) {
                    Ok(()) => Outcome::Data(buf),
                    Err(e) => failed(errno_of(&e), e.report().to_string()),
                };
            }
            Command::Write => self.chain.write_at(payload, offset),
            Command::Flush => {
                if self.options.read_only {
                    Ok(())
                } else {
                    self.chain.flush()
                }
            }
            Command::Trim if !self.options.discard || len == 0 => Ok(()),
            Command::Trim => self.chain.discard(offset, len),
            Command::Cache => {
                if request.length > MAX_PAYLOAD {
                    return failed(errno::EINVAL, "cache request longer than 32 MiB");
                }
                self.cache(offset, len)
            }
            Command::WriteZeroes => {
                if request.flags & command_flags::FAST_ZERO != 0
                    && !self.zeroes_are_fast(offset, len)
                {
                    return failed(errno::ENOTSUP, "zeroing this range is not fast");
                }
                let unmap = self.options.discard && request.flags & command_flags::NO_HOLE == 0;
                if len == 0 {
                    Ok(())
                } else {
                    self.chain.write_zeroes(offset, len, unmap)
                }
            }
            Command::BlockStatus => {
                if len == 0 {
                    return failed(errno::EINVAL, "block status of no bytes");
                }
                if contexts.is_empty() {
                    return failed(errno::EINVAL, "no metadata context selected");
                }
                let one = request.flags & command_flags::REQ_ONE != 0;
                let mut out = Vec::with_capacity(contexts.len());
                for (i, context) in contexts.iter().enumerate() {
                    match self.block_status(*context, offset, len, one) {
                        Ok(extents) => out.push((i as u32 + 1, extents)),
                        Err(e) => return failed(errno_of(&e), e.report().to_string()),
                    }
                }
                return Outcome::Status(out);
            }
            Command::Disconnect | Command::Other(_) => unreachable!("refused above"),
        };
        let result = result.and_then(|()| {
            if fua && writes && !self.options.read_only {
                self.chain.flush()
            } else {
                Ok(())
            }
        });
        match result {
            Ok(()) => Outcome::Done,
            Err(e) => failed(errno_of(&e), e.report().to_string()),
        }
    }

    /// Reads the range so that what follows finds it cached, in 1 MiB pieces.
    fn cache(&self, offset: u64, len: u64) -> Result<()> {
        let mut buf = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            self.chain.read_at(&mut buf[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Whether zeroing `offset..offset + len` needs no data written, as QEMU's qcow2
    /// decides for `BDRV_REQ_NO_FALLBACK`: version 3 zero flags on whole clusters, and a
    /// partial cluster only when its whole cluster already reads as zeros.
    fn zeroes_are_fast(&self, offset: u64, len: u64) -> bool {
        let image = match self.chain.top() {
            Layer::Qcow2(image) => image,
            Layer::Raw(_) => return true,
        };
        if image.header().version < 3 {
            return false;
        }
        let cluster = image.cluster_size();
        let end = offset + len;
        let size = self.size();
        let start = offset - offset % cluster;
        let stop = if end == size {
            end
        } else {
            end.div_ceil(cluster) * cluster
        };
        if start == offset && (stop == end || end == size) {
            return true;
        }
        self.chain
            .runs(start, stop.min(size) - start)
            .all(|r| r.is_ok_and(|r| r.reads_as_zero()))
    }

    /// The extents of one context over `offset..offset + len` (at most one with `one`),
    /// adjacent extents with the same flags merged, at most [`MAX_EXTENTS`].
    fn block_status(
        &self,
        context: Context,
        offset: u64,
        len: u64,
        one: bool,
    ) -> Result<Vec<StatusExtent>> {
        let max = if one { 1 } else { MAX_EXTENTS };
        let end = offset + len;
        let mut out: Vec<StatusExtent> = Vec::new();
        // Appends `length` bytes with `flags`; false once the reply is full.
        let push = |length: u64, flags: u32, out: &mut Vec<StatusExtent>| -> bool {
            let length = length as u32; // every extent lies inside the request's u32 length
            let full = out.len() == max;
            match out.last_mut() {
                Some(last) if last.flags == flags => last.length += length,
                _ if full => return false,
                _ => out.push(StatusExtent { length, flags }),
            }
            true
        };
        match context {
            Context::Allocation => {
                for entry in map_range_with(&self.chain, offset, len, self.hints.clone()) {
                    let entry = entry?;
                    let length = entry.end().min(end) - entry.start.max(offset);
                    let flags = (if entry.data { 0 } else { status::HOLE })
                        | (if entry.zero { status::ZERO } else { 0 });
                    if !push(length, flags, &mut out) {
                        break;
                    }
                }
            }
            Context::Depth => {
                let layers = self.chain.layers();
                for run in self.chain.runs(offset, len) {
                    let run = run?;
                    // As QEMU: past the end of a shorter backing file, the zeros count as
                    // allocated by that file.
                    let allocated = run.mapping != Mapping::Unallocated
                        || run.offset >= layers[run.depth].size();
                    let depth = if allocated { run.depth as u32 + 1 } else { 0 };
                    if !push(run.len, depth, &mut out) {
                        break;
                    }
                }
            }
            Context::Bitmap(i) => {
                let bitmap = &self.bitmaps[i].1;
                let mut at = offset;
                let mut full = false;
                for (start, run_len) in bitmap.runs_from(offset) {
                    let dirty_start = start.max(at);
                    let dirty_end = (start + run_len).min(end);
                    if dirty_start >= end {
                        break;
                    }
                    if dirty_start > at && !push(dirty_start - at, 0, &mut out) {
                        full = true;
                        break;
                    }
                    if dirty_end > dirty_start
                        && !push(dirty_end - dirty_start, status::DIRTY, &mut out)
                    {
                        full = true;
                        break;
                    }
                    at = dirty_end.max(at);
                }
                if !full && at < end {
                    push(end - at, 0, &mut out);
                }
            }
        }
        Ok(out)
    }
}
