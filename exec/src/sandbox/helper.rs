//! The sandbox helper: the zygote (`casbuild __sandbox-helper --zygote`), a
//! small single-threaded process that starts each run's pid 1, and that pid 1
//! (init), which builds the run's file system, runs the command and writes
//! the report. Forking and namespace changes happen here, never among the
//! worker's threads.
//!
//! ```text
//! zygote (host pid namespace)  per spec: unshare(PID), fork, answer the pid; reap; lend a network namespace
//!  └─ init, pid 1            cgroups; unshare(mount, ipc, uts), enter the lent network namespace; mounts;
//!      │                     pivot_root; fork; wait (timeout, connect watch, reaping); kill all; report.json
//!      └─ command, pid 2     limits, drop to uid/gid, no_new_privs, execve
//! ```
//!
//! When init exits the kernel kills everything left in the pid namespace, and
//! the mount namespace goes with its last process: nothing outlives the run,
//! on the host nothing is ever mounted.

use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsString};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::{kill, SigHandler, SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Gid, Pid, Uid};

use crate::beneath::Beneath;
use crate::seccomp::Filters;

use super::host_paths::{with_sandbox_name, HostPath, HostPaths};
use super::netwatch::ConnectWatch;
use super::spec::{RunReport, SandboxSpec, ScratchLayout};

/// Devices a sandbox gets, bound from the host.
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// Spare network namespaces the zygote keeps at most.
const SPARE_NETS: usize = 64;

/// Entry point of the helper. `casbuild __sandbox-helper --zygote` reads
/// specs (JSON) from stdin, one per line, starts each run's pid 1, which
/// writes its report into its scratch directory, and answers each line with
/// that process's pid (the caller waits on it with a pidfd). Forking from
/// this small, single-threaded process is what keeps sandbox start-up cheap.
/// `casbuild __sandbox-helper SPEC` runs one spec in the foreground.
pub fn helper_main(args: &[OsString]) -> std::process::ExitCode {
    let done = match args.first().and_then(|a| a.to_str()) {
        None => Err("give --zygote or a spec path".to_owned()),
        Some("--zygote") => zygote(),
        Some(_) => run_spec_file(Path::new(&args[0])),
    };
    match done {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sandbox helper: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Empty network namespaces (a loopback that is down, nothing else), each
/// lent to one run at a time. Creating a network namespace and tearing it
/// down are the most expensive steps of a sandbox; a namespace is empty
/// again once its run's init has been reaped (every process of the run is
/// dead by then, with its sockets), and an unprivileged command cannot
/// configure one, so the next run gets it as it was made. Runs that are
/// under way at the same time never share one.
#[derive(Default)]
struct NetPool {
    spare: Vec<OwnedFd>,
    lent: HashMap<Pid, OwnedFd>,
}

impl NetPool {
    /// A namespace for the next run: a spare one, or a new one.
    fn take(&mut self) -> Result<OwnedFd, String> {
        if let Some(net) = self.spare.pop() {
            return Ok(net);
        }
        let own = File::open("/proc/self/ns/net").map_err(|e| format!("opening the network namespace: {e}"))?;
        unshare(CloneFlags::CLONE_NEWNET).map_err(|e| format!("unshare(CLONE_NEWNET): {e}"))?;
        let made = File::open("/proc/self/ns/net");
        setns(own.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| format!("returning to the network namespace: {e}"))?;
        Ok(made.map_err(|e| format!("opening the new network namespace: {e}"))?.into())
    }

    /// Init `pid` was reaped: its namespace is free again.
    fn returned(&mut self, pid: Pid) {
        if let Some(net) = self.lent.remove(&pid) {
            if self.spare.len() < SPARE_NETS {
                self.spare.push(net);
            }
        }
    }
}

/// The zygote loop; ends when stdin closes (its owner is gone).
fn zygote() -> Result<(), String> {
    use std::io::BufRead;
    // Each run's init is forked into a new pid namespace; this puts the
    // zygote's next children back into its own.
    let own_pids = File::open("/proc/self/ns/pid").map_err(|e| format!("opening the pid namespace: {e}"))?;
    let mut nets = NetPool::default();
    let mut host = HostPaths::default();
    let mut stdout = std::io::stdout().lock();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        // Runs that ended are reaped only now, when the owner has had the
        // chance to open a pidfd on them: their pids cannot be reused before.
        while let Ok(status) = waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
            match status.pid() {
                Some(pid) => nets.returned(pid),
                None => break,
            }
        }
        // `RUN_ID PID` or `RUN_ID error WHY`: the owner matches answers to
        // its requests (the answer to one whose caller gave up is skipped).
        let answer = match serde_json::from_str::<SandboxSpec>(&line) {
            Err(e) => format!("error reading the spec: {e}"),
            Ok(spec) => match start_run(&spec, &own_pids, &mut nets, &mut host) {
                Ok(started) => format!("{} {started}", spec.run_id),
                Err(e) => format!("{} error {e}", spec.run_id),
            },
        };
        if writeln!(stdout, "{answer}").and_then(|()| stdout.flush()).is_err() {
            break;
        }
    }
    Ok(())
}

