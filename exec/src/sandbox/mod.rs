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
//! the namespace work happens in processes forked from a small helper (the
//! zygote, see `helper`), never in the caller's threads. With warm slots
//! (`slots`, `slot_init`) one such process per sandbox user builds the
//! namespaces and root once and runs one action after another.

mod helper;
mod host_paths;
mod netwatch;
mod slot_init;
mod slots;
mod spec;

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use crate::cgroup::{ActionGroup, Cgroups, GroupLimits};
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
    Invalid(#[from] casbuild_cas::error::Invalid),
    /// The helper failed; the message says how.
    #[error("sandbox: {0}")]
    Helper(String),
}

/// Runs commands through a zygote: one long-lived helper process per
/// `Sandbox`, started on first use, that forks a process per run.
#[derive(Debug)]
pub struct Sandbox {
    helper: PathBuf,
    zygote: tokio::sync::Mutex<Option<Zygote>>,
    /// Where each run gets its own cgroup, when runs have one.
    cgroups: Option<Cgroups>,
    /// Runs waiting for their init's `done` line, by run id.
    waiting: Waiting,
    next_run: std::sync::atomic::AtomicU64,
    /// Idle warm slots by sandbox user, when runs use them
    /// ([`Sandbox::with_warm_slots`]).
    slots: Option<Mutex<HashMap<u32, slots::Slot>>>,
    /// Set by [`Sandbox::close_slots`]: slots are not kept after it.
    closed: std::sync::atomic::AtomicBool,
    /// Set by [`Sandbox::give_up_warm_slots`]: every run gets a new sandbox.
    cold: std::sync::atomic::AtomicBool,
}

type Waiting = Arc<Mutex<HashMap<u64, tokio::sync::oneshot::Sender<()>>>>;

/// Scratch space left at most this free at the end of a run counts as full.
const FULL_SLACK: u64 = 1 << 20;

#[derive(Debug)]
struct Zygote {
    _child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    /// The zygote's answers to requests, in order (its output without the
    /// runs' `done` lines, which go to their waiters).
    answers: tokio::sync::mpsc::UnboundedReceiver<String>,
}

/// A run in progress: its init (pid 1 of the sandbox), watched through a
/// pidfd. Dropped before the run ended (the caller gave up), it kills init,
/// and with it everything in the sandbox.
struct Running {
    pidfd: AsyncFd<OwnedFd>,
    finished: bool,
}

impl Running {
    /// Waits until the run's init has exited.
    async fn exited(&self) {
        if let Ok(mut ready) = self.pidfd.readable().await {
            ready.retain_ready();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.finished {
            self.kill();
        }
    }
}

impl Running {
    /// Kills the run's init, and with it everything in its namespace.
    fn kill(&self) {
        // SAFETY: pidfd_send_signal reads only its arguments: a pidfd we
        // own (so the signal cannot reach a recycled pid), a signal number,
        // a null siginfo and zero flags.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.get_ref().as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if ret != 0 {
            tracing::debug!("killing a sandbox run: {}", std::io::Error::last_os_error());
        }
    }
}

/// Counts and logs a warm slot given up (`why`); dropping it kills it.
fn discarded(uid: u32, why: &str) {
    metrics::counter!("casbuild_sandbox_slots_discarded_total").increment(1);
    tracing::debug!(uid, "a warm sandbox slot is discarded: {why}");
}

fn helper_error(what: &str, e: &dyn std::fmt::Display) -> SandboxError {
    SandboxError::Helper(format!("{what}: {e}"))
}

impl Sandbox {
    /// A sandbox runner whose helper is `helper` (a `casbuild` binary; the
    /// worker passes its own executable).
    pub fn new(helper: impl Into<PathBuf>) -> Self {
        Sandbox {
            helper: helper.into(),
            zygote: tokio::sync::Mutex::new(None),
            cgroups: None,
            waiting: Waiting::default(),
            next_run: Default::default(),
            slots: None,
            closed: Default::default(),
            cold: Default::default(),
        }
    }

