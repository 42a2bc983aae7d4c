//! Turning a local directory into a Merkle tree of Directory protos — what a
//! client uploads to make the directory an input root.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use casbuild_proto::reapi::{Directory, DirectoryNode, FileNode, SymlinkNode};
use prost::Message;

use crate::digest::{Digest, DigestFunction};

/// A scanned directory: its root digest, every Directory blob, and where each
/// distinct file blob can be read from.
#[derive(Debug)]
pub struct LocalTree {
    /// Digest of the root Directory.
    pub root: Digest,
    /// Encoded Directory protos by digest.
    pub directories: BTreeMap<Digest, Bytes>,
    /// One local path per distinct file content.
    pub files: BTreeMap<Digest, PathBuf>,
}

/// Why a directory could not be scanned.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {problem}")]
pub struct ScanError {
    /// The file or directory at fault.
    pub path: PathBuf,
    /// What went wrong.
    pub problem: String,
}

impl LocalTree {
    /// Hashes every file under `root` and builds its Directory protos.
    pub fn scan(root: &Path, function: DigestFunction) -> Result<Self, ScanError> {
        let mut tree = LocalTree { root: function.empty(), directories: BTreeMap::new(), files: BTreeMap::new() };
        tree.root = tree.scan_dir(root, function)?;
        Ok(tree)
    }

    fn scan_dir(&mut self, dir: &Path, function: DigestFunction) -> Result<Digest, ScanError> {
        let fail = |path: &Path, e: std::io::Error| ScanError { path: path.to_path_buf(), problem: e.to_string() };
        let mut entries: Vec<(String, PathBuf)> = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| fail(dir, e))? {
            let entry = entry.map_err(|e| fail(dir, e))?;
            let name = entry
                .file_name()
                .into_string()
                .map_err(|_| ScanError { path: entry.path(), problem: "file name is not UTF-8".into() })?;
            entries.push((name, entry.path()));
        }
        entries.sort();
        let mut directory = Directory::default();
        for (name, path) in entries {
            let meta = std::fs::symlink_metadata(&path).map_err(|e| fail(&path, e))?;
            let kind = meta.file_type();
            if kind.is_symlink() {
                let target = std::fs::read_link(&path).map_err(|e| fail(&path, e))?;
                let target = target
                    .into_os_string()
                    .into_string()
                    .map_err(|_| ScanError { path: path.clone(), problem: "symlink target is not UTF-8".into() })?;
                directory.symlinks.push(SymlinkNode { name, target, node_properties: None });
            } else if kind.is_dir() {
                let digest = self.scan_dir(&path, function)?;
                directory.directories.push(DirectoryNode { name, digest: Some(digest.to_proto()) });
            } else if kind.is_file() {
                let digest = hash_file(&path, function).map_err(|e| fail(&path, e))?;
                let is_executable = meta.permissions().mode() & 0o111 != 0;
                directory.files.push(FileNode {
                    name,
                    digest: Some(digest.to_proto()),
                    is_executable,
                    node_properties: None,
                });
                self.files.entry(digest).or_insert(path);
            } else {
                return Err(ScanError { path, problem: "not a file, directory or symlink".into() });
            }
        }
        let bytes = Bytes::from(directory.encode_to_vec());
        let digest = function.digest_of(&bytes);
        self.directories.insert(digest, bytes);
        Ok(digest)
    }
}

/// The largest read when hashing a file.
const HASH_READ: usize = 1 << 20;

/// Hashes a file's contents by streaming it.
pub fn hash_file(path: &Path, function: DigestFunction) -> std::io::Result<Digest> {
    hash_open_file(&mut std::fs::File::open(path)?, function)
}

/// Hashes an open file from its current position to its end. The read
/// buffer fits the file (up to 1 MiB): most files a build hashes (logs,
/// outputs, cached blobs) are small, and a zeroed 1 MiB buffer for each was
/// most of what hashing them cost.
pub fn hash_open_file(file: &mut std::fs::File, function: DigestFunction) -> std::io::Result<Digest> {
    // One byte more than the file holds: its end is found by the second read.
    let len = file.metadata()?.len().saturating_add(1);
    let mut buf = vec![0u8; usize::try_from(len).unwrap_or(HASH_READ).clamp(4096, HASH_READ)];
    let mut hasher = function.hasher();
    loop {
        let n = std::io::Read::read(file, &mut buf)?;
        if n == 0 {
            return Ok(hasher.finish());
        }
        hasher.update(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_of_every_size_hash_to_their_digest() {
        let dir = tempfile::tempdir().unwrap();
        // Around the buffer's bounds: empty, below and above its 4 KiB floor, beyond its 1 MiB cap.
        for len in [0usize, 1, 4095, 4096, 4097, (1 << 20) - 1, 1 << 20, (1 << 20) + 3, 3 << 20] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
            let path = dir.path().join(format!("f{len}"));
            std::fs::write(&path, &bytes).unwrap();
            for function in [DigestFunction::Sha256, DigestFunction::Blake3] {
                let expected = function.digest_of(&bytes);
                assert_eq!(hash_file(&path, function).unwrap(), expected, "{len} bytes, {function:?}");
            }
        }
    }
}