/// Starts `spec`'s run with a lent network namespace; returns the answer:
/// its init's pid, and for a warm slot (`spec.warm`) the number of the
/// descriptor in that init that the owner takes (`pidfd_getfd`) to talk to
/// the slot.
fn start_run(spec: &SandboxSpec, own_pids: &File, nets: &mut NetPool, host: &mut HostPaths) -> Result<String, String> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    use std::os::fd::AsRawFd;
    // Compiled here, before the fork, once for all runs with this deny list.
    filters_for(&spec.seccomp_deny)?;
    let host_paths = host.look(&spec.toolchain);
    let net = nets.take()?;
    let run = Run { spec, net: Some(&net), host_paths: &host_paths, announce: !spec.warm };
    let slot = match spec.warm {
        true => Some(
            socketpair(AddressFamily::Unix, SockType::Stream, None, SockFlag::SOCK_CLOEXEC)
                .map_err(|e| format!("socketpair: {e}"))?,
        ),
        false => None,
    };
    let owners_end = slot.as_ref().map(|(_, theirs)| theirs.as_raw_fd());
    // The zygote's copies of the pair close when `slot` goes, here.
    let pid = start_init(&run, own_pids, nets, slot)?;
    nets.lent.insert(pid, net);
    Ok(match owners_end {
        Some(fd) => format!("{pid} {fd}"),
        None => pid.to_string(),
    })
}

/// Forks the run's init as pid 1 of a new pid namespace and returns its
/// pid. In the child this never returns: init runs `spec` and exits, or
/// with `slot` (its end and the owner's end of a socket pair) serves one
/// action after another as a warm slot. `nets` are the zygote's
/// namespaces, closed in the child.
fn start_init(
    run: &Run<'_>,
    own_pids: &File,
    nets: &mut NetPool,
    slot: Option<(OwnedFd, OwnedFd)>,
) -> Result<Pid, String> {
    unshare(CloneFlags::CLONE_NEWPID).map_err(|e| format!("unshare(CLONE_NEWPID): {e}"))?;
    // SAFETY: the zygote is single-threaded (it starts no threads), so the
    // child may run arbitrary code after the fork.
    let started = match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            // The zygote's pipes and namespaces are not this run's business,
            // but for one line on its output at the end (close-on-exec).
            drop(std::mem::take(nets));
            let done = run.announce.then(|| std::io::stdout().as_fd().try_clone_to_owned().ok()).flatten();
            if let Ok(null) = File::options().read(true).write(true).open("/dev/null") {
                let _ = nix::unistd::dup2_stdin(&null);
                let _ = nix::unistd::dup2_stdout(&null);
            }
            match slot {
                Some((ours, theirs)) => super::slot_init::serve(run, ours, theirs),
                None => init(run, done.map(File::from)),
            }
        }
        Ok(ForkResult::Parent { child }) => Ok(child),
        Err(e) => Err(format!("fork: {e}")),
    };
    if let Err(e) = setns(own_pids.as_fd(), CloneFlags::CLONE_NEWPID) {
        // Its next child would join this run's namespace: stop instead (the
        // owner starts a new zygote).
        eprintln!("sandbox helper: returning to the pid namespace: {e}");
        std::process::exit(1);
    }
    started
}

/// Reads a spec from a file and runs it in the foreground (for debugging),
/// in a network namespace of its own.
fn run_spec_file(spec_path: &Path) -> Result<(), String> {
    let bytes = std::fs::read(spec_path).map_err(|e| format!("reading {}: {e}", spec_path.display()))?;
    let spec: SandboxSpec =
        serde_json::from_slice(&bytes).map_err(|e| format!("reading {}: {e}", spec_path.display()))?;
    let own_pids = File::open("/proc/self/ns/pid").map_err(|e| format!("opening the pid namespace: {e}"))?;
    let host_paths = HostPaths::default().look(&spec.toolchain);
    let run = Run { spec: &spec, net: None, host_paths: &host_paths, announce: false };
    let pid = start_init(&run, &own_pids, &mut NetPool::default(), None)?;
    match waitpid(pid, None) {
        Ok(WaitStatus::Exited(_, 0)) => Ok(()),
        other => Err(format!("the run's init ended with {other:?}")),
    }
}

