//! Limits on the files images name, for images that are not trusted.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::layers::Layer;
use crate::qcow2::Image;
use crate::storage::{FileInfo, Opener, canonicalize_with, stat_with};

/// Limits on the files that images name — backing files and external data files — for
/// images that are not trusted (loops and the depth limit apply always).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackingPolicy {
    /// Every backing file and external data file must lie inside this directory once
    /// symbolic links and `..` are resolved.
    pub confine_to: Option<PathBuf>,
    /// Refuse backing files and external data files that are not regular files (block
    /// and character devices, FIFOs, sockets).
    pub regular_files_only: bool,
}

impl BackingPolicy {
    /// Why the policy refuses the file at `path` (already known to exist, as `info`), if
    /// it does, resolving names through `opener` (the host file system without one).
    fn refusal(
        &self,
        path: &Path,
        info: &FileInfo,
        opener: Option<&dyn Opener>,
    ) -> Result<Option<&'static str>> {
        if self.regular_files_only && !info.regular {
            return Ok(Some("not a regular file"));
        }
        if let Some(dir) = &self.confine_to {
            let real = canonicalize_with(opener, path)
                .map_err(|e| Error::io(format!("resolving {}", path.display()), e))?;
            let dir = canonicalize_with(opener, dir)
                .map_err(|e| Error::io(format!("resolving {}", dir.display()), e))?;
            if !real.starts_with(&dir) {
                return Ok(Some("outside the directory backing files are confined to"));
            }
        }
        Ok(None)
    }

    /// Checks a backing file (already known to exist, as `info`) against the policy.
    pub(super) fn check(
        &self,
        path: &Path,
        info: &FileInfo,
        opener: Option<&dyn Opener>,
    ) -> Result<()> {
        match self.refusal(path, info, opener)? {
            Some(reason) => Err(Error::BackingRefused {
                path: path.to_path_buf(),
                reason,
            }),
            None => Ok(()),
        }
    }

    /// Checks the external data file of `layer`, if it has one (it is open, but nothing
    /// has been read from it yet).
    pub(super) fn check_data_file(&self, layer: &Layer, opener: Option<&dyn Opener>) -> Result<()> {
        if *self == BackingPolicy::default()
            || !layer.as_qcow2().is_some_and(Image::has_external_data_file)
        {
            return Ok(());
        }
        let path = layer.data_path();
        let info = stat_with(opener, &path)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        match self.refusal(&path, &info, opener)? {
            Some(reason) => Err(Error::DataFileRefused { path, reason }),
            None => Ok(()),
        }
    }
}
