//! The mount's inode table.
//!
//! A handful of fixed inodes form the skeleton (`/`, `blobs/`, `trees/`,
//! `inputs/` and one directory per digest function); everything else is
//! created on demand. A CAS directory's children get their inodes when its
//! Directory proto is first loaded, so an inode number names one path for the
//! life of the mount (stable numbers, no aliasing between input roots, which
//! keeps each root's access log exact). Unregistering an input root drops its
//! whole subtree.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use casbuild_proto::reapi::{Directory, NodeProperties};

use crate::access_log::{join, AccessLog};
use crate::blob_cache::BlobCache;
use casbuild_cas::digest::{Digest, DigestFunction};
use casbuild_cas::tree::child_digest;

/// Modification time of entries without `NodeProperties.mtime`: a fixed
/// instant (2000-01-01), so that tools comparing times see a stable tree.
pub(crate) const FIXED_MTIME: Duration = Duration::from_secs(946_684_800);

pub(crate) const ROOT: u64 = 1;
const BLOBS: u64 = 2;
const TREES: u64 = 3;
pub(crate) const INPUTS: u64 = 4;
const FUNCTIONS: [DigestFunction; 2] = [DigestFunction::Blake3, DigestFunction::Sha256];
const FIRST_DYNAMIC: u64 = 16;

/// The fixed directories of the mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Virtual {
    Root,
    Blobs,
    Trees,
    Inputs,
    /// `blobs/{function}/`: entries appear on lookup.
    BlobsOf(DigestFunction),
    /// `trees/{function}/`: entries appear on lookup.
    TreesOf(DigestFunction),
}

pub(crate) enum NodeKind {
    Virtual(Virtual),
    Dir(DirNode),
    File(FileNode),
    Symlink(String),
}

/// A CAS directory; its children are loaded on first use.
pub(crate) struct DirNode {
    pub digest: Digest,
    pub mtime: SystemTime,
    children: Mutex<Option<Arc<Children>>>,
}

impl DirNode {
    fn new(digest: Digest, mtime: SystemTime) -> Self {
        DirNode { digest, mtime, children: Mutex::new(None) }
    }

