//! The scratch root and the runs' directories in it.
//!
//! The worker deletes only what it made: a scratch root carries a marker
//! file from the moment the worker creates it, and a directory without one
//! that is not empty (`--scratch ~/src`, a typo) is refused, never cleared.
//! The root is the worker's alone (mode 0700): the overlay upper layers in it
//! hold what actions wrote, and no other local user may read or change them.
//!
//! Removing a run's scratch directory does not make the run wait for it:
//! the directory is renamed into `.trash` beside it (one syscall; its path is
//! free at once) and deleted by a background thread. Whatever a crash leaves
//! in `.trash` goes with the rest of the scratch root at the next start.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Mutex, OnceLock};

/// The name of the trash directory beside scratch directories.
pub const TRASH: &str = ".trash";

/// The directory of a run's scratch directory that holds what the action
/// writes; a tmpfs when the run has a scratch budget.
pub const SPACE: &str = "space";

/// The file that marks a directory as a casbuild scratch root.
pub const MARKER: &str = ".casbuild-scratch";

/// The source name of the tmpfs [`mount_root_tmpfs`] puts over a scratch
/// root: how a later start knows it for casbuild's (and never unmounts a
/// file system someone mounted there on purpose).
const ROOT_SOURCE: &str = "casbuild-scratch";

/// Makes `root` ready for runs: created with its marker when missing or
/// empty; emptied of earlier runs' leftovers when it carries the marker;
/// refused otherwise. Either way it ends up mode 0700.
pub fn prepare_root(root: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |what: &str, e: std::io::Error| format!("{what} {}: {e}", root.display());
    match std::fs::symlink_metadata(root) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(root).map_err(|e| fail("creating", e))?
        }
        Err(e) => return Err(fail("reading", e)),
        Ok(meta) if !meta.is_dir() => {
            return Err(format!("the scratch directory {} exists and is not a directory", root.display()))
        }
        Ok(_) => {}
    }
    unmount_below(root);
    unmount_root_tmpfs(root);
    let entries: Vec<_> = std::fs::read_dir(root)
        .map_err(|e| fail("reading", e))?
        .collect::<Result<_, _>>()
        .map_err(|e| fail("reading", e))?;
    let marked = entries.iter().any(|e| e.file_name() == MARKER);
    if !entries.is_empty() && !marked {
        return Err(format!(
            "the scratch directory {} is not empty and was not made by casbuild (no {MARKER} file); \
             casbuild deletes everything in its scratch directory, so give it an empty or new one",
            root.display()
        ));
    }
    for entry in entries.iter().filter(|e| e.file_name() != MARKER) {
        let path = entry.path();
        // std's remove_dir_all never follows symlinks out of the tree.
        let removed = match entry.file_type() {
            Ok(kind) if kind.is_dir() => std::fs::remove_dir_all(&path),
            _ => std::fs::remove_file(&path),
        };
        removed.map_err(|e| format!("clearing {}: {e}", path.display()))?;
    }
    if !marked {
        std::fs::write(root.join(MARKER), "casbuild scratch space: its contents are deleted at start\n")
            .map_err(|e| fail("marking", e))?;
    }
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700)).map_err(|e| fail("chmod", e))
}

/// Mounts a small tmpfs over the scratch root `root` (after
/// [`prepare_root`]) for runs whose scratch space is a tmpfs of its own
/// anyway: the runs' directories and mount points are made and removed
/// hundreds of times a second, which on a disk file system keeps its inode
/// allocator and journal busy (about a sixth of a worker's CPU per no-op
/// action). [`unmount_root_tmpfs`] takes it away.
pub fn mount_root_tmpfs(root: &Path) -> Result<(), String> {
    use nix::mount::{mount, MsFlags};
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount(Some(ROOT_SOURCE), root, Some("tmpfs"), flags, Some("size=64m,mode=0700"))
        .map_err(|e| format!("mounting a tmpfs over the scratch directory {}: {e}", root.display()))
}

