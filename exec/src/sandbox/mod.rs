//! Running one command in a Linux sandbox over an input root.
//!
//! The command sees: the input root as its working tree (an overlay whose
//! writes land in scratch space), read-only toolchain paths from the host,
//! a fresh `/proc`, a minimal `/dev`, a private `/tmp`, no network, its own
//! pid, mount, ipc and uts namespaces. It runs as an unprivileged user with
//! no capabilities and `no_new_privs`, under resource limits and a timeout
//! that kills everything it started.
//!
//! [`Sandbox::run`] is async and safe to call from a multi-threaded runtime:
//! the namespace work happens in a separate helper process (see `helper`).

mod helper;
mod spec;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

pub use helper::helper_main;
use spec::ScratchLayout;
pub use spec::{relative_inside, Limits, RunReport, SandboxSpec, DEFAULT_TOOLCHAIN, DEFAULT_WORK_DIR};

/// The hidden first argument that turns the `casbuild` binary into the helper.
pub const HELPER_ARG: &str = "__sandbox-helper";

/// How long the helper may take beyond the command's own timeout (set-up,
/// tear-down) before it is presumed stuck and killed.
const HELPER_GRACE: Duration = Duration::from_secs(30);

/// Why a command could not be run at all.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The spec asks for something not allowed (bad path, empty argv, ...).
    #[error("invalid command: {0}")]
    Invalid(String),
    /// The helper failed; the message says how.
    #[error("sandbox: {0}")]
    Helper(String),
}

/// Runs commands through the helper binary.
#[derive(Clone, Debug)]
pub struct Sandbox {
    helper: PathBuf,
}

impl Sandbox {
    /// A sandbox runner whose helper is `helper` (a `casbuild` binary; the
    /// worker passes its own executable).
    pub fn new(helper: impl Into<PathBuf>) -> Self {
        Sandbox { helper: helper.into() }
    }

    /// Runs `spec` to completion. The command's stdout and stderr are in
    /// [`Sandbox::stdout_path`]/[`Sandbox::stderr_path`] of the scratch
    /// directory and its writes under [`Sandbox::upper_path`]; the caller
    /// removes the scratch directory.
    pub async fn run(&self, spec: &SandboxSpec) -> Result<RunReport, SandboxError> {
        spec.validate().map_err(SandboxError::Invalid)?;
        let layout = ScratchLayout::new(&spec.scratch);
        let helper_error = |what: &str, e: &dyn std::fmt::Display| SandboxError::Helper(format!("{what}: {e}"));
        tokio::fs::create_dir_all(&spec.scratch)
            .await
            .map_err(|e| helper_error("creating the scratch directory", &e))?;
        let json = serde_json::to_vec(spec).map_err(|e| helper_error("encoding the spec", &e))?;
        tokio::fs::write(&layout.spec, json).await.map_err(|e| helper_error("writing the spec", &e))?;
        let child = tokio::process::Command::new(&self.helper)
            .arg(HELPER_ARG)
            .arg(&layout.spec)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| helper_error(&format!("starting {}", self.helper.display()), &e))?;
        let waited = match spec.timeout_ms {
            Some(ms) => tokio::time::timeout(Duration::from_millis(ms) + HELPER_GRACE, child.wait_with_output())
                .await
                .map_err(|_| SandboxError::Helper("the helper did not finish in time; killed".into()))?,
            None => child.wait_with_output().await,
        };
        let output = waited.map_err(|e| helper_error("waiting for the helper", &e))?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(SandboxError::Helper(format!("helper failed ({}): {}", output.status, stderr.trim())));
        }
        let report = tokio::fs::read(&layout.report).await.map_err(|e| helper_error("reading the report", &e))?;
        serde_json::from_slice(&report).map_err(|e| helper_error("decoding the report", &e))
    }

    /// Where a run's stdout is.
    pub fn stdout_path(spec: &SandboxSpec) -> PathBuf {
        ScratchLayout::new(&spec.scratch).stdout
    }

    /// Where a run's stderr is.
    pub fn stderr_path(spec: &SandboxSpec) -> PathBuf {
        ScratchLayout::new(&spec.scratch).stderr
    }

    /// The overlay's upper layer: every file the command created or changed
    /// in its working tree, at its path there.
    pub fn upper_path(spec: &SandboxSpec) -> PathBuf {
        ScratchLayout::new(&spec.scratch).upper
    }
}
