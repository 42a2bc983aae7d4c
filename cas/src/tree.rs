//! Directory protos: decoding and the checks REAPI requires of them.
//!
//! A Directory lists files, subdirectories and symlinks, each list sorted by
//! name, names unique across all three, and no name that could step outside
//! the directory. A tree that breaks these rules is refused, not interpreted.

use casbuild_proto::reapi::Directory;
use prost::Message;

use crate::digest::{Digest, DigestFunction};
use crate::error::Invalid;

/// Why a Directory blob cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("directory {digest}: {problem}")]
pub struct TreeError {
    /// The offending Directory blob, as `HASH/SIZE`.
    pub digest: String,
    /// What is wrong with it.
    pub problem: String,
}

/// Decodes and validates the Directory stored under `digest`.
pub fn decode_directory(digest: &Digest, bytes: &[u8]) -> Result<Directory, TreeError> {
    let error = |problem: String| TreeError { digest: digest.to_string(), problem };
    let directory = Directory::decode(bytes).map_err(|e| error(format!("is not a Directory proto: {e}")))?;
    validate_directory(&directory, digest.function).map_err(|e| error(e.0))?;
    Ok(directory)
}

/// Checks entry names, their order and uniqueness, and child digests.
pub fn validate_directory(directory: &Directory, function: DigestFunction) -> Result<(), Invalid> {
    let files = directory.files.iter().map(|f| f.name.as_str());
    let dirs = directory.directories.iter().map(|d| d.name.as_str());
    let links = directory.symlinks.iter().map(|s| s.name.as_str());
    for (kind, names) in
        [("files", files.collect::<Vec<_>>()), ("directories", dirs.collect()), ("symlinks", links.collect())]
    {
        for name in &names {
            check_name(name)?;
        }
        for pair in names.windows(2) {
            if pair[0] == pair[1] {
                return Err(Invalid(format!("duplicate name {:?} in {kind}", pair[0])));
            }
            if pair[0] > pair[1] {
                return Err(Invalid(format!("{kind} are not sorted: {:?} comes before {:?}", pair[0], pair[1])));
            }
        }
    }
    let mut all: Vec<&str> = directory
        .files
        .iter()
        .map(|f| f.name.as_str())
        .chain(directory.directories.iter().map(|d| d.name.as_str()))
        .chain(directory.symlinks.iter().map(|s| s.name.as_str()))
        .collect();
    all.sort_unstable();
    if let Some(pair) = all.windows(2).find(|p| p[0] == p[1]) {
        return Err(Invalid(format!("name {:?} is used by two entries", pair[0])));
    }
    for file in &directory.files {
        child_digest(function, &file.name, file.digest.as_ref())?;
    }
    for dir in &directory.directories {
        child_digest(function, &dir.name, dir.digest.as_ref())?;
    }
    for link in &directory.symlinks {
        if link.target.is_empty() {
            return Err(Invalid(format!("symlink {:?} has an empty target", link.name)));
        }
    }
    Ok(())
}

/// The digest of a child entry, checked.
pub fn child_digest(
    function: DigestFunction,
    name: &str,
    digest: Option<&casbuild_proto::reapi::Digest>,
) -> Result<Digest, Invalid> {
    let digest = digest.ok_or_else(|| Invalid(format!("entry {name:?} has no digest")))?;
    Digest::from_proto(function, digest).map_err(|e| Invalid(format!("entry {name:?}: {e}")))
}

fn check_name(name: &str) -> Result<(), Invalid> {
    if name.is_empty() {
        return Err(Invalid("an entry has an empty name".into()));
    }
    if name == "." || name == ".." {
        return Err(Invalid(format!("entry name {name:?} is not allowed")));
    }
    if name.contains('/') || name.contains('\0') {
        return Err(Invalid(format!("entry name {name:?} contains '/' or NUL")));
    }
    Ok(())
}

