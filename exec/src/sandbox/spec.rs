//! What to run and how it went: the contract between the worker and the
//! sandbox helper process, written as JSON files in the scratch directory.

use std::path::{Component, Path, PathBuf};

use casbuild_cas::error::Invalid;
use serde::{Deserialize, Serialize};

/// Host paths made visible, read-only, in every sandbox unless configured
/// otherwise: enough for a shell and a C toolchain, nothing else of the host.
/// Paths under `/etc` are copied into the sandbox (they are small); the rest
/// are bind-mounted.
pub const DEFAULT_TOOLCHAIN: &[&str] = &[
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/etc/alternatives",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
];

/// Where the input root appears inside the sandbox.
pub const DEFAULT_WORK_DIR: &str = "/work";

/// Resource limits applied to the command (and everything it starts).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Limits {
    /// Processes the sandbox user may have (RLIMIT_NPROC).
    pub max_processes: u64,
    /// Open files per process (RLIMIT_NOFILE).
    pub max_open_files: u64,
    /// Largest file the command may write, stdout and stderr included
    /// (RLIMIT_FSIZE); writing past it kills the writer with SIGXFSZ.
    pub max_file_bytes: u64,
    /// Memory of the whole action (its cgroup; needs a sandbox with
    /// cgroups), what it keeps in its memory-backed scratch space included.
    /// 0: no memory limit.
    pub max_memory_bytes: u64,
    /// Bytes the action may write into its working tree, /tmp and /dev/shm
    /// together: its scratch directory becomes a tmpfs of this size. 0: the
    /// scratch directory is a plain directory on the host, without a bound.
    pub max_scratch_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_processes: 512,
            max_open_files: 4096,
            max_file_bytes: 4 << 30,
            max_memory_bytes: 0,
            max_scratch_bytes: 0,
        }
    }
}

/// One command to run sandboxed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SandboxSpec {
    /// The host directory that becomes the working tree's read-only lower
    /// layer (on a worker, `/cas/inputs/NAME`).
    pub input_root: PathBuf,
    /// A host directory for this run only: the overlay's upper layer, the
    /// sandbox root, stdout and stderr. The caller removes it.
    pub scratch: PathBuf,
    /// Where the working tree appears inside the sandbox.
    pub work_dir: PathBuf,
    /// The command's working directory, relative to the working tree.
    pub cwd: String,
    /// Arguments; the first names the program (looked up on the
    /// environment's PATH when it has no slash).
    pub argv: Vec<String>,
    /// The environment, exactly: nothing is inherited.
    pub env: Vec<(String, String)>,
    /// Directories (relative to the working tree) created before the command
    /// runs and made writable for it: parents of declared outputs.
    pub writable_dirs: Vec<String>,
    /// Host paths visible read-only at the same place inside (see
    /// [`DEFAULT_TOOLCHAIN`]).
    pub toolchain: Vec<PathBuf>,
    /// The user and group the command runs as.
    pub uid: u32,
    /// See `uid`.
    pub gid: u32,
    /// Resource limits.
    pub limits: Limits,
    /// Wall-clock limit in milliseconds; everything in the sandbox is killed
    /// when it passes. `None`: no limit.
    pub timeout_ms: Option<u64>,
    /// Files of the action's cgroups (`tasks` or `cgroup.procs`) the run
    /// joins before anything else (filled in by [`super::Sandbox::run`]).
    #[serde(default)]
    pub cgroup_procs: Vec<PathBuf>,
    /// Set by [`super::Sandbox::run`]: the number the run's init announces
    /// (`done N` on the zygote's output) once its report is written, so
    /// that the caller need not wait for the namespaces' tear-down.
    #[serde(default)]
    pub run_id: u64,
    /// System calls denied (EPERM) on top of the default seccomp filter
    /// ([`crate::seccomp`]), by name.
    #[serde(default)]
    pub seccomp_deny: Vec<String>,
    /// An empty host directory laid under the sandbox's root file system as
    /// its read-only lowest layer (on a worker, an empty tree on the /cas
    /// mount, which logs lookups): a lookup of a name the root does not have
    /// (`/home/...`) ends there, so the worker can name it in the report.
    /// `None`: the root is a plain tmpfs.
    #[serde(default)]
    pub root_lower: Option<PathBuf>,
    /// Set by [`super::Sandbox::run`] when it asks the zygote for a warm
    /// slot (see `slot`): a long-lived init that builds the root this spec
    /// describes once and then runs one action after another in it.
    #[serde(default)]
    pub warm: bool,
}

