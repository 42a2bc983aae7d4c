//! The sandbox helper: a short-lived process (`casbuild __sandbox-helper
//! SPEC`) that builds the namespaces and runs one command. It is a separate,
//! single-threaded process so that forking and namespace changes never meet
//! the worker's threads.
//!
//! ```text
//! helper (host pid namespace)  unshare(PID), fork, wait with the timeout, write report.json
//!  └─ init, pid 1            unshare(mount, net, ipc, uts); mounts; pivot_root; fork; reap all
//!      └─ command, pid 2     limits, drop to uid/gid, no_new_privs, execve
//! ```
//!
//! When init exits the kernel kills everything left in the pid namespace, and
//! the mount namespace goes with its last process: nothing outlives the run,
//! on the host nothing is ever mounted.

use std::ffi::{CString, OsString};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::{kill, SigHandler, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Gid, Pid, Uid};

use crate::beneath::Beneath;
use crate::seccomp::Filters;

use super::netwatch::{ConnectWatch, Denied};
use super::spec::{RunReport, SandboxSpec, ScratchLayout};

/// Devices a sandbox gets, bound from the host.
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// Entry point of the helper. `casbuild __sandbox-helper --zygote` reads
/// specs (JSON) from stdin, one per line, forks a process per spec that runs
/// it and writes its report into its scratch directory, and answers each line with that
/// process's pid (the caller waits on it with a pidfd). Forking from this
/// small, single-threaded process is what keeps sandbox start-up cheap.
/// `casbuild __sandbox-helper SPEC` runs one spec in the foreground.
pub fn helper_main(args: &[OsString]) -> std::process::ExitCode {
    match args.first().and_then(|a| a.to_str()) {
        None => {
            eprintln!("sandbox helper: give --zygote or a spec path");
            std::process::ExitCode::FAILURE
        }
        Some("--zygote") => zygote(),
        Some(_) => match run_spec_file(Path::new(&args[0])) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sandbox helper: {e}");
                std::process::ExitCode::FAILURE
            }
        },
    }
}

/// The zygote loop; ends when stdin closes (its owner is gone).
fn zygote() -> std::process::ExitCode {
    use std::io::BufRead;
    let mut stdout = std::io::stdout().lock();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        // Parsed here, before the fork, so that the filters for its deny
        // list are compiled once for all runs rather than in each.
        let spec = serde_json::from_str::<SandboxSpec>(&line).map_err(|e| format!("reading the spec: {e}"));
        if let Ok(spec) = &spec {
            // An error comes back to the run that needs the filters.
            let _ = filters_for(&spec.seccomp_deny);
        }
        // Runs that ended are reaped only now, when the owner has had the
        // chance to open a pidfd on them: their pids cannot be reused before.
        while let Ok(status) = waitpid(None::<Pid>, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
            if status == WaitStatus::StillAlive {
                break;
            }
        }
        // SAFETY: the zygote is single-threaded, so the child may run arbitrary code.
        let answer = match unsafe { fork() } {
            Ok(ForkResult::Child) => {
                // The zygote's pipes are not this run's business.
                if let Ok(null) = File::options().read(true).write(true).open("/dev/null") {
                    let _ = nix::unistd::dup2_stdin(&null);
                    let _ = nix::unistd::dup2_stdout(&null);
                }
                let code = match spec.and_then(|spec| run_parsed(&spec)) {
                    Ok(()) => 0,
                    Err(e) => {
                        eprintln!("sandbox helper: {e}");
                        1
                    }
                };
                std::process::exit(code)
            }
            Ok(ForkResult::Parent { child }) => child.as_raw().to_string(),
            Err(e) => format!("error fork: {e}"),
        };
        if writeln!(stdout, "{answer}").and_then(|()| stdout.flush()).is_err() {
            break;
        }
    }
    std::process::ExitCode::SUCCESS
}

/// Reads a spec from a file and runs it (the one-shot mode, for debugging).
fn run_spec_file(spec_path: &Path) -> Result<(), String> {
    let bytes = std::fs::read(spec_path).map_err(|e| format!("reading {}: {e}", spec_path.display()))?;
    run_spec(&bytes, &spec_path.display().to_string())
}

