//! A bounded least-recently-used cache of decoded L2 tables.
//!
//! The lock is held only to look up or insert, never across I/O: a miss reads the table
//! outside the lock, and two threads missing at once both read it (harmless).
//!
//! Tables changed by a write are *pinned*: they are the only up-to-date copy until the
//! next checkpoint writes them, so eviction skips them.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A decoded L2 table: raw 64-bit words (two per entry with extended L2).
/// (An `Arc<Vec>` rather than `Arc<[u64]>`: a changed table is published without a copy.)
pub(crate) type L2Table = Arc<Vec<u64>>;

#[derive(Debug)]
pub(crate) struct L2Cache {
    capacity: AtomicUsize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    tick: u64,
    by_offset: HashMap<u64, (L2Table, u64)>,
    by_age: BTreeMap<u64, u64>,
    pinned: HashMap<u64, L2Table>,
}

impl L2Cache {
    /// A cache holding at most `capacity` tables (at least one).
    pub(crate) fn new(capacity: usize) -> L2Cache {
        L2Cache {
            capacity: AtomicUsize::new(capacity.max(1)),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Holds at most `capacity` tables (at least one) from now on.
    pub(crate) fn set_capacity(&self, capacity: usize) {
        self.capacity.store(capacity.max(1), Ordering::Relaxed);
        self.evict_over_capacity(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// How many tables it holds at most.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity.load(Ordering::Relaxed)
    }

    fn evict_over_capacity(&self, inner: &mut Inner) {
        while inner.by_offset.len() > self.capacity() {
            let Some((_, victim)) = inner.by_age.pop_first() else {
                break;
            };
            inner.by_offset.remove(&victim);
        }
    }

    pub(crate) fn get(&self, offset: u64) -> Option<L2Table> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = inner.pinned.get(&offset) {
            return Some(t.clone());
        }
        inner.tick += 1;
        let tick = inner.tick;
        let (table, old_tick) = {
            let slot = inner.by_offset.get_mut(&offset)?;
            let old = slot.1;
            slot.1 = tick;
            (slot.0.clone(), old)
        };
        inner.by_age.remove(&old_tick);
        inner.by_age.insert(tick, offset);
        Some(table)
    }

    pub(crate) fn insert(&self, offset: u64, table: L2Table) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.tick += 1;
        let tick = inner.tick;
        if let Some((_, old)) = inner.by_offset.insert(offset, (table, tick)) {
            inner.by_age.remove(&old);
        }
        inner.by_age.insert(tick, offset);
        self.evict_over_capacity(&mut inner);
    }

    /// Forgets a table (after it was freed).
    #[allow(dead_code)] // used once snapshots can free L2 tables
    pub(crate) fn remove(&self, offset: u64) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, tick)) = inner.by_offset.remove(&offset) {
            inner.by_age.remove(&tick);
        }
        inner.pinned.remove(&offset);
    }

    /// Forgets every unpinned table (after tables were rewritten on disk directly).
    pub(crate) fn clear(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.by_offset.clear();
        inner.by_age.clear();
    }

    /// Stores a changed table, pinned until [`L2Cache::unpin`].
    pub(crate) fn insert_pinned(&self, offset: u64, table: L2Table) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, tick)) = inner.by_offset.remove(&offset) {
            inner.by_age.remove(&tick);
        }
        inner.pinned.insert(offset, table);
    }

    /// The pinned table at `offset`, if any.
    pub(crate) fn pinned(&self, offset: u64) -> Option<L2Table> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.pinned.get(&offset).cloned()
    }

    /// Makes a written table evictable again.
    pub(crate) fn unpin(&self, offset: u64) {
        let table = {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            inner.pinned.remove(&offset)
        };
        if let Some(t) = table {
            self.insert(offset, t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_recently_used_table_is_evicted() {
        let c = L2Cache::new(2);
        c.insert(1, Arc::from(vec![1u64]));
        c.insert(2, Arc::from(vec![2u64]));
        assert!(c.get(1).is_some());
        c.insert(3, Arc::from(vec![3u64]));
        assert!(c.get(2).is_none());
        assert_eq!(c.get(1).unwrap()[0], 1);
        assert_eq!(c.get(3).unwrap()[0], 3);
    }
}
