//! Finding a layer of a chain: by the file it is, or by a name as qemu-img takes one for
//! `commit -b` and `rebase`.

use std::path::Path;

use crate::error::{Error, Result};
use crate::names::resolve_relative;

use super::Chain;

impl Chain {
    /// Which layer is the file at `path`: the same file as the chain's opener sees it
    /// (same device and inode for host files), whatever name reaches it.
    pub fn index_of(&self, path: impl AsRef<Path>) -> Result<usize> {
        let path = path.as_ref();
        let want = self
            .stat(path)
            .map_err(|e| Error::io("opening", e).in_file(path))?;
        self.layers
            .iter()
            .position(|layer| self.stat(layer.name()).is_ok_and(|m| m.id == want.id))
            .ok_or_else(|| self.not_in_chain(path))
    }

    /// The layer a user means by `name`, found as qemu-img finds a base: the name an
    /// image of the chain stores for its backing file, or else the file `name` reaches
    /// from the current directory or next to any image of the chain.
    pub fn find(&self, name: impl AsRef<Path>) -> Result<usize> {
        let name = name.as_ref();
        let stored = self.layers.windows(2).position(|pair| {
            pair[0]
                .backing()
                .is_some_and(|(backing, _)| Path::new(&backing) == name)
        });
        if let Some(above) = stored {
            return Ok(above + 1);
        }
        let Some(text) = name.to_str() else {
            return self.index_of(name);
        };
        std::iter::once(name.to_path_buf())
            .chain(self.layers.iter().map(|l| resolve_relative(l.name(), text)))
            .find_map(|candidate| self.index_of(candidate).ok())
            .ok_or_else(|| self.not_in_chain(name))
    }

    fn not_in_chain(&self, name: &Path) -> Error {
        Error::NotInChain {
            name: name.display().to_string(),
        }
        .in_file(self.top().name())
    }
}
