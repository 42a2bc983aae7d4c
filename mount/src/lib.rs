//! The `/cas` filesystem: CAS trees over FUSE, fetched lazily.
//!
//! ```text
//! MOUNT/blobs/{blake3|sha256}/HASH-SIZE     any blob, as a read-only file
//! MOUNT/trees/{blake3|sha256}/HASH-SIZE/    the tree whose root Directory has that digest
//! MOUNT/inputs/NAME/                        input roots registered in-process
//! ```
//!
//! Entries under `blobs/` and `trees/` appear when looked up. A Directory
//! proto is fetched the first time something looks inside it; a file's blob is
//! fetched when it is opened, into the local [`BlobCache`], and then served
//! from there (through FUSE passthrough when the kernel allows). Everything is
//! read-only. Each input root keeps an [`AccessLog`] of what was looked up,
//! opened, read and listed in it.
//!
//! One mount serves a whole worker host: registering an input root is O(1)
//! and all actions share the fetched blobs.

mod access_log;
mod blob_cache;
mod download;
mod filesystem;
mod inodes;
mod metrics;
mod prefetch;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use fuser::{BackgroundSession, Config, MountOption, Notifier, SessionACL};
use tokio::runtime::Handle;

pub use access_log::{AccessLog, AccessReport, MAX_NOT_FOUND};
pub use blob_cache::{BlobCache, CachedBlob, FetchError};
pub use prefetch::{Prefetch, PrefetchLimits, PrefetchStats};

use casbuild_cas::digest::Digest;
use filesystem::{CasFs, MountState, INPUTS_INO};

/// How to mount.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// FUSE request threads. Requests that wait on the network hold a thread,
    /// so this bounds how many fetches the mount drives at once.
    pub threads: usize,
    /// Serve reads of cached blobs through FUSE passthrough where the kernel
    /// supports it (Linux ≥ 6.9, root).
    pub passthrough: bool,
    /// The group that may read the mount besides root (a worker's sandbox
    /// group): every entry is owned by root and that group, with no
    /// permissions for others. `None`: everyone may read it.
    pub readers: Option<u32>,
    /// Cold files of this many bytes or more are read while they stream in;
    /// smaller ones are fetched whole before their open returns.
    pub stream_min: u64,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions { threads: 16, passthrough: true, readers: None, stream_min: blob_cache::STREAM_MIN }
    }
}

/// Why a mount operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// Mounting (or preparing the mount point) failed.
    #[error("mounting {path}: {source}")]
    Mount {
        /// The mount point.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A bad or duplicate input root name.
    #[error("{0}")]
    InvalidName(String),
    /// No input root of that name is registered.
    #[error("no input root named {0:?} is registered")]
    NotRegistered(String),
}

/// Counters of a live mount.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MountStats {
    /// Blob reads that went to the remote CAS.
    pub remote_reads: u64,
    /// Whether reads are served by the kernel through passthrough.
    pub passthrough: bool,
    /// Opens served through passthrough.
    pub passthrough_opens: u64,
    /// Files open right now.
    pub open_files: usize,
    /// Inodes in the table.
    pub inodes: usize,
}

/// A mounted `/cas` filesystem. Unmounts when dropped.
pub struct CasMount {
    mountpoint: PathBuf,
    state: Arc<MountState>,
    session: Mutex<Option<BackgroundSession>>,
    notifier: Notifier,
}

