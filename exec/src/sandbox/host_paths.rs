//! The toolchain paths a sandbox gets from the host, looked at by the zygote
//! before each run so that the run's set-up does no lookups of its own.
//!
//! Directories (and files outside `/etc`) are bound read-only; links are
//! made again as the same links (merged /usr makes `/bin` one); small
//! configuration files under `/etc` are copied. The zygote keeps the bytes
//! of each copied file and reads them again only when the file's identity,
//! size or times change, so a run writes each copy in one go.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What a toolchain path is on this host, as a run sets it up.
#[derive(Debug, Clone, PartialEq)]
pub enum HostPath {
    /// Bound read-only; `dir` tells what to make as the mount point.
    Bind { dir: bool },
    /// Made again as a link to this target.
    Link(PathBuf),
    /// Copied: the file's bytes and permission bits.
    Copy { bytes: Arc<[u8]>, mode: u32 },
    /// This host does not have it: skipped.
    Missing,
}

/// Identity and version of a host file: a change to any of these means its
/// copy is read again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// Copies are made of files below this directory.
const COPIED_UNDER: &str = "/etc";

/// The zygote's view of the host's toolchain paths, kept between runs.
#[derive(Debug, Default)]
pub struct HostPaths {
    seen: HashMap<PathBuf, (Stamp, HostPath)>,
}

impl HostPaths {
    /// What each of `paths` is now, in order; one `lstat` each, plus a read
    /// of what changed since the last look.
    pub fn look(&mut self, paths: &[PathBuf]) -> Vec<(PathBuf, HostPath)> {
        paths.iter().map(|path| (path.clone(), self.look_one(path))).collect()
    }

    fn look_one(&mut self, path: &Path) -> HostPath {
        let Ok(meta) = std::fs::symlink_metadata(path) else {
            self.seen.remove(path);
            return HostPath::Missing;
        };
        let stamp = Stamp::of(&meta);
        if let Some((seen, what)) = self.seen.get(path) {
            if *seen == stamp {
                return what.clone();
            }
        }
        let what = if meta.file_type().is_symlink() {
            match std::fs::read_link(path) {
                Ok(target) => HostPath::Link(target),
                Err(_) => HostPath::Missing,
            }
        } else if meta.is_file() && path.starts_with(COPIED_UNDER) {
            match std::fs::read(path) {
                Ok(bytes) => HostPath::Copy { bytes: bytes.into(), mode: meta.mode() & 0o7777 },
                Err(_) => HostPath::Missing,
            }
        } else {
            HostPath::Bind { dir: meta.is_dir() }
        };
        self.seen.insert(path.to_path_buf(), (stamp, what.clone()));
        what
    }
}

/// `passwd` or `group` text with a line naming the sandbox's `id` added
/// when no line names it yet (tools that look their user up fail without
/// one). Both files keep the id in their third field.
pub fn with_sandbox_name(text: &[u8], id: u32, line: &str) -> Vec<u8> {
    let id = id.to_string();
    let named = String::from_utf8_lossy(text).lines().any(|l| l.split(':').nth(2) == Some(id.as_str()));
    let mut out = text.to_vec();
    if !named {
        if !out.is_empty() && !out.ends_with(b"\n") {
            out.push(b'\n');
        }
        out.extend_from_slice(line.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_are_read_again_only_when_the_file_changes() {
        // Classification by kind; copies only under /etc, so the file test
        // uses the real /etc/passwd and a link and a directory of a temp dir.
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("usr/bin", &link).unwrap();
        let missing = dir.path().join("missing");
        let mut paths = HostPaths::default();
        let seen = paths.look(&[dir.path().to_path_buf(), link.clone(), missing.clone()]);
        assert_eq!(seen[0].1, HostPath::Bind { dir: true });
        assert_eq!(seen[1].1, HostPath::Link("usr/bin".into()));
        assert_eq!(seen[2].1, HostPath::Missing);

        let passwd = PathBuf::from("/etc/passwd");
        let HostPath::Copy { bytes, .. } = paths.look_one(&passwd) else { panic!("/etc/passwd is copied") };
        assert_eq!(&*bytes, std::fs::read(&passwd).unwrap().as_slice());
        let HostPath::Copy { bytes: again, .. } = paths.look_one(&passwd) else { panic!() };
        assert!(Arc::ptr_eq(&bytes, &again), "an unchanged file is not read again");

        // A changed stamp is read again (simulated: the remembered stamp is off).
        paths.seen.get_mut(&passwd).unwrap().0.size += 1;
        let HostPath::Copy { bytes: reread, .. } = paths.look_one(&passwd) else { panic!() };
        assert!(!Arc::ptr_eq(&bytes, &reread));
    }

    #[test]
    fn the_sandbox_user_is_named_once() {
        let line = "casbuild:x:65534:65534:casbuild action:/tmp:/usr/sbin/nologin\n";
        let root = b"root:x:0:0:root:/root:/bin/bash";
        let named = with_sandbox_name(root, 65534, line);
        assert_eq!(named, format!("root:x:0:0:root:/root:/bin/bash\n{line}").into_bytes());
        assert_eq!(with_sandbox_name(&named, 65534, line), named, "already named: unchanged");
        assert_eq!(with_sandbox_name(b"", 7, "x:x:7:\n"), b"x:x:7:\n");
    }
}