/// One run (or warm slot) as the zygote hands it to its init.
pub(super) struct Run<'a> {
    pub spec: &'a SandboxSpec,
    /// The lent network namespace; without one the run makes its own.
    net: Option<&'a OwnedFd>,
    /// What the spec's toolchain paths are on the host.
    host_paths: &'a [(PathBuf, HostPath)],
    /// Whether init says `done N` on the zygote's output after its report.
    announce: bool,
}

/// Pid 1 of the sandbox: writes the report of running its spec into its
/// scratch directory, says `done N` on `done`, and exits, taking the
/// namespaces with it.
fn init(run: &Run<'_>, done: Option<File>) -> ! {
    let start = Instant::now();
    let spec = run.spec;
    let layout = ScratchLayout::new(&spec.scratch);
    // Opened now: after pivot_root the host's paths are gone.
    let code = match File::create(&layout.report) {
        Ok(mut out) => {
            let mut report = match run_in_namespaces(run, &layout, start) {
                Ok(report) => report,
                Err(e) => RunReport { error: Some(e), ..Default::default() },
            };
            report.wall_micros = start.elapsed().as_micros() as u64;
            match serde_json::to_vec(&report).map_err(std::io::Error::other).and_then(|b| out.write_all(&b)) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("sandbox helper: writing {}: {e}", layout.report.display());
                    1
                }
            }
        }
        Err(e) => {
            eprintln!("sandbox helper: creating {}: {e}", layout.report.display());
            1
        }
    };
    if let Some(mut done) = done {
        // One short write: lines of runs ending together do not mix.
        let _ = done.write_all(format!("done {}\n", spec.run_id).as_bytes());
    }
    std::process::exit(code)
}

/// Builds the sandbox, runs the command to its end (or its timeout) and
/// kills whatever it left running: its outputs are final once this returns.
/// The timeout counts from `start`.
fn run_in_namespaces(run: &Run<'_>, layout: &ScratchLayout, start: Instant) -> Result<RunReport, String> {
    let spec = run.spec;
    let deadline = spec.timeout_ms.map(|ms| start + std::time::Duration::from_millis(ms));
    let (stdout, stderr) = create_outputs(layout)?;
    // Everything the run starts is in the action's cgroups from here on
    // (`0`: the writer itself; this process is single-threaded).
    for procs in &spec.cgroup_procs {
        std::fs::write(procs, "0").map_err(|e| format!("joining the cgroup {}: {e}", procs.display()))?;
    }
    enter_namespaces(run)?;
    build_static_root(run, &layout.root)?;
    // Its mounts go with the run's mount namespace.
    mount_working_tree(spec, &layout.root, &spec.input_root, layout)?;
    pivot_into(&layout.root)?;
    let setup_micros = start.elapsed().as_micros() as u64;
    let waiter = Waiter::new()?;
    let ended = run_command(spec, (stdout.as_fd(), stderr.as_fd()), deadline, &waiter, None)?;
    // Init has reaped every process of the run (orphans come to pid 1), so
    // its children's usage is the action's CPU time.
    Ok(report_of(ended, setup_micros, children_cpu_micros()))
}

/// The command's stdout and stderr files in its scratch space.
fn create_outputs(layout: &ScratchLayout) -> Result<(File, File), String> {
    let stdout = File::create(&layout.stdout).map_err(|e| format!("creating {}: {e}", layout.stdout.display()))?;
    let stderr = File::create(&layout.stderr).map_err(|e| format!("creating {}: {e}", layout.stderr.display()))?;
    Ok((stdout, stderr))
}

/// CPU time of every child this process has reaped so far, in µs.
pub(super) fn children_cpu_micros() -> Option<u64> {
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN).ok()?;
    let micros = |t: nix::sys::time::TimeVal| t.tv_sec() as u64 * 1_000_000 + t.tv_usec() as u64;
    Some(micros(usage.user_time()) + micros(usage.system_time()))
}

/// The report of a command that ended as `ended`.
pub(super) fn report_of(ended: Ended, setup_micros: u64, cpu_micros: Option<u64>) -> RunReport {
    let mut report = RunReport {
        timed_out: ended.status.is_none(),
        blocked: ended.blocked,
        setup_micros,
        cpu_micros,
        ..Default::default()
    };
    match (ended.exec_error, ended.status) {
        (Some(error), _) => report.error = Some(error),
        (None, None) => {}
        (None, Some(WaitStatus::Exited(_, code))) => report.exit_code = Some(code),
        (None, Some(WaitStatus::Signaled(_, signal, _))) => report.signal = Some(signal as i32),
        (None, Some(other)) => report.error = Some(format!("unexpected wait status {other:?}")),
    }
    report
}

