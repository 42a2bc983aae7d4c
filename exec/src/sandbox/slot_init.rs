//! A warm slot's init: pid 1 of a sandbox that outlives its actions.
//!
//! It builds the part of the sandbox that is the same for every action
//! (namespaces, root, toolchain, `/proc`, `/dev`) once, pivots into it, and
//! then serves one action after another over its socket:
//!
//! ```text
//! owner → slot   u64 length, SandboxSpec (JSON); with it, descriptors: a
//!                detached copy of the input root, one of the scratch space
//!                and, with a scratch budget, one each of that space's
//!                `tmp` and `shm`; and the action's cgroup `tasks` files
//!                open for writing
//! slot → owner   u64 length, SlotReply (JSON): the report
//! slot → owner   u64 length, SlotSettled (JSON), unless the reply said
//!                the slot is unfit
//! ```
//!
//! Per action it builds the working tree, `/tmp` and `/dev/shm` from the
//! two trees without attaching either anywhere (the working tree's overlay
//! takes its layers as descriptors; `/tmp` and `/dev/shm` are copies of
//! directories of the scratch space), and runs the command, which joins the
//! cgroups and gets an ipc namespace of its own. Afterwards it kills every
//! process left and sends the report: the action's outputs are final. Only
//! then does it clean up (unmount what the action had, make its root forget
//! the action's misses, check that it is alone in its pid namespace), while
//! the owner collects the outputs, and says whether that went through. A
//! slot that timed out, could not start the command or failed any of this
//! exits, and the owner starts a new one for the next action.

