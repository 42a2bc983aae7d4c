//! The FUSE request handlers: `fuser::Filesystem` over the inode table and
//! the blob cache.
//!
//! Requests arrive on several fuser threads. A handler that needs the network
//! (a Directory proto, a blob) blocks its own thread on the tokio runtime
//! while the fetch runs there; no lock is held meanwhile, so other requests
//! proceed. Fetches are bounded by the cache's idle timeout, after which the
//! request fails with EIO instead of hanging.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use casbuild_proto::reapi::Directory;
use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig,
    LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEntry, ReplyOpen,
    ReplyStatfs, Request,
};
use tokio::runtime::Handle;

use crate::access_log::{Access, AccessLog};
use crate::blob_cache::{BlobCache, CachedBlob, FetchError};
use crate::inodes::{Children, DirNode, Inodes, Node, NodeKind, Virtual, FIXED_MTIME, INPUTS};
use casbuild_cas::digest::{Digest, DigestFunction};
use casbuild_cas::tree::decode_directory;

/// Content never changes, so the kernel may cache names and attributes for
/// as long as it likes; input roots that go away are invalidated explicitly.
const TTL: Duration = Duration::from_secs(365 * 24 * 3600);
const BLOCK_SIZE: u32 = 4096;

/// State shared by the FUSE threads and the owning process.
pub(crate) struct MountState {
    pub inodes: Inodes,
    pub cache: Arc<BlobCache>,
    /// Caches of other instances than the mount's own, by instance name.
    instances: Mutex<HashMap<String, Arc<BlobCache>>>,
    pub runtime: Handle,
    /// Whether to ask the kernel for passthrough reads.
    pub want_passthrough: bool,
    /// The only group (besides root) that may read the mount, if any.
    pub readers: Option<u32>,
    /// Whether the kernel agreed to passthrough.
    pub passthrough: AtomicBool,
    handles: Mutex<HashMap<u64, Arc<OpenFile>>>,
    /// One backing file per inode while any handle of it is open.
    backing: Mutex<HashMap<u64, Weak<BackingId>>>,
    /// Handles open without passthrough, by inode: the kernel refuses a
    /// passthrough open of an inode that has any (EIO), so while there are,
    /// new opens of it are served from userspace too.
    userspace_opens: Mutex<HashMap<u64, usize>>,
    next_fh: AtomicU64,
    pub passthrough_opens: AtomicU64,
}

struct OpenFile {
    blob: CachedBlob,
    /// The inode, when this handle is open without passthrough.
    userspace: Option<u64>,
    /// Keeps the kernel's backing file registered while this handle is open.
    _backing: Option<Arc<BackingId>>,
    /// Where reads are logged, for files inside an input root.
    scope: Option<(Arc<AccessLog>, String)>,
    logged_read: AtomicBool,
}

impl MountState {
    pub fn new(cache: Arc<BlobCache>, runtime: Handle, want_passthrough: bool, readers: Option<u32>) -> Self {
        MountState {
            inodes: Inodes::new(),
            cache,
            instances: Mutex::new(HashMap::new()),
            runtime,
            want_passthrough,
            readers,
            passthrough: AtomicBool::new(false),
            handles: Mutex::new(HashMap::new()),
            backing: Mutex::new(HashMap::new()),
            userspace_opens: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            passthrough_opens: AtomicU64::new(0),
        }
    }

    /// The cache for another instance of the same remote, created once.
    pub fn cache_for(&self, instance: &str) -> Arc<BlobCache> {
        if instance == self.cache.instance() {
            return self.cache.clone();
        }
        let mut caches = self.instances.lock().unwrap_or_else(|e| e.into_inner());
        caches.entry(instance.to_owned()).or_insert_with(|| Arc::new(self.cache.for_instance(instance))).clone()
    }

    /// Remote reads of every instance's cache.
    pub fn remote_reads(&self) -> u64 {
        let others: u64 =
            self.instances.lock().unwrap_or_else(|e| e.into_inner()).values().map(|c| c.remote_reads()).sum();
        self.cache.remote_reads() + others
    }