    /// Whether runs use warm slots (and have not given them up).
    pub fn uses_warm_slots(&self) -> bool {
        self.slots.is_some() && !self.cold.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Builds a new sandbox for every run from now on, and ends the idle
    /// warm slots: for a host whose kernel cannot build a slot's working
    /// tree (it needs overlayfs to take its layers as descriptors of
    /// detached mounts, which older kernels refuse).
    pub async fn give_up_warm_slots(&self) {
        self.cold.store(true, std::sync::atomic::Ordering::SeqCst);
        self.end_idle_slots().await;
    }

    /// Ends every idle warm slot and keeps none from now on (a slot's root
    /// holds the `/cas` mount through its root observer: call this before
    /// unmounting it). Returns once their inits have exited.
    pub async fn close_slots(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        self.end_idle_slots().await;
    }

    async fn end_idle_slots(&self) {
        let idle: Vec<slots::Slot> = match &self.slots {
            Some(slots) => slots.lock().unwrap_or_else(|e| e.into_inner()).drain().map(|(_, slot)| slot).collect(),
            None => Vec::new(),
        };
        for slot in idle {
            slot.close().await;
        }
    }

    /// Runs actions in warm slots: one long-lived sandbox init per sandbox
    /// user that builds its namespaces and root once and runs one action
    /// after another, each in a working tree, `/tmp`, `/dev/shm`, cgroup and
    /// ipc namespace of its own (ADR 0008). A slot that is not as clean as
    /// a new one after an action (a process left, a mount it could not
    /// remove, a time-out) is thrown away.
    pub fn with_warm_slots(mut self) -> Self {
        self.slots = Some(Mutex::default());
        self
    }

    /// Gives every run a cgroup of its own under `cgroups`, with the memory
    /// and process limits of its spec.
    pub fn with_cgroups(mut self, cgroups: Cgroups) -> Self {
        self.cgroups = Some(cgroups);
        self
    }

    fn spawn_zygote(&self) -> Result<Zygote, SandboxError> {
        let mut child = tokio::process::Command::new(&self.helper)
            .args([HELPER_ARG, "--zygote"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| helper_error(&format!("starting {}", self.helper.display()), &e))?;
        let stdin = child.stdin.take().expect("piped");
        let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("piped")).lines();
        let (answer, answers) = tokio::sync::mpsc::unbounded_channel();
        let waiting = self.waiting.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                match line.strip_prefix("done ").and_then(|id| id.parse::<u64>().ok()) {
                    Some(id) => {
                        let waiter = waiting.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                        if let Some(waiter) = waiter {
                            let _ = waiter.send(());
                        }
                    }
                    None if answer.send(line).is_err() => break,
                    None => {}
                }
            }
        });
        Ok(Zygote { _child: child, stdin, answers })
    }

    /// Asks the zygote to start run `run_id`, which `spec_json` describes;
    /// for a warm slot, also the number of its socket's descriptor in init.
    async fn start(&self, spec_json: &str, run_id: u64) -> Result<(Running, Option<i32>), SandboxError> {
        let mut zygote = self.zygote.lock().await;
        let mut last_error = None;
        for _ in 0..2 {
            if zygote.is_none() {
                *zygote = Some(self.spawn_zygote()?);
            }
            let z = zygote.as_mut().expect("just set");
            let line = format!("{spec_json}\n");
            let answer = async {
                z.stdin.write_all(line.as_bytes()).await?;
                z.stdin.flush().await?;
                // An answer to a request whose caller gave up before it came
                // is still queued: skip it (that run ends on its own).
                let prefix = format!("{run_id} ");
                loop {
                    match z.answers.recv().await {
                        Some(answer) if answer.starts_with("error ") => return Ok(Some(answer)),
                        Some(answer) => match answer.strip_prefix(&prefix) {
                            Some(ours) => return Ok(Some(ours.to_owned())),
                            None => continue,
                        },
                        None => return Ok::<_, std::io::Error>(None),
                    }
                }
            };
            match answer.await {
                Ok(Some(answer)) => {
                    if let Some(why) = answer.strip_prefix("error ") {
                        return Err(SandboxError::Helper(why.to_owned()));
                    }
                    let bad = || SandboxError::Helper(format!("the helper said {answer:?}"));
                    let mut numbers = answer.split(' ').map(|n| n.parse::<i32>().map_err(|_| bad()));
                    let pid = numbers.next().ok_or_else(bad)??;
                    let fd = numbers.next().transpose()?;
                    // The zygote reaps this pid only after our next request, so it is still ours here.
                    return Ok((Running { pidfd: pidfd_open(pid)?, finished: false }, fd));
                }
                Ok(None) => last_error = Some("the helper exited".to_owned()),
                Err(e) => last_error = Some(e.to_string()),
            }
            *zygote = None; // it died: start a new one and try once more
        }
        Err(SandboxError::Helper(last_error.unwrap_or_default()))
    }

    /// Runs `spec` to completion. The command's stdout and stderr are in
    /// [`Sandbox::stdout_path`]/[`Sandbox::stderr_path`] of the scratch
    /// directory and its writes under [`Sandbox::upper_path`]; the caller
    /// removes the scratch directory. Dropping the future kills the run.
    pub async fn run(&self, spec: &SandboxSpec) -> Result<RunReport, SandboxError> {
        spec.validate()?;
        let layout = ScratchLayout::new(&spec.scratch);
        // Local directory and file operations here take microseconds, less
        // than a hop to a blocking thread would.
        std::fs::create_dir_all(&layout.space).map_err(|e| helper_error("creating the scratch directory", &e))?;
        let limits = &spec.limits;
        if limits.max_scratch_bytes > 0 {
            mount_scratch(&layout.space, limits.max_scratch_bytes)?;
        }
        let mut spec = spec.clone();
        spec.run_id = self.next_run.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut report = match &self.slots {
            Some(slots) if self.uses_warm_slots() => self.run_warm(slots, &spec, &layout).await,
            _ => self.run_cold(&mut spec, &layout).await,
        };
        if let (Ok(report), true) = (&mut report, limits.max_scratch_bytes > 0) {
            report.scratch_full = nix::sys::statvfs::statvfs(&layout.space)
                .is_ok_and(|s| s.blocks_available().saturating_mul(s.fragment_size()) <= FULL_SLACK);
        }
        report
    }

    /// A cgroup named `name` with `spec`'s limits, when runs have cgroups.
    fn group_for(&self, name: &str, spec: &SandboxSpec) -> Result<Option<ActionGroup>, SandboxError> {
        let Some(cgroups) = &self.cgroups else { return Ok(None) };
        let limits = &spec.limits;
        let memory_bytes = if limits.max_memory_bytes == 0 { u64::MAX >> 1 } else { limits.max_memory_bytes };
        let group_limits = GroupLimits { memory_bytes, processes: limits.max_processes };
        cgroups.create(name, group_limits).map(Some).map_err(SandboxError::Helper)
    }

    /// Runs `spec` in a new sandbox (and a new cgroup) of its own.
    async fn run_cold(&self, spec: &mut SandboxSpec, layout: &ScratchLayout) -> Result<RunReport, SandboxError> {
        let run = spec.scratch.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let group = self.group_for(&run, spec)?;
        spec.cgroup_procs = group.as_ref().map(|g| g.procs_files()).unwrap_or_default();
        let (mut report, running) = match self.run_in_helper(spec, layout).await {
            Ok((report, running)) => (Ok(report), Some(running)),
            Err(e) => (Err(e), None),
        };
        if let (Ok(report), Some(group)) = (&mut report, &group) {
            let usage = group.usage();
            report.memory_exceeded = usage.oom_kills > 0;
            report.processes_exhausted = usage.fork_refusals > 0;
        }
        if let Some(group) = group {
            // Init reports before its own exit (the namespaces' tear-down).
            remove_when_empty(group, running);
        }
        report
    }

    /// Runs `spec` in the warm slot of its user, made first if there is none
    /// or the one there was built for another spec.
    async fn run_warm(
        &self,
        slots: &Mutex<HashMap<u32, slots::Slot>>,
        spec: &SandboxSpec,
        layout: &ScratchLayout,
    ) -> Result<RunReport, SandboxError> {
        let idle = slots.lock().unwrap_or_else(|e| e.into_inner()).remove(&spec.uid);
        let mut idle = idle.filter(|slot| slot.fits(spec));
        if let Some(slot) = idle.as_mut() {
            if let Err(why) = slot.settle().await {
                discarded(spec.uid, &why);
                idle = None;
            }
        }
        let mut slot = match idle {
            Some(slot) => slot,
            None => {
                // The slot's cgroup serves all its actions: its limits are
                // the spec's (a spec with others gets another slot).
                let group = self.group_for(&format!("slot-{}", spec.uid), spec)?;
                let mut slot_spec = spec.clone();
                slot_spec.warm = true;
                slot_spec.cgroup_procs = group.as_ref().map(|g| g.procs_files()).unwrap_or_default();
                let json = serde_json::to_string(&slot_spec).map_err(|e| helper_error("encoding the spec", &e))?;
                let (init, fd) = self.start(&json, spec.run_id).await?;
                let fd = fd.ok_or_else(|| SandboxError::Helper("the helper started no slot".into()))?;
                slots::Slot::new(slot_spec, init, fd, group)?
            }
        };
        let mut spec = spec.clone();
        spec.cgroup_procs = slot.procs_files();
        let before = slot.usage();
        let mut fds = vec![slots::detached_copy(&spec.input_root)?, slots::detached_copy(&layout.space)?];
        if spec.limits.max_scratch_bytes > 0 {
            // /tmp and /dev/shm: directories of the size-bounded scratch
            // space, one budget for everything the action writes.
            for dir in [&layout.tmp, &layout.shm] {
                std::fs::create_dir(dir)
                    .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o1777)))
                    .map_err(|e| helper_error(&format!("creating {}", dir.display()), &e))?;
                fds.push(slots::detached_copy(dir)?);
            }
        }
        fds.extend(slot.procs_fds()?);
        let spec = &spec;
        let ran = slot.run(spec, fds);
        let reply = match spec.timeout_ms {
            Some(ms) => tokio::time::timeout(Duration::from_millis(ms) + HELPER_GRACE, ran)
                .await
                .map_err(|_| SandboxError::Helper("the sandbox slot did not finish in time; killed".into()))??,
            None => ran.await?,
        };
        let mut report = reply.report;
        // The group's counters add up over the slot's actions.
        if let (Some(before), Some(after)) = (before, slot.usage()) {
            report.memory_exceeded = after.oom_kills > before.oom_kills;
            report.processes_exhausted = after.fork_refusals > before.fork_refusals;
        }
        match reply.unfit {
            None if self.closed.load(std::sync::atomic::Ordering::SeqCst) => slot.close().await,
            None => {
                slots.lock().unwrap_or_else(|e| e.into_inner()).insert(spec.uid, slot);
            }
            Some(why) => discarded(spec.uid, &why),
        }
        Ok(report)
    }

    /// Runs `spec` through the zygote; returns the report and the run's init,
    /// which may still be exiting.
    async fn run_in_helper(
        &self,
        spec: &SandboxSpec,
        layout: &ScratchLayout,
    ) -> Result<(RunReport, Running), SandboxError> {
        // One line of JSON (strings escape newlines) straight to the zygote.
        let json = serde_json::to_string(spec).map_err(|e| helper_error("encoding the spec", &e))?;
        let (done, reported) = tokio::sync::oneshot::channel();
        self.waiting.lock().unwrap_or_else(|e| e.into_inner()).insert(spec.run_id, done);
        let _unlisted = Unlist(&self.waiting, spec.run_id);
        let (mut running, _) = self.start(&json, spec.run_id).await?;
        // The report is complete when init says so, before the kernel has
        // torn its namespaces down; if init dies without saying so, its exit.
        let ended = async {
            tokio::select! {
                _ = reported => {}
                ready = running.pidfd.readable() => {
                    ready.map_err(|e| helper_error("waiting for the run", &e))?.retain_ready();
                }
            }
            Ok::<(), SandboxError>(())
        };
        match spec.timeout_ms {
            Some(ms) => tokio::time::timeout(Duration::from_millis(ms) + HELPER_GRACE, ended)
                .await
                .map_err(|_| SandboxError::Helper("the helper did not finish in time; killed".into()))??,
            None => ended.await?,
        }
        running.finished = true;
        let report = std::fs::read(&layout.report)
            .map_err(|e| helper_error("reading the report (the helper failed; see its stderr)", &e))?;
        let report = serde_json::from_slice(&report).map_err(|e| helper_error("decoding the report", &e))?;
        Ok((report, running))
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

/// Removes `group` once it is empty: at once, or when `init` (a run's, or
/// a discarded slot's that was just killed) has exited, since every process
/// of the group is gone by then.
fn remove_when_empty(group: ActionGroup, init: Option<Running>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        drop(init);
        drop(group);
        return;
    };
    runtime.spawn(async move {
        if let Some(mut init) = init {
            let _ = tokio::time::timeout(HELPER_GRACE, init.exited()).await;
            init.finished = true;
        }
        let _ = tokio::task::spawn_blocking(move || drop(group)).await;
    });
}

