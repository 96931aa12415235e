//! Snapshot table entries (spec: "Snapshots").

use super::MAX_SNAPSHOT_EXTRA_DATA;
use super::{be16, be32, be64, put_be16, put_be32, put_be64};
use crate::error::{Error, Result};

/// The extra data fields QEMU knows, plus whatever follows them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SnapshotExtra {
    /// 64-bit VM state size (bytes 40-47), overriding the 32-bit field.
    pub vm_state_size_large: Option<u64>,
    /// Virtual disk size when the snapshot was taken (bytes 48-55).
    pub disk_size: Option<u64>,
    /// Record/replay instruction count (bytes 56-63), -1 when disabled.
    pub icount: Option<u64>,
    /// Extra data past the known fields, preserved as is.
    pub unknown: Vec<u8>,
}

impl SnapshotExtra {
    /// Bytes of extra data the entry stores.
    pub(crate) fn len(&self) -> usize {
        let known = if self.icount.is_some() {
            24
        } else if self.disk_size.is_some() {
            16
        } else if self.vm_state_size_large.is_some() {
            8
        } else {
            0
        };
        known + self.unknown.len()
    }
}

/// One entry of the snapshot table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotEntry {
    /// Offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in that L1 table.
    pub l1_size: u32,
    /// Unique ID string.
    pub id: String,
    /// Name.
    pub name: String,
    /// Wall-clock seconds when taken.
    pub date_sec: u32,
    /// Nanosecond part of the date.
    pub date_nsec: u32,
    /// Guest run time in nanoseconds.
    pub vm_clock_nsec: u64,
    /// 32-bit VM state size (superseded by `extra.vm_state_size_large`).
    pub vm_state_size32: u32,
    /// Extra data.
    pub extra: SnapshotExtra,
}

impl SnapshotEntry {
    /// The VM state size, from the 64-bit extra field when present.
    pub fn vm_state_size(&self) -> u64 {
        self.extra
            .vm_state_size_large
            .unwrap_or(self.vm_state_size32.into())
    }

    /// Bytes this entry takes in the table (a multiple of 8).
    pub fn encoded_len(&self) -> usize {
        self.unpadded_len().div_ceil(8) * 8
    }

    /// Bytes of the entry without the padding to 8 that separates it from the next.
    pub fn unpadded_len(&self) -> usize {
        40 + self.extra.len() + self.id.len() + self.name.len()
    }

    /// Decodes the entry at the start of `buf`; returns it and its encoded length.
    /// `table_offset` is where `buf` starts in the file, for messages.
    pub fn decode(buf: &[u8], table_offset: u64) -> Result<(SnapshotEntry, usize)> {
        let trunc = |len: usize| Error::Truncated {
            structure: "snapshot table entry",
            offset: table_offset,
            len: len as u64,
            file_len: buf.len() as u64,
        };
        if buf.len() < 40 {
            return Err(trunc(40));
        }
        let id_len = be16(buf, 12) as usize;
        let name_len = be16(buf, 14) as usize;
        let extra_len = be32(buf, 36);
        if extra_len > MAX_SNAPSHOT_EXTRA_DATA {
            return Err(Error::invalid(
                "snapshot extra_data_size",
                extra_len.into(),
                "more than QEMU's 1024 bytes",
            ));
        }
        let extra_len = extra_len as usize;
        let total = (40 + extra_len + id_len + name_len).div_ceil(8) * 8;
        if buf.len() < 40 + extra_len + id_len + name_len {
            return Err(trunc(total));
        }
        let l1_table_offset = be64(buf, 0);
        let extra_bytes = &buf[40..40 + extra_len];
        let field = |i: usize| (extra_bytes.len() >= 8 * (i + 1)).then(|| be64(extra_bytes, 8 * i));
        let extra = SnapshotExtra {
            vm_state_size_large: field(0),
            disk_size: field(1),
            icount: field(2),
            unknown: extra_bytes.get(24..).unwrap_or(&[]).to_vec(),
        };
        let extra = if extra_len % 8 != 0 && extra_len < 24 {
            // A partial known field: keep all bytes verbatim rather than guess.
            SnapshotExtra {
                vm_state_size_large: None,
                disk_size: None,
                icount: None,
                unknown: extra_bytes.to_vec(),
            }
        } else {
            extra
        };
        let id_start = 40 + extra_len;
        let name_start = id_start + id_len;
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let entry = SnapshotEntry {
            l1_table_offset,
            l1_size: be32(buf, 8),
            id: text(&buf[id_start..name_start]),
            name: text(&buf[name_start..name_start + name_len]),
            date_sec: be32(buf, 16),
            date_nsec: be32(buf, 20),
            vm_clock_nsec: be64(buf, 24),
            vm_state_size32: be32(buf, 32),
            extra,
        };
        Ok((entry, total.min(buf.len())))
    }