/// Runs a spec (JSON) and writes its report into its scratch directory.
fn run_spec(json: &[u8], what: &str) -> Result<(), String> {
    let spec: SandboxSpec = serde_json::from_slice(json).map_err(|e| format!("reading {what}: {e}"))?;
    run_parsed(&spec)
}

/// Runs a spec and writes its report into its scratch directory.
fn run_parsed(spec: &SandboxSpec) -> Result<(), String> {
    let layout = ScratchLayout::new(&spec.scratch);
    let report = run(spec, &layout);
    serde_json::to_vec(&report)
        .map_err(std::io::Error::other)
        .and_then(|b| std::fs::write(&layout.report, b))
        .map_err(|e| format!("writing {}: {e}", layout.report.display()))
}

fn run(spec: &SandboxSpec, layout: &ScratchLayout) -> RunReport {
    let start = Instant::now();
    let mut report = match run_namespaced(spec, layout) {
        Ok(report) => report,
        Err(e) => RunReport { error: Some(e), ..Default::default() },
    };
    report.wall_micros = start.elapsed().as_micros() as u64;
    report
}

fn run_namespaced(spec: &SandboxSpec, layout: &ScratchLayout) -> Result<RunReport, String> {
    let stdout = File::create(&layout.stdout).map_err(|e| format!("creating {}: {e}", layout.stdout.display()))?;
    let stderr = File::create(&layout.stderr).map_err(|e| format!("creating {}: {e}", layout.stderr.display()))?;
    // Everything the run starts is in the action's cgroups from here on
    // (`0`: the writer itself; this process is single-threaded).
    for procs in &spec.cgroup_procs {
        std::fs::write(procs, "0").map_err(|e| format!("joining the cgroup {}: {e}", procs.display()))?;
    }
    let (status_read, status_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    unshare(CloneFlags::CLONE_NEWPID).map_err(|e| format!("unshare(CLONE_NEWPID): {e}"))?;
    // SAFETY: this process is single-threaded (the helper starts no threads),
    // so the child may run arbitrary code after the fork.
    let child = match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => {
            drop(status_read);
            init(spec, layout, File::from(status_write), stdout.as_fd(), stderr.as_fd())
        }
        ForkResult::Parent { child } => child,
    };
    drop(status_write);
    let status_read = File::from(status_read);
    let timed_out = wait_with_timeout(child, &status_read, spec.timeout_ms)?;
    let mut status = String::new();
    (&status_read).read_to_string(&mut status).map_err(|e| format!("reading the init status: {e}"))?;
    // Init is not waited for: once it has reported, everything else in the
    // sandbox is dead, and the kernel tears its namespaces down on its own.
    let mut report = RunReport { timed_out, ..Default::default() };
    let mut lines: Vec<&str> = status.lines().collect();
    let last = lines.pop().unwrap_or_default();
    report.blocked = lines.iter().filter_map(|l| l.strip_prefix("blocked ")).map(str::to_owned).collect();
    match last.trim_end().split_once(' ') {
        Some(("exit", code)) => report.exit_code = code.parse().ok(),
        Some(("signal", sig)) => report.signal = sig.parse().ok(),
        Some(("error", message)) => report.error = Some(message.to_owned()),
        _ if timed_out => {}
        _ => report.error = Some(format!("the sandbox's init ended without a status ({status:?})")),
    }
    Ok(report)
}

