//! Space accounting of a chain (`qimg du`): for each layer, where its file's clusters go
//! (metadata, the active state, each internal snapshot, shared), and how much of its guest
//! data the top of the chain still shows.

use std::path::PathBuf;

use crate::chain::Chain;
use crate::error::Result;
use crate::layers::{Format, Layer};
use crate::qcow2::{ImageSpace, Mapping};

/// One internal snapshot's space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotSpace {
    /// The snapshot's ID.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its space (see [`crate::qcow2::OwnerSpace`]).
    pub space: crate::qcow2::OwnerSpace,
}

/// One layer's space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerSpace {
    /// The layer's file.
    pub filename: PathBuf,
    /// Its format.
    pub format: Format,
    /// Position in the chain (0 = the image the chain was opened from).
    pub depth: usize,
    /// Length of the file.
    pub file_len: u64,
    /// Bytes the file occupies on disk, when known.
    pub disk_usage: Option<u64>,
    /// Cluster accounting of a qcow2 layer (`None` for raw).
    pub clusters: Option<ImageSpace>,
    /// The internal snapshots, in table order (their space is also in `clusters`).
    pub snapshots: Vec<SnapshotSpace>,
    /// Guest bytes the layer's active state holds data for (zero clusters excluded).
    pub guest_data: u64,
    /// Of those, the bytes the top of the chain shows from this layer.
    pub visible_data: u64,
    /// Guest data hidden by layers above (`guest_data - visible_data`): what committing
    /// those layers down would overwrite.
    pub shadowed_data: u64,
}

/// Space accounting of every layer of a chain, top first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpaceReport {
    /// The layers.
    pub layers: Vec<LayerSpace>,
}

impl SpaceReport {
    /// Sum of the layers' file lengths.
    pub fn total_file_len(&self) -> u64 {
        self.layers.iter().map(|l| l.file_len).sum()
    }

    /// Sum of the referenced bytes of the qcow2 layers and the file lengths of raw ones.
    pub fn total_referenced(&self) -> u64 {
        self.layers
            .iter()
            .map(|l| l.clusters.as_ref().map_or(l.file_len, |c| c.referenced))
            .sum()
    }
}

fn has_data(mapping: &Mapping) -> bool {
    matches!(mapping, Mapping::Data { .. } | Mapping::Compressed(_))
}

/// Accounts for the space of every layer of `chain`.
pub fn du(chain: &Chain) -> Result<SpaceReport> {
    let layers = chain.layers();
    let mut visible = vec![0u64; layers.len()];
    for run in chain.runs(0, chain.size()) {
        let run = run?;
        if has_data(&run.mapping) {
            visible[run.depth] += run.len;
        }
    }
    let mut report = SpaceReport { layers: Vec::new() };
    for (depth, layer) in layers.iter().enumerate() {
        let (file_len, disk_usage, clusters, snapshots, guest_data) = match layer {
            Layer::Qcow2(image) => {
                let space = image.space().map_err(|e| image.name_error(e))?;
                let snapshots = image
                    .snapshots()
                    .into_iter()
                    .zip(&space.snapshots)
                    .map(|(s, space)| SnapshotSpace {
                        id: s.id,
                        name: s.name,
                        space: *space,
                    })
                    .collect();
                let mut data = 0;
                for run in image.runs(0, image.size()) {
                    let run = run?;
                    if has_data(&run.mapping) {
                        data += run.len;
                    }
                }
                (
                    image.file_len(),
                    image.allocated_size(),
                    Some(space),
                    snapshots,
                    data,
                )
            }
            Layer::Raw(raw) => (
                raw.file_len(),
                raw.allocated_size(),
                None,
                Vec::new(),
                raw.allocated_size()
                    .unwrap_or(raw.file_len())
                    .min(raw.size()),
            ),
        };
        let visible_data = visible[depth].min(guest_data);
        report.layers.push(LayerSpace {
            filename: layer.name().to_path_buf(),
            format: layer.format(),
            depth,
            file_len,
            disk_usage,
            clusters,
            snapshots,
            guest_data,
            visible_data,
            shadowed_data: guest_data - visible_data,
        });
    }
    Ok(report)
}