    pub fn open_files(&self) -> usize {
        self.handles.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The entries of the CAS directory `node`, fetching and installing its
    /// Directory proto on first use (FUSE lookups block on this; a prefetch
    /// awaits it).
    pub async fn children(&self, node: &Node, dir: &DirNode) -> Result<Arc<Children>, FetchError> {
        if let Some(children) = dir.loaded() {
            return Ok(children);
        }
        let cache = node.scope.as_ref().map_or(&self.cache, |s| &s.cache);
        let directory = fetch_directory(cache, &dir.digest).await?;
        Ok(self.inodes.install_children(node, &directory))
    }
}

/// Fetches and validates a Directory proto; a malformed one is a failed fetch.
async fn fetch_directory(cache: &BlobCache, digest: &Digest) -> Result<Directory, FetchError> {
    let bytes = cache.read_directory(digest).await?;
    decode_directory(digest, &bytes).map_err(|e| FetchError::Failed(e.to_string()))
}

/// The `fuser::Filesystem` the session runs.
pub(crate) struct CasFs {
    pub state: Arc<MountState>,
}

fn fetch_errno(what: &str, error: FetchError) -> Errno {
    tracing::warn!("{what}: {error}");
    Errno::EIO
}

impl CasFs {
    /// The cache a node's blobs come from: its input root's instance, or the
    /// mount's default instance for `blobs/` and `trees/`.
    fn cache_of(&self, node: &Node) -> Arc<BlobCache> {
        node.scope.as_ref().map_or_else(|| self.state.cache.clone(), |s| s.cache.clone())
    }

    fn node(&self, ino: INodeNo) -> Result<Arc<Node>, Errno> {
        self.state.inodes.get(ino.0).ok_or(Errno::ESTALE)
    }

    /// The entries of a CAS directory, fetching its Directory proto on first use.
    fn load(&self, node: &Node, dir: &DirNode) -> Result<Arc<Children>, Errno> {
        if let Some(children) = dir.loaded() {
            return Ok(children);
        }
        let state = &self.state;
        state.runtime.block_on(state.children(node, dir)).map_err(|e| fetch_errno("loading a directory", e))
    }

    /// Every entry of a directory with its inode, in a stable order.
    fn entries(&self, node: &Node) -> Result<Vec<(String, u64)>, Errno> {
        match &node.kind {
            NodeKind::Virtual(v) => Ok(self.state.inodes.virtual_children(*v)),
            NodeKind::Dir(dir) => Ok(self.load(node, dir)?.entries.clone()),
            _ => Err(Errno::ENOTDIR),
        }
    }

    fn lookup_child(&self, parent: &Node, name: &str) -> Result<Arc<Node>, Errno> {
        let ino = match &parent.kind {
            NodeKind::Virtual(Virtual::Inputs) => self.state.inodes.input_ino(name),
            NodeKind::Virtual(Virtual::BlobsOf(f)) => return self.lookup_by_digest(parent, *f, false, name),
            NodeKind::Virtual(Virtual::TreesOf(f)) => return self.lookup_by_digest(parent, *f, true, name),
            NodeKind::Virtual(v) => {
                self.state.inodes.virtual_children(*v).into_iter().find(|(n, _)| n == name).map(|(_, ino)| ino)
            }
            NodeKind::Dir(dir) => self.load(parent, dir)?.get(name),
            _ => return Err(Errno::ENOTDIR),
        };
        ino.and_then(|ino| self.state.inodes.get(ino)).ok_or(Errno::ENOENT)
    }

    /// `blobs/{f}/HASH-SIZE` or `trees/{f}/HASH-SIZE`: exists if the CAS has it.
    fn lookup_by_digest(&self, parent: &Node, f: DigestFunction, tree: bool, name: &str) -> Result<Arc<Node>, Errno> {
        let digest = name
            .rsplit_once('-')
            .and_then(|(hash, size)| Digest::from_hex(f, hash, size.parse().ok()?).ok())
            .ok_or(Errno::ENOENT)?;
        if let Some(node) = self.state.inodes.by_digest(tree, &digest).and_then(|ino| self.state.inodes.get(ino)) {
            return Ok(node);
        }
        if tree {
            // The root Directory proves the tree exists, and its entries are
            // what the next request asks for: keep them.
            let directory = match self.state.runtime.block_on(fetch_directory(&self.state.cache, &digest)) {
                Ok(directory) => directory,
                Err(FetchError::NotFound(_)) => return Err(Errno::ENOENT),
                Err(e) => return Err(fetch_errno("looking up a tree", e)),
            };
            let node = self.state.inodes.add_by_digest(parent.ino, true, digest);
            self.state.inodes.install_children(&node, &directory);
            return Ok(node);
        }
        let cache = self.state.cache.clone();
        match self.state.runtime.block_on(async move { cache.has(&digest).await }) {
            Ok(true) => Ok(self.state.inodes.add_by_digest(parent.ino, false, digest)),
            Ok(false) => Err(Errno::ENOENT),
            Err(e) => Err(fetch_errno("looking up a blob", e)),
        }
    }

