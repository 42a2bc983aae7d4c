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

/// Hashes a file's contents by streaming it.
pub fn hash_file(path: &Path, function: DigestFunction) -> std::io::Result<Digest> {
    hash_reader(std::fs::File::open(path)?, function)
}

/// Hashes everything `reader` yields (an open file, say) by streaming it.
pub fn hash_reader(mut reader: impl std::io::Read, function: DigestFunction) -> std::io::Result<Digest> {
    let mut hasher = function.hasher();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            return Ok(hasher.finish());
        }
        hasher.update(&buf[..n]);
    }
}