impl CasMount {
    /// Mounts at `mountpoint` (created if missing; a stale mount left there by
    /// a crashed process is detached first). Network fetches run on
    /// `runtime`, which must not be blocked by the caller meanwhile. Blocks
    /// briefly for the FUSE handshake: call it from a blocking context.
    pub fn mount(
        mountpoint: &Path,
        cache: Arc<BlobCache>,
        runtime: Handle,
        options: &MountOptions,
    ) -> Result<CasMount, MountError> {
        let mount_error = |source| MountError::Mount { path: mountpoint.to_path_buf(), source };
        cache.set_stream_min(options.stream_min);
        let mountpoint = std::path::absolute(mountpoint).map_err(mount_error)?;
        detach_stale_mounts(&mountpoint).map_err(mount_error)?;
        std::fs::create_dir_all(&mountpoint).map_err(mount_error)?;

        let state = Arc::new(MountState::new(cache, runtime, options.passthrough, options.readers));
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("casbuild".into()),
            MountOption::Subtype("cas".into()),
            MountOption::RO,
            MountOption::NoSuid,
            MountOption::NoDev,
            MountOption::NoAtime,
            MountOption::DefaultPermissions,
        ];
        // Sandboxed commands run as other users; with `readers`, the
        // permission bits keep everyone else out.
        config.acl = SessionACL::All;
        config.n_threads = Some(options.threads.max(1));
        config.clone_fd = true;
        let session = fuser::spawn_mount(CasFs { state: state.clone() }, &mountpoint, &config).map_err(mount_error)?;
        let notifier = session.notifier();
        Ok(CasMount { mountpoint, state, session: Mutex::new(Some(session)), notifier })
    }

    /// Where the filesystem is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Makes the tree rooted at `root` appear as `inputs/{name}` and returns
    /// its path. O(1): nothing is fetched until something looks inside.
    pub fn register(&self, name: &str, root: Digest) -> Result<PathBuf, MountError> {
        self.register_in(name, None, root)
    }

    /// [`CasMount::register`] for a tree of another REAPI instance than the
    /// mount's own (`None`: the mount's).
    pub fn register_in(&self, name: &str, instance: Option<&str>, root: Digest) -> Result<PathBuf, MountError> {
        let cache = match instance {
            None => self.state.cache.clone(),
            Some(instance) => self.state.cache_for(instance),
        };
        self.state.inodes.register(name, root, cache).map_err(MountError::InvalidName)?;
        Ok(self.mountpoint.join("inputs").join(name))
    }

    /// Removes `inputs/{name}`. Files already open in it stay readable.
    pub fn unregister(&self, name: &str) -> Result<(), MountError> {
        self.state.inodes.unregister(name).ok_or_else(|| MountError::NotRegistered(name.to_owned()))?;
        // The kernel may have cached the name; an error only means it had not.
        let _ = self.notifier.inval_entry(INPUTS_INO, name.as_ref());
        Ok(())
    }

    /// What has been accessed in `inputs/{name}` so far.
    pub fn access_report(&self, name: &str) -> Result<AccessReport, MountError> {
        self.state.inodes.input(name).map(|log| log.report()).ok_or_else(|| MountError::NotRegistered(name.to_owned()))
    }

    /// Starts fetching the files at `paths` (relative to `inputs/{name}`) in
    /// the background, within `limits`, without logging them as accessed. The
    /// fetch stops when the returned [`Prefetch`] is dropped.
    pub fn prefetch(&self, name: &str, paths: Vec<String>, limits: PrefetchLimits) -> Result<Prefetch, MountError> {
        let root = self.state.inodes.input_ino(name).and_then(|ino| self.state.inodes.get(ino));
        let root = root.ok_or_else(|| MountError::NotRegistered(name.to_owned()))?;
        Ok(prefetch::start(self.state.clone(), root, paths, limits))
    }

    /// Waits until every file of `inputs/{name}` that was opened while it
    /// streamed in has been verified: bytes served before the verdict must
    /// not end up in a result if the blob turns out not to match. The error
    /// names the blob.
    pub async fn verify_streamed(&self, name: &str) -> Result<(), String> {
        let log =
            self.state.inodes.input(name).ok_or_else(|| MountError::NotRegistered(name.to_owned()).to_string())?;
        log.verify_streamed().await
    }

    /// Clears the access log of `inputs/{name}`.
    pub fn clear_access_log(&self, name: &str) -> Result<(), MountError> {
        self.state.inodes.input(name).map(|log| log.clear()).ok_or_else(|| MountError::NotRegistered(name.to_owned()))
    }

    /// Counters for monitoring and tests.
    pub fn stats(&self) -> MountStats {
        MountStats {
            remote_reads: self.state.remote_reads(),
            passthrough: self.state.passthrough.load(Ordering::Relaxed),
            passthrough_opens: self.state.passthrough_opens.load(Ordering::Relaxed),
            open_files: self.state.open_files(),
            inodes: self.state.inodes.len(),
        }
    }

    /// The blob cache behind the mount.
    pub fn cache(&self) -> &Arc<BlobCache> {
        &self.state.cache
    }

    /// Unmounts (lazily: processes still using the mount keep working until
    /// they let go) and waits for the FUSE threads to finish.
    pub fn unmount(self) -> std::io::Result<()> {
        self.shutdown()
    }

    /// [`CasMount::unmount`] for a mount shared behind an `Arc`: later calls
    /// find it already unmounted.
    pub fn shutdown(&self) -> std::io::Result<()> {
        let Some(session) = self.take_session() else { return Ok(()) };
        match session.umount_and_join() {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => self.unmount_busy(),
            // The unmount went through and the session's reader found its
            // connection aborted rather than closed (the kernel reports
            // either as the connection goes away): the mount is gone.
            Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => {
                tracing::debug!("{}: the FUSE connection ended aborted at unmount", self.mountpoint.display());
                Ok(())
            }
            other => other,
        }
    }

    /// Files closed a moment ago may still be being released by the kernel
    /// (EBUSY): retries briefly, then detaches lazily rather than fail a
    /// shutdown because of a straggler. The session's thread, no longer
    /// joinable, ends by itself once the kernel reports the unmount.
    fn unmount_busy(&self) -> std::io::Result<()> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            match nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::empty()) {
                Ok(()) => return Ok(()),
                Err(nix::errno::Errno::EBUSY) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(nix::errno::Errno::EBUSY) => {
                    tracing::warn!("{} is still busy after 2 s; detaching it", self.mountpoint.display());
                    return Ok(nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH)?);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn take_session(&self) -> Option<BackgroundSession> {
        self.session.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl Drop for CasMount {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!("unmounting {}: {e}", self.mountpoint.display());
        }
    }
}

/// Detaches FUSE mounts left at `path` by a process that died without
/// unmounting (their mount point answers ENOTCONN until then).
fn detach_stale_mounts(path: &Path) -> std::io::Result<()> {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else { return Ok(()) };
    let stale = mountinfo.lines().filter(|line| {
        let mut halves = line.splitn(2, " - ");
        let (Some(head), Some(tail)) = (halves.next(), halves.next()) else { return false };
        let point = head.split(' ').nth(4).map(unescape_mountinfo);
        let fstype = tail.split(' ').next().unwrap_or("");
        point.as_deref() == Some(path.as_os_str().as_encoded_bytes()) && fstype.starts_with("fuse")
    });
    for _ in stale {
        tracing::warn!("detaching a stale FUSE mount at {}", path.display());
        nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH).map_err(std::io::Error::from)?;
    }
    Ok(())
}

/// Mount points in mountinfo escape space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo(r"/tmp/a\040b\134c"), b"/tmp/a b\\c");
        assert_eq!(unescape_mountinfo("/cas"), b"/cas");
    }
}
