//! Warm sandbox slots, the owner's side (`slot_init` is the slot's).
//!
//! A slot is a long-lived sandbox init for one sandbox user: it keeps its
//! namespaces and its read-only root, and gets for each action a detached
//! copy of the input root and of the scratch space, and the action's
//! cgroups, as descriptors over a socket. The slot reports each action as
//! soon as its processes are gone, and says after cleaning up whether it is
//! as clean as a new one (while the owner collects the outputs); one that
//! is not exits, and the next action of that user gets a new slot.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};

use super::slot_init::{same_slot, MAX_FDS};
use super::spec::{SandboxSpec, SlotReply, SlotSettled};
use super::{helper_error, remove_when_empty, Running, SandboxError};
use crate::cgroup::{ActionGroup, GroupUsage};

/// The largest reply taken from a slot (a report is a few hundred bytes).
const MAX_REPLY: u64 = 1 << 20;

/// How long a slot may take to clean up after an action before it is
/// given up (killed) instead of reused.
const SETTLE_TIME: std::time::Duration = std::time::Duration::from_secs(10);

/// A warm slot, idle or running one action.
pub(super) struct Slot {
    /// What it was built for.
    spec: SandboxSpec,
    socket: tokio::net::UnixStream,
    /// Its init; dropping the slot kills it, and with it the namespaces.
    init: Option<Running>,
    /// The cgroup its actions run in, one after another, and its `tasks`
    /// (or `cgroup.procs`) files open for writing, handed to each action.
    group: Option<(ActionGroup, Vec<OwnedFd>)>,
    /// It has reported an action and not yet said whether it cleaned up.
    settling: bool,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot").field("uid", &self.spec.uid).finish_non_exhaustive()
    }
}

