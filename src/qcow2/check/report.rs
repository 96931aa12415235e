//! What a check finds and a repair fixes, with `qemu-img check`'s classes, counters and
//! exit codes.

/// Findings kept in a report; the counters stay exact beyond it.
pub(super) const MAX_FINDINGS: usize = 1000;

/// What `repair` may fix (qemu-img's `-r leaks` and `-r all`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairMode {
    /// Only leaked clusters (refcounts above the number of references).
    Leaks,
    /// Leaks and corruptions: refcounts too low or broken refcount structures (rebuilt),
    /// and wrong COPIED flags.
    All,
}

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Data may be corrupted, or further writes may corrupt it.
    Corruption,
    /// Space is wasted, no harm to data.
    Leak,
    /// The check itself could not look at something.
    CheckError,
    /// Something that was found and fixed by the repair.
    Repaired,
}

/// One thing a check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// How serious it is.
    pub severity: Severity,
    /// What is wrong, naming the cluster or table.
    pub message: String,
}

/// The result of [`Image::check`](crate::Image::check) or
/// [`Image::repair`](crate::Image::repair), with `qemu-img check`'s counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Problems the check could not look into (I/O errors, a rebuild `-r leaks` may not do).
    pub check_errors: u64,
    /// Corruptions remaining.
    pub corruptions: u64,
    /// Leaked clusters remaining.
    pub leaks: u64,
    /// Corruptions the repair fixed.
    pub corruptions_fixed: u64,
    /// Leaked clusters the repair fixed.
    pub leaks_fixed: u64,
    /// End of the last cluster in use (referenced or with a refcount).
    pub image_end_offset: u64,
    /// Guest clusters (virtual size in clusters).
    pub total_clusters: u64,
    /// Guest clusters the active image allocates (data, preallocated zero, compressed).
    pub allocated_clusters: u64,
    /// Allocated clusters not placed right after the previous one of their L2 table.
    pub fragmented_clusters: u64,
    /// Compressed clusters.
    pub compressed_clusters: u64,
    /// What was found, at most 1000 entries (the counters are exact).
    pub findings: Vec<Finding>,
    /// Findings left out of `findings`.
    pub findings_omitted: u64,
    /// For a repair: what its first pass found and what it repaired (or could not), in
    /// the order `qemu-img check -r` prints them before its double check; `findings`
    /// is then what the double check finds. Empty for a plain check.
    pub repair_log: Vec<Finding>,
}

impl CheckReport {
    /// `qemu-img check`'s exit code: 0 clean, 1 the check could not complete, 2
    /// corruptions, 3 leaks only.
    pub fn exit_code(&self) -> i32 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }

    /// No corruption, leak or check error remains.
    pub fn is_clean(&self) -> bool {
        self.exit_code() == 0
    }

    pub(super) fn note(&mut self, severity: Severity, message: String) {
        match severity {
            Severity::Corruption => self.corruptions += 1,
            Severity::Leak => self.leaks += 1,
            Severity::CheckError => self.check_errors += 1,
            Severity::Repaired => {}
        }
        if self.findings.len() < MAX_FINDINGS {
            self.findings.push(Finding { severity, message });
        } else {
            self.findings_omitted += 1;
        }
    }
}
