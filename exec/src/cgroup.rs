//! A control group per action: a hard memory limit and a process limit that
//! hold for everything the action starts, whatever user it runs as; read
//! back after the run to say which limit struck. (CPU time needs no group:
//! the sandbox's init reaps every process of the action and reads it from
//! its own resource usage.)
//!
//! Both hierarchies are supported. cgroup v2 (one tree at /sys/fs/cgroup):
//! groups live under `/sys/fs/cgroup/casbuild/`, with the memory and pids
//! controllers enabled for it. cgroup v1 (one tree per controller): groups
//! live under `casbuild/` of the memory and pids trees.
//! Each action's group is named after the worker's pid and the run, so
//! several workers on one host never meet; groups left by a worker that died
//! are removed by the next one.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Limits of one action's group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupLimits {
    /// Memory of every process in it, page cache and tmpfs pages included.
    pub memory_bytes: u64,
    /// Processes and threads at once.
    pub processes: u64,
}

/// What a group recorded, read after its run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupUsage {
    /// Processes the kernel's OOM killer killed in it.
    pub oom_kills: u64,
    /// Forks refused because the process limit was reached.
    pub fork_refusals: u64,
    /// The most memory it used (when the kernel reports it).
    pub memory_peak: Option<u64>,
}

#[derive(Clone, Debug)]
enum Layout {
    /// cgroup v2: casbuild's parent group.
    V2 { parent: PathBuf },
    /// cgroup v1: casbuild's parent group in each controller's tree.
    V1 { memory: PathBuf, pids: PathBuf },
}

/// casbuild's place in the host's cgroup hierarchy.
#[derive(Clone, Debug)]
pub struct Cgroups {
    layout: Layout,
}

/// One action's group, removed on drop.
#[derive(Debug)]
pub struct ActionGroup {
    layout: Layout,
    name: String,
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    std::fs::write(path, value).map_err(|e| format!("writing {value:?} to {}: {e}", path.display()))
}

fn create(dir: &Path) -> Result<(), String> {
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!("creating the cgroup {}: {e}", dir.display())),
    }
}

/// The number after `key` in a flat keyed file (`oom_kill 3`).
fn keyed(path: &Path, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|line| line.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}

fn number(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

impl Cgroups {
    /// Finds the hierarchy mounted at `base` (normally /sys/fs/cgroup) and
    /// prepares casbuild's parent group in it.
    pub fn detect(base: &Path) -> Result<Self, String> {
        let layout = if base.join("cgroup.controllers").exists() {
            let parent = base.join("casbuild");
            let available = std::fs::read_to_string(base.join("cgroup.controllers")).unwrap_or_default();
            for controller in ["memory", "pids"] {
                if !available.split_whitespace().any(|c| c == controller) {
                    return Err(format!(
                        "the cgroup v2 hierarchy at {} lacks the {controller} controller",
                        base.display()
                    ));
                }
            }
            // The root may hold processes and children alike; casbuild's
            // group holds only children, so it may enable controllers.
            write(&base.join("cgroup.subtree_control"), "+memory +pids")?;
            create(&parent)?;
            write(&parent.join("cgroup.subtree_control"), "+memory +pids")?;
            Layout::V2 { parent }
        } else {
            let tree = |controller: &str| {
                let dir = base.join(controller);
                dir.join("cgroup.procs").exists().then(|| dir.join("casbuild"))
            };
            let (Some(memory), Some(pids)) = (tree("memory"), tree("pids")) else {
                return Err(format!(
                    "no cgroup hierarchy with the memory and pids controllers at {} (v2, or v1 memory/ and pids/)",
                    base.display()
                ));
            };
            for dir in [&memory, &pids] {
                create(dir)?;
            }
            Layout::V1 { memory, pids }
        };
        let cgroups = Cgroups { layout };
        cgroups.remove_stale();
        Ok(cgroups)
    }

    /// The host's hierarchy at /sys/fs/cgroup.
    pub fn host() -> Result<Self, String> {
        Cgroups::detect(Path::new("/sys/fs/cgroup"))
    }

    fn parents(&self) -> Vec<&Path> {
        match &self.layout {
            Layout::V2 { parent } => vec![parent],
            Layout::V1 { memory, pids } => vec![memory, pids],
        }
    }

    /// Removes groups of workers that no longer run (named `PID-...`).
    fn remove_stale(&self) {
        for parent in self.parents() {
            let Ok(entries) = std::fs::read_dir(parent) else { continue };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(pid) = name.split_once('-').and_then(|(pid, _)| pid.parse::<u32>().ok()) else { continue };
                if entry.path().is_dir() && !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = std::fs::remove_dir(entry.path());
                }
            }
        }
    }

    /// Creates the group of run `run` with `limits`.
    pub fn create(&self, run: &str, limits: GroupLimits) -> Result<ActionGroup, String> {
        // The sequence number keeps two runs of one process apart even when
        // their scratch directories share a name (two runners in one process).
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let group = ActionGroup { layout: self.layout.clone(), name: format!("{}-{seq}-{run}", std::process::id()) };
        let memory = limits.memory_bytes.to_string();
        let processes = limits.processes.to_string();
        match &self.layout {
            Layout::V2 { parent } => {
                let dir = parent.join(&group.name);
                create(&dir)?;
                write(&dir.join("memory.max"), &memory)?;
                // Swap would let an action exceed its memory limit unseen.
                if dir.join("memory.swap.max").exists() {
                    write(&dir.join("memory.swap.max"), "0")?;
                }
                write(&dir.join("pids.max"), &processes)?;
            }
            Layout::V1 { memory: mem, pids } => {
                for parent in [mem, pids] {
                    create(&parent.join(&group.name))?;
                }
                let dir = mem.join(&group.name);
                write(&dir.join("memory.limit_in_bytes"), &memory)?;
                if dir.join("memory.memsw.limit_in_bytes").exists() {
                    write(&dir.join("memory.memsw.limit_in_bytes"), &memory)?;
                }
                write(&pids.join(&group.name).join("pids.max"), &processes)?;
            }
        }
        Ok(group)
    }
}