fn sys(what: impl FnOnce() -> String) -> impl FnOnce(nix::errno::Errno) -> String {
    move |e| format!("{}: {e}", what())
}

fn io(what: impl FnOnce() -> String) -> impl FnOnce(std::io::Error) -> String {
    move |e| format!("{}: {e}", what())
}

/// The path `inside` (absolute, as the command will see it) under `root`.
fn under(root: &Path, inside: &Path) -> PathBuf {
    root.join(inside.strip_prefix("/").unwrap_or(inside))
}

/// Enters the run's own mount, ipc and uts namespaces and its network
/// namespace, with every mount private to it from here on.
pub(super) fn enter_namespaces(run: &Run<'_>) -> Result<(), String> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(sys(|| "prctl(PDEATHSIG)".into()))?;
    let mut flags = CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS;
    if run.net.is_none() {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    unshare(flags).map_err(sys(|| "unshare(mount, ipc, uts)".into()))?;
    if let Some(net) = run.net {
        setns(net.as_fd(), CloneFlags::CLONE_NEWNET).map_err(sys(|| "entering the network namespace".into()))?;
    }
    nix::unistd::sethostname("casbuild").map_err(sys(|| "sethostname".into()))?;
    let none: Option<&str> = None;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none).map_err(sys(|| "making / private".into()))
}

/// Builds at `root` everything of the sandbox's file system that does not
/// depend on the action's inputs: the root (a tmpfs, or an overlay over the
/// root observer), the toolchain, `/proc`, `/dev`, and the places where the
/// working tree, `/tmp` and `/dev/shm` go.
pub(super) fn build_static_root(run: &Run<'_>, root: &Path) -> Result<(), String> {
    let spec = run.spec;
    // `root` usually exists (shared by all runs); create_dir_all then only stats it.
    std::fs::create_dir_all(root).map_err(io(|| format!("creating {}", root.display())))?;
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount(Some("tmpfs"), root, Some("tmpfs"), nosuid, Some("mode=0755,size=16m"))
        .map_err(sys(|| "mounting the root tmpfs".into()))?;
    if let Some(lower) = &spec.root_lower {
        // The tmpfs becomes the upper layer of an overlay whose lower layer
        // observes every lookup the root cannot answer.
        let (upper, work) = (root.join("upper"), root.join("work"));
        for dir in [&upper, &work] {
            std::fs::create_dir(dir).map_err(io(|| format!("creating {}", dir.display())))?;
        }
        // What the set-up makes at the top is made now, in the upper layer
        // (directories opaque), so that its lookups stay there: only the
        // command's own lookups of what the root lacks reach the observer (a
        // FUSE round trip each).
        for (name, link) in own_top_entries(spec, run.host_paths) {
            let path = upper.join(&name);
            match &link {
                Some(target) => std::os::unix::fs::symlink(target, &path),
                None => std::fs::create_dir(&path),
            }
            .map_err(io(|| format!("creating {}", path.display())))?;
            if link.is_none() {
                make_opaque(&path)?;
            }
        }
        let options = format!("lowerdir={},upperdir={},workdir={}", lower.display(), upper.display(), work.display());
        mount(Some("overlay"), root, Some("overlay"), nosuid, Some(options.as_str()))
            .map_err(sys(|| format!("mounting the root overlay over {}", lower.display())))?;
    }
    let work = under(root, &spec.work_dir);
    std::fs::create_dir_all(&work).map_err(io(|| format!("creating {}", work.display())))?;

    let mut made = HashSet::new();
    for (host, what) in run.host_paths {
        set_up_host_path(host, what, &under(root, host), spec, &mut made)?;
    }

    let proc_dir = root.join("proc");
    std::fs::create_dir_all(&proc_dir).map_err(io(|| "creating /proc".into()))?;
    let none: Option<&str> = None;
    mount(Some("proc"), &proc_dir, Some("proc"), nosuid | MsFlags::MS_NOEXEC, none)
        .map_err(sys(|| "mounting /proc".into()))?;
    build_dev(&root.join("dev"))?;
    for inside in ["tmp", "dev/shm"] {
        let target = root.join(inside);
        std::fs::create_dir_all(&target).map_err(io(|| format!("creating /{inside}")))?;
    }
    Ok(())
}

