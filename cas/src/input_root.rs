//! An input root built from paths and what they hold (files by digest,
//! stored directories, symlinks), encoded as REAPI Directory protos — a graph
//! job's sources and its producers' outputs, or a compile's preprocessed file.

use std::collections::BTreeMap;

use crate::digest::{Digest, DigestFunction};
use crate::error::Invalid;
use bytes::Bytes;
use casbuild_proto::reapi::{Directory, DirectoryNode, FileNode, SymlinkNode};
use prost::Message;

/// Directories deep an input path may go; bounds the recursion of encoding.
pub const MAX_DEPTH: usize = 256;

/// What one path of the input root holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// A file's content.
    File {
        /// Its content digest.
        digest: Digest,
        /// Whether it is executable.
        executable: bool,
    },
    /// A directory whose Directory protos are in the CAS already.
    Directory(Digest),
    /// A symbolic link.
    Symlink(String),
}

enum Node {
    Leaf(Entry),
    Dir(BTreeMap<String, Node>),
}

/// Paths and what they hold, turned into a tree of Directory protos.
#[derive(Default)]
pub struct InputRoot {
    root: BTreeMap<String, Node>,
}

impl InputRoot {
    /// Places `entry` at `path` (relative, already checked not to escape).
    /// The same entry twice is fine; anything else at a taken path is an error
    /// naming the path.
    pub fn insert(&mut self, path: &str, entry: Entry) -> Result<(), Invalid> {
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty() && *p != ".").collect();
        if parts.len() > MAX_DEPTH {
            return Err(Invalid(format!("input path {path:?} is nested deeper than {MAX_DEPTH} directories")));
        }
        let Some((name, parents)) = parts.split_last() else {
            return Err(Invalid(format!("input path {path:?} names the root")));
        };
        let mut dir = &mut self.root;
        for (depth, part) in parents.iter().enumerate() {
            let node = dir.entry(part.to_string()).or_insert_with(|| Node::Dir(BTreeMap::new()));
            dir = match node {
                Node::Dir(children) => children,
                Node::Leaf(_) => {
                    let at = parents[..=depth].join("/");
                    return Err(Invalid(format!(
                        "input {path:?} needs {at:?} to be a directory, but another input is there"
                    )));
                }
            };
        }
        match dir.get(*name) {
            None => {
                dir.insert(name.to_string(), Node::Leaf(entry));
                Ok(())
            }
            Some(Node::Leaf(existing)) if *existing == entry => Ok(()),
            Some(_) => Err(Invalid(format!("two inputs put different contents at {path:?}"))),
        }
    }

    /// Encodes the tree: returns the root digest and every Directory blob.
    pub fn encode(&self, function: DigestFunction) -> (Digest, Vec<(Digest, Bytes)>) {
        let mut blobs = Vec::new();
        let root = encode_dir(&self.root, function, &mut blobs);
        (root, blobs)
    }
}

fn encode_dir(dir: &BTreeMap<String, Node>, function: DigestFunction, blobs: &mut Vec<(Digest, Bytes)>) -> Digest {
    // BTreeMap iterates in name order, which REAPI requires of each list.
    let mut directory = Directory::default();
    for (name, node) in dir {
        let name = name.clone();
        match node {
            Node::Dir(children) => {
                let digest = encode_dir(children, function, blobs);
                directory.directories.push(DirectoryNode { name, digest: Some(digest.to_proto()) });
            }
            Node::Leaf(Entry::Directory(digest)) => {
                directory.directories.push(DirectoryNode { name, digest: Some(digest.to_proto()) });
            }
            Node::Leaf(Entry::File { digest, executable }) => directory.files.push(FileNode {
                name,
                digest: Some(digest.to_proto()),
                is_executable: *executable,
                node_properties: None,
            }),
            Node::Leaf(Entry::Symlink(target)) => {
                directory.symlinks.push(SymlinkNode { name, target: target.clone(), node_properties: None })
            }
        }
    }
    let bytes = Bytes::from(directory.encode_to_vec());
    let digest = function.digest_of(&bytes);
    blobs.push((digest, bytes));
    digest
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> Entry {
        Entry::File { digest: DigestFunction::Sha256.digest_of(text.as_bytes()), executable: false }
    }

    #[test]
    fn paths_become_nested_sorted_directories() {
        let mut root = InputRoot::default();
        root.insert("src/b.c", file("b")).unwrap();
        root.insert("src/a.c", file("a")).unwrap();
        root.insert("./top.h", file("t")).unwrap();
        root.insert("src/a.c", file("a")).unwrap();
        let (digest, blobs) = root.encode(DigestFunction::Sha256);
        assert_eq!(blobs.len(), 2);
        let (last, bytes) = blobs.last().unwrap();
        assert_eq!(*last, digest, "the root comes last");
        let top = Directory::decode(bytes.as_ref()).unwrap();
        assert_eq!(top.files[0].name, "top.h");
        assert_eq!(top.directories[0].name, "src");
        let src = Directory::decode(blobs[0].1.as_ref()).unwrap();
        let names: Vec<&str> = src.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["a.c", "b.c"]);
    }

    #[test]
    fn conflicting_inputs_are_named() {
        let mut root = InputRoot::default();
        root.insert("gen/out.h", file("1")).unwrap();
        let e = root.insert("gen/out.h", file("2")).unwrap_err();
        assert!(e.0.contains("different contents at \"gen/out.h\""), "{e}");
        let e = root.insert("gen/out.h/x", file("3")).unwrap_err();
        assert!(e.0.contains("needs \"gen/out.h\" to be a directory"), "{e}");
    }
}