impl Slot {
    /// The slot whose init is `init`, built for `spec`, reached through the
    /// socket that is descriptor `fd` in that init; its actions run in
    /// `group`.
    pub(super) fn new(
        spec: SandboxSpec,
        init: Running,
        fd: RawFd,
        group: Option<ActionGroup>,
    ) -> Result<Self, SandboxError> {
        let group = match group {
            None => None,
            Some(group) => {
                let mut procs = Vec::new();
                for path in group.procs_files() {
                    let file = std::fs::File::options().write(true).open(&path);
                    procs.push(file.map_err(|e| helper_error(&format!("opening {}", path.display()), &e))?.into());
                }
                Some((group, procs))
            }
        };
        // SAFETY: pidfd_getfd takes a pidfd we own, a descriptor number in
        // that process and zero flags, and returns a new descriptor or -1.
        let ours = unsafe { libc::syscall(libc::SYS_pidfd_getfd, init.pidfd.get_ref().as_raw_fd(), fd, 0) };
        if ours < 0 {
            return Err(helper_error("taking the slot's socket", &std::io::Error::last_os_error()));
        }
        // SAFETY: the kernel just returned this descriptor and nothing else owns it.
        let socket = std::os::unix::net::UnixStream::from(unsafe { OwnedFd::from_raw_fd(ours as i32) });
        let socket = socket
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixStream::from_std(socket))
            .map_err(|e| helper_error("the slot's socket", &e))?;
        Ok(Slot { spec, socket, init: Some(init), group, settling: false })
    }

    /// Whether the slot was built for what `spec` asks (its cgroup's
    /// limits included).
    pub(super) fn fits(&self, spec: &SandboxSpec) -> bool {
        same_slot(&self.spec, spec) && self.spec.limits == spec.limits
    }

    /// The files of the slot's cgroups that a process writes to join them.
    pub(super) fn procs_files(&self) -> Vec<PathBuf> {
        self.group.as_ref().map(|(group, _)| group.procs_files()).unwrap_or_default()
    }

    /// Copies of the open `procs_files`, to hand to one action.
    pub(super) fn procs_fds(&self) -> Result<Vec<OwnedFd>, SandboxError> {
        let Some((_, procs)) = &self.group else { return Ok(Vec::new()) };
        procs.iter().map(|fd| fd.try_clone().map_err(|e| helper_error("the slot's cgroup", &e))).collect()
    }

    /// The slot's cgroup counters so far (they add up over its actions).
    pub(super) fn usage(&self) -> Option<GroupUsage> {
        self.group.as_ref().map(|(group, _)| group.usage())
    }

    /// Runs `spec` in the slot: `fds` are the detached input root and
    /// scratch space (with a scratch budget, that space's `tmp` and `shm`
    /// too) and the action's cgroup files. Returns the report; the slot
    /// then cleans up, and [`Slot::settle`] says how that went.
    pub(super) async fn run(&mut self, spec: &SandboxSpec, fds: Vec<OwnedFd>) -> Result<SlotReply, SandboxError> {
        if fds.len() > MAX_FDS {
            return Err(SandboxError::Helper(format!("{} descriptors for one action", fds.len())));
        }
        if self.settling {
            return Err(SandboxError::Helper("the sandbox slot has not settled its last action".into()));
        }
        let failed = |e: std::io::Error| helper_error("the sandbox slot", &e);
        let body = serde_json::to_vec(spec).map_err(|e| helper_error("encoding the spec", &e))?;
        let header = (body.len() as u64).to_le_bytes();
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let socket = &self.socket;
        let sent = socket
            .async_io(Interest::WRITABLE, || {
                let rights = [ControlMessage::ScmRights(&raw)];
                sendmsg::<()>(socket.as_raw_fd(), &[IoSlice::new(&header)], &rights, MsgFlags::MSG_NOSIGNAL, None)
                    .map_err(std::io::Error::from)
            })
            .await
            .map_err(failed)?;
        drop(fds);
        self.socket.write_all(&header[sent..]).await.map_err(failed)?;
        self.socket.write_all(&body).await.map_err(failed)?;
        // The slot answers once the action is over; a slot that died
        // (killed, or it failed to start) closes the socket instead.
        let reply: SlotReply = self.receive("a report").await?;
        self.settling = reply.unfit.is_none();
        Ok(reply)
    }

    /// Waits until the slot has cleaned up after its last action; an error
    /// says why it cannot run another.
    pub(super) async fn settle(&mut self) -> Result<(), String> {
        if !self.settling {
            return Ok(());
        }
        let settled = tokio::time::timeout(SETTLE_TIME, self.receive::<SlotSettled>("its clean-up"))
            .await
            .map_err(|_| format!("it did not clean up within {} s", SETTLE_TIME.as_secs()))?
            .map_err(|e| e.to_string())?;
        self.settling = false;
        settled.unfit.map_or(Ok(()), Err)
    }

    /// Reads one message of the slot's (`what` names it in errors).
    async fn receive<T: serde::de::DeserializeOwned>(&mut self, what: &str) -> Result<T, SandboxError> {
        let failed = |e: std::io::Error| helper_error("the sandbox slot", &e);
        let length = self.socket.read_u64_le().await.map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => SandboxError::Helper(format!("the sandbox slot ended without {what}")),
            _ => failed(e),
        })?;
        if length > MAX_REPLY {
            return Err(SandboxError::Helper(format!("the sandbox slot sent a message of {length} bytes")));
        }
        let mut message = vec![0; length as usize];
        self.socket.read_exact(&mut message).await.map_err(failed)?;
        serde_json::from_slice(&message).map_err(|e| helper_error(&format!("decoding {what}"), &e))
    }

    /// Ends an idle slot: its init reads the end of its socket and exits,
    /// which takes its namespaces, and the mounts it holds, with it.
    pub(super) async fn close(mut self) {
        let _ = self.socket.shutdown().await;
        if let Some(init) = &mut self.init {
            if tokio::time::timeout(std::time::Duration::from_secs(5), init.exited()).await.is_ok() {
                init.finished = true;
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let init = self.init.take();
        if let Some(init) = init.as_ref().filter(|init| !init.finished) {
            init.kill();
        }
        match self.group.take() {
            Some((group, procs)) => {
                drop(procs);
                remove_when_empty(group, init);
            }
            None => drop(init),
        }
    }
}

/// A detached copy of the mount at `path` (only that mount, from `path`
/// down), as a descriptor another mount namespace can attach.
pub(super) fn detached_copy(path: &Path) -> Result<OwnedFd, SandboxError> {
    const OPEN_TREE_CLONE: libc::c_uint = 0x1;
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| helper_error(&format!("{}", path.display()), &e))?;
    // SAFETY: open_tree reads one NUL-terminated string that outlives the
    // call and returns a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, c_path.as_ptr(), OPEN_TREE_CLONE | libc::O_CLOEXEC as u32)
    };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return Err(helper_error(&format!("copying the mount of {}", path.display()), &e));
    }
    // SAFETY: the kernel just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
