//! Access profiles: which input files a command opened the last time it ran,
//! so that the next run of the same command can prefetch them while it
//! starts (see `casbuild_mount::Prefetch`).
//!
//! A profile is keyed by what identifies an action apart from its inputs:
//! the REAPI instance, the Command's digest (arguments, environment, outputs)
//! and the Action's platform. A rebuild after an edit has a new input root
//! but the same commands, and its actions open mostly the same paths.
//!
//! Profiles live in a directory of their own, one file per key (the paths,
//! NUL-separated), written by rename so a reader never sees half of one. At
//! most [`MAX_PROFILES`] are kept, the least recently used removed first, and
//! each holds at most [`MAX_PATHS`] paths. A profile only steers what is
//! fetched early, within the runner's byte bound: a wrong or stale one costs
//! bandwidth, never a wrong result, which is why nothing is fsynced.

use std::collections::BTreeSet;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use casbuild_cas::digest::{Digest, DigestFunction};
use lru::LruCache;

/// Profiles kept on disk.
pub const MAX_PROFILES: usize = 65_536;

/// Paths kept per profile.
pub const MAX_PATHS: usize = 10_000;

/// Largest profile file read (a longer one is ignored).
const MAX_FILE: u64 = 4 << 20;

/// Which profile an action uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProfileKey([u8; 32]);

impl ProfileKey {
    /// The key of actions of `instance` that run the Command `command` on `platform`
    /// (the Action's platform, encoded).
    pub fn new(instance: &str, command: &Digest, platform: &[u8]) -> Self {
        let mut text = Vec::with_capacity(instance.len() + platform.len() + 128);
        for part in [instance.as_bytes(), command.to_string().as_bytes(), platform] {
            text.extend_from_slice(&(part.len() as u64).to_le_bytes());
            text.extend_from_slice(part);
        }
        ProfileKey(DigestFunction::Blake3.digest_of(&text).hash)
    }