impl SandboxSpec {
    /// A spec with the defaults for everything but what to run and where.
    pub fn new(input_root: PathBuf, scratch: PathBuf, argv: Vec<String>) -> Self {
        SandboxSpec {
            input_root,
            scratch,
            work_dir: PathBuf::from(DEFAULT_WORK_DIR),
            cwd: String::new(),
            argv,
            env: Vec::new(),
            writable_dirs: Vec::new(),
            toolchain: DEFAULT_TOOLCHAIN.iter().map(PathBuf::from).collect(),
            uid: 65534,
            gid: 65534,
            limits: Limits::default(),
            timeout_ms: None,
            cgroup_procs: Vec::new(),
            run_id: 0,
            seccomp_deny: Vec::new(),
            root_lower: None,
            warm: false,
        }
    }

    /// The names the sandbox's set-up always makes at the top of its root,
    /// as directories: the working tree's first component, and `proc`,
    /// `dev`, `tmp` and `etc`.
    pub fn made_top_dirs(&self) -> std::collections::BTreeSet<String> {
        let fixed = ["proc", "dev", "tmp", "etc"].map(String::from);
        top_name(&self.work_dir).into_iter().chain(fixed).collect()
    }

    /// Every name the sandbox's own set-up puts at the top of its root:
    /// [`SandboxSpec::made_top_dirs`] and the toolchain paths' first
    /// components.
    pub fn own_top_names(&self) -> std::collections::BTreeSet<String> {
        let mut names = self.made_top_dirs();
        names.extend(self.toolchain.iter().filter_map(|p| top_name(p)));
        names
    }

    /// Checks what the command asks for before anything is set up.
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.argv.is_empty() || self.argv[0].is_empty() {
            return Err(Invalid("the command has no arguments (argv[0] names the program)".into()));
        }
        if self.argv.iter().chain(self.env.iter().flat_map(|(k, v)| [k, v])).any(|s| s.contains('\0')) {
            return Err(Invalid("arguments and environment may not contain NUL bytes".into()));
        }
        if let Some((k, _)) = self.env.iter().find(|(k, _)| k.is_empty() || k.contains('=')) {
            return Err(Invalid(format!("invalid environment variable name {k:?}")));
        }
        relative_inside(&self.cwd).map_err(|e| e.context(format!("working directory {:?}", self.cwd)))?;
        for dir in &self.writable_dirs {
            relative_inside(dir).map_err(|e| e.context(format!("output directory {dir:?}")))?;
        }
        if !self.work_dir.is_absolute() || self.work_dir == Path::new("/") {
            return Err(Invalid(format!("work_dir {} must be an absolute path below /", self.work_dir.display())));
        }
        for path in [&self.input_root, &self.scratch].into_iter().chain(&self.root_lower) {
            let text = path.to_string_lossy();
            if !path.is_absolute() || text.contains([',', ':', '\\']) {
                return Err(Invalid(format!(
                    "{text} must be absolute and free of ',', ':' and '\\' (overlayfs options)"
                )));
            }
        }
        Ok(())
    }
}

/// The first normal component of `path` (`usr` of `/usr/bin`).
fn top_name(path: &Path) -> Option<String> {
    path.components().find_map(|c| match c {
        Component::Normal(name) => Some(name.to_string_lossy().into_owned()),
        _ => None,
    })
}

/// Checks that `path` is relative and stays inside the tree it is relative to.
pub fn relative_inside(path: &str) -> Result<(), Invalid> {
    for component in Path::new(path).components() {
        match component {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => return Err(Invalid("'..' would leave the input root".into())),
            Component::RootDir | Component::Prefix(_) => {
                return Err(Invalid("must be relative to the input root".into()))
            }
        }
    }
    Ok(())
}