/// Mounts the action's working tree at the spec's work directory under
/// `root`: an overlay of the input root (`lower`) under the upper layer of
/// its scratch space (`layout`); makes the directories the command may
/// write to; and gives it its own `/tmp` and `/dev/shm`.
fn mount_working_tree(spec: &SandboxSpec, root: &Path, lower: &Path, layout: &ScratchLayout) -> Result<(), String> {
    for dir in [&layout.upper, &layout.overlay_work] {
        std::fs::create_dir_all(dir).map_err(io(|| format!("creating {}", dir.display())))?;
    }
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let work = under(root, &spec.work_dir);
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        layout.upper.display(),
        layout.overlay_work.display()
    );
    mount(Some("overlay"), &work, Some("overlay"), nosuid, Some(options.as_str()))
        .map_err(sys(|| format!("mounting the overlay over {}", spec.input_root.display())))?;
    hand_over_dirs(spec, &work)?;
    // With a scratch budget, /tmp and /dev/shm are directories of the run's
    // size-bounded scratch tmpfs: one budget for everything the action writes.
    let none: Option<&str> = None;
    let bounded = spec.limits.max_scratch_bytes > 0;
    for (dir, inside) in [(&layout.tmp, "tmp"), (&layout.shm, "dev/shm")] {
        let target = root.join(inside);
        if bounded {
            std::fs::create_dir_all(dir).map_err(io(|| format!("creating {}", dir.display())))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o1777))
                .map_err(io(|| format!("chmod {}", dir.display())))?;
            mount(Some(dir.as_path()), &target, none, MsFlags::MS_BIND, none)
                .map_err(sys(|| format!("binding /{inside}")))?;
        } else {
            mount(Some("tmpfs"), &target, Some("tmpfs"), nosuid, Some("mode=1777"))
                .map_err(sys(|| format!("mounting /{inside}")))?;
        }
    }
    Ok(())
}

/// Makes the directories the command may write to in the working tree
/// mounted at `work` and gives them to its user. Inputs are read-only
/// (0555) in the CAS; the command may write where its outputs go, in its
/// working directory, and at the top of the tree. The input root may hold
/// symlinks to anywhere (`out -> /etc`): these directories are made and
/// handed over beneath the working tree only, never through a link, since
/// the host's file system is still visible.
pub(super) fn hand_over_dirs(spec: &SandboxSpec, work: &Path) -> Result<(), String> {
    let tree = Beneath::open(work).map_err(io(|| "opening the working tree".into()))?;
    let writable = [String::new(), spec.cwd.clone()].into_iter().chain(spec.writable_dirs.iter().cloned());
    for dir in writable {
        let made = tree.create_dirs(&dir).map_err(io(|| {
            let what = if dir == spec.cwd { "the working directory" } else { "an output's directory" };
            format!("creating {what} {dir:?} in the working tree (it must be a real directory, not a link)")
        }))?;
        made.chown_chmod(spec.uid, spec.gid, 0o755).map_err(io(|| format!("handing {dir:?} to the command")))?;
    }
    Ok(())
}

/// Makes `root` the process's root and lets go of the host's.
pub(super) fn pivot_into(root: &Path) -> Result<(), String> {
    nix::unistd::chdir(root).map_err(sys(|| "chdir to the new root".into()))?;
    nix::unistd::pivot_root(".", ".").map_err(sys(|| "pivot_root".into()))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(sys(|| "detaching the old root".into()))?;
    nix::unistd::chdir("/").map_err(sys(|| "chdir /".into()))
}

/// What the sandbox's set-up makes at the top of its root: a directory for
/// each of its own names, but a link for a toolchain name that is a link on
/// the host (merged-usr `/bin -> usr/bin`), and nothing for a toolchain name
/// the host lacks.
fn own_top_entries(spec: &SandboxSpec, host_paths: &[(PathBuf, HostPath)]) -> Vec<(String, Option<PathBuf>)> {
    let made = spec.made_top_dirs();
    let mut entries = Vec::new();
    for name in spec.own_top_names() {
        let host = Path::new("/").join(&name);
        let entry = match host_paths.iter().find(|(path, _)| *path == host) {
            _ if made.contains(&name) => Some(None),
            Some((_, HostPath::Bind { dir: true })) => Some(None),
            Some((_, HostPath::Link(target))) => Some(Some(target.clone())),
            Some(_) => None,
            // The top of a deeper toolchain path (`/opt` of `/opt/cc`).
            None => std::fs::symlink_metadata(&host).is_ok_and(|m| m.is_dir()).then_some(None),
        };
        entries.extend(entry.map(|link| (name, link)));
    }
    entries
}

