//! Naming denied network access: the sandbox's pid 1 asks the kernel (a
//! seccomp filter whose answer to `connect` is "ask the listener") to be
//! told of every `connect` in the sandbox. A connection to anything but
//! loopback fails with ENETUNREACH, as it would in the empty network
//! namespace anyway, and is recorded for the action's report:
//! `network: connect 10.0.0.1:443 denied`.
//!
//! The namespace is the wall; this is only the witness. Connections it lets
//! through (loopback, Unix sockets) go on inside the empty namespace, so a
//! command that changes its address after the check gains nothing.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use crate::seccomp::{answer, install_program, jump, load, ARCH, AUDIT_ARCH, NR};

/// At most this many denied connections are recorded (the first ones).
const MOST: usize = 20;

/// The listener of a seccomp filter that reports every `connect`.
pub struct ConnectWatch {
    listener: OwnedFd,
}

impl ConnectWatch {
    /// Installs the filter on the calling process (and so on everything it
    /// forks from now on). Needs root or `no_new_privs`.
    pub fn install() -> Result<Self, String> {
        let program = [
            load(ARCH),
            jump(libc::BPF_JEQ, AUDIT_ARCH, 0, 3),
            load(NR),
            jump(libc::BPF_JEQ, libc::SYS_connect as u32, 0, 1),
            answer(libc::SECCOMP_RET_USER_NOTIF),
            answer(libc::SECCOMP_RET_ALLOW),
        ];
        let fd = install_program(&program, libc::SECCOMP_FILTER_FLAG_NEW_LISTENER)
            .map_err(|e| format!("installing the connect watch: {e}"))?;
        // SAFETY: the kernel just returned this descriptor and nothing else owns it.
        Ok(ConnectWatch { listener: unsafe { OwnedFd::from_raw_fd(fd as i32) } })
    }

    /// Receives and answers one notification (call it when the listener is
    /// readable); a denied connection is added to `denied`.
    pub fn answer_one(&self, denied: &mut Vec<String>) {
        // SAFETY: seccomp_notif is plain data; all-zero is the valid initial
        // value the kernel requires for RECV.
        let mut notification: libc::seccomp_notif = unsafe { std::mem::zeroed() };
        // SAFETY: RECV writes one seccomp_notif into the struct we pass.
        let received = unsafe {
            libc::ioctl(self.listener.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_RECV, &mut notification as *mut _)
        };
        if received < 0 {
            // EINTR, or ENOENT when the caller died before we looked.
            return;
        }
        let args = notification.data.args;
        let address = read_sockaddr(notification.pid, args[1], args[2]);
        // The memory read counts only if the caller still waits in this call.
        let mut id = notification.id;
        // SAFETY: ID_VALID reads the u64 we pass.
        let valid =
            unsafe { libc::ioctl(self.listener.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_ID_VALID, &mut id as *mut u64) }
                == 0;
        let mut response = libc::seccomp_notif_resp { id: notification.id, val: 0, error: 0, flags: 0 };
        match address {
            Some(addr) if valid && !addr.ip().is_loopback() => {
                response.error = -libc::ENETUNREACH;
                let line = format!("network: connect {addr} denied");
                if denied.len() < MOST && !denied.contains(&line) {
                    denied.push(line);
                }
            }
            _ => response.flags = libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32,
        }
        // SAFETY: SEND reads the response we pass. A caller that died in
        // the meantime makes it fail with ENOENT, which is fine.
        unsafe { libc::ioctl(self.listener.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_SEND, &mut response as *mut _) };
    }
}

impl AsFd for ConnectWatch {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }
}

/// The IPv4 or IPv6 address a process passed to connect, read from its
/// memory; `None` for other families or when it cannot be read.
fn read_sockaddr(pid: u32, pointer: u64, length: u64) -> Option<SocketAddr> {
    let mem = File::open(format!("/proc/{pid}/mem")).ok()?;
    let mut buf = [0u8; 28];
    let length = (length as usize).min(buf.len());
    let read = mem.read_at(&mut buf[..length], pointer).ok()?;
    parse_sockaddr(&buf[..read])
}

/// A `sockaddr_in` or `sockaddr_in6` in the machine's byte order for the
/// family and network order for port and address.
fn parse_sockaddr(bytes: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes(bytes.get(0..2)?.try_into().ok()?);
    let port = u16::from_be_bytes(bytes.get(2..4)?.try_into().ok()?);
    let ip = match i32::from(family) {
        libc::AF_INET => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(bytes.get(4..8)?).ok()?)),
        libc::AF_INET6 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes.get(8..24)?).ok()?)),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_addresses_are_read_as_the_kernel_lays_them_out() {
        let mut v4 = vec![0u8; 16];
        v4[0..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        v4[2..4].copy_from_slice(&443u16.to_be_bytes());
        v4[4..8].copy_from_slice(&[10, 0, 0, 1]);
        assert_eq!(parse_sockaddr(&v4), Some("10.0.0.1:443".parse().unwrap()));
        let mut v6 = vec![0u8; 28];
        v6[0..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
        v6[2..4].copy_from_slice(&80u16.to_be_bytes());
        v6[23] = 1;
        assert_eq!(parse_sockaddr(&v6), Some("[::1]:80".parse().unwrap()));
        let unix = (libc::AF_UNIX as u16).to_ne_bytes();
        assert_eq!(parse_sockaddr(&unix), None);
        assert_eq!(parse_sockaddr(&[]), None);
    }
}