    /// Encodes the entry (padded to a multiple of 8 bytes).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.encoded_len()];
        put_be64(&mut out, 0, self.l1_table_offset);
        put_be32(&mut out, 8, self.l1_size);
        put_be16(&mut out, 12, self.id.len() as u16);
        put_be16(&mut out, 14, self.name.len() as u16);
        put_be32(&mut out, 16, self.date_sec);
        put_be32(&mut out, 20, self.date_nsec);
        put_be64(&mut out, 24, self.vm_clock_nsec);
        put_be32(&mut out, 32, self.vm_state_size32);
        let extra_len = self.extra.len();
        put_be32(&mut out, 36, extra_len as u32);
        let mut at = 40;
        for v in [
            self.extra.vm_state_size_large,
            self.extra.disk_size,
            self.extra.icount,
        ]
        .into_iter()
        .take((extra_len - self.extra.unknown.len()) / 8)
        {
            put_be64(&mut out, at, v.unwrap_or(0));
            at += 8;
        }
        out[at..at + self.extra.unknown.len()].copy_from_slice(&self.extra.unknown);
        at += self.extra.unknown.len();
        out[at..at + self.id.len()].copy_from_slice(self.id.as_bytes());
        at += self.id.len();
        out[at..at + self.name.len()].copy_from_slice(self.name.as_bytes());
        out
    }
}

/// Size of a snapshot table holding `entries`, as QEMU counts it (its `snapshots_size`):
/// entries padded to 8 bytes, except the last. Refcounts cover exactly this many bytes.
pub fn snapshot_table_len(entries: &[SnapshotEntry]) -> u64 {
    match entries.split_last() {
        None => 0,
        Some((last, rest)) => {
            rest.iter().map(|e| e.encoded_len() as u64).sum::<u64>() + last.unpadded_len() as u64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_with_qemu_extra_data_round_trips() {
        let e = SnapshotEntry {
            l1_table_offset: 0x50000,
            l1_size: 16,
            id: "1".into(),
            name: "before-upgrade".into(),
            date_sec: 1_700_000_000,
            date_nsec: 5,
            vm_clock_nsec: 0,
            vm_state_size32: 0,
            extra: SnapshotExtra {
                vm_state_size_large: Some(0),
                disk_size: Some(1 << 30),
                icount: Some(u64::MAX),
                unknown: vec![],
            },
        };
        let bytes = e.encode();
        assert_eq!(bytes.len() % 8, 0);
        let (d, len) = SnapshotEntry::decode(&bytes, 0).unwrap();
        assert_eq!(d, e);
        assert_eq!(len, bytes.len());
    }

    #[test]
    fn truncated_entry_is_an_error() {
        assert!(SnapshotEntry::decode(&[0u8; 39], 0).is_err());
    }

    #[test]
    fn extra_data_larger_than_1_kib_is_refused() {
        let mut e = SnapshotEntry::decode(&[0u8; 48], 0).unwrap().0;
        e.extra.unknown = vec![0; MAX_SNAPSHOT_EXTRA_DATA as usize];
        assert!(SnapshotEntry::decode(&e.encode(), 0).is_ok());
        let mut bytes = e.encode();
        put_be32(&mut bytes, 36, MAX_SNAPSHOT_EXTRA_DATA + 1);
        bytes.resize(bytes.len() + 8, 0);
        assert!(matches!(
            SnapshotEntry::decode(&bytes, 0),
            Err(Error::InvalidField {
                field: "snapshot extra_data_size",
                ..
            })
        ));
    }
}
