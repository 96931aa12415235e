//! What a reference into the image file is: who owns it, what it points at, the entry
//! that makes it; and what the walk over them (`references.rs`) reports.

use crate::format::{L1Entry, L2Entry};

/// Who a reference belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Owner {
    /// The image's own structures: header, snapshot table, refcounts, bitmaps.
    Image,
    /// The active (current) state: its L1 table and what it reaches.
    Active,
    /// The internal snapshot at this index of the snapshot table.
    Snapshot(usize),
}

/// What a reference points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReferenceKind {
    /// The header cluster.
    Header,
    /// The snapshot table.
    SnapshotTable,
    /// The refcount table.
    RefcountTable,
    /// A refcount block.
    RefcountBlock,
    /// A bitmap directory, bitmap table or bitmap data cluster.
    Bitmap,
    /// An L1 table.
    L1Table,
    /// An L2 table.
    L2Table,
    /// A data cluster (also a preallocated zero cluster).
    Data,
    /// The bytes of a compressed cluster.
    Compressed,
}

impl ReferenceKind {
    /// Every kind, in declaration order.
    pub(crate) const ALL: [ReferenceKind; 9] = [
        ReferenceKind::Header,
        ReferenceKind::SnapshotTable,
        ReferenceKind::RefcountTable,
        ReferenceKind::RefcountBlock,
        ReferenceKind::Bitmap,
        ReferenceKind::L1Table,
        ReferenceKind::L2Table,
        ReferenceKind::Data,
        ReferenceKind::Compressed,
    ];

    /// The kind's bit in a set of kinds held in a `u16`.
    pub(crate) fn bit(self) -> u16 {
        1 << self as u16
    }

    /// What messages call a structure of this kind.
    pub(crate) fn name(self) -> &'static str {
        match self {
            ReferenceKind::Header => "header",
            ReferenceKind::SnapshotTable => "snapshot table",
            ReferenceKind::RefcountTable => "refcount table",
            ReferenceKind::RefcountBlock => "refcount block",
            ReferenceKind::Bitmap => "bitmap structure",
            ReferenceKind::L1Table => "L1 table",
            ReferenceKind::L2Table => "L2 table",
            ReferenceKind::Data => "data cluster",
            ReferenceKind::Compressed => "compressed cluster",
        }
    }
}

/// Where the entry that makes a reference lives (for rewriting its COPIED flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EntryAt {
    /// Offset of the table holding the entry (an L1 or L2 table).
    pub table: u64,
    /// Index of the 64-bit word in that table.
    pub index: usize,
    /// The entry as stored.
    pub raw: u64,
}

impl EntryAt {
    /// The entry's COPIED flag; `kind` is what the entry references (an L2 table: an L1
    /// entry; data: an L2 entry).
    pub fn copied(&self, kind: ReferenceKind) -> bool {
        match kind {
            ReferenceKind::L2Table => L1Entry(self.raw).copied(),
            _ => L2Entry(self.raw).copied(),
        }
    }

    /// The entry as stored with its COPIED flag set or cleared.
    pub fn with_copied(&self, kind: ReferenceKind, copied: bool) -> u64 {
        match kind {
            ReferenceKind::L2Table => L1Entry(self.raw).with_copied(copied).0,
            _ => L2Entry(self.raw).with_copied(copied).0,
        }
    }
}

/// One reference to a range of the image file.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reference {
    pub owner: Owner,
    pub kind: ReferenceKind,
    pub offset: u64,
    pub len: u64,
    /// The L1 or L2 entry making the reference, for L2 tables, data and compressed
    /// clusters.
    pub entry: Option<EntryAt>,
}

/// Something the walk could not follow.
#[derive(Debug, Clone)]
pub(crate) struct Problem {
    pub message: String,
    /// The refcount structures themselves are broken: only a rebuild repairs them.
    pub refcount_structure: bool,
    /// A table or data reference that was not followed (past the end of the file), with
    /// the entry that makes it: its COPIED flag must be clear.
    pub unfollowed: Option<(ReferenceKind, EntryAt)>,
}

/// What the walk reports, in order: the references of one L2 table come together, right
/// after the reference to the table.
#[derive(Debug)]
pub(crate) enum Event {
    Reference(Reference),
    Problem(Problem),
}

/// Which references to walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    /// Everything.
    All,
    /// Only the active L1 table and what it reaches.
    Active,
    /// Only one L1 table as the file stores it (a snapshot's, or an active table about to
    /// be replaced) and what it reaches, as `owner`'s references.
    L1Table {
        /// Whose table it is.
        owner: Owner,
        /// Where it is.
        offset: u64,
        /// Its entries.
        entries: u32,
    },
}