    fn file_name(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn from_file_name(name: &str) -> Option<Self> {
        if name.len() != 64 {
            return None;
        }
        let mut key = [0; 32];
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(name.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(ProfileKey(key))
    }
}

/// The profiles of one worker.
pub struct AccessProfiles {
    dir: PathBuf,
    /// Keys on disk, least recently used last.
    index: Mutex<LruCache<ProfileKey, ()>>,
}

impl AccessProfiles {
    /// Opens (creating) the profile directory `dir`; what earlier runs left
    /// there is kept, the most recently written counting as most recently used.
    pub fn open(dir: &Path) -> Result<Self, String> {
        Self::open_bounded(dir, MAX_PROFILES)
    }

    fn open_bounded(dir: &Path, max: usize) -> Result<Self, String> {
        use std::os::unix::fs::DirBuilderExt;
        let fail = |e: std::io::Error| format!("the access profile directory {}: {e}", dir.display());
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(fail)?;
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(fail)? {
            let entry = entry.map_err(fail)?;
            let name = entry.file_name();
            match name.to_str().and_then(ProfileKey::from_file_name) {
                Some(key) => {
                    let written = entry.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
                    found.push((written, key));
                }
                // A temp file a crash left behind.
                None if name.to_string_lossy().starts_with(".tmp-") => {
                    let _ = std::fs::remove_file(entry.path());
                }
                None => {}
            }
        }
        found.sort_by_key(|(written, _)| *written);
        let mut index = LruCache::new(NonZeroUsize::new(max.max(1)).expect("at least one"));
        for (_, key) in found {
            if let Some((old, ())) = index.push(key, ()) {
                let _ = std::fs::remove_file(dir.join(old.file_name()));
            }
        }
        Ok(AccessProfiles { dir: dir.to_path_buf(), index: Mutex::new(index) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<ProfileKey, ()>> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn path(&self, key: &ProfileKey) -> PathBuf {
        self.dir.join(key.file_name())
    }

    fn remove(&self, key: &ProfileKey) {
        let _ = std::fs::remove_file(self.path(key));
    }

    /// The paths `key`'s last run opened, if it has a profile. Reads one small
    /// file from the local disk.
    pub fn load(&self, key: &ProfileKey) -> Option<Vec<String>> {
        self.lock().get(key)?;
        let file = std::fs::File::open(self.path(key)).ok()?;
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(file, MAX_FILE + 1), &mut bytes).ok()?;
        if bytes.len() as u64 > MAX_FILE {
            return None;
        }
        let text = String::from_utf8(bytes).ok()?;
        Some(text.split('\0').filter(|p| !p.is_empty()).take(MAX_PATHS).map(str::to_owned).collect())
    }

    /// Records that `key`'s run opened `opened` (at most [`MAX_PATHS`] of
    /// them are kept); nothing opened removes the profile. Blocking: call it
    /// off the async threads.
    pub fn store(&self, key: &ProfileKey, opened: &BTreeSet<String>) {
        if opened.is_empty() {
            self.lock().pop(key);
            self.remove(key);
            return;
        }
        let mut text = Vec::new();
        for path in opened.iter().filter(|p| !p.contains('\0')).take(MAX_PATHS) {
            text.extend_from_slice(path.as_bytes());
            text.push(0);
        }
        let temp = self.dir.join(format!(".tmp-{}-{}", key.file_name(), std::process::id()));
        let written = std::fs::write(&temp, &text).and_then(|()| std::fs::rename(&temp, self.path(key)));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&temp);
            tracing::warn!("writing an access profile into {}: {e}", self.dir.display());
            return;
        }
        let evicted = self.lock().push(*key, ());
        if let Some((old, ())) = evicted.filter(|(old, ())| old != key) {
            self.remove(&old);
        }
    }
}

/// Whether `opened` differs from the profile `known` (so it is worth writing).
pub fn changed(known: Option<&[String]>, opened: &BTreeSet<String>) -> bool {
    match known {
        None => !opened.is_empty(),
        Some(known) => known.len() != opened.len().min(MAX_PATHS) || known.iter().zip(opened).any(|(a, b)| a != b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(paths: &[&str]) -> BTreeSet<String> {
        paths.iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn keys_separate_instances_commands_and_platforms() {
        let f = DigestFunction::Sha256;
        let (a, b) = (f.digest_of(b"a"), f.digest_of(b"b"));
        let key = ProfileKey::new("main", &a, b"");
        assert_eq!(key, ProfileKey::new("main", &a, b""));
        assert_ne!(key, ProfileKey::new("other", &a, b""));
        assert_ne!(key, ProfileKey::new("main", &b, b""));
        assert_ne!(key, ProfileKey::new("main", &a, b"x"));
        assert_ne!(ProfileKey::new("ab", &a, b""), ProfileKey::new("a", &a, b"b"), "parts are length-prefixed");
        assert_eq!(ProfileKey::from_file_name(&key.file_name()), Some(key));
        assert_eq!(ProfileKey::from_file_name("not-a-key"), None);
    }

    #[test]
    fn profiles_round_trip_survive_a_restart_and_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let f = DigestFunction::Sha256;
        let key = |i: u32| ProfileKey::new("", &f.digest_of(&i.to_le_bytes()), b"");
        let profiles = AccessProfiles::open_bounded(dir.path(), 2).unwrap();
        assert_eq!(profiles.load(&key(1)), None);
        profiles.store(&key(1), &set(&["src/a.c", "include/a.h"]));
        assert_eq!(profiles.load(&key(1)).unwrap(), ["include/a.h", "src/a.c"]);
        std::thread::sleep(std::time::Duration::from_millis(20));
        profiles.store(&key(2), &set(&["b"]));

        // Reopened: both are there; a third write evicts the older one.
        let profiles = AccessProfiles::open_bounded(dir.path(), 2).unwrap();
        assert!(profiles.load(&key(1)).is_some() && profiles.load(&key(2)).is_some());
        profiles.load(&key(1)); // now the most recently used
        profiles.store(&key(3), &set(&["c"]));
        assert_eq!(profiles.load(&key(2)), None, "the least recently used profile is evicted");
        assert!(profiles.load(&key(1)).is_some() && profiles.load(&key(3)).is_some());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2, "and its file removed");

        // A run that opened nothing removes its profile.
        profiles.store(&key(1), &BTreeSet::new());
        assert_eq!(profiles.load(&key(1)), None);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn only_a_different_set_of_paths_is_worth_writing() {
        let known = vec!["a".to_string(), "b".to_string()];
        assert!(!changed(Some(&known), &set(&["a", "b"])));
        assert!(changed(Some(&known), &set(&["a", "c"])));
        assert!(changed(Some(&known), &set(&["a"])));
        assert!(changed(None, &set(&["a"])));
        assert!(!changed(None, &BTreeSet::new()));
        assert!(changed(Some(&known), &BTreeSet::new()));
    }
}
