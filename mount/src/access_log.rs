//! What a command did inside one input root: the paths it looked up (found or
//! not), opened, read and listed. The sandbox turns this into hermeticity
//! reports ("tried to read `src/config.h`, which is not a declared input") and
//! into hints about declared inputs that were never touched.
//!
//! Paths are relative to the input root, `/`-separated; the root itself is "".

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use crate::download::Download;

/// Misses kept per log. Other kinds name paths that exist in the tree, so
/// the tree bounds them; a command can make up names without end.
pub const MAX_NOT_FOUND: usize = 10_000;

/// A snapshot of one input root's access log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccessReport {
    /// Paths looked up that exist.
    pub found: BTreeSet<String>,
    /// Paths looked up that do not exist (ENOENT), at most
    /// [`MAX_NOT_FOUND`]: a command may look up any number of names.
    pub not_found: BTreeSet<String>,
    /// Misses not kept in `not_found` because it was full.
    pub not_found_dropped: u64,
    /// Files opened.
    pub opened: BTreeSet<String>,
    /// Files whose bytes were read through the filesystem. With FUSE
    /// passthrough the kernel reads cached files directly, so there an open is
    /// the finest signal and this set stays empty.
    pub read: BTreeSet<String>,
    /// Directories listed.
    pub listed: BTreeSet<String>,
}

impl AccessReport {
    /// Every path the command touched in any way.
    pub fn touched(&self) -> BTreeSet<&str> {
        [&self.found, &self.opened, &self.read, &self.listed].into_iter().flatten().map(String::as_str).collect()
    }
}

/// One input root's log, appended to by the FUSE threads.
#[derive(Default)]
pub struct AccessLog {
    report: Mutex<AccessReport>,
    /// Files opened while they were still streaming in: their bytes were
    /// served before the blob was verified.
    streamed: Mutex<Vec<Arc<Download>>>,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog").field("report", &self.report).finish_non_exhaustive()
    }
}

/// What happened to a path.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Access {
    Found,
    NotFound,
    Opened,
    Read,
    Listed,
}

impl AccessLog {
    pub(crate) fn record(&self, access: Access, path: &str) {
        let mut report = self.report.lock().unwrap_or_else(|e| e.into_inner());
        let report = &mut *report;
        let set = match access {
            Access::Found => &mut report.found,
            Access::NotFound => &mut report.not_found,
            Access::Opened => &mut report.opened,
            Access::Read => &mut report.read,
            Access::Listed => &mut report.listed,
        };
        // Most accesses repeat a path already logged: avoid the allocation then.
        if set.contains(path) {
            return;
        }
        if matches!(access, Access::NotFound) && set.len() >= MAX_NOT_FOUND {
            report.not_found_dropped += 1;
            return;
        }
        set.insert(path.to_owned());
    }

    /// Notes a file opened while `download` streams it in.
    pub(crate) fn streamed(&self, download: Arc<Download>) {
        let mut streamed = self.streamed.lock().unwrap_or_else(|e| e.into_inner());
        if !streamed.iter().any(|d| Arc::ptr_eq(d, &download)) {
            streamed.push(download);
        }
    }

    /// Waits until every file opened while streaming in is verified; the
    /// first failure says which blob did not match (or could not be had).
    pub async fn verify_streamed(&self) -> Result<(), String> {
        let streamed = self.streamed.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for download in streamed {
            download.finished().await?;
        }
        Ok(())
    }

    /// A copy of what has been logged so far.
    pub fn report(&self) -> AccessReport {
        self.report.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Forgets everything logged so far.
    pub fn clear(&self) {
        *self.report.lock().unwrap_or_else(|e| e.into_inner()) = AccessReport::default();
        self.streamed.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// `parent/name`, or `name` at the root.
pub(crate) fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_owned()
    } else {
        format!("{parent}/{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn misses_are_kept_up_to_a_bound_and_the_rest_counted() {
        let log = AccessLog::default();
        for i in 0..MAX_NOT_FOUND + 5 {
            log.record(Access::NotFound, &format!("made-up-{i}"));
        }
        log.record(Access::NotFound, "made-up-0");
        let report = log.report();
        assert_eq!(report.not_found.len(), MAX_NOT_FOUND);
        assert_eq!(report.not_found_dropped, 5, "a repeat of a kept miss is not counted");
    }

    #[test]
    fn records_each_kind_once_and_clears() {
        let log = AccessLog::default();
        log.record(Access::Found, "src");
        log.record(Access::Found, "src");
        log.record(Access::NotFound, "src/config.h");
        log.record(Access::Opened, "src/main.c");
        log.record(Access::Listed, "");
        let report = log.report();
        assert_eq!(report.found.len(), 1);
        assert!(report.not_found.contains("src/config.h"));
        assert_eq!(report.touched(), ["", "src", "src/main.c"].into_iter().collect());
        log.clear();
        assert_eq!(log.report(), AccessReport::default());
    }

    #[test]
    fn joins_paths_from_the_root() {
        assert_eq!(join("", "a"), "a");
        assert_eq!(join("a/b", "c"), "a/b/c");
    }
}