/// Marks an upper-layer directory opaque: overlayfs then never looks for it
/// in the lower layer.
fn make_opaque(dir: &Path) -> Result<(), String> {
    let path = CString::new(dir.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: both strings are NUL-terminated and outlive the call; the
    // value is one byte long as passed.
    let rc = unsafe { libc::setxattr(path.as_ptr(), c"trusted.overlay.opaque".as_ptr(), b"y".as_ptr().cast(), 1, 0) };
    if rc != 0 {
        return Err(format!("marking {} opaque: {}", dir.display(), std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Makes `dir` and its parents, at most once per set-up.
fn make_dir(dir: &Path, made: &mut HashSet<PathBuf>) -> Result<(), String> {
    if made.insert(dir.to_path_buf()) {
        std::fs::create_dir_all(dir).map_err(io(|| format!("creating {}", dir.display())))?;
    }
    Ok(())
}

/// Puts the host path `host` at `target` as the zygote found it: bound
/// read-only, made again as a link (unless the root overlay's set-up made
/// it already), or copied (root-owned on the root tmpfs, so read-only to
/// the command; `/etc/passwd` and `/etc/group` name the command's user).
fn set_up_host_path(
    host: &Path,
    what: &HostPath,
    target: &Path,
    spec: &SandboxSpec,
    made: &mut HashSet<PathBuf>,
) -> Result<(), String> {
    if *what == HostPath::Missing {
        return Ok(());
    }
    if let Some(parent) = target.parent() {
        make_dir(parent, made)?;
    }
    match what {
        HostPath::Missing => Ok(()),
        HostPath::Link(to) => match std::os::unix::fs::symlink(to, target) {
            Err(e)
                if !(e.kind() == std::io::ErrorKind::AlreadyExists
                    && std::fs::symlink_metadata(target).is_ok_and(|m| m.file_type().is_symlink())) =>
            {
                Err(format!("symlink {}: {e}", target.display()))
            }
            _ => Ok(()),
        },
        HostPath::Copy { bytes, mode } => {
            let (uid, gid) = (spec.uid, spec.gid);
            let contents = match host.to_str() {
                Some("/etc/passwd") => {
                    let line = format!("casbuild:x:{uid}:{gid}:casbuild action:/tmp:/usr/sbin/nologin\n");
                    std::borrow::Cow::Owned(with_sandbox_name(bytes, uid, &line))
                }
                Some("/etc/group") => {
                    std::borrow::Cow::Owned(with_sandbox_name(bytes, gid, &format!("casbuild:x:{gid}:\n")))
                }
                _ => std::borrow::Cow::Borrowed(&bytes[..]),
            };
            let mut file = File::create_new(target).map_err(io(|| format!("creating {}", target.display())))?;
            file.write_all(&contents).map_err(io(|| format!("copying {}", host.display())))?;
            file.set_permissions(std::fs::Permissions::from_mode(*mode))
                .map_err(io(|| format!("chmod {}", target.display())))
        }
        HostPath::Bind { dir } => {
            if *dir {
                make_dir(target, made)?;
            } else {
                File::create(target).map_err(io(|| format!("creating {}", target.display())))?;
            }
            let none: Option<&str> = None;
            mount(Some(host), target, none, MsFlags::MS_BIND | MsFlags::MS_REC, none)
                .map_err(sys(|| format!("binding {}", host.display())))?;
            let read_only =
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
            mount(none, target, none, read_only, none).map_err(sys(|| format!("making {} read-only", host.display())))
        }
    }
}

/// A minimal /dev: a few devices bound from the host and fd links (/dev/shm is the caller's).
fn build_dev(dev: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dev).map_err(io(|| "creating /dev".into()))?;
    mount(Some("tmpfs"), dev, Some("tmpfs"), MsFlags::MS_NOSUID, Some("mode=0755,size=64k"))
        .map_err(sys(|| "mounting /dev".into()))?;
    let none: Option<&str> = None;
    for name in DEVICES {
        let (host, target) = (Path::new("/dev").join(name), dev.join(name));
        File::create(&target).map_err(io(|| format!("creating /dev/{name}")))?;
        mount(Some(&host), &target, none, MsFlags::MS_BIND, none).map_err(sys(|| format!("binding /dev/{name}")))?;
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(name)).map_err(io(|| format!("creating /dev/{name}")))?;
    }
    Ok(())
}

/// How the command ended.
pub(super) struct Ended {
    /// Its wait status; `None` when the deadline came first.
    status: Option<WaitStatus>,
    /// Why it could not be started, when it could not.
    exec_error: Option<String>,
    /// What the sandbox refused, for the report.
    blocked: Vec<String>,
}

/// What pid 1 waits with: the connect watch, installed on pid 1 itself so
/// that the listener is ours and every command inherits the filter, and a
/// signalfd announcing ended children (SIGCHLD blocked from here on, so
/// that none is missed; each command unblocks it).
pub(super) struct Waiter {
    watch: ConnectWatch,
    signals: SignalFd,
}

impl Waiter {
    /// Sets both up; once per init (a filter installed twice stays twice).
    pub(super) fn new() -> Result<Self, String> {
        let watch = ConnectWatch::install()?;
        let mut chld = SigSet::empty();
        chld.add(Signal::SIGCHLD);
        chld.thread_block().map_err(sys(|| "blocking SIGCHLD".into()))?;
        let signals = SignalFd::with_flags(&chld, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .map_err(sys(|| "signalfd".into()))?;
        Ok(Waiter { watch, signals })
    }
}

/// Forks the command, waits for its end or the deadline while answering
/// the connect watch and reaping every process that ends, then kills and
/// reaps whatever is left. In a warm slot (`slot`: the action's cgroup
/// `tasks` files, open for writing), whose init outlives its actions, the
/// command joins the cgroups itself and then gets an ipc namespace of its
/// own, before anything else.
pub(super) fn run_command(
    spec: &SandboxSpec,
    (stdout, stderr): (std::os::fd::BorrowedFd<'_>, std::os::fd::BorrowedFd<'_>),
    deadline: Option<Instant>,
    waiter: &Waiter,
    slot: Option<&[OwnedFd]>,
) -> Result<Ended, String> {
    // Everything the child needs is prepared here, before the fork.
    let cwd = spec.work_dir.join(&spec.cwd);
    let program = resolve_program(spec)?;
    let argv = cstrings(spec.argv.iter().map(String::as_str))?;
    let env =
        cstrings(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().iter().map(String::as_str))?;
    let program_c = CString::new(program.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    let filters = filters_for(&spec.seccomp_deny)?;
    let (error_read, error_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys(|| "pipe".into()))?;
    // SAFETY: init is single-threaded, so the child may run arbitrary code.
    match unsafe { fork() }.map_err(sys(|| "fork".into()))? {
        ForkResult::Child => {
            drop(error_read);
            let command = Prepared { cwd: &cwd, program: &program_c, argv: &argv, env: &env, filters: &filters, slot };
            let error = exec_command(spec, &command, stdout, stderr);
            let _ = File::from(error_write).write_all(error.as_bytes());
            std::process::exit(127)
        }
        ForkResult::Parent { child } => {
            drop(error_write);
            let mut blocked = Vec::new();
            let waited = wait_for(child, deadline, waiter, &mut blocked);
            // Whatever the command left running dies now, before the
            // report: its outputs are final once the report is read.
            let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
            while let Ok(reaped) = waitpid(None::<Pid>, None) {
                if matches!(reaped, WaitStatus::StillAlive) {
                    break;
                }
            }
            let status = waited?;
            let mut error = String::new();
            let _ = File::from(error_read).read_to_string(&mut error);
            let exec_error = (!error.is_empty()).then_some(error);
            Ok(Ended { status, exec_error, blocked })
        }
    }
}

/// Reaps every process that ends (pid 1 inherits orphans) and answers the
/// connect watch until `command` has ended (its status) or the deadline
/// has passed (`None`).
fn wait_for(
    command: Pid,
    deadline: Option<Instant>,
    waiter: &Waiter,
    blocked: &mut Vec<String>,
) -> Result<Option<WaitStatus>, String> {
    use nix::errno::Errno;
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let Waiter { watch, signals } = waiter;
    loop {
        loop {
            match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(status) if status.pid() == Some(command) => return Ok(Some(status)),
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(format!("waiting for the command: {e}")),
            }
        }
        let wait = match deadline {
            None => PollTimeout::NONE,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(None);
                }
                let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
            }
        };
        let mut fds = [PollFd::new(signals.as_fd(), PollFlags::POLLIN), PollFd::new(watch.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, wait) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(format!("poll: {e}")),
        }
        let ready = |fd: &PollFd| fd.revents().is_some_and(|r| r.contains(PollFlags::POLLIN));
        if ready(&fds[1]) {
            watch.answer_one(blocked);
        }
        if ready(&fds[0]) {
            while let Ok(Some(_)) = signals.read_signal() {}
        }
    }
}

/// The seccomp filters of the last deny list asked for. A worker's runs all
/// use the same list, so the zygote compiles them once, before it forks, and
/// every run inherits them.
static FILTERS: Mutex<Option<(Vec<String>, Arc<Filters>)>> = Mutex::new(None);

/// The compiled filters for `deny` (see [`FILTERS`]).
fn filters_for(deny: &[String]) -> Result<Arc<Filters>, String> {
    let mut cached = FILTERS.lock().unwrap_or_else(|e| e.into_inner());
    match cached.as_ref() {
        Some((list, filters)) if list.as_slice() == deny => Ok(filters.clone()),
        _ => {
            let filters = Arc::new(Filters::compile(deny)?);
            *cached = Some((deny.to_vec(), filters.clone()));
            Ok(filters)
        }
    }
}

fn cstrings<'a>(items: impl Iterator<Item = &'a str>) -> Result<Vec<CString>, String> {
    items.map(|s| CString::new(s).map_err(|_| format!("{s:?} contains a NUL byte"))).collect()
}

/// argv[0] as a path inside the sandbox: as given when it has a slash
/// (relative to the working directory), else the first executable match on
/// the command's own PATH.
fn resolve_program(spec: &SandboxSpec) -> Result<PathBuf, String> {
    let name = &spec.argv[0];
    if name.contains('/') {
        return Ok(PathBuf::from(name));
    }
    let path = spec.env.iter().find(|(k, _)| k == "PATH").map(|(_, v)| v.as_str()).unwrap_or("");
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let candidate = spec.work_dir.join(&spec.cwd).join(dir).join(name);
        if let Ok(meta) = std::fs::metadata(&candidate) {
            if meta.is_file() {
                return Ok(candidate);
            }
        }
    }
    Err(format!("command not found: {name:?} is not on the action's PATH {path:?}"))
}