/// Waits until init reports (its status pipe becomes readable); past the
/// timeout, kills it, and with it the namespace. Returns whether the timeout
/// struck. `init` is an unreaped child, so its pid cannot have been reused.
fn wait_with_timeout(init: Pid, status: &File, timeout_ms: Option<u64>) -> Result<bool, String> {
    let deadline = timeout_ms.map(|ms| Instant::now() + std::time::Duration::from_millis(ms));
    loop {
        let wait = match deadline {
            None => nix::poll::PollTimeout::NONE,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                nix::poll::PollTimeout::try_from(left.as_millis().min(i32::MAX as u128) as i32)
                    .unwrap_or(nix::poll::PollTimeout::MAX)
            }
        };
        let mut fds = [nix::poll::PollFd::new(status.as_fd(), nix::poll::PollFlags::POLLIN)];
        match nix::poll::poll(&mut fds, wait) {
            Ok(0) if deadline.is_some_and(|d| Instant::now() >= d) => {
                let _ = kill(init, Signal::SIGKILL);
                return Ok(true);
            }
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => return Ok(false),
            Err(e) => return Err(format!("poll: {e}")),
        }
    }
}

/// Pid 1 of the sandbox: builds its file system, runs the command, reaps
/// everything, reports on `status`, and exits — taking the namespace with it.
fn init(
    spec: &SandboxSpec,
    layout: &ScratchLayout,
    mut status: File,
    stdout: std::os::fd::BorrowedFd<'_>,
    stderr: std::os::fd::BorrowedFd<'_>,
) -> ! {
    let mut denied = Denied::default();
    let line = match build_root(spec, layout).and_then(|()| run_command(spec, stdout, stderr, &mut denied)) {
        Ok(WaitStatus::Exited(_, code)) => format!("exit {code}"),
        Ok(WaitStatus::Signaled(_, signal, _)) => format!("signal {}", signal as i32),
        Ok(other) => format!("error unexpected wait status {other:?}"),
        Err(e) => format!("error {e}"),
    };
    // Whatever the command left running dies now, before the report: its
    // outputs are final once the status is read.
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    while let Ok(reaped) = waitpid(None::<Pid>, None) {
        if matches!(reaped, WaitStatus::StillAlive) {
            break;
        }
    }
    // What the sandbox refused, one `blocked` line each, before the status.
    for access in denied.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        let _ = writeln!(status, "blocked {access}");
    }
    let _ = writeln!(status, "{line}");
    std::process::exit(0)
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

/// Mounts the sandbox's file system under the scratch root and pivots into it.
fn build_root(spec: &SandboxSpec, layout: &ScratchLayout) -> Result<(), String> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(sys(|| "prctl(PDEATHSIG)".into()))?;
    let flags =
        CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS;
    unshare(flags).map_err(sys(|| "unshare(mount, net, ipc, uts)".into()))?;
    nix::unistd::sethostname("casbuild").map_err(sys(|| "sethostname".into()))?;
    let none: Option<&str> = None;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none).map_err(sys(|| "making / private".into()))?;

    let root = &layout.root;
    // `root` usually exists (shared by all runs); create_dir_all then only stats it.
    for dir in [root, &layout.upper, &layout.overlay_work] {
        std::fs::create_dir_all(dir).map_err(io(|| format!("creating {}", dir.display())))?;
    }
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
        for (name, link) in own_top_entries(spec) {
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

    // The working tree: the input root under a private writable layer.
    let work = under(root, &spec.work_dir);
    std::fs::create_dir_all(&work).map_err(io(|| format!("creating {}", work.display())))?;
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        spec.input_root.display(),
        layout.upper.display(),
        layout.overlay_work.display()
    );
    mount(Some("overlay"), &work, Some("overlay"), nosuid, Some(options.as_str()))
        .map_err(sys(|| format!("mounting the overlay over {}", spec.input_root.display())))?;
    // Inputs are read-only (0555) in the CAS; the command may write where its
    // outputs go, in its working directory, and at the top of the tree.
    // The input root may hold symlinks to anywhere (`out -> /etc`): these
    // directories are made and handed over beneath the working tree only,
    // never through a link, since the host's file system is still visible.
    let tree = Beneath::open(&work).map_err(io(|| "opening the working tree".into()))?;
    let writable = [String::new(), spec.cwd.clone()].into_iter().chain(spec.writable_dirs.iter().cloned());
    for dir in writable {
        let made = tree.create_dirs(&dir).map_err(io(|| {
            let what = if dir == spec.cwd { "the working directory" } else { "an output's directory" };
            format!("creating {what} {dir:?} in the working tree (it must be a real directory, not a link)")
        }))?;
        made.chown_chmod(spec.uid, spec.gid, 0o755).map_err(io(|| format!("handing {dir:?} to the command")))?;
    }

    for host in &spec.toolchain {
        let target = under(root, host);
        if host.starts_with("/etc") && !host.is_dir() {
            // Small configuration files: copying them onto the root tmpfs
            // (root-owned, so read-only to the command) is cheaper than a
            // bind mount and a read-only remount each. Directories are bound.
            copy_file(host, &target)?;
        } else {
            bind_read_only(host, &target)?;
        }
    }
    name_the_sandbox_user(root, spec)?;

    let proc_dir = root.join("proc");
    std::fs::create_dir_all(&proc_dir).map_err(io(|| "creating /proc".into()))?;
    mount(Some("proc"), &proc_dir, Some("proc"), nosuid | MsFlags::MS_NOEXEC, none)
        .map_err(sys(|| "mounting /proc".into()))?;
    // With a scratch budget, /tmp and /dev/shm are directories of the run's
    // size-bounded scratch tmpfs: one budget for everything the action writes.
    build_dev(&root.join("dev"))?;
    let bounded = spec.limits.max_scratch_bytes > 0;
    for (dir, inside) in [(&layout.tmp, "tmp"), (&layout.shm, "dev/shm")] {
        let target = root.join(inside);
        std::fs::create_dir_all(&target).map_err(io(|| format!("creating /{inside}")))?;
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

    nix::unistd::chdir(root).map_err(sys(|| "chdir to the new root".into()))?;
    nix::unistd::pivot_root(".", ".").map_err(sys(|| "pivot_root".into()))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(sys(|| "detaching the old root".into()))?;
    nix::unistd::chdir("/").map_err(sys(|| "chdir /".into()))?;
    Ok(())
}