use std::fs::File;
use std::io::{IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::fcntl::{openat, OFlag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use nix::sys::stat::{fchmod, mkdirat, Mode};

use super::helper::{
    build_static_root, children_cpu_micros, enter_namespaces, hand_over_dirs, pivot_into, report_of, run_command, Run,
    Waiter,
};
use super::spec::{RunReport, SandboxSpec, ScratchLayout, SlotReply, SlotSettled};

/// The most descriptors one request carries: up to four trees and the cgroups.
pub(super) const MAX_FDS: usize = 16;

/// The largest request accepted (a spec with a long command line).
const MAX_REQUEST: u64 = 64 << 20;

/// Serves actions until the owner closes the socket or an action leaves the
/// slot unfit for another; never returns. `theirs` is the owner's end,
/// which the owner takes from this process; it is closed once the first
/// request shows the owner has it.
pub(super) fn serve(run: &Run<'_>, ours: OwnedFd, theirs: OwnedFd) -> ! {
    let mut theirs = Some(theirs);
    let built = enter_namespaces(run)
        .and_then(|()| {
            let root = ScratchLayout::new(&run.spec.scratch).root;
            build_static_root(run, &root)?;
            pivot_into(&root)
        })
        .and_then(|()| Waiter::new());
    let mut socket = UnixStream::from(ours);
    let mut cpu_before = children_cpu_micros();
    loop {
        let (spec, fds) = match receive(&socket) {
            Ok(Some(request)) => request,
            Ok(None) => std::process::exit(0),
            Err(e) => {
                eprintln!("sandbox slot: {e}");
                std::process::exit(1)
            }
        };
        drop(theirs.take());
        let reply = match &built {
            Err(e) => {
                let report = failed(format!("building the sandbox: {e}"));
                SlotReply { report, unfit: Some("it could not be built".into()) }
            }
            Ok(waiter) => {
                let (reply, leftovers) = run_action(run.spec, &spec, fds, waiter);
                let cpu_now = children_cpu_micros();
                let cpu = cpu_now.zip(cpu_before).map(|(now, before)| now.saturating_sub(before));
                cpu_before = cpu_now;
                let reply = SlotReply { report: RunReport { cpu_micros: cpu, ..reply.report }, ..reply };
                answer(&mut socket, &reply, reply.unfit.is_some());
                let settled = SlotSettled { unfit: clean_up(run.spec, leftovers).err() };
                answer(&mut socket, &settled, settled.unfit.is_some());
                continue;
            }
        };
        answer(&mut socket, &reply, reply.unfit.is_some());
    }
}

/// Sends `message` to the owner; exits after it if `last`, or if it
/// cannot be sent.
fn answer(socket: &mut UnixStream, message: &impl serde::Serialize, last: bool) {
    if let Err(e) = send(socket, message) {
        eprintln!("sandbox slot: answering: {e}");
        std::process::exit(1)
    }
    if last {
        std::process::exit(0)
    }
}

fn failed(error: String) -> RunReport {
    RunReport { error: Some(error), ..Default::default() }
}

/// Reads one request: `None` when the owner has closed the socket.
fn receive(socket: &UnixStream) -> Result<Option<(SandboxSpec, Vec<OwnedFd>)>, String> {
    let mut header = [0u8; 8];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; MAX_FDS]);
    let (got, fds) = {
        let mut iov = [IoSliceMut::new(&mut header)];
        let message = recvmsg::<()>(socket.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
            .map_err(|e| format!("receiving a request: {e}"))?;
        let mut fds = Vec::new();
        for cmsg in message.cmsgs().map_err(|e| format!("receiving a request: {e}"))? {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                // SAFETY: SCM_RIGHTS just installed these descriptors in this
                // process; nothing else owns them.
                fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        if message.flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err("a request carried more descriptors than a slot takes".into());
        }
        (message.bytes, fds)
    };
    if got == 0 {
        return Ok(None);
    }
    (&*socket).read_exact(&mut header[got..]).map_err(|e| format!("reading a request: {e}"))?;
    let length = u64::from_le_bytes(header);
    if length > MAX_REQUEST {
        return Err(format!("a request of {length} bytes"));
    }
    let mut body = vec![0; length as usize];
    (&*socket).read_exact(&mut body).map_err(|e| format!("reading a request: {e}"))?;
    let spec = serde_json::from_slice(&body).map_err(|e| format!("reading a request: {e}"))?;
    Ok(Some((spec, fds)))
}

fn send(socket: &mut UnixStream, reply: &impl serde::Serialize) -> std::io::Result<()> {
    let body = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    let mut message = (body.len() as u64).to_le_bytes().to_vec();
    message.extend_from_slice(&body);
    socket.write_all(&message)
}

/// What an action leaves in its slot until the slot cleans up after it:
/// its mount points, and the detached trees it was given (closing the last
/// descriptor of a detached tree unmounts it, which waits for the kernel
/// like any unmount, so that waits until after the report too).
#[derive(Default)]
struct Leftovers {
    mounted: Vec<PathBuf>,
    trees: Vec<OwnedFd>,
}

/// Runs one action in the slot built for `slot`; returns the reply and
/// what the action leaves to clean up.
fn run_action(slot: &SandboxSpec, spec: &SandboxSpec, fds: Vec<OwnedFd>, waiter: &Waiter) -> (SlotReply, Leftovers) {
    let start = Instant::now();
    let mut leftovers = Leftovers::default();
    let ran = (|| -> Result<RunReport, String> {
        if !same_slot(slot, spec) {
            return Err("the action does not fit this slot (user, toolchain or root differ)".into());
        }
        let trees = if spec.limits.max_scratch_bytes > 0 { 4 } else { 2 };
        if fds.len() != trees + spec.cgroup_procs.len() {
            return Err(format!("{} descriptors for an action with {} cgroups", fds.len(), spec.cgroup_procs.len()));
        }
        let mut fds = fds.into_iter();
        leftovers.trees = fds.by_ref().take(trees).collect();
        let cgroups: Vec<OwnedFd> = fds.collect();
        let (stdout, stderr) = mount_action(spec, &mut leftovers)?;
        let setup_micros = start.elapsed().as_micros() as u64;
        let deadline = spec.timeout_ms.map(|ms| start + std::time::Duration::from_millis(ms));
        let ended = run_command(spec, (stdout.as_fd(), stderr.as_fd()), deadline, waiter, Some(&cgroups))?;
        Ok(report_of(ended, setup_micros, None))
    })();
    let mut report = match ran {
        Ok(report) => report,
        Err(e) => {
            let unfit = Some("the action's set-up failed".into());
            return (SlotReply { report: failed(e), unfit }, leftovers);
        }
    };
    report.wall_micros = start.elapsed().as_micros() as u64;
    let unfit = if report.timed_out {
        Some("the action timed out".into())
    } else if report.error.is_some() {
        Some("the command could not start".into())
    } else {
        None
    };
    (SlotReply { report, unfit }, leftovers)
}

/// Builds the action's working tree, `/tmp` and `/dev/shm` from the
/// detached trees it was given (`leftovers.trees`: its input root, its
/// scratch space and, with a scratch budget, that space's `tmp` and `shm`),
/// and makes its stdout and stderr files; adds what it mounts to
/// `leftovers.mounted` as it goes.
fn mount_action(spec: &SandboxSpec, leftovers: &mut Leftovers) -> Result<(File, File), String> {
    // Attached, the copies of `tmp` and `shm` need no descriptor kept.
    let mut bounded = leftovers.trees.split_off(2).into_iter();
    let (trees, mounted) = (&leftovers.trees, &mut leftovers.mounted);
    let (input, scratch) = (trees[0].as_fd(), trees[1].as_fd());
    let output = |name: &str| -> Result<File, String> {
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW;
        let fd = openat(scratch, name, flags, Mode::from_bits_truncate(0o666))
            .map_err(|e| format!("creating the scratch space's {name}: {e}"))?;
        Ok(File::from(fd))
    };
    let (stdout, stderr) = (output("stdout")?, output("stderr")?);
    let upper = scratch_dir(scratch, "upper", 0o755)?;
    let overlay_work = scratch_dir(scratch, "overlay-work", 0o755)?;
    let work = spec.work_dir.clone();
    attach(overlay(input, upper.as_fd(), overlay_work.as_fd())?, &work)?;
    mounted.push(work.clone());
    hand_over_dirs(spec, &work)?;
    // With a scratch budget, /tmp and /dev/shm are the scratch space's own
    // directories (the owner made them): one budget for all the action writes.
    for target in ["/tmp", "/dev/shm"] {
        if let Some(tree) = bounded.next() {
            attach(tree, Path::new(target))?;
        } else {
            let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
            mount(Some("tmpfs"), target, Some("tmpfs"), nosuid, Some("mode=1777"))
                .map_err(|e| format!("mounting {target}: {e}"))?;
        }
        mounted.push(PathBuf::from(target));
    }
    Ok((stdout, stderr))
}

/// Makes directory `name` in the scratch space with `mode` and opens it.
/// The scratch space is new and nothing but this init has written to it.
fn scratch_dir(scratch: BorrowedFd<'_>, name: &str, mode: u32) -> Result<OwnedFd, String> {
    mkdirat(scratch, name, Mode::from_bits_truncate(0o700)).map_err(|e| format!("creating {name}: {e}"))?;
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let dir = openat(scratch, name, flags, Mode::empty()).map_err(|e| format!("opening {name}: {e}"))?;
    fchmod(dir.as_fd(), Mode::from_bits_truncate(mode)).map_err(|e| format!("chmod {name}: {e}"))?;
    Ok(dir)
}

/// A detached overlay of `lower` under `upper` (with its work directory
/// `work`), mounted nosuid and nodev; every layer given as a descriptor.
fn overlay(lower: BorrowedFd<'_>, upper: BorrowedFd<'_>, work: BorrowedFd<'_>) -> Result<OwnedFd, String> {
    const FSOPEN_CLOEXEC: libc::c_uint = 0x1;
    const FSCONFIG_SET_FD: libc::c_uint = 5;
    const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
    const FSMOUNT_CLOEXEC: libc::c_uint = 0x1;
    const MOUNT_ATTR_NOSUID: libc::c_uint = 0x2;
    const MOUNT_ATTR_NODEV: libc::c_uint = 0x4;
    // SAFETY: fsopen reads one NUL-terminated string and returns a new
    // descriptor or -1.
    let context = owned(unsafe { libc::syscall(libc::SYS_fsopen, c"overlay".as_ptr(), FSOPEN_CLOEXEC) }, || {
        "opening an overlay file system context".into()
    })?;
    for (key, fd) in [(c"lowerdir+", lower), (c"upperdir", upper), (c"workdir", work)] {
        // SAFETY: fsconfig reads the NUL-terminated key, a null value and a
        // descriptor, all valid for the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                context.as_raw_fd(),
                FSCONFIG_SET_FD,
                key.as_ptr(),
                std::ptr::null::<libc::c_char>(),
                fd.as_raw_fd(),
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            return Err(format!("giving the working tree's overlay its {}: {e}", key.to_string_lossy()));
        }
    }
    // SAFETY: fsconfig with CMD_CREATE takes the context and no key or value.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            context.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_char>(),
            0,
        )
    };
    if rc != 0 {
        return Err(format!("creating the working tree's overlay: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fsmount takes the context descriptor and two flag words and
    // returns a new descriptor or -1.
    let rc = unsafe {
        libc::syscall(libc::SYS_fsmount, context.as_raw_fd(), FSMOUNT_CLOEXEC, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)
    };
    owned(rc, || "mounting the working tree's overlay".into())
}

/// The descriptor a syscall returned, or its error (`what` says what failed).
fn owned(rc: libc::c_long, what: impl FnOnce() -> String) -> Result<OwnedFd, String> {
    if rc < 0 {
        return Err(format!("{}: {}", what(), std::io::Error::last_os_error()));
    }
    // SAFETY: the kernel just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(rc as i32) })
}

/// After an action's report: what it mounted goes, and the root forgets its
/// misses; the slot is fit for another action only if that worked and
/// nothing of the action is left running.
fn clean_up(slot: &SandboxSpec, leftovers: Leftovers) -> Result<(), String> {
    for dir in &leftovers.mounted {
        umount2(dir, MntFlags::MNT_DETACH).map_err(|e| format!("unmounting {}: {e}", dir.display()))?;
    }
    drop(leftovers.trees);
    forget_misses(slot)?;
    match alone() {
        true => Ok(()),
        false => Err("a process of the action outlived it".into()),
    }
}

/// Makes the root forget the names the action looked up and did not find.
/// Over a root observer, the root overlay keeps such a miss in the kernel's
/// dentry cache, and the next action's lookup of the same name would end
/// there, unseen by the observer (which names undeclared host paths in
/// failure reports). Remounting the overlay's superblock drops its unused
/// dentries, those misses with them.
fn forget_misses(slot: &SandboxSpec) -> Result<(), String> {
    if slot.root_lower.is_none() {
        return Ok(());
    }
    let none: Option<&str> = None;
    let flags = MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount(none, "/", none, flags, none).map_err(|e| format!("remounting the root: {e}"))
}

/// Whether `spec` asks for the slot that `slot` built: the same user, group,
/// toolchain, root observer, working tree place and system call filter.
pub(super) fn same_slot(slot: &SandboxSpec, spec: &SandboxSpec) -> bool {
    (slot.uid, slot.gid, &slot.toolchain, &slot.root_lower, &slot.work_dir, &slot.seccomp_deny)
        == (spec.uid, spec.gid, &spec.toolchain, &spec.root_lower, &spec.work_dir, &spec.seccomp_deny)
}

/// Mounts the detached tree `tree` at `at`.
fn attach(tree: OwnedFd, at: &Path) -> Result<(), String> {
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
    let target = std::ffi::CString::new(at.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: move_mount reads two NUL-terminated strings that outlive the
    // call and two descriptors; `tree` is open for its duration.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc != 0 {
        return Err(format!("attaching a tree at {}: {}", at.display(), std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Whether init is the only process left in its pid namespace.
fn alone() -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else { return false };
    entries.flatten().all(|entry| {
        let name = entry.file_name();
        let is_pid = name.to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()));
        !is_pid || name == "1"
    })
}
