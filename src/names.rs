//! Backing file names as QEMU reads them: relative names resolve against the directory
//! of the image that stores them, `file:` prefixes are stripped, and protocol and `json:`
//! names are refused (this crate opens local files only).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Joins a relative `name` stored in `overlay` to the overlay's directory, as QEMU does.
pub fn resolve_relative(overlay: &Path, name: &str) -> PathBuf {
    let name = Path::new(name);
    if name.is_absolute() {
        return name.to_path_buf();
    }
    match overlay.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(name),
        _ => name.to_path_buf(),
    }
}

/// Protocols QEMU would hand a `proto:...` backing name to.
const PROTOCOLS: &[&str] = &[
    "nbd",
    "nbd+unix",
    "nbd+tcp",
    "http",
    "https",
    "ftp",
    "ftps",
    "ssh",
    "iscsi",
    "iser",
    "rbd",
    "gluster",
    "gluster+tcp",
    "gluster+unix",
    "gluster+rdma",
    "nfs",
    "vvfat",
    "blkdebug",
    "blkverify",
    "null-co",
    "null-aio",
    "host_device",
    "host_cdrom",
    "quorum",
    "throttle",
];

/// Checks a backing file name and strips a `file:` prefix.
pub(crate) fn backing_path_name(name: &str) -> Result<&str> {
    let refuse = |reason| Error::UnsupportedBackingName {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(refuse("empty name"));
    }
    if name.starts_with("json:") {
        return Err(refuse("json: pseudo-protocol names are not supported"));
    }
    if let Some(rest) = name.strip_prefix("file:") {
        return Ok(rest);
    }
    if let Some((prefix, _)) = name.split_once(':') {
        if !prefix.contains('/') && PROTOCOLS.contains(&prefix) {
            return Err(refuse(
                "network and protocol backing files are not supported",
            ));
        }
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_backing_names_resolve_against_the_overlay_directory() {
        assert_eq!(
            resolve_relative(Path::new("/vm/disks/top.qcow2"), "base.qcow2"),
            PathBuf::from("/vm/disks/base.qcow2")
        );
        assert_eq!(
            resolve_relative(Path::new("top.qcow2"), "base.qcow2"),
            PathBuf::from("base.qcow2")
        );
        assert_eq!(
            resolve_relative(Path::new("/vm/top.qcow2"), "/abs/base.raw"),
            PathBuf::from("/abs/base.raw")
        );
    }

    #[test]
    fn protocol_and_json_names_are_refused() {
        assert!(backing_path_name("json:{\"driver\":\"raw\"}").is_err());
        assert!(backing_path_name("nbd://host/export").is_err());
        assert!(backing_path_name("").is_err());
        assert_eq!(backing_path_name("file:base.img").unwrap(), "base.img");
        assert_eq!(
            backing_path_name("dir:with/colon").unwrap(),
            "dir:with/colon"
        );
    }
}
