//! The crate's one error type.
//!
//! Every variant says which structure (or file) is wrong and carries the offending value, so
//! that a message such as `top.qcow2: L2 table at 0x50000: entry 3 has unaligned host
//! offset 0x50200` can be printed without further context.
//!
//! As in the crates users know (`std::io`, `anyhow`), an error's `Display` says only what
//! happened at its own level and [`std::error::Error::source`] carries the cause: the file
//! an error happened in wraps the error ([`Error::InFile`]), an I/O error's context wraps
//! the operating system's error. [`Error::report`] (or `anyhow`'s `{:#}`) prints the whole
//! chain on one line.

use std::io;
use std::path::PathBuf;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while opening, reading or writing an image.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An error that happened in a named file (image, backing file, data file).
    #[error("{}", file.display())]
    InFile {
        /// The file the error belongs to.
        file: PathBuf,
        /// What went wrong there.
        #[source]
        source: Box<Error>,
    },

    /// The operating system reported an I/O error.
    #[error("{context}")]
    Io {
        /// What was being done, e.g. "reading L2 table at 0x50000".
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// A structure extends past the end of the file.
    #[error(
        "{structure} at {offset:#x} (+{len} bytes) lies past the end of the file ({file_len} bytes)"
    )]
    Truncated {
        /// The structure being read.
        structure: &'static str,
        /// Where it starts.
        offset: u64,
        /// How long it is.
        len: u64,
        /// How long the file is.
        file_len: u64,
    },

    /// The file does not start with the qcow2 magic.
    #[error("not a qcow2 image (magic {found:#010x})")]
    BadMagic {
        /// The four bytes found instead.
        found: u32,
    },

    /// A qcow2 version other than 2 or 3.
    #[error("unsupported qcow2 version {0}")]
    UnsupportedVersion(u32),

    /// A header or table field holds a value the format (or QEMU's limits) does not allow.
    #[error("invalid {field} {value:#x}: {reason}")]
    InvalidField {
        /// The field, e.g. "cluster_bits".
        field: &'static str,
        /// Its value.
        value: u64,
        /// Why it is refused.
        reason: &'static str,
    },

    /// The image uses an incompatible feature this crate does not implement.
    #[error("unsupported incompatible feature: {name}")]
    UnsupportedFeature {
        /// The feature's name (from the image's feature-name table when it has one).
        name: String,
    },

    /// The image is encrypted; encryption is not supported.
    #[error("encrypted images are not supported (crypt_method {method})")]
    Encrypted {
        /// The header's crypt_method.
        method: u32,
    },

    /// Image metadata is inconsistent.
    #[error("{structure} at {offset:#x}: {reason}")]
    Corrupt {
        /// The structure that is wrong, e.g. "L2 table".
        structure: &'static str,
        /// Its offset in the file.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },

    /// A compressed cluster could not be decompressed.
    #[error("compressed cluster at host offset {host_offset:#x}: {reason}")]
    Decompress {
        /// Where the compressed data starts.
        host_offset: u64,
        /// What the decompressor said.
        reason: String,
    },

    /// An access falls outside the image.
    #[error("access at {offset:#x} (+{len} bytes) is past the end of the image ({size} bytes)")]
    OutOfRange {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// The image's virtual size.
        size: u64,
    },

    /// A backing chain refers back to one of its own images.
    #[error("backing chain loops back to {}", path.display())]
    BackingLoop {
        /// The image that appears twice.
        path: PathBuf,
    },

    /// A backing chain is deeper than the configured limit.
    #[error("backing chain is deeper than {limit} layers")]
    ChainTooDeep {
        /// The limit in force.
        limit: usize,
    },

    /// A backing file name that this crate refuses to open (protocol, `json:` or empty).
    #[error("backing file name {name:?} is not supported: {reason}")]
    UnsupportedBackingName {
        /// The name as stored in the image.
        name: String,
        /// Why it is refused.
        reason: &'static str,
    },

    /// A backing file that the caller's [`crate::chain::BackingPolicy`] does not allow.
    #[error("backing file {} refused: {reason}", path.display())]
    BackingRefused {
        /// The backing file.
        path: PathBuf,
        /// Why.
        reason: &'static str,
    },

    /// An external data file that the caller's [`crate::chain::BackingPolicy`] does not
    /// allow.
    #[error("external data file {} refused: {reason}", path.display())]
    DataFileRefused {
        /// The data file.
        path: PathBuf,
        /// Why.
        reason: &'static str,
    },

    /// A format name qemu-img does not know (see [`crate::Format::from_name`]).
    #[error("unsupported image format {0:?}")]
    UnsupportedFormat(String),

    /// An image of a format qemu-img knows and probes (vmdk, vdi, ...) that this crate
    /// recognises but does not open: only qcow2 and raw images can be layers.
    #[error("{format} images are not supported")]
    FormatNotSupported {
        /// qemu-img's name of the format (`vmdk`).
        format: &'static str,
    },

    /// A write to a raw image whose format was probed would change its first sector so
    /// that it probes as another format (QEMU's raw driver refuses it too: a guest must
    /// not turn its disk into, say, a qcow2 image naming a host file as backing file).
    /// Opening the image explicitly as raw allows it.
    #[error(
        "a write would make this probed raw image look like a {format} image; open it \
         with -f raw to allow it"
    )]
    ProbedRawWrite {
        /// qemu-img's name of the format the first sector would probe as.
        format: &'static str,
    },

    /// A backing file (named by the image this error is in) could not be opened: missing
    /// when the source's kind is [`io::ErrorKind::NotFound`].
    #[error("could not open backing file {}", path.display())]
    BackingFile {
        /// The backing file, as resolved against the overlay's directory.
        path: PathBuf,
        /// Why it could not be opened.
        #[source]
        source: io::Error,
    },

    /// A name that is no image of the chain (see [`crate::Chain::find`]).
    #[error("'{name}' is not in its backing chain")]
    NotInChain {
        /// The name as given.
        name: String,
    },

    /// Another process uses the file in a way this open conflicts with: QEMU's image
    /// locks ([`crate::storage::Locking`]). `shared`: the other process holds
    /// `permission`, which this open does not share; otherwise it does not share
    /// `permission`, which this open needs.
    #[error(
        "Failed to get {}\"{permission}\" lock: is another process using the image?",
        if *shared { "shared " } else { "" }
    )]
    Locked {
        /// QEMU's name of the permission (`write`, `resize`, `consistent read`, ...).
        permission: &'static str,
        /// Whether the lock that failed is the one of a permission not shared.
        shared: bool,
    },

    /// An image outside the chain being merged depends on the image a merge would change
    /// (`direct`: uses it as its backing file; otherwise further down its chain), so what
    /// it shows would change: the classic way to corrupt linked clones.
    #[error(
        "is {} {}; committing would change what it shows",
        if *direct { "the backing file of" } else { "in the backing chain of" },
        dependent.display()
    )]
    HasDependents {
        /// The image that would change.
        dependent: PathBuf,
        /// Whether it uses the image as its backing file directly.
        direct: bool,
    },

    /// The image's corrupt bit is set: it may be read, but not written until `check -r
    /// all` ([`crate::Image::repair`]) repairs it.
    #[error("the image is marked corrupt (run check -r all to repair it)")]
    MarkedCorrupt,

    /// The image cannot be written.
    #[error("image is read-only: {reason}")]
    ReadOnly {
        /// Why.
        reason: &'static str,
    },

    /// An operation this crate does not (yet) perform on this kind of image.
    #[error("not supported: {0}")]
    Unsupported(&'static str),

    /// The caller asked for something invalid (an option value, a range).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// A persistent bitmap operation was refused.
    #[error("bitmap '{name}': {reason}")]
    Bitmap {
        /// The bitmap's name.
        name: String,
        /// What is wrong.
        reason: String,
    },

    /// A long operation was stopped by its progress callback.
    #[error("operation cancelled")]
    Cancelled,
}