    fn attr(&self, node: &Node) -> FileAttr {
        let fixed = SystemTime::UNIX_EPOCH + FIXED_MTIME;
        let (kind, perm, size, mtime, nlink) = match &node.kind {
            NodeKind::Virtual(_) => (FileType::Directory, 0o555, 0, fixed, 2),
            NodeKind::Dir(dir) => (FileType::Directory, 0o555, 0, dir.mtime, 2),
            NodeKind::File(file) => {
                let perm = if file.executable { 0o555 } else { 0o444 };
                (FileType::RegularFile, perm, file.digest.size_bytes, file.mtime, 1)
            }
            NodeKind::Symlink(target) => (FileType::Symlink, 0o777, target.len() as u64, fixed, 1),
        };
        // With a reader group, everything is root's and that group's only
        // (the kernel checks these bits: default_permissions).
        let (gid, perm) = match self.state.readers {
            Some(gid) if kind != FileType::Symlink => (gid, perm & 0o770),
            _ => (0, perm),
        };
        FileAttr {
            ino: INodeNo(node.ino),
            size,
            blocks: size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind,
            perm,
            nlink,
            uid: 0,
            gid,
            rdev: 0,
            blksize: BLOCK_SIZE,
            flags: 0,
        }
    }

    fn kind(node: &Node) -> FileType {
        match node.kind {
            NodeKind::Virtual(_) | NodeKind::Dir(_) => FileType::Directory,
            NodeKind::File(_) => FileType::RegularFile,
            NodeKind::Symlink(_) => FileType::Symlink,
        }
    }

    /// Opens a regular file: makes its blob local and hands the kernel either
    /// a passthrough backing file or our own handle to read from.
    fn open_file(&self, node: &Node, reply: ReplyOpen) {
        let NodeKind::File(file) = &node.kind else {
            let errno = if matches!(node.kind, NodeKind::Symlink(_)) { Errno::ELOOP } else { Errno::EISDIR };
            return reply.error(errno);
        };
        if let Some(scope) = &node.scope {
            scope.log.record(Access::Opened, &scope.path);
        }
        let cache = self.cache_of(node);
        let digest = file.digest;
        let blob = match self.state.runtime.block_on(async move { cache.open(&digest).await }) {
            Ok(blob) => blob,
            Err(e) => return reply.error(fetch_errno("opening a file", e)),
        };
        let passthrough = self.state.passthrough.load(Ordering::Relaxed);
        let mut userspace_opens = self.state.userspace_opens.lock().unwrap_or_else(|e| e.into_inner());
        let backing = match &blob.file {
            Some(fd) if passthrough && !userspace_opens.contains_key(&node.ino) => {
                self.backing_for(node.ino, fd, &reply)
            }
            _ => None,
        };
        let userspace = (passthrough && backing.is_none()).then_some(node.ino);
        if let Some(ino) = userspace {
            *userspace_opens.entry(ino).or_insert(0) += 1;
        }
        drop(userspace_opens);
        let fh = self.state.next_fh.fetch_add(1, Ordering::Relaxed);
        let streaming = blob.download.is_some();
        if let (Some(scope), Some(download)) = (&node.scope, &blob.download) {
            scope.log.streamed(download.clone());
        }
        let scope = node.scope.as_ref().map(|s| (s.log.clone(), s.path.clone()));
        let open = OpenFile { blob, userspace, _backing: backing.clone(), scope, logged_read: AtomicBool::new(false) };
        self.state.handles.lock().unwrap_or_else(|e| e.into_inner()).insert(fh, Arc::new(open));
        match backing {
            Some(id) => {
                self.state.passthrough_opens.fetch_add(1, Ordering::Relaxed);
                // The kernel refuses passthrough opens with caching flags
                // (EIO): the backing file's own page cache serves instead.
                reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id)
            }
            // A blob still streaming in is not verified yet: its pages must
            // not outlive this open if the verdict is a mismatch.
            None if streaming => reply.opened(FileHandle(fh), FopenFlags::empty()),
            // Content never changes: keep cached pages across opens.
            None => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
        }
    }