/// What the sandbox's set-up makes at the top of its root: a directory for
/// each of its own names, but a link for a toolchain name that is a link on
/// the host (merged-usr `/bin -> usr/bin`), and nothing for a toolchain name
/// the host lacks.
fn own_top_entries(spec: &SandboxSpec) -> Vec<(String, Option<PathBuf>)> {
    let made = spec.made_top_dirs();
    let mut entries = Vec::new();
    for name in spec.own_top_names() {
        if made.contains(&name) {
            entries.push((name, None));
            continue;
        }
        let host = Path::new("/").join(&name);
        match std::fs::symlink_metadata(&host) {
            Ok(m) if m.is_dir() => entries.push((name, None)),
            Ok(m) if m.file_type().is_symlink() && spec.toolchain.contains(&host) => {
                if let Ok(target) = std::fs::read_link(&host) {
                    entries.push((name, Some(target)));
                }
            }
            _ => {}
        }
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

/// Gives the command's user and group a name in the sandbox's copies of
/// /etc/passwd and /etc/group (tools that look their user up fail without
/// one), when those files were copied in and do not name them already.
fn name_the_sandbox_user(root: &Path, spec: &SandboxSpec) -> Result<(), String> {
    use std::io::Write as _;
    let (uid, gid) = (spec.uid, spec.gid);
    let entries = [
        ("etc/passwd", uid, format!("casbuild:x:{uid}:{gid}:casbuild action:/tmp:/usr/sbin/nologin\n")),
        ("etc/group", gid, format!("casbuild:x:{gid}:\n")),
    ];
    for (file, id, line) in entries {
        let path = root.join(file);
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        // Both files keep the id in their third field.
        let named = text.lines().any(|l| l.split(':').nth(2) == Some(id.to_string().as_str()));
        if !named {
            let mut out = File::options().append(true).open(&path).map_err(io(|| format!("opening /{file}")))?;
            let line = if text.ends_with('\n') || text.is_empty() { line } else { format!("\n{line}") };
            out.write_all(line.as_bytes()).map_err(io(|| format!("writing /{file}")))?;
        }
    }
    Ok(())
}

/// Makes `target`'s parent and, when `host` is a link, the same link at
/// `target` (unless the root overlay's set-up made it already). Returns what
/// is left to do: `host`'s metadata when it is not a link, `None` when it is
/// or this host does not have it.
fn link_or_prepare(host: &Path, target: &Path) -> Result<Option<std::fs::Metadata>, String> {
    let Ok(meta) = std::fs::symlink_metadata(host) else { return Ok(None) };
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(io(|| format!("creating {}", parent.display())))?;
    }
    if !meta.file_type().is_symlink() {
        return Ok(Some(meta));
    }
    if !std::fs::symlink_metadata(target).is_ok_and(|m| m.file_type().is_symlink()) {
        let link = std::fs::read_link(host).map_err(io(|| format!("reading link {}", host.display())))?;
        std::os::unix::fs::symlink(link, target).map_err(io(|| format!("symlink {}", target.display())))?;
    }
    Ok(None)
}

/// Copies a host file or symlink to `target`; skips paths this host does not have.
fn copy_file(host: &Path, target: &Path) -> Result<(), String> {
    if link_or_prepare(host, target)?.is_some() {
        std::fs::copy(host, target).map_err(io(|| format!("copying {}", host.display())))?;
    }
    Ok(())
}

/// Binds a host path read-only at `target`; recreates symlinks (merged /usr
/// makes `/bin` one); skips paths this host does not have.
fn bind_read_only(host: &Path, target: &Path) -> Result<(), String> {
    let Some(meta) = link_or_prepare(host, target)? else { return Ok(()) };
    if meta.is_dir() {
        std::fs::create_dir_all(target).map_err(io(|| format!("creating {}", target.display())))?;
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

/// Forks the command, reaps every process until the command has ended, and
/// returns its wait status; a failure to start it comes back as an error.
fn run_command(
    spec: &SandboxSpec,
    stdout: std::os::fd::BorrowedFd<'_>,
    stderr: std::os::fd::BorrowedFd<'_>,
    denied: &mut Denied,
) -> Result<WaitStatus, String> {
    // Everything the child needs is prepared here, before the fork.
    let cwd = spec.work_dir.join(&spec.cwd);
    let program = resolve_program(spec)?;
    let argv = cstrings(spec.argv.iter().map(String::as_str))?;
    let env =
        cstrings(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().iter().map(String::as_str))?;
    let program_c = CString::new(program.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    let filters = filters_for(&spec.seccomp_deny)?;
    // Installed here, in pid 1, so that the listener is ours and the
    // command inherits the filter.
    let watch = ConnectWatch::install()?;
    let (error_read, error_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys(|| "pipe".into()))?;
    // SAFETY: init is single-threaded, so the child may run arbitrary code.
    match unsafe { fork() }.map_err(sys(|| "fork".into()))? {
        ForkResult::Child => {
            drop(error_read);
            let command = Prepared { cwd: &cwd, program: &program_c, argv: &argv, env: &env, filters: &filters };
            let error = exec_command(spec, &command, stdout, stderr);
            let _ = File::from(error_write).write_all(error.as_bytes());
            std::process::exit(127)
        }
        ForkResult::Parent { child } => {
            drop(error_write);
            // Init has forked its last child: from here it may run a thread.
            *denied = watch.serve();
            let status = loop {
                match waitpid(None::<Pid>, None) {
                    Ok(status) if status.pid() == Some(child) => break status,
                    Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(format!("waiting for the command: {e}")),
                }
            };
            let mut error = String::new();
            let _ = File::from(error_read).read_to_string(&mut error);
            if error.is_empty() {
                Ok(status)
            } else {
                Err(error)
            }
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
}

/// In the command's process: limits, identity, then execve. Returns only on
/// failure, with the reason.
fn exec_command(
    spec: &SandboxSpec,
    command: &Prepared<'_>,
    stdout: std::os::fd::BorrowedFd<'_>,
    stderr: std::os::fd::BorrowedFd<'_>,
) -> String {
    let Prepared { cwd, program, argv, env, filters } = *command;
    let result = (|| -> Result<(), String> {
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
