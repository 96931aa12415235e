//! Rebuilding refcounts from the mapping tables (for images left dirty with lazy
//! refcounts). Filled in below.
use crate::error::Result;

use super::Image;

impl Image {
    pub(crate) fn rebuild_refcounts(&self) -> Result<()> {
        Err(crate::Error::Unsupported(
            "rebuilding refcounts of a dirty image",
        ))
    }
}