    /// The inode's registered backing file, registering `fd` if there is none.
    /// `None` (plain reads) if the kernel refuses it.
    fn backing_for(&self, ino: u64, fd: &std::fs::File, reply: &ReplyOpen) -> Option<Arc<BackingId>> {
        let mut backing = self.state.backing.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(id) = backing.get(&ino).and_then(Weak::upgrade) {
            return Some(id);
        }
        match reply.open_backing(fd) {
            Ok(id) => {
                let id = Arc::new(id);
                backing.insert(ino, Arc::downgrade(&id));
                Some(id)
            }
            Err(e) => {
                tracing::warn!("FUSE passthrough refused ({e}); serving reads from userspace");
                self.state.passthrough.store(false, Ordering::Relaxed);
                None
            }
        }
    }
}

impl fuser::Filesystem for CasFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let wanted = InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_PARALLEL_DIROPS | InitFlags::FUSE_CACHE_SYMLINKS;
        let _ = config.add_capabilities(wanted);
        if self.state.want_passthrough
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            // Depth 1: an overlayfs may still be stacked on top of this mount.
            && config.set_max_stack_depth(1).is_ok()
        {
            self.state.passthrough.store(true, Ordering::Relaxed);
        }
        let _ = config.set_max_readahead(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        crate::metrics::operation("lookup");
        let parent = match self.node(parent) {
            Ok(node) => node,
            Err(e) => return reply.error(e),
        };
        let Ok(name) = std::str::from_utf8(name.as_bytes()) else { return reply.error(Errno::ENOENT) };
        let result = self.lookup_child(&parent, name);
        if let (Some(scope), Ok(_) | Err(Errno::ENOENT)) = (parent.child_scope(name), &result) {
            let access = if result.is_ok() { Access::Found } else { Access::NotFound };
            scope.log.record(access, &scope.path);
        }
        match result {
            Ok(node) => reply.entry(&TTL, &self.attr(&node), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        crate::metrics::operation("getattr");
        match self.node(ino) {
            Ok(node) => reply.attr(&TTL, &self.attr(&node)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        crate::metrics::operation("readlink");
        match self.node(ino) {
            Ok(node) => match &node.kind {
                NodeKind::Symlink(target) => reply.data(target.as_bytes()),
                _ => reply.error(Errno::EINVAL),
            },
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        crate::metrics::operation("open");
        if flags.acc_mode() != OpenAccMode::O_RDONLY || flags.0 & libc::O_TRUNC != 0 {
            return reply.error(Errno::EROFS);
        }
        match self.node(ino) {
            Ok(node) => self.open_file(&node, reply),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        crate::metrics::operation("read");
        let open = self.state.handles.lock().unwrap_or_else(|e| e.into_inner()).get(&fh.0).cloned();
        let Some(open) = open else { return reply.error(Errno::EBADF) };
        if let Some((log, path)) = &open.scope {
            if !open.logged_read.swap(true, Ordering::Relaxed) {
                log.record(Access::Read, path);
            }
        }
        if let Some(data) = &open.blob.data {
            let start = (offset as usize).min(data.len());
            let end = start.saturating_add(size as usize).min(data.len());
            return reply.data(&data[start..end]);
        }
        if let Some(download) = &open.blob.download {
            return match self.state.runtime.block_on(download.read(offset, size)) {
                Ok(data) => reply.data(&data),
                Err(why) => {
                    tracing::warn!("reading a file: {why}");
                    reply.error(Errno::EIO)
                }
            };
        }
        let Some(file) = open.blob.file.as_ref() else { return reply.data(&[]) };
        let mut buf = vec![0; size as usize];
        let mut filled = 0;
        while filled < buf.len() {
            match file.read_at(&mut buf[filled..], offset + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return reply.error(Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))),
            }
        }
        reply.data(&buf[..filled])
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: fuser::ReplyEmpty,
    ) {
        crate::metrics::operation("release");
        let closed = self.state.handles.lock().unwrap_or_else(|e| e.into_inner()).remove(&fh.0);
        if let Some(ino) = closed.as_ref().and_then(|open| open.userspace) {
            let mut opens = self.state.userspace_opens.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(count) = opens.get_mut(&ino) {
                *count -= 1;
                if *count == 0 {
                    opens.remove(&ino);
                }
            }
        }
        drop(closed); // unpins the blob and, with the last handle, the backing file
        reply.ok()
    }

    // Nothing is ever written, so there is nothing to flush. ENOSYS (rather
    // than success) makes the kernel stop sending FLUSH for good: otherwise
    // every close() of a file on the mount waits for a round trip here.
    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: fuser::ReplyEmpty) {
        crate::metrics::operation("flush");
        reply.error(Errno::ENOSYS)
    }

    // No extended attributes. ENOSYS (rather than "none here") makes the
    // kernel stop asking for good: overlayfs probes its lower layers' xattrs
    // at every mount and lookup, and each probe would be a round trip.
    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: fuser::ReplyXattr) {
        crate::metrics::operation("getxattr");
        reply.error(Errno::ENOSYS)
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: fuser::ReplyXattr) {
        crate::metrics::operation("listxattr");
        reply.error(Errno::ENOSYS)
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // Overlayfs asks lower files for their flags on copy-up; there are none.
        reply.error(Errno::ENOTTY)
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        crate::metrics::operation("opendir");
        match self.node(ino) {
            // CAS directories never change: let the kernel cache their listings
            // (without KEEP_CACHE it drops the cached listing at every open).
            Ok(node) if matches!(node.kind, NodeKind::Dir(_)) => {
                reply.opened(FileHandle(0), FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE)
            }
            Ok(node) if matches!(node.kind, NodeKind::Virtual(_)) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        crate::metrics::operation("readdir");
        let entries = match self.node(ino).and_then(|node| self.listing(&node)) {
            Ok(entries) => entries,
            Err(e) => return reply.error(e),
        };
        for (i, (name, ino, kind)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), i as u64 + 1, kind, &name) {
                break;
            }
        }
        reply.ok()
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        crate::metrics::operation("readdirplus");
        let entries = match self.node(ino).and_then(|node| self.listing(&node)) {
            Ok(entries) => entries,
            Err(e) => return reply.error(e),
        };
        for (i, (name, ino, _)) in entries.into_iter().enumerate().skip(offset as usize) {
            let Some(child) = self.state.inodes.get(ino) else { continue };
            if reply.add(INodeNo(ino), i as u64 + 1, &name, &TTL, &self.attr(&child), Generation(0)) {
                break;
            }
        }
        reply.ok()
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        crate::metrics::operation("statfs");
        let local = self.state.cache.local();
        let (budget, used) = (local.budget(), local.bytes_used());
        let blocks = budget / BLOCK_SIZE as u64;
        let free = budget.saturating_sub(used) / BLOCK_SIZE as u64;
        let files = self.state.inodes.len() as u64;
        reply.statfs(blocks, free, free, files, 0, BLOCK_SIZE, 255, BLOCK_SIZE)
    }
}

impl CasFs {
    /// A directory's entries for readdir: `.`, `..`, then its children.
    fn listing(&self, node: &Node) -> Result<Vec<(String, u64, FileType)>, Errno> {
        let entries = self.entries(node)?;
        if let Some(scope) = &node.scope {
            scope.log.record(Access::Listed, &scope.path);
        }
        let mut listing = Vec::with_capacity(entries.len() + 2);
        listing.push((".".to_owned(), node.ino, FileType::Directory));
        listing.push(("..".to_owned(), node.parent, FileType::Directory));
        for (name, ino) in entries {
            let Some(child) = self.state.inodes.get(ino) else { continue };
            listing.push((name, ino, Self::kind(&child)));
        }
        Ok(listing)
    }
}

/// The inode of `inputs/`, for invalidating its entries.
pub(crate) const INPUTS_INO: INodeNo = INodeNo(INPUTS);