/// What the command's process needs, prepared before the fork.
struct Prepared<'a> {
    cwd: &'a Path,
    program: &'a CString,
    argv: &'a [CString],
    env: &'a [CString],
    filters: &'a Filters,
    slot: Option<&'a [OwnedFd]>,
}

/// In the command's process: limits, identity, then execve. Returns only on
/// failure, with the reason.
fn exec_command(
    spec: &SandboxSpec,
    command: &Prepared<'_>,
    stdout: std::os::fd::BorrowedFd<'_>,
    stderr: std::os::fd::BorrowedFd<'_>,
) -> String {
    let Prepared { cwd, program, argv, env, filters, slot } = *command;
    let result = (|| -> Result<(), String> {
        if let Some(cgroups) = slot {
            for procs in cgroups {
                nix::unistd::write(procs, b"0").map_err(sys(|| "joining the action's cgroup".into()))?;
            }
            // SysV objects and POSIX queues of this command die with it,
            // not with the slot.
            unshare(CloneFlags::CLONE_NEWIPC).map_err(sys(|| "unshare(CLONE_NEWIPC)".into()))?;
        }
        let null = File::open("/dev/null").map_err(io(|| "opening /dev/null".into()))?;
        nix::unistd::dup2_stdin(&null).map_err(sys(|| "stdin".into()))?;
        nix::unistd::dup2_stdout(stdout).map_err(sys(|| "stdout".into()))?;
        nix::unistd::dup2_stderr(stderr).map_err(sys(|| "stderr".into()))?;
        nix::unistd::chdir(cwd).map_err(sys(|| format!("working directory {}", cwd.display())))?;
        let limits = &spec.limits;
        // RLIMIT_NPROC counts the user's processes host-wide; it is the
        // process limit only when the run has no cgroup (whose pids.max
        // counts this action's processes alone).
        let nproc = spec.cgroup_procs.is_empty().then_some((Resource::RLIMIT_NPROC, limits.max_processes));
        let rlimits = [
            (Resource::RLIMIT_CORE, 0),
            (Resource::RLIMIT_NOFILE, limits.max_open_files),
            (Resource::RLIMIT_FSIZE, limits.max_file_bytes),
        ];
        for (resource, value) in rlimits.into_iter().chain(nproc) {
            setrlimit(resource, value, value).map_err(sys(|| format!("setrlimit {resource:?}")))?;
        }
        nix::unistd::setgroups(&[]).map_err(sys(|| "setgroups".into()))?;
        nix::unistd::setgid(Gid::from_raw(spec.gid)).map_err(sys(|| format!("setgid {}", spec.gid)))?;
        nix::unistd::setuid(Uid::from_raw(spec.uid)).map_err(sys(|| format!("setuid {}", spec.uid)))?;
        nix::sys::prctl::set_no_new_privs().map_err(sys(|| "no_new_privs".into()))?;
        // The helper is a Rust program, which ignores SIGPIPE; commands expect the default.
        // SAFETY: setting a signal to its default disposition installs no handler code.
        unsafe { nix::sys::signal::signal(Signal::SIGPIPE, SigHandler::SigDfl) }
            .map_err(sys(|| "resetting SIGPIPE".into()))?;
        nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
            .map_err(sys(|| "clearing the signal mask".into()))?;
        // Last: from here on only execve is left to call.
        filters.install()
    })();
    if let Err(e) = result {
        return format!("setting up the command: {e}");
    }
    let Err(e) = nix::unistd::execve(program, argv, env);
    let name = program.to_string_lossy();
    match e {
        nix::errno::Errno::ENOENT => format!("command not found: {name}"),
        nix::errno::Errno::EACCES => format!("cannot execute {name}: permission denied (not executable?)"),
        other => format!("cannot execute {name}: {other}"),
    }
}
