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
            let sent = remover().lock().unwrap_or_else(|e| e.into_inner()).send(target.clone());
            if sent.is_err() {
                remove(&target);
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(_) => remove(scratch),
    }
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
fn remover() -> &'static Mutex<Sender<PathBuf>> {
    static REMOVER: OnceLock<Mutex<Sender<PathBuf>>> = OnceLock::new();
    REMOVER.get_or_init(|| {
        let (sender, receiver) = std::sync::mpsc::channel::<PathBuf>();
        let spawned = std::thread::Builder::new().name("scratch-remover".into()).spawn(move || {
            for path in receiver {
                remove(&path);
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
        let trash = dir.path().join(TRASH);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::fs::read_dir(&trash).unwrap().next().is_some() {
            assert!(std::time::Instant::now() < deadline, "the trash was not emptied");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        discard(&dir.path().join("never-existed"));
    }
}
