//! The images found, each under its backing file: who depends on whom.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::storage::{Opener, stat_with};

use super::scan::{TreeImage, TreeOptions, files_in, too_many};

impl std::fmt::Debug for Forest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forest")
            .field("images", &self.images)
            .field("parents", &self.parents)
            .field("skipped", &self.skipped)
            .finish()
    }
}

/// Images and their backing files: a forest whose roots have no backing file (or one
/// that could not be read), each image under the image it uses as backing file.
#[derive(Default)]
pub struct Forest {
    opener: Option<Arc<dyn Opener>>,
    images: Vec<TreeImage>,
    parents: Vec<Option<usize>>,
    children: Vec<Vec<usize>>,
    skipped: Vec<Error>,
}

impl Forest {
    /// Reads the images in `paths` (directories, not recursively, and files), and the
    /// backing chains they name, wherever those are. Files that cannot be read as images
    /// (damaged headers, unreadable) are left out and listed in [`Forest::skipped`];
    /// a backing chain that loops is cut where it comes back, and listed there too.
    pub fn scan(paths: &[impl AsRef<Path>], options: &TreeOptions) -> Result<Forest> {
        let paths: Vec<PathBuf> = paths.iter().map(|p| p.as_ref().to_path_buf()).collect();
        let mut forest = Forest {
            opener: options.opener.clone(),
            ..Forest::default()
        };
        let mut by_id: HashMap<(u64, u64), usize> = HashMap::new();
        for file in files_in(&paths, options)? {
            forest.add(&file, options, &mut by_id)?;
        }
        // Backing files outside the directories, level by level (each file once).
        let mut next = 0;
        while next < forest.images.len() {
            if let Some(backing) = forest.images[next].backing_path.clone() {
                if let Ok(info) = stat_with(options.opener(), &backing) {
                    if !by_id.contains_key(&info.id) {
                        forest.add(&backing, options, &mut by_id)?;
                    }
                }
            }
            next += 1;
        }
        forest.link(&by_id);
        Ok(forest)
    }

    fn add(
        &mut self,
        path: &Path,
        options: &TreeOptions,
        by_id: &mut HashMap<(u64, u64), usize>,
    ) -> Result<()> {
        if self.images.len() >= options.max_images {
            return Err(too_many(options.max_images));
        }
        match TreeImage::read(path, options) {
            Ok(Some(image)) => {
                if let std::collections::hash_map::Entry::Vacant(slot) = by_id.entry(image.id) {
                    slot.insert(self.images.len());
                    self.images.push(image);
                }
            }
            Ok(None) => {}
            Err(e) => self.skipped.push(e),
        }
        Ok(())
    }

    /// Sets each image's parent to its backing file, cutting loops.
    fn link(&mut self, by_id: &HashMap<(u64, u64), usize>) {
        let n = self.images.len();
        self.parents = vec![None; n];
        for i in 0..n {
            let parent = self.images[i]
                .backing_path
                .as_deref()
                .and_then(|b| stat_with(self.opener.as_deref(), b).ok())
                .and_then(|info| by_id.get(&info.id).copied());
            self.parents[i] = parent;
        }
        // Loops, each image walked once: a walk up the parents that comes back to an image
        // it passed is cut before that image (hostile directories may hold long chains).
        #[derive(Clone, Copy, PartialEq)]
        enum Walk {
            Unseen,
            OnPath,
            Done,
        }
        let mut walk = vec![Walk::Unseen; n];
        let mut path = Vec::new();
        for start in 0..n {
            let mut at = start;
            while walk[at] == Walk::Unseen {
                walk[at] = Walk::OnPath;
                path.push(at);
                match self.parents[at] {
                    Some(p) => at = p,
                    None => break,
                }
            }
            if walk[at] == Walk::OnPath && self.parents[at].is_some() {
                if let Some(&last) = path.last() {
                    self.parents[last] = None;
                    self.skipped.push(
                        Error::InvalidArgument("its backing chain loops back to it".into())
                            .in_file(&self.images[last].path),
                    );
                }
            }
            for i in path.drain(..) {
                walk[i] = Walk::Done;
            }
        }
        self.children = vec![Vec::new(); n];
        for (i, parent) in self.parents.iter().enumerate() {
            if let Some(p) = parent {
                self.children[*p].push(i);
            }
        }
    }

    /// Every image found, in the order read.
    pub fn images(&self) -> &[TreeImage] {
        &self.images
    }

    /// The images without a backing file among those found: the forest's roots.
    pub fn roots(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.images.len()).filter(|&i| self.parents[i].is_none())
    }

    /// The images that use image `index` as their backing file.
    pub fn children(&self, index: usize) -> &[usize] {
        &self.children[index]
    }

    /// The backing file of image `index`, if it was found.
    pub fn parent(&self, index: usize) -> Option<usize> {
        self.parents[index]
    }

    /// What could not be read, each error naming its file.
    pub fn skipped(&self) -> &[Error] {
        &self.skipped
    }

    /// Which image is the file at `path` (the same file, whatever name reaches it).
    pub fn find(&self, path: impl AsRef<Path>) -> Option<usize> {
        let id = stat_with(self.opener.as_deref(), path.as_ref()).ok()?.id;
        self.images.iter().position(|image| image.id == id)
    }

    /// Image `index` and the images below it, its backing chain as far as it was found.
    pub fn chain_of(&self, index: usize) -> impl Iterator<Item = usize> + '_ {
        std::iter::successors(Some(index), |&i| self.parents[i])
    }

    /// Every image whose backing chain holds image `index` (not itself), nearest first.
    pub fn dependents(&self, index: usize) -> Vec<usize> {
        let mut found = Vec::new();
        let mut level = self.children[index].clone();
        while !level.is_empty() {
            found.extend(&level);
            level = level
                .iter()
                .flat_map(|&i| self.children[i].iter().copied())
                .collect();
        }
        found
    }
}