/// Detaches the tmpfs [`mount_root_tmpfs`] put over `root`, if it is there
/// (also one a killed worker left); any other file system mounted at
/// `root` stays.
pub fn unmount_root_tmpfs(root: &Path) {
    let Ok(root) = root.canonicalize() else { return };
    let ours = mounts().any(|m| m.point == root && m.fstype == "tmpfs" && m.source == ROOT_SOURCE);
    if ours {
        if let Err(e) = nix::mount::umount2(&root, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!("unmounting the tmpfs over {}: {e}", root.display());
        }
    }
}

/// Detaches every mount below `root` (scratch tmpfs of runs a killed worker
/// left), deepest first.
fn unmount_below(root: &Path) {
    let Ok(root) = root.canonicalize() else { return };
    let mut below: Vec<PathBuf> =
        mounts().map(|m| m.point).filter(|point| point.starts_with(&root) && point != &root).collect();
    below.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for point in below {
        if let Err(e) = nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!("unmounting {}: {e}", point.display());
        }
    }
}

/// One line of this process's mount table.
struct Mount {
    point: PathBuf,
    fstype: String,
    source: String,
}

/// This process's mount table (`/proc/self/mountinfo`; empty if unreadable).
fn mounts() -> impl Iterator<Item = Mount> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let table: Vec<Mount> = info
        .lines()
        .filter_map(|line| {
            let point = line.split(' ').nth(4)?;
            // After the optional fields: ` - FSTYPE SOURCE OPTIONS`.
            let (_, tail) = line.split_once(" - ")?;
            let mut tail = tail.split(' ');
            let (fstype, source) = (tail.next()?, tail.next()?);
            Some(Mount {
                point: PathBuf::from(unescape_mountinfo(point)),
                fstype: fstype.to_owned(),
                source: unescape_mountinfo(source),
            })
        })
        .collect();
    table.into_iter()
}

/// mountinfo writes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| std::str::from_utf8(d).ok());
        match (bytes[i], octal.and_then(|d| u8::from_str_radix(d, 8).ok())) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Takes `scratch` away now and deletes it in the background. A directory
