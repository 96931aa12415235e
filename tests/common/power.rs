//! A disk behind a power switch, for crash tests: a `FaultStorage` whose writes (and
//! size changes) each count on a switch that cuts the power at a chosen write.

use std::io;
use std::sync::Arc;

use qcow2_engine::storage::{Extent, FaultStorage, Storage};

/// Counts writes, and cuts the power of its disks at its crash point.
pub trait Switch: Send + Sync {
    /// One write happened.
    fn wrote(&self);
}

/// One file's disk: reads and flushes go to `fault`; each write counts on `switch`.
pub struct SwitchedDisk {
    pub fault: Arc<FaultStorage>,
    pub switch: Arc<dyn Switch>,
}

impl Storage for SwitchedDisk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.fault.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.fault.write_at(buf, offset)?;
        self.switch.wrote();
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.fault.flush()
    }
    fn len(&self) -> io::Result<u64> {
        self.fault.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.fault.set_len(len)?;
        self.switch.wrote();
        Ok(())
    }
    fn extent(&self, offset: u64, max_len: u64) -> io::Result<Extent> {
        self.fault.extent(offset, max_len)
    }
}