impl ActionGroup {
    fn dirs(&self) -> Vec<PathBuf> {
        match &self.layout {
            Layout::V2 { parent } => vec![parent.join(&self.name)],
            Layout::V1 { memory, pids } => vec![memory.join(&self.name), pids.join(&self.name)],
        }
    }

    /// The files the run's process writes `0` into to join this group
    /// (itself, with everything it will start). On v1 that is `tasks`:
    /// moving only the calling thread skips the threadgroup lock whose RCU
    /// sync makes a `cgroup.procs` write cost milliseconds (the process is
    /// single-threaded, so the thread is the process).
    pub fn procs_files(&self) -> Vec<PathBuf> {
        let file = match self.layout {
            Layout::V2 { .. } => "cgroup.procs",
            Layout::V1 { .. } => "tasks",
        };
        self.dirs().into_iter().map(|d| d.join(file)).collect()
    }

    /// What the group recorded so far.
    pub fn usage(&self) -> GroupUsage {
        match &self.layout {
            Layout::V2 { parent } => {
                let dir = parent.join(&self.name);
                GroupUsage {
                    oom_kills: keyed(&dir.join("memory.events"), "oom_kill").unwrap_or(0),
                    fork_refusals: keyed(&dir.join("pids.events"), "max").unwrap_or(0),
                    memory_peak: number(&dir.join("memory.peak")),
                }
            }
            Layout::V1 { memory, pids } => {
                let mem = memory.join(&self.name);
                GroupUsage {
                    oom_kills: keyed(&mem.join("memory.oom_control"), "oom_kill").unwrap_or(0),
                    fork_refusals: keyed(&pids.join(&self.name).join("pids.events"), "max").unwrap_or(0),
                    memory_peak: number(&mem.join("memory.max_usage_in_bytes")),
                }
            }
        }
    }
}

impl Drop for ActionGroup {
    /// Removes the group. Its processes are dead when the run reports, but
    /// the kernel may still be finishing their exit: a busy group is retried
    /// briefly, then left for the next worker start.
    fn drop(&mut self) {
        for dir in self.dirs() {
            for attempt in 0..50 {
                match std::fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) if attempt == 49 => tracing::warn!("removing the cgroup {}: {e}", dir.display()),
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_files_are_read_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("memory.events");
        std::fs::write(&file, "low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\n").unwrap();
        assert_eq!(keyed(&file, "oom_kill"), Some(1));
        assert_eq!(keyed(&file, "max"), Some(12));
        assert_eq!(keyed(&file, "oom"), Some(2));
        assert_eq!(keyed(&file, "absent"), None);
    }

    #[test]
    fn a_v1_layout_gets_a_group_per_controller_with_its_limits() {
        let dir = tempfile::tempdir().unwrap();
        for controller in ["memory", "pids"] {
            std::fs::create_dir_all(dir.path().join(controller)).unwrap();
            std::fs::write(dir.path().join(controller).join("cgroup.procs"), "").unwrap();
        }
        let cgroups = Cgroups::detect(dir.path()).unwrap();
        let group = cgroups.create("run-1", GroupLimits { memory_bytes: 1 << 20, processes: 7 }).unwrap();
        let name = group.name.clone();
        assert!(name.starts_with(&format!("{}-", std::process::id())) && name.ends_with("-run-1"), "{name}");
        let mem = dir.path().join("memory/casbuild").join(&name);
        assert_eq!(std::fs::read_to_string(mem.join("memory.limit_in_bytes")).unwrap(), "1048576");
        let pids = dir.path().join("pids/casbuild").join(&name);
        assert_eq!(std::fs::read_to_string(pids.join("pids.max")).unwrap(), "7");
        assert_eq!(group.procs_files(), [mem.join("tasks"), pids.join("tasks")]);
        std::fs::write(pids.join("pids.events"), "max 3\n").unwrap();
        assert_eq!(group.usage().fork_refusals, 3);
        assert!(Cgroups::detect(&dir.path().join("nothing")).is_err());
    }
}
