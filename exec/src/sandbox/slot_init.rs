//! A warm slot's init: pid 1 of a sandbox that outlives its actions.
//!
//! It builds the part of the sandbox that is the same for every action
//! (namespaces, root, toolchain, `/proc`, `/dev`) once, pivots into it, and
//! then serves one action after another over its socket:
//!
//! ```text
//! owner → slot   u64 length, SandboxSpec (JSON); with it, descriptors: a
//!                detached copy of the input root, one of the scratch space,
//!                and the action's cgroup `tasks` files open for writing
//! slot → owner   u64 length, SlotReply (JSON)
//! ```
//!
//! Per action it attaches the two trees under its root-only `/.casbuild`,
//! builds the working tree, `/tmp` and `/dev/shm` from them, detaches them
//! again, and runs the command, which joins the cgroups and gets an ipc
//! namespace of its own. Afterwards it kills every process left, checks
//! that it is alone in its pid namespace and unmounts what the action had.
//! It says whether all of that went through (`reusable`); if not, or on a
//! time-out, it exits and the owner starts a new slot.

use std::io::{IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};

use super::helper::{
    build_static_root, children_cpu_micros, create_outputs, enter_namespaces, mount_working_tree, pivot_into,
    report_of, run_command, Run, Waiter,
};
use super::spec::{RunReport, SandboxSpec, ScratchLayout, SlotReply, HIDDEN};

/// The most descriptors one request carries: two trees and the cgroups.
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
                let reply = run_action(run.spec, &spec, fds, waiter);
                let cpu_now = children_cpu_micros();
                let cpu = cpu_now.zip(cpu_before).map(|(now, before)| now.saturating_sub(before));
                cpu_before = cpu_now;
                SlotReply { report: RunReport { cpu_micros: cpu, ..reply.report }, ..reply }
            }
        };
        if let Err(e) = send(&mut socket, &reply) {
            eprintln!("sandbox slot: answering: {e}");
            std::process::exit(1)
        }
        if reply.unfit.is_some() {
            std::process::exit(0)
        }
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

fn send(socket: &mut UnixStream, reply: &SlotReply) -> std::io::Result<()> {
    let body = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    let mut message = (body.len() as u64).to_le_bytes().to_vec();
    message.extend_from_slice(&body);
    socket.write_all(&message)
}

/// Runs one action in the slot built for `slot`.
fn run_action(slot: &SandboxSpec, spec: &SandboxSpec, fds: Vec<OwnedFd>, waiter: &Waiter) -> SlotReply {
    let start = Instant::now();
    let hidden = Path::new("/").join(HIDDEN);
    let (lower, space) = (hidden.join("in"), hidden.join("run"));
    let layout = ScratchLayout::with_space(space.clone(), PathBuf::from("/"), PathBuf::new());
    let ran = (|| -> Result<(RunReport, [PathBuf; 3]), String> {
        if !same_slot(slot, spec) {
            return Err("the action does not fit this slot (user, toolchain or root differ)".into());
        }
        if fds.len() != 2 + spec.cgroup_procs.len() {
            return Err(format!("{} descriptors for an action with {} cgroups", fds.len(), spec.cgroup_procs.len()));
        }
        let mut fds = fds.into_iter();
        let (input, scratch) = (fds.next().expect("counted"), fds.next().expect("counted"));
        let cgroups: Vec<OwnedFd> = fds.collect();
        attach(input, &lower)?;
        attach(scratch, &space)?;
        let (stdout, stderr) = create_outputs(&layout)?;
        let mounted = mount_working_tree(spec, Path::new("/"), &lower, &layout)?;
        // The working tree, /tmp and /dev/shm hold their own references:
        // the trees go from the slot's view before the command starts.
        for dir in [&lower, &space] {
            umount2(dir, MntFlags::MNT_DETACH).map_err(|e| format!("detaching {}: {e}", dir.display()))?;
        }
        let setup_micros = start.elapsed().as_micros() as u64;
        let deadline = spec.timeout_ms.map(|ms| start + std::time::Duration::from_millis(ms));
        let ended = run_command(spec, (stdout.as_fd(), stderr.as_fd()), deadline, waiter, Some(&cgroups))?;
        Ok((report_of(ended, setup_micros, None), mounted))
    })();
    let (mut report, mounted) = match ran {
        Ok(ran) => ran,
        Err(e) => return SlotReply { report: failed(e), unfit: Some("the action's set-up failed".into()) },
    };
    report.wall_micros = start.elapsed().as_micros() as u64;
    // What the action mounted goes; the slot is fit for another action
    // only if that worked and nothing of the action is left running.
    let unmounted = mounted
        .iter()
        .map(|dir| umount2(dir, MntFlags::MNT_DETACH).map_err(|e| format!("unmounting {}: {e}", dir.display())))
        .collect::<Result<Vec<()>, String>>()
        .and_then(|_| forget_misses(slot));
    let unfit = match (unmounted, alone()) {
        _ if report.timed_out => Some("the action timed out".into()),
        _ if report.error.is_some() => Some("the command could not start".into()),
        (Err(e), _) => Some(e),
        (Ok(_), false) => Some("a process of the action outlived it".into()),
        (Ok(_), true) => None,
    };
    SlotReply { report, unfit }
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