/// Takes a run's entry out of the waiting list when the run is over,
/// however it ended.
struct Unlist<'a>(&'a Waiting, u64);

impl Drop for Unlist<'_> {
    fn drop(&mut self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.1);
    }
}

/// Mounts a tmpfs of `bytes` over a run's scratch space: its upper layer,
/// stdout, stderr, /tmp and /dev/shm share that budget. Only root may enter
/// it. [`crate::scratch::discard`] unmounts it.
fn mount_scratch(space: &std::path::Path, bytes: u64) -> Result<(), SandboxError> {
    use nix::mount::{mount, MsFlags};
    let options = format!("size={bytes},mode=0700");
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount(Some("tmpfs"), space, Some("tmpfs"), flags, Some(options.as_str()))
        .map_err(|e| helper_error(&format!("mounting the scratch tmpfs on {}", space.display()), &e))
}

/// A pidfd for `pid`, registered with the runtime to wait for its exit.
fn pidfd_open(pid: i32) -> Result<AsyncFd<OwnedFd>, SandboxError> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(helper_error("pidfd_open", &std::io::Error::last_os_error()));
    }
    // SAFETY: the kernel just returned this descriptor to us and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: `fd` is an OwnedFd moved into the AsyncFd, so it stays open and
    // is the same descriptor for the AsyncFd's whole life.
    unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| helper_error("watching the run", &e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in zygote: answers each request line with the lines given.
    fn zygote_saying(dir: &std::path::Path, answers: &str) -> Sandbox {
        use std::os::unix::fs::PermissionsExt;
        let script = dir.join("zygote");
        std::fs::write(&script, format!("#!/bin/sh\nread line\nprintf \"{answers}\"\nsleep 5\n")).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        Sandbox::new(script)
    }

    #[tokio::test]
    async fn answers_to_requests_whose_callers_gave_up_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        // A stale answer (run 7, whose caller is gone) comes before ours.
        let sandbox = zygote_saying(dir.path(), "7 1\\n0 $$\\n");
        assert!(sandbox.start("{}", 0).await.is_ok(), "the stale answer was skipped");

        let sandbox = zygote_saying(dir.path(), "7 1\\n3 error no network namespace\\n");
        let err = sandbox.start("{}", 3).await.err().expect("our answer is an error");
        assert!(err.to_string().contains("no network namespace"), "{err}");
    }
}