/// Checks a path of an ActionResult output or an output declaration: one or
/// more valid names joined by `/`, relative, normalized (no `.`, `..` or
/// empty components), so that it names a place inside the output root and
/// nothing else.
pub fn check_output_path(path: &str) -> Result<(), Invalid> {
    if path.is_empty() {
        return Err(Invalid("an output path is empty".into()));
    }
    if path.starts_with('/') {
        return Err(Invalid(format!("output path {path:?} is absolute")));
    }
    for component in path.split('/') {
        check_name(component).map_err(|e| e.context(format!("output path {path:?}")))?;
    }
    Ok(())
}

/// Whether `bytes` is exactly the canonical encoding of a valid Directory.
/// Used to tell a stored Directory from a file blob when only a digest is known.
pub fn looks_like_directory(digest: &Digest, bytes: &[u8]) -> bool {
    match decode_directory(digest, bytes) {
        Ok(dir) => dir.encode_to_vec() == bytes,
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use casbuild_proto::reapi::{DirectoryNode, FileNode, SymlinkNode};

    fn file(name: &str) -> FileNode {
        FileNode { name: name.into(), digest: Some(DigestFunction::Sha256.empty().to_proto()), ..Default::default() }
    }

    #[test]
    fn accepts_a_well_formed_directory() {
        let dir = Directory {
            files: vec![file("a"), file("b.txt")],
            directories: vec![DirectoryNode {
                name: "sub".into(),
                digest: Some(DigestFunction::Sha256.empty().to_proto()),
            }],
            symlinks: vec![SymlinkNode { name: "z".into(), target: "a".into(), ..Default::default() }],
            ..Default::default()
        };
        validate_directory(&dir, DigestFunction::Sha256).unwrap();
    }

    #[test]
    fn rejects_each_kind_of_bad_entry() {
        let cases: Vec<(Directory, &str)> = vec![
            (Directory { files: vec![file("b"), file("a")], ..Default::default() }, "not sorted"),
            (Directory { files: vec![file("a"), file("a")], ..Default::default() }, "duplicate"),
            (Directory { files: vec![file("x/y")], ..Default::default() }, "contains '/'"),
            (Directory { files: vec![file("..")], ..Default::default() }, "not allowed"),
            (Directory { files: vec![file(".")], ..Default::default() }, "not allowed"),
            (Directory { files: vec![file("")], ..Default::default() }, "empty name"),
            (
                Directory {
                    files: vec![file("a")],
                    symlinks: vec![SymlinkNode { name: "a".into(), target: "b".into(), ..Default::default() }],
                    ..Default::default()
                },
                "used by two entries",
            ),
            (
                Directory { files: vec![FileNode { name: "a".into(), ..Default::default() }], ..Default::default() },
                "no digest",
            ),
        ];
        for (dir, want) in cases {
            let err = validate_directory(&dir, DigestFunction::Sha256).unwrap_err();
            assert!(err.0.contains(want), "{err} should mention {want}");
        }
    }

    #[test]
    fn output_paths_must_name_a_place_inside_the_output_root() {
        assert!(check_output_path("bazel-out/k8/bin/a.o").is_ok());
        for bad in ["", "/root/.bashrc", "../../etc/cron.d/x", "a/../b", "a//b", "a/./b", "a/", "a\0b"] {
            let bad = bad.replace("\\0", "\0");
            assert!(check_output_path(&bad).is_err(), "{bad:?} is refused");
        }
    }

    #[tokio::test]
    async fn a_tree_naming_each_child_twice_is_walked_once_per_directory() {
        use crate::store::{BlobStore, MemoryStore};
        use casbuild_proto::reapi::{DirectoryNode, FileNode};
        let f = DigestFunction::Sha256;
        let store = MemoryStore::new(1 << 30);
        let absent = f.digest_of(b"a file nobody uploaded");
        let leaf = Directory {
            files: vec![FileNode { name: "f".into(), digest: Some(absent.to_proto()), ..Default::default() }],
            ..Default::default()
        };
        let mut bytes = bytes::Bytes::from(leaf.encode_to_vec());
        let mut digest = f.digest_of(&bytes);
        store.write(&digest, bytes.clone()).await.unwrap();
        // 2^64 paths through 65 directories.
        for _ in 0..64 {
            let node = |name: &str| DirectoryNode { name: name.into(), digest: Some(digest.to_proto()) };
            let parent = Directory { directories: vec![node("a"), node("b")], ..Default::default() };
            bytes = bytes::Bytes::from(parent.encode_to_vec());
            digest = f.digest_of(&bytes);
            store.write(&digest, bytes.clone()).await.unwrap();
        }
        let missing = tokio::time::timeout(std::time::Duration::from_secs(10), missing_in_tree(&store, &digest))
            .await
            .expect("the walk ends")
            .unwrap();
        assert_eq!(missing, vec![absent]);
    }

    #[test]
    fn garbage_is_not_a_directory() {
        let bytes = b"hello world, not a proto";
        let digest = DigestFunction::Sha256.digest_of(bytes);
        assert!(!looks_like_directory(&digest, bytes));
        assert!(decode_directory(&digest, &[0xff, 0xff]).unwrap_err().problem.contains("not a Directory"));
    }
}

/// Most distinct Directories one tree walk visits before it refuses the
/// tree: a bound on what one request can make a server read.
pub const MAX_TREE_DIRECTORIES: usize = 1 << 20;

/// The blobs of the tree rooted at `root` (its Directories and files) that
/// `cas` lacks. A Directory that is present but malformed is an error.
///
/// Each distinct Directory is read once, however often the tree names it
/// (a chain of directories each naming its child twice is 2^depth paths but
/// depth Directories); past [`MAX_TREE_DIRECTORIES`] the tree is refused.
/// The walk yields to the runtime as it goes, so a large tree never keeps a
/// server thread from other requests.
pub async fn missing_in_tree(cas: &dyn crate::store::BlobStore, root: &Digest) -> Result<Vec<Digest>, MissingError> {
    let function = root.function;
    let mut missing = Vec::new();
    let mut files = Vec::new();
    let mut pending = vec![*root];
    let mut seen = std::collections::HashSet::new();
    while let Some(digest) = pending.pop() {
        if digest.is_empty_blob() || !seen.insert(digest) {
            continue;
        }
        if seen.len() > MAX_TREE_DIRECTORIES {
            let problem = format!("the tree has more than {MAX_TREE_DIRECTORIES} distinct directories");
            return Err(MissingError::Tree(TreeError { digest: root.to_string(), problem }));
        }
        if seen.len() % 256 == 0 {
            tokio::task::yield_now().await;
        }
        let bytes = match cas.read_all(&digest).await {
            Ok(bytes) => bytes,
            Err(e) if e.is_not_found() => {
                missing.push(digest);
                continue;
            }
            Err(e) => return Err(MissingError::Store(e)),
        };
        let directory = decode_directory(&digest, &bytes).map_err(MissingError::Tree)?;
        for file in &directory.files {
            files.push(
                child_digest(function, &file.name, file.digest.as_ref())
                    .map_err(|e| MissingError::Tree(TreeError { digest: digest.to_string(), problem: e.0 }))?,
            );
        }
        for sub in &directory.directories {
            pending.push(
                child_digest(function, &sub.name, sub.digest.as_ref())
                    .map_err(|e| MissingError::Tree(TreeError { digest: digest.to_string(), problem: e.0 }))?,
            );
        }
    }
    files.sort();
    files.dedup();
    missing.extend(cas.find_missing(&files).await.map_err(MissingError::Store)?);
    Ok(missing)
}

/// Why [`missing_in_tree`] could not answer.
#[derive(Debug, thiserror::Error)]
pub enum MissingError {
    /// A Directory in the tree is malformed.
    #[error(transparent)]
    Tree(TreeError),
    /// The store failed.
    #[error(transparent)]
    Store(crate::store::StoreError),
}
