//! Directory claims: each long-running role (coordinator, up, worker, mount)
//! records the directories it owns in a per-user registry, and refuses to
//! start on a directory that is, contains or lies inside one a live process
//! of another role (or the same one) owns. Two roles sharing a tree corrupt
//! each other: a coordinator storing blobs under `casbuild up`'s FUSE mount,
//! a worker's scratch inside its own blob cache.
//!
//! A claim is a small file in the registry holding the path, the role and
//! the pid, exclusively `flock`ed for the owner's lifetime: a claim whose
//! lock can be taken belongs to a process that is gone and is removed.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context};
use nix::fcntl::{Flock, FlockArg};

/// The claims a process holds; dropping them (at exit) releases them.
pub struct Claims {
    _held: Vec<Flock<File>>,
    files: Vec<PathBuf>,
}

impl Drop for Claims {
    fn drop(&mut self) {
        for file in &self.files {
            let _ = std::fs::remove_file(file);
        }
    }
}

/// The registry of this user's claims.
fn registry() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/run/casbuild/claims");
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("casbuild/claims"),
        None => std::env::temp_dir().join(format!("casbuild-{}/claims", nix::unistd::geteuid())),
    }
}

/// `path` made absolute and free of `.`, `..` and links as far as it exists
/// (the rest need not exist yet).
fn resolved(path: &Path) -> anyhow::Result<PathBuf> {
    let absolute = std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))?;
    let mut existing = absolute.clone();
    let mut rest = Vec::new();
    loop {
        match existing.canonicalize() {
            Ok(real) => {
                let mut out = real;
                for part in rest.iter().rev() {
                    out.push(part);
                }
                return Ok(out);
            }
            Err(_) => match (existing.file_name().map(ToOwned::to_owned), existing.parent()) {
                (Some(name), Some(parent)) => {
                    rest.push(name);
                    existing = parent.to_path_buf();
                }
                _ => return Ok(absolute),
            },
        }
    }
}

fn overlap(a: &Path, b: &Path) -> bool {
    let parts = |p: &Path| p.components().filter(|c| !matches!(c, Component::CurDir)).count();
    let (short, long) = if parts(a) <= parts(b) { (a, b) } else { (b, a) };
    long.starts_with(short)
}

/// Claims `dirs` (each with what it is for, e.g. "storage") for `role`, or
/// says which live claim one of them overlaps.
pub fn claim(role: &str, dirs: &[(&str, &Path)]) -> anyhow::Result<Claims> {
    let ours: Vec<(&str, PathBuf)> =
        dirs.iter().map(|(what, dir)| Ok((*what, resolved(dir)?))).collect::<anyhow::Result<_>>()?;
    for (i, (what, dir)) in ours.iter().enumerate() {
        for (other, other_dir) in &ours[i + 1..] {
            if overlap(dir, other_dir) {
                bail!(
                    "{role}: the {what} directory {} and the {other} directory {} overlap; give each its own",
                    dir.display(),
                    other_dir.display()
                );
            }
        }
    }
    let registry = registry();
    std::fs::create_dir_all(&registry).with_context(|| format!("creating {}", registry.display()))?;
    let _ = std::fs::set_permissions(&registry, std::os::unix::fs::PermissionsExt::from_mode(0o700));
    // One process at a time checks and adds.
    let guard = File::create(registry.join(".lock")).context("opening the claims lock")?;
    let _guard = Flock::lock(guard, FlockArg::LockExclusive).map_err(|(_, e)| e).context("locking the claims")?;
    for entry in std::fs::read_dir(&registry)?.flatten() {
        let path = entry.path();
        if path.file_name().is_some_and(|n| n == ".lock") {
            continue;
        }
        let Ok(mut file) = File::open(&path) else { continue };
        let mut text = String::new();
        let _ = file.read_to_string(&mut text);
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            // Its owner is gone.
            Ok(_stale) => {
                let _ = std::fs::remove_file(&path);
            }
            Err(_) => {
                let mut lines = text.lines();
                let (theirs, their_role, pid) =
                    (PathBuf::from(lines.next().unwrap_or_default()), lines.next().unwrap_or("?"), lines.next());
                for (what, dir) in &ours {
                    if overlap(dir, &theirs) {
                        bail!(
                            "{role}: the {what} directory {} overlaps {} used by casbuild {their_role} (pid {}); \
                             give each role directories of its own",
                            dir.display(),
                            theirs.display(),
                            pid.unwrap_or("?")
                        );
                    }
                }
            }
        }
    }
    let mut held = Vec::new();
    let mut files = Vec::new();
    for (_, dir) in &ours {
        let path = registry.join(format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple()));
        let mut file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        writeln!(file, "{}\n{role}\n{}", dir.display(), std::process::id())?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| e).context("locking a claim")?;
        held.push(lock);
        files.push(path);
    }
    Ok(Claims { _held: held, files })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_or_equal_paths_overlap_and_siblings_do_not() {
        assert!(overlap(Path::new("/a/b"), Path::new("/a/b")));
        assert!(overlap(Path::new("/a"), Path::new("/a/b/c")));
        assert!(overlap(Path::new("/a/b/c"), Path::new("/a")));
        assert!(!overlap(Path::new("/a/b"), Path::new("/a/bc")));
        assert!(!overlap(Path::new("/a/b"), Path::new("/a/c")));
    }

    #[test]
    fn paths_resolve_through_links_as_far_as_they_exist() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, dir.path().join("link")).unwrap();
        let resolved = resolved(&dir.path().join("link/not/yet")).unwrap();
        assert_eq!(resolved, real.canonicalize().unwrap().join("not/yet"));
    }
}
