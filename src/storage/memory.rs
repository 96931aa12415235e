use std::collections::BTreeMap;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, RwLock};

use super::{FileInfo, Opener, Storage};

/// Bytes held in memory: for tests, benches and fuzzing.
#[derive(Debug, Default)]
pub struct MemStorage {
    bytes: RwLock<Vec<u8>>,
}

impl MemStorage {
    /// An empty storage.
    pub fn new() -> MemStorage {
        MemStorage::default()
    }

    /// A storage holding `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> MemStorage {
        MemStorage {
            bytes: RwLock::new(bytes),
        }
    }

    /// A copy of the bytes held.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.bytes.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

fn range(offset: u64, len: usize) -> io::Result<(usize, usize)> {
    let start = usize::try_from(offset).map_err(|_| io::Error::other("offset too large"))?;
    let end = start
        .checked_add(len)
        .ok_or_else(|| io::Error::other("offset too large"))?;
    Ok((start, end))
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let bytes = self.bytes.read().unwrap_or_else(|e| e.into_inner());
        let (start, end) = range(offset, buf.len())?;
        let src = bytes
            .get(start..end)
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut bytes = self.bytes.write().unwrap_or_else(|e| e.into_inner());
        let (start, end) = range(offset, buf.len())?;
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        bytes[start..end].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.bytes.read().unwrap_or_else(|e| e.into_inner()).len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::Error::other("length too large"))?;
        self.bytes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .resize(len, 0);
        Ok(())
    }
    fn allocated_size(&self) -> Option<u64> {
        self.len().ok()
    }
}

/// A file system in memory: an [`Opener`] that serves [`MemStorage`]s by name, so that
/// whole chains can be created, opened and merged without touching the host (tests,
/// fuzzing). Names are taken lexically: relative ones are relative to `/`, `.` and `..`
/// are resolved without looking anything up, and there are no links, except that one
/// storage may be added under several names (hard links: [`Opener::stat`] gives them one
/// identity).
#[derive(Debug, Default)]
pub struct MemOpener {
    files: RwLock<BTreeMap<PathBuf, Arc<MemStorage>>>,
}

impl MemOpener {
    /// An empty file system.
    pub fn new() -> MemOpener {
        MemOpener::default()
    }

    /// Adds (or replaces) the file `path` holding `storage`.
    pub fn insert(&self, path: impl AsRef<Path>, storage: Arc<MemStorage>) {
        self.files
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(normalize(path.as_ref()), storage);
    }

    /// Adds (or replaces) an empty file `path` and returns its storage.
    pub fn create(&self, path: impl AsRef<Path>) -> Arc<MemStorage> {
        let storage = Arc::new(MemStorage::new());
        self.insert(path, storage.clone());
        storage
    }

    /// The storage of the file `path`, if there is one.
    pub fn get(&self, path: impl AsRef<Path>) -> Option<Arc<MemStorage>> {
        self.files
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&normalize(path.as_ref()))
            .cloned()
    }

    /// Removes the file `path`; returns its storage.
    pub fn remove(&self, path: impl AsRef<Path>) -> Option<Arc<MemStorage>> {
        self.files
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&normalize(path.as_ref()))
    }

    /// Every file's name (absolute, normalized) and storage, sorted by name.
    pub fn files(&self) -> Vec<(PathBuf, Arc<MemStorage>)> {
        self.files
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(p, s)| (p.clone(), s.clone()))
            .collect()
    }

    fn find(&self, path: &Path) -> io::Result<Arc<MemStorage>> {
        self.get(path).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{}: no such file in memory", path.display()),
            )
        })
    }
}

/// `path` made absolute (relative to `/`) with `.` and `..` resolved lexically.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::Prefix(_) | Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(name) => out.push(name),
        }
    }
    out
}

impl Opener for MemOpener {
    fn open(&self, path: &Path, _writable: bool) -> io::Result<Box<dyn Storage>> {
        Ok(Box::new(self.find(path)?))
    }

    fn stat(&self, path: &Path) -> io::Result<FileInfo> {
        let storage = self.find(path)?;
        Ok(FileInfo {
            // One storage, one file, whatever its names.
            id: (u64::MAX, Arc::as_ptr(&storage) as usize as u64),
            regular: true,
        })
    }

    fn canonicalize(&self, path: &Path) -> io::Result<PathBuf> {
        Ok(normalize(path))
    }

    fn read_dir(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        let dir = normalize(dir);
        if self.get(&dir).is_some() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                "not a directory",
            ));
        }
        // Directories exist only as the names their files have: the files right in `dir`.
        Ok(self
            .files()
            .into_iter()
            .map(|(path, _)| path)
            .filter(|path| path.parent() == Some(dir.as_path()))
            .collect())
    }

    fn create(&self, path: &Path) -> io::Result<Box<dyn Storage>> {
        Ok(Box::new(MemOpener::create(self, path)))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.remove(path)
            .map(drop)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such file in memory"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_past_the_end_is_an_error() {
        let s = MemStorage::from_bytes(vec![1, 2, 3]);
        let mut buf = [0u8; 2];
        assert!(s.read_at(&mut buf, 2).is_err());
        s.read_at(&mut buf, 1).unwrap();
        assert_eq!(buf, [2, 3]);
    }

    #[test]
    fn writing_past_the_end_grows_with_zeros() {
        let s = MemStorage::new();
        s.write_at(&[7], 3).unwrap();
        assert_eq!(s.to_bytes(), vec![0, 0, 0, 7]);
    }

    #[test]
    fn mem_opener_resolves_names_lexically_and_links_share_an_identity() {
        let fs = MemOpener::new();
        let a = fs.create("dir/a.img");
        a.write_at(&[1, 2], 0).unwrap();
        let opened = fs.open(Path::new("/dir/./x/../a.img"), true).unwrap();
        let mut buf = [0u8; 2];
        opened.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [1, 2]);
        assert!(fs.open(Path::new("a.img"), false).is_err());
        fs.insert("link.img", a.clone());
        let id = |p: &str| fs.stat(Path::new(p)).unwrap().id;
        assert_eq!(id("link.img"), id("dir/a.img"));
        fs.create("b.img");
        assert_ne!(id("b.img"), id("dir/a.img"));
        assert_eq!(
            fs.canonicalize(Path::new("dir/../b.img")).unwrap(),
            PathBuf::from("/b.img")
        );
    }
}
