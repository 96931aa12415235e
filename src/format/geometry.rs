/// The index arithmetic of one image: cluster size, L2 entry width and subclusters, kept
/// on one value instead of passing `cluster_bits` around.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    cluster_bits: u32,
    extended_l2: bool,
}

impl Geometry {
    /// Geometry for `cluster_bits` (already validated, 9..=21) and the extended-L2 flag.
    pub fn new(cluster_bits: u32, extended_l2: bool) -> Geometry {
        debug_assert!((9..=21).contains(&cluster_bits));
        Geometry {
            cluster_bits,
            extended_l2,
        }
    }
    /// log2 of the cluster size.
    pub fn cluster_bits(&self) -> u32 {
        self.cluster_bits
    }
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// Whether L2 entries are 128-bit extended entries with subcluster bitmaps.
    pub fn extended_l2(&self) -> bool {
        self.extended_l2
    }
    /// Bytes per L2 entry (8, or 16 with extended L2).
    pub fn l2_entry_bytes(&self) -> u64 {
        if self.extended_l2 { 16 } else { 8 }
    }
    /// Entries per L2 table (one cluster).
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_bytes()
    }
    /// Guest bytes covered by one L2 table.
    pub fn l2_span(&self) -> u64 {
        self.l2_entries() << self.cluster_bits
    }
    /// Subclusters per cluster (32 with extended L2, else 1).
    pub fn subclusters(&self) -> u64 {
        if self.extended_l2 { 32 } else { 1 }
    }
    /// Subcluster size in bytes (the cluster size without extended L2).
    pub fn subcluster_size(&self) -> u64 {
        self.cluster_size() / self.subclusters()
    }
    /// Index into the L1 table for a guest offset.
    pub fn l1_index(&self, guest: u64) -> u64 {
        guest / self.l2_span()
    }
    /// Index into the L2 table for a guest offset.
    pub fn l2_index(&self, guest: u64) -> u64 {
        (guest >> self.cluster_bits) % self.l2_entries()
    }
    /// Offset of a byte within its cluster.
    pub fn offset_in_cluster(&self, offset: u64) -> u64 {
        offset & (self.cluster_size() - 1)
    }
    /// The start of the cluster holding `offset`.
    pub fn cluster_start(&self, offset: u64) -> u64 {
        offset & !(self.cluster_size() - 1)
    }
    /// Number of L1 entries needed to map `size` guest bytes (None on overflow).
    pub fn l1_entries_for(&self, size: u64) -> Option<u64> {
        let span = self.l2_span();
        Some(size.checked_add(span - 1)? / span)
    }
    /// Number of clusters needed to hold `bytes` bytes.
    pub fn clusters_for(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.cluster_size())
    }
    /// Bit position of the sector count in a compressed cluster descriptor.
    pub fn compressed_size_shift(&self) -> u32 {
        62 - (self.cluster_bits - 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_for_64k_clusters_match_the_spec() {
        let g = Geometry::new(16, false);
        assert_eq!(g.l2_entries(), 8192);
        assert_eq!(g.l2_span(), 512 << 20);
        assert_eq!(g.l1_index(512 << 20), 1);
        assert_eq!(g.l2_index(65536 * 3 + 5), 3);
        assert_eq!(g.compressed_size_shift(), 54);
    }

    #[test]
    fn extended_l2_halves_the_entries_per_table() {
        let g = Geometry::new(16, true);
        assert_eq!(g.l2_entries(), 4096);
        assert_eq!(g.subcluster_size(), 2048);
    }
}