    /// The children, if the Directory proto has been loaded.
    pub fn loaded(&self) -> Option<Arc<Children>> {
        self.children.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A loaded directory's entries, sorted by name.
pub(crate) struct Children {
    pub entries: Vec<(String, u64)>,
}

impl Children {
    pub fn get(&self, name: &str) -> Option<u64> {
        self.entries.binary_search_by(|(n, _)| n.as_str().cmp(name)).ok().map(|i| self.entries[i].1)
    }
}

pub(crate) struct FileNode {
    pub digest: Digest,
    pub executable: bool,
    pub mtime: SystemTime,
}

/// Which input root a node belongs to, its path there, and the cache of
/// the instance its blobs come from.
pub(crate) struct Scope {
    pub log: Arc<AccessLog>,
    pub path: String,
    pub cache: Arc<BlobCache>,
}

pub(crate) struct Node {
    pub ino: u64,
    pub parent: u64,
    pub kind: NodeKind,
    pub scope: Option<Scope>,
}

impl Node {
    /// The path of `name` inside this node's input root, if it has one.
    pub fn child_scope(&self, name: &str) -> Option<Scope> {
        self.scope.as_ref().map(|s| Scope { log: s.log.clone(), path: join(&s.path, name), cache: s.cache.clone() })
    }
}

/// A registered input root.
pub(crate) struct InputRoot {
    pub ino: u64,
    pub log: Arc<AccessLog>,
}

pub(crate) struct Inodes {
    nodes: RwLock<HashMap<u64, Arc<Node>>>,
    next: AtomicU64,
    inputs: Mutex<BTreeMap<String, InputRoot>>,
    /// Entries created under `blobs/` (false) and `trees/` (true).
    by_digest: Mutex<HashMap<(bool, Digest), u64>>,
}

impl Inodes {
    pub fn new() -> Self {
        let mut nodes = HashMap::new();
        let mut fixed = |ino, parent, v| {
            nodes.insert(ino, Arc::new(Node { ino, parent, kind: NodeKind::Virtual(v), scope: None }));
        };
        fixed(ROOT, ROOT, Virtual::Root);
        fixed(BLOBS, ROOT, Virtual::Blobs);
        fixed(TREES, ROOT, Virtual::Trees);
        fixed(INPUTS, ROOT, Virtual::Inputs);
        for (i, f) in FUNCTIONS.into_iter().enumerate() {
            fixed(5 + i as u64, BLOBS, Virtual::BlobsOf(f));
            fixed(7 + i as u64, TREES, Virtual::TreesOf(f));
        }
        Inodes {
            nodes: RwLock::new(nodes),
            next: AtomicU64::new(FIRST_DYNAMIC),
            inputs: Mutex::new(BTreeMap::new()),
            by_digest: Mutex::new(HashMap::new()),
        }
    }

    pub fn get(&self, ino: u64) -> Option<Arc<Node>> {
        self.nodes.read().unwrap_or_else(|e| e.into_inner()).get(&ino).cloned()
    }

    pub fn len(&self) -> usize {
        self.nodes.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn alloc(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    fn insert(&self, node: Node) -> Arc<Node> {
        let node = Arc::new(node);
        self.nodes.write().unwrap_or_else(|e| e.into_inner()).insert(node.ino, node.clone());
        node
    }

    /// The fixed children of a virtual directory, or the registered inputs.
    pub fn virtual_children(&self, v: Virtual) -> Vec<(String, u64)> {
        let named = |names: &[(&str, u64)]| names.iter().map(|(n, i)| (n.to_string(), *i)).collect();
        match v {
            Virtual::Root => named(&[("blobs", BLOBS), ("inputs", INPUTS), ("trees", TREES)]),
            Virtual::Blobs => named(&[("blake3", 5), ("sha256", 6)]),
            Virtual::Trees => named(&[("blake3", 7), ("sha256", 8)]),
            Virtual::Inputs => self.lock_inputs().iter().map(|(name, root)| (name.clone(), root.ino)).collect(),
            Virtual::BlobsOf(_) | Virtual::TreesOf(_) => Vec::new(),
        }
    }

    fn lock_inputs(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, InputRoot>> {
        self.inputs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `inputs/{name}` for the tree rooted at `root`, fetched through
    /// `cache`. O(1): nothing is fetched.
    pub fn register(&self, name: &str, root: Digest, cache: Arc<BlobCache>) -> Result<Arc<AccessLog>, String> {
        if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
            return Err(format!("{name:?} is not a valid input root name"));
        }
        let mut inputs = self.lock_inputs();
        if inputs.contains_key(name) {
            return Err(format!("an input root named {name:?} is already registered"));
        }
        let log = Arc::new(AccessLog::default());
        let ino = self.alloc();
        let scope = Some(Scope { log: log.clone(), path: String::new(), cache });
        let mtime = SystemTime::UNIX_EPOCH + FIXED_MTIME;
        self.insert(Node { ino, parent: INPUTS, kind: NodeKind::Dir(DirNode::new(root, mtime)), scope });
        inputs.insert(name.to_owned(), InputRoot { ino, log: log.clone() });
        Ok(log)
    }

    /// Removes `inputs/{name}` and every inode below it.
    pub fn unregister(&self, name: &str) -> Option<u64> {
        let root = self.lock_inputs().remove(name)?;
        let mut nodes = self.nodes.write().unwrap_or_else(|e| e.into_inner());
        let mut stack = vec![root.ino];
        while let Some(ino) = stack.pop() {
            if let Some(node) = nodes.remove(&ino) {
                if let NodeKind::Dir(dir) = &node.kind {
                    if let Some(children) = dir.loaded() {
                        stack.extend(children.entries.iter().map(|(_, ino)| *ino));
                    }
                }
            }
        }
        Some(root.ino)
    }

    pub fn input(&self, name: &str) -> Option<Arc<AccessLog>> {
        self.lock_inputs().get(name).map(|root| root.log.clone())
    }

    pub fn input_ino(&self, name: &str) -> Option<u64> {
        self.lock_inputs().get(name).map(|root| root.ino)
    }

    /// The inode of `blobs/{fn}/{digest}` (`tree` false) or `trees/{fn}/{digest}`,
    /// if it was created before.
    pub fn by_digest(&self, tree: bool, digest: &Digest) -> Option<u64> {
        self.by_digest.lock().unwrap_or_else(|e| e.into_inner()).get(&(tree, *digest)).copied()
    }

    /// Creates `blobs/{fn}/{digest}` or `trees/{fn}/{digest}` (or returns the
    /// one a concurrent lookup created first).
    pub fn add_by_digest(&self, parent: u64, tree: bool, digest: Digest) -> Arc<Node> {
        let mut map = self.by_digest.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(node) = map.get(&(tree, digest)).and_then(|ino| self.get(*ino)) {
            return node;
        }
        let mtime = SystemTime::UNIX_EPOCH + FIXED_MTIME;
        let kind = if tree {
            NodeKind::Dir(DirNode::new(digest, mtime))
        } else {
            NodeKind::File(FileNode { digest, executable: false, mtime })
        };
        let node = self.insert(Node { ino: self.alloc(), parent, kind, scope: None });
        map.insert((tree, digest), node.ino);
        node
    }

    /// Gives a CAS directory its children from its (validated) Directory
    /// proto. When two threads load the same directory, the first to finish
    /// wins and the other's nodes are discarded unseen.
    pub fn install_children(&self, node: &Node, directory: &Directory) -> Arc<Children> {
        let NodeKind::Dir(dir) = &node.kind else { unreachable!("only directories have children") };
        let function = dir.digest.function;
        let mut new_nodes = Vec::new();
        let mut entries = Vec::new();
        let mut add = |name: &str, kind: NodeKind| {
            let ino = self.alloc();
            new_nodes.push(Node { ino, parent: node.ino, kind, scope: node.child_scope(name) });
            entries.push((name.to_owned(), ino));
        };
        // The proto was validated, so child digests parse; skip defensively otherwise.
        for file in &directory.files {
            let Ok(digest) = child_digest(function, &file.name, file.digest.as_ref()) else { continue };
            let mtime = mtime_of(file.node_properties.as_ref());
            add(&file.name, NodeKind::File(FileNode { digest, executable: file.is_executable, mtime }));
        }
        for sub in &directory.directories {
            let Ok(digest) = child_digest(function, &sub.name, sub.digest.as_ref()) else { continue };
            add(&sub.name, NodeKind::Dir(DirNode::new(digest, SystemTime::UNIX_EPOCH + FIXED_MTIME)));
        }
        for link in &directory.symlinks {
            add(&link.name, NodeKind::Symlink(link.target.clone()));
        }
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let children = Arc::new(Children { entries });

        let mut nodes = self.nodes.write().unwrap_or_else(|e| e.into_inner());
        let mut slot = dir.children.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(existing) = slot.as_ref() {
            return existing.clone();
        }
        for new in new_nodes {
            nodes.insert(new.ino, Arc::new(new));
        }
        *slot = Some(children.clone());
        children
    }
}

/// A file's modification time from its node properties, else the fixed time.
pub(crate) fn mtime_of(properties: Option<&NodeProperties>) -> SystemTime {
    let Some(ts) = properties.and_then(|p| p.mtime.as_ref()) else {
        return SystemTime::UNIX_EPOCH + FIXED_MTIME;
    };
    let nanos = ts.nanos.clamp(0, 999_999_999) as u32;
    if ts.seconds >= 0 {
        SystemTime::UNIX_EPOCH + Duration::new(ts.seconds as u64, nanos)
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(ts.seconds.unsigned_abs()) + Duration::from_nanos(nanos as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use casbuild_cas::store::{DiskStore, RemoteChannel, RemoteStore, RemoteStoreOptions};
    use casbuild_proto::reapi::{DirectoryNode, FileNode as WireFile, SymlinkNode};

    /// A cache whose remote is never reached: the inode table fetches nothing.
    fn cache(dir: &std::path::Path) -> Arc<BlobCache> {
        let local = DiskStore::open(dir, 1 << 20).unwrap().namespace("");
        let channel = tonic::transport::Channel::from_static("http://127.0.0.1:9").connect_lazy();
        let remote = RemoteStore::from_channel(RemoteChannel::plain(channel), RemoteStoreOptions::default());
        Arc::new(BlobCache::new(local, Arc::new(remote), "", Duration::from_secs(1)))
    }

    #[tokio::test]
    async fn input_roots_register_once_load_children_once_and_unregister_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (inodes, cache) = (Inodes::new(), cache(dir.path()));
        let f = DigestFunction::Sha256;
        let before = inodes.len();
        for bad in ["", ".", "..", "a/b", "nul\0"] {
            assert!(inodes.register(bad, f.empty(), cache.clone()).is_err(), "{bad:?}");
        }
        inodes.register("a", f.digest_of(b"root"), cache.clone()).unwrap();
        assert!(inodes.register("a", f.empty(), cache.clone()).is_err(), "a name is taken once");
        let root = inodes.get(inodes.input_ino("a").unwrap()).unwrap();

        let directory = Directory {
            files: vec![WireFile {
                name: "x".into(),
                digest: Some(f.digest_of(b"x").to_proto()),
                ..Default::default()
            }],
            directories: vec![DirectoryNode { name: "sub".into(), digest: Some(f.empty().to_proto()) }],
            symlinks: vec![SymlinkNode { name: "ln".into(), target: "x".into(), ..Default::default() }],
            ..Default::default()
        };
        let children = inodes.install_children(&root, &directory);
        let names: Vec<&str> = children.entries.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["ln", "sub", "x"], "sorted for lookups");
        let x = inodes.get(children.get("x").unwrap()).unwrap();
        assert!(matches!(x.kind, NodeKind::File(ref file) if file.digest == f.digest_of(b"x")));
        assert_eq!(x.scope.as_ref().unwrap().path, "x", "accesses are logged by path in the input root");
        // A second load (a racing thread) keeps the first one's inodes.
        let again = inodes.install_children(&root, &Directory::default());
        assert!(Arc::ptr_eq(&children, &again));
        assert_eq!(inodes.len(), before + 4);

        // By-digest entries are made once.
        let blob = inodes.add_by_digest(INPUTS, false, f.digest_of(b"y"));
        assert_eq!(inodes.add_by_digest(INPUTS, false, f.digest_of(b"y")).ino, blob.ino);
        assert_eq!(inodes.by_digest(false, &f.digest_of(b"y")), Some(blob.ino));

        // Unregistering removes the root and everything loaded below it.
        inodes.unregister("a").unwrap();
        assert!(inodes.input("a").is_none());
        assert!(inodes.get(x.ino).is_none());
        assert_eq!(inodes.len(), before + 1, "only the by-digest entry is left");
    }
}
