//! The operations that write to, resize or snapshot the top image, each applied to the
//! chain and to the model; merges and reopening are dispatched from here too.

use crate::qcow2::compress_cluster;

use super::config::{MAX_IMAGES, MAX_LAYERS, MAX_SNAPSHOTS, SECTOR};
use super::model::{SnapshotModel, pattern_bytes};
use super::program::ChainOp;
use super::run::{Outcome, Run};

impl Run {
    pub(super) fn op(&mut self, op: &ChainOp) {
        let size = self.size();
        let top = self.layers[0].config;
        let cluster = top.cluster_size;
        let has_backing = self.layers.len() > 1;
        match *op {
            ChainOp::Write { range, pattern } => {
                let (off, len) = range.resolve(size, cluster);
                let data = pattern_bytes(pattern, off, len);
                let r = self.chain().write_at(&data, off);
                self.expect(r, Outcome::Succeeds, "write");
                self.layers[0].view[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            ChainOp::WriteZeroes(range) => {
                let (off, len) = range.resolve(size, cluster);
                let unmap = range.flags & 8 != 0;
                let r = self.chain().write_zeroes(off, len, unmap);
                self.expect(r, Outcome::Succeeds, "write_zeroes");
                self.layers[0].view[off as usize..(off + len) as usize].fill(0);
            }
            ChainOp::Discard(range) => {
                let (off, len) = range.resolve(size, cluster);
                let r = self.chain().discard(off, len);
                self.expect(r, Outcome::Succeeds, "discard");
                // Whole clusters, and the partial last one when the range reaches the end;
                // version 2 with a backing file cannot discard at all.
                if !(top.v2 && has_backing) {
                    let end = off + len;
                    let lo = (off.div_ceil(cluster) * cluster).min(size);
                    let hi = if end == size {
                        size
                    } else {
                        end / cluster * cluster
                    };
                    if lo < hi {
                        self.layers[0].view[lo as usize..hi as usize].fill(0);
                    }
                }
            }
            ChainOp::WriteCompressed { offset, pattern } => {
                let off = u64::from(offset) % size / cluster * cluster;
                let len = cluster.min(size - off);
                let mut data = pattern_bytes(pattern, off, len);
                let kind = self.top().compression_type();
                data.resize(cluster as usize, 0);
                let compressed = compress_cluster(kind, &data)
                    .unwrap_or_else(|e| self.fail(format_args!("compressing: {}", e.report())));
                let r = match compressed {
                    Some(c) => self.chain().write_compressed(off, &c),
                    None => self.chain().write_at(&data[..len as usize], off),
                };
                self.expect(r, Outcome::Succeeds, "write_compressed");
                self.layers[0].view[off as usize..(off + len) as usize]
                    .copy_from_slice(&data[..len as usize]);
            }
            ChainOp::Flush => {
                let r = self.chain().flush();
                self.expect(r, Outcome::Succeeds, "flush");
            }
            ChainOp::SnapshotCreate => self.snapshot_create(),
            ChainOp::SnapshotApply(i) => self.snapshot_apply(i),
            ChainOp::SnapshotDelete(i) => self.snapshot_delete(i),
            // These check every layer themselves.
            ChainOp::Commit(mode) => return self.commit(mode),
            ChainOp::Pull(mode) => return self.pull(mode),
            ChainOp::Rebase(mode) => return self.rebase(mode),
            ChainOp::Reopen => {
                self.reopen();
                return self.check_all_views("reopen");
            }
            ChainOp::Overlay(config) => {
                if self.layers.len() >= MAX_LAYERS || self.images >= MAX_IMAGES {
                    return;
                }
                self.new_image(config, size);
                return self.check_all_views("new overlay");
            }
            ChainOp::Resize(arg) => {
                let arg = u64::from(arg);
                let new_size = (arg + 1) * 8192 - arg % 7 * SECTOR;
                let backing_longer = self
                    .layers
                    .get(1)
                    .is_some_and(|b| b.view.len() as u64 > size);
                let has_snapshots = self
                    .snapshots
                    .get(&self.layers[0].name)
                    .is_some_and(|s| !s.is_empty());
                // Growth inside the partial last cluster is zeroed by writing zeros: only
                // growth past it needs zero clusters.
                let past_tail = new_size > size.div_ceil(top.cluster_size) * top.cluster_size;
                let refused = top.v2 && (has_snapshots || backing_longer && past_tail);
                let outcome = if new_size == size || !refused {
                    Outcome::Succeeds
                } else {
                    Outcome::Refused
                };
                let r = self.chain().resize(new_size, true);
                if self.expect(r, outcome, &format!("resize to {new_size}")) {
                    self.layers[0].view.resize(new_size as usize, 0);
                }
            }
        }
        self.check_content("after the operation");
    }

    /// Narrow refcounts may not count the references a snapshot adds (1 bit: none at
    /// all; up to 8 bits: a few snapshots, or a host cluster packed with compressed
    /// clusters); 16 bits and more always do here.
    fn snapshot_outcome(&self) -> Outcome {
        if self.layers[0].config.refcount_bits < 16 {
            Outcome::MayBeRefused
        } else {
            Outcome::Succeeds
        }
    }

    fn snapshot_create(&mut self) {
        let image = self.layers[0].name.clone();
        if self.snapshots.get(&image).map_or(0, Vec::len) >= MAX_SNAPSHOTS {
            return;
        }
        let name = format!("s{}", self.next_snapshot);
        self.next_snapshot += 1;
        let own = self.own_sectors(0);
        let r = self.top().snapshot_create(&name).map(drop);
        if self.expect(r, self.snapshot_outcome(), "snapshot create") {
            let bytes = self.layers[0].view.clone();
            self.snapshots
                .entry(image)
                .or_default()
                .push(SnapshotModel { name, bytes, own });
        }
        self.check_snapshot_names();
    }

    fn snapshot_apply(&mut self, index: u8) {
        let Some(list) = self.snapshots.get(&self.layers[0].name) else {
            return;
        };
        if list.is_empty() {
            return;
        }
        let snapshot = list[usize::from(index) % list.len()].clone();
        let r = self.top().snapshot_apply(&snapshot.name);
        if self.expect(r, self.snapshot_outcome(), "snapshot apply") {
            self.layers[0].view = self.snapshot_view(&snapshot, 0);
        }
        self.check_snapshot_names();
    }

    fn snapshot_delete(&mut self, index: u8) {
        let image = self.layers[0].name.clone();
        let Some(list) = self.snapshots.get(&image) else {
            return;
        };
        if list.is_empty() {
            return;
        }
        let i = usize::from(index) % list.len();
        let name = list[i].name.clone();
        let r = self.top().snapshot_delete(&name);
        if self.expect(r, Outcome::Succeeds, "snapshot delete") {
            self.snapshots.get_mut(&image).expect("listed").remove(i);
        }
        self.check_snapshot_names();
    }
}