/// that does not exist is fine; one that cannot be moved is deleted here.
pub fn discard(scratch: &Path) {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    // A bounded run's tmpfs goes first (a mount point cannot be renamed);
    // detached, it is freed as soon as nothing uses it.
    match nix::mount::umount2(&scratch.join(SPACE), nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => tracing::warn!("unmounting the scratch space of {}: {e}", scratch.display()),
    }
    let Some(parent) = scratch.parent().filter(|p| !p.as_os_str().is_empty()) else {
        return remove(scratch);
    };
    let trash = parent.join(TRASH);
    if let Err(e) = std::fs::create_dir_all(&trash) {
        tracing::debug!("creating {}: {e}", trash.display());
        return remove(scratch);
    }
    let name = format!("{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
    let target = trash.join(name);
    match std::fs::rename(scratch, &target) {
        Ok(()) => {
            let sent = remover().lock().unwrap_or_else(|e| e.into_inner()).send(Job::Remove(target.clone()));
            if sent.is_err() {
                remove(&target);
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(_) => remove(scratch),
    }
}

/// Waits until every directory discarded so far is deleted (before a
/// process removes the scratch root itself, or exits).
pub fn flush() {
    let (done, wait) = std::sync::mpsc::channel();
    let sent = remover().lock().unwrap_or_else(|e| e.into_inner()).send(Job::Flush(done));
    if sent.is_ok() {
        let _ = wait.recv_timeout(std::time::Duration::from_secs(60));
    }
}

enum Job {
    Remove(PathBuf),
    Flush(Sender<()>),
}

/// Deletes a directory tree now; a missing one is fine.
fn remove(path: &Path) {
    if let Err(e) = std::fs::remove_dir_all(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("removing {}: {e}", path.display());
        }
    }
}

/// The background thread's queue, started on first use.
fn remover() -> &'static Mutex<Sender<Job>> {
    static REMOVER: OnceLock<Mutex<Sender<Job>>> = OnceLock::new();
    REMOVER.get_or_init(|| {
        let (sender, receiver) = std::sync::mpsc::channel::<Job>();
        let spawned = std::thread::Builder::new().name("scratch-remover".into()).spawn(move || {
            for job in receiver {
                match job {
                    Job::Remove(path) => remove(&path),
                    Job::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
        if let Err(e) = spawned {
            tracing::warn!("starting the scratch remover: {e}; removing in place");
        }
        Mutex::new(sender)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo("/a\\040b/c\\134d"), "/a b/c\\d");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }

    #[test]
    fn only_a_marked_or_empty_directory_becomes_a_scratch_root() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let foreign = dir.path().join("src");
        std::fs::create_dir_all(&foreign).unwrap();
        std::fs::write(foreign.join("main.c"), "int main;").unwrap();
        let err = prepare_root(&foreign).unwrap_err();
        assert!(err.contains("not empty and was not made by casbuild"), "{err}");
        assert!(foreign.join("main.c").exists(), "a foreign directory is left as it was");

        let root = dir.path().join("scratch");
        prepare_root(&root).unwrap();
        std::fs::create_dir_all(root.join("run-1/upper")).unwrap();
        std::os::unix::fs::symlink(&foreign, root.join("run-1/upper/link")).unwrap();
        prepare_root(&root).unwrap();
        let left: Vec<_> = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, [MARKER]);
        assert!(foreign.join("main.c").exists(), "links in leftovers are not followed");
        assert_eq!(std::fs::metadata(&root).unwrap().permissions().mode() & 0o777, 0o700);

        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        prepare_root(&empty).unwrap();
        assert!(empty.join(MARKER).exists());
    }

    #[test]
    fn the_scratch_tmpfs_a_killed_worker_left_goes_and_no_other_mount_does() {
        if !nix::unistd::Uid::effective().is_root() {
            assert!(std::env::var_os("CASBUILD_REQUIRE_PRIVILEGED").is_none(), "mounting needs root");
            eprintln!("skipped: mounting a tmpfs needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("scratch");
        prepare_root(&root).unwrap();
        mount_root_tmpfs(&root).unwrap();
        std::fs::create_dir_all(root.join("run-1/space")).unwrap();
        // The worker is killed here: the next start finds its tmpfs.
        prepare_root(&root).unwrap();
        let left: Vec<_> = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, [MARKER], "the tmpfs is gone and the marked directory below is used");

        // Someone else's file system mounted at the scratch directory stays.
        let none: Option<&str> = None;
        nix::mount::mount(Some("elsewhere"), &root, Some("tmpfs"), nix::mount::MsFlags::empty(), none).unwrap();
        unmount_root_tmpfs(&root);
        let still = std::fs::read_to_string("/proc/self/mountinfo").unwrap().contains(" elsewhere ");
        let _ = nix::mount::umount2(&root, nix::mount::MntFlags::MNT_DETACH);
        assert!(still, "a tmpfs casbuild did not mount is left alone");
    }

    #[test]
    fn a_discarded_directory_is_gone_at_once_and_deleted_soon() {
        let dir = tempfile::tempdir().unwrap();
        let scratch = dir.path().join("run-1");
        std::fs::create_dir_all(scratch.join("upper/deep")).unwrap();
        std::fs::write(scratch.join("upper/deep/file"), "x").unwrap();
        discard(&scratch);
        assert!(!scratch.exists(), "the path is free as soon as discard returns");
        flush();
        let trash = dir.path().join(TRASH);
        assert_eq!(std::fs::read_dir(&trash).unwrap().count(), 0, "flush waits for the deletion");
        discard(&dir.path().join("never-existed"));
    }
}