/// How a sandboxed command ended.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RunReport {
    /// Exit status, when the command exited.
    pub exit_code: Option<i32>,
    /// The signal that killed it, when one did.
    pub signal: Option<i32>,
    /// Whether the timeout killed it.
    pub timed_out: bool,
    /// Why it could not run at all (set-up failure, program not found, ...).
    pub error: Option<String>,
    /// Wall time from starting the sandbox to the command's end, in µs.
    pub wall_micros: u64,
    /// Of that, the sandbox's set-up (namespaces, cgroups, mounts, pivot)
    /// before the command started, in µs.
    #[serde(default)]
    pub setup_micros: u64,
    /// Whether the kernel killed a process of the action for exceeding its
    /// memory limit.
    #[serde(default)]
    pub memory_exceeded: bool,
    /// Whether a fork failed because the action reached its process limit.
    #[serde(default)]
    pub processes_exhausted: bool,
    /// Whether the action's scratch space (working tree, /tmp, /dev/shm)
    /// was full when it ended.
    #[serde(default)]
    pub scratch_full: bool,
    /// CPU time of everything the action ran, in µs.
    #[serde(default)]
    pub cpu_micros: Option<u64>,
    /// Accesses the sandbox refused, for the report
    /// (`network: connect 10.0.0.1:443 denied`).
    #[serde(default)]
    pub blocked: Vec<String>,
}

impl RunReport {
    /// Whether the command ran and exited with status 0.
    pub fn success(&self) -> bool {
        self.exit_code == Some(0) && self.error.is_none() && !self.timed_out
    }
}

/// Files of one run inside its scratch directory.
/// Everything the action writes is in `space` (a size-bounded tmpfs when
/// the run has a scratch budget); the report is beside it, so that a full
/// scratch space cannot keep the run from reporting.
pub(crate) struct ScratchLayout {
    pub space: PathBuf,
    /// The run's own /tmp and /dev/shm, on its scratch space.
    pub tmp: PathBuf,
    pub shm: PathBuf,
    /// Where the run's root tmpfs is mounted: one directory shared by every
    /// run beside this scratch directory, since each run mounts in its own
    /// mount namespace (one mkdir and rmdir fewer per run).
    pub root: PathBuf,
    pub upper: PathBuf,
    pub overlay_work: PathBuf,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    pub report: PathBuf,
}

impl ScratchLayout {
    pub fn new(scratch: &Path) -> Self {
        let root = match scratch.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.join(".sandbox-root"),
            _ => scratch.join("root"),
        };
        let space = scratch.join(crate::scratch::SPACE);
        ScratchLayout {
            tmp: space.join("tmp"),
            shm: space.join("shm"),
            root,
            upper: space.join("upper"),
            overlay_work: space.join("overlay-work"),
            stdout: space.join("stdout"),
            stderr: space.join("stderr"),
            space,
            report: scratch.join("report.json"),
        }
    }
}

/// A warm slot's first answer to one action, once its processes are gone:
/// the report, and why the slot cannot run another action (a time-out, a
/// command that could not start, a failed set-up), if it cannot. A slot
/// that can sends a [`SlotSettled`] when it has cleaned up after the action.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct SlotReply {
    pub report: RunReport,
    pub unfit: Option<String>,
}

/// A warm slot's second answer to an action: why the slot is not as clean
/// as a new one after all (a process of the action left, a mount it could
/// not remove), if it is not; only a clean slot runs the next action.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct SlotSettled {
    pub unfit: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_stay_inside_the_input_root() {
        assert!(relative_inside("").is_ok());
        assert!(relative_inside("a/./b").is_ok());
        assert!(relative_inside("a/../b").is_err());
        assert!(relative_inside("/etc").is_err());
    }

    #[test]
    fn bad_specs_are_refused_with_a_reason() {
        let spec = |argv: &[&str]| {
            SandboxSpec::new("/in".into(), "/scratch".into(), argv.iter().map(|s| s.to_string()).collect())
        };
        assert!(spec(&["true"]).validate().is_ok());
        assert!(spec(&[]).validate().unwrap_err().0.contains("no arguments"));
        let mut s = spec(&["true"]);
        s.cwd = "../up".into();
        assert!(s.validate().unwrap_err().0.contains("working directory"));
        let mut s = spec(&["true"]);
        s.writable_dirs = vec!["/abs".into()];
        assert!(s.validate().unwrap_err().0.contains("output directory"));
        let mut s = spec(&["true"]);
        s.env = vec![("A=B".into(), "x".into())];
        assert!(s.validate().is_err());
    }
}
