//! Removing a run's scratch directory without making the run wait for it:
//! the directory is renamed into `.trash` beside it (one syscall; its path is
//! free at once) and deleted by a background thread. Whatever a crash leaves
//! in `.trash` goes with the rest of the scratch root at the next start.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Mutex, OnceLock};

/// The name of the trash directory beside scratch directories.
pub const TRASH: &str = ".trash";

/// Takes `scratch` away now and deletes it in the background. A directory
/// that does not exist is fine; one that cannot be moved is deleted here.
pub fn discard(scratch: &Path) {
    static NEXT: AtomicU64 = AtomicU64::new(0);
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