impl Error {
    /// Attaches the file this error happened in, unless it already names one.
    pub fn in_file(self, file: impl Into<PathBuf>) -> Error {
        match self {
            Error::InFile { .. } => self,
            other => Error::InFile {
                file: file.into(),
                source: Box::new(other),
            },
        }
    }

    /// The error with any [`Error::InFile`] wrappers removed.
    pub fn root(&self) -> &Error {
        match self {
            Error::InFile { source, .. } => source.root(),
            other => other,
        }
    }

    /// The file the error happened in, if it names one (the innermost, when a backing
    /// file's error was wrapped in its overlay's name).
    pub fn file(&self) -> Option<&std::path::Path> {
        match self {
            Error::InFile { file, source } => source.file().or(Some(file)),
            _ => None,
        }
    }

    /// The kind of the operating system's error behind this one, if an I/O error caused it
    /// (e.g. [`io::ErrorKind::NotFound`] for a missing image or backing file).
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        match self.root() {
            Error::Io { source, .. } | Error::BackingFile { source, .. } => Some(source.kind()),
            _ => None,
        }
    }

    /// The whole error on one line: this error and each of its causes, separated by
    /// `": "` (`top.qcow2: reading L2 table at 0x50000: Input/output error (os error 5)`).
    pub fn report(&self) -> Report<'_> {
        Report(self)
    }

    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn corrupt(
        structure: &'static str,
        offset: u64,
        reason: impl Into<String>,
    ) -> Error {
        Error::Corrupt {
            structure,
            offset,
            reason: reason.into(),
        }
    }

    pub(crate) fn invalid(field: &'static str, value: u64, reason: &'static str) -> Error {
        Error::InvalidField {
            field,
            value,
            reason,
        }
    }
}

/// An error and its causes on one line (see [`Error::report`]).
#[derive(Debug, Clone, Copy)]
pub struct Report<'a>(&'a Error);

impl std::fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = std::error::Error::source(self.0);
        while let Some(e) = cause {
            write!(f, ": {e}")?;
            cause = std::error::Error::source(e);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_says_its_own_level_and_the_report_says_every_cause_once() {
        let os = io::Error::new(io::ErrorKind::NotFound, "gone");
        let e = Error::io("reading L2 table at 0x50000", os).in_file("top.qcow2");
        assert_eq!(e.to_string(), "top.qcow2");
        let inner = std::error::Error::source(&e).unwrap();
        assert_eq!(inner.to_string(), "reading L2 table at 0x50000");
        assert_eq!(
            std::error::Error::source(inner).unwrap().to_string(),
            "gone"
        );
        assert_eq!(
            e.report().to_string(),
            "top.qcow2: reading L2 table at 0x50000: gone"
        );
        assert_eq!(e.io_kind(), Some(io::ErrorKind::NotFound));
        assert_eq!(e.file(), Some(std::path::Path::new("top.qcow2")));
    }
}
