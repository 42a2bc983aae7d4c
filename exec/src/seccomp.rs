//! The seccomp filter every sandboxed command runs under: system calls a
//! build never needs, and that widen what a hostile action can reach, fail
//! with EPERM (or ENOSYS, where callers fall back to an older call).
//!
//! The namespaces and the unprivileged user already stop most of these;
//! the filter is a second wall for the kernel interfaces that are open to
//! unprivileged users (new user namespaces, keyrings shared per uid, BPF,
//! perf events, userfaultfd, io_uring) and the ones a kernel bug would turn
//! into an escape. The list is in `docs/SECURITY.md`; `casbuild worker
//! --seccomp-deny NAME` adds to it.

use seccompiler::{sock_filter, BpfMap, BpfProgram, TargetArch};
use serde_json::json;

/// Denied with EPERM, whatever their arguments: (name, why).
pub const DENIED: &[(&str, &str)] = &[
    ("mount", "file system mounts"),
    ("umount2", "file system mounts"),
    ("pivot_root", "file system mounts"),
    ("move_mount", "file system mounts"),
    ("open_tree", "file system mounts"),
    ("fsopen", "file system mounts"),
    ("fsconfig", "file system mounts"),
    ("fsmount", "file system mounts"),
    ("fspick", "file system mounts"),
    ("mount_setattr", "file system mounts"),
    ("chroot", "file system mounts"),
    ("setns", "joining other namespaces"),
    ("keyctl", "kernel keyrings (shared by a uid across actions)"),
    ("add_key", "kernel keyrings"),
    ("request_key", "kernel keyrings"),
    ("bpf", "BPF programs and maps"),
    ("perf_event_open", "performance counters of the host"),
    ("userfaultfd", "a common exploit primitive"),
    ("kexec_load", "replacing the kernel"),
    ("kexec_file_load", "replacing the kernel"),
    ("init_module", "kernel modules"),
    ("finit_module", "kernel modules"),
    ("delete_module", "kernel modules"),
    ("swapon", "host swap"),
    ("swapoff", "host swap"),
    ("reboot", "the host's power"),
    ("acct", "host process accounting"),
    ("quotactl", "host disk quotas"),
    ("syslog", "the kernel log"),
    ("open_by_handle_at", "opening files by handle, around path checks"),
    ("name_to_handle_at", "file handles"),
    ("iopl", "raw I/O ports"),
    ("ioperm", "raw I/O ports"),
    ("settimeofday", "the host clock"),
    ("clock_settime", "the host clock"),
    ("clock_adjtime", "the host clock"),
    ("adjtimex", "the host clock"),
    ("lookup_dcookie", "kernel profiling"),
    ("vhangup", "terminals"),
];

/// Denied with ENOSYS, so that libraries fall back to an older call:
/// `clone3` (its flags are in memory a filter cannot read; glibc then uses
/// `clone`, whose flags it can) and io_uring (a large kernel surface that
/// has carried many escapes; callers fall back to plain I/O).
pub const UNAVAILABLE: &[&str] = &["clone3", "io_uring_setup", "io_uring_enter", "io_uring_register"];

/// New user namespaces: denied for `unshare` and `clone` when the flags ask
/// for one (an unprivileged user may otherwise create them and gain
/// capabilities inside, the usual first step of a kernel exploit).
const NEW_USER_NAMESPACE: u32 = libc::CLONE_NEWUSER as u32;

/// `AUDIT_ARCH_*` of the machine the sandbox runs on.
#[cfg(target_arch = "x86_64")]
pub(crate) const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
pub(crate) const AUDIT_ARCH: u32 = 0xC000_00B7;
#[cfg(target_arch = "riscv64")]
pub(crate) const AUDIT_ARCH: u32 = 0xC000_00F3;

/// Offsets in `seccomp_data`: the call's number, its architecture, and the
/// low half of its first argument (little-endian machines).
pub(crate) const NR: u32 = 0;
pub(crate) const ARCH: u32 = 4;
#[cfg(target_endian = "little")]
const ARG0_LOW: u32 = 16;

/// What the filter answers a call of the default lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Verdict {
    /// EPERM.
    Deny,
    /// ENOSYS.
    Unavailable,
    /// EPERM when the flags (first argument) ask for a new user namespace.
    DenyNewUserNamespace,
}

/// The number of a call of the default lists on this architecture; `None`
/// for a call this architecture does not have (it cannot be made).
fn number(name: &str) -> Option<u32> {
    let nr = match name {
        "mount" => libc::SYS_mount,
        "umount2" => libc::SYS_umount2,
        "pivot_root" => libc::SYS_pivot_root,
        "move_mount" => libc::SYS_move_mount,
        "open_tree" => libc::SYS_open_tree,
        "fsopen" => libc::SYS_fsopen,
        "fsconfig" => libc::SYS_fsconfig,
        "fsmount" => libc::SYS_fsmount,
        "fspick" => libc::SYS_fspick,
        "mount_setattr" => libc::SYS_mount_setattr,
        "chroot" => libc::SYS_chroot,
        "setns" => libc::SYS_setns,
        "keyctl" => libc::SYS_keyctl,
        "add_key" => libc::SYS_add_key,
        "request_key" => libc::SYS_request_key,
        "bpf" => libc::SYS_bpf,
        "perf_event_open" => libc::SYS_perf_event_open,
        "userfaultfd" => libc::SYS_userfaultfd,
        "kexec_load" => libc::SYS_kexec_load,
        "kexec_file_load" => libc::SYS_kexec_file_load,
        "init_module" => libc::SYS_init_module,
        "finit_module" => libc::SYS_finit_module,
        "delete_module" => libc::SYS_delete_module,
        "swapon" => libc::SYS_swapon,
        "swapoff" => libc::SYS_swapoff,
        "reboot" => libc::SYS_reboot,
        "acct" => libc::SYS_acct,
        "quotactl" => libc::SYS_quotactl,
        "syslog" => libc::SYS_syslog,
        "open_by_handle_at" => libc::SYS_open_by_handle_at,
        "name_to_handle_at" => libc::SYS_name_to_handle_at,
        #[cfg(target_arch = "x86_64")]
        "iopl" => libc::SYS_iopl,
        #[cfg(target_arch = "x86_64")]
        "ioperm" => libc::SYS_ioperm,
        "settimeofday" => libc::SYS_settimeofday,
        "clock_settime" => libc::SYS_clock_settime,
        "clock_adjtime" => libc::SYS_clock_adjtime,
        "adjtimex" => libc::SYS_adjtimex,
        "lookup_dcookie" => libc::SYS_lookup_dcookie,
        "vhangup" => libc::SYS_vhangup,
        "clone3" => libc::SYS_clone3,
        "io_uring_setup" => libc::SYS_io_uring_setup,
        "io_uring_enter" => libc::SYS_io_uring_enter,
        "io_uring_register" => libc::SYS_io_uring_register,
        "clone" => libc::SYS_clone,
        "unshare" => libc::SYS_unshare,
        _ => return None,
    };
    u32::try_from(nr).ok()
}

fn statement(code: u32, k: u32) -> sock_filter {
    sock_filter { code: code as u16, jt: 0, jf: 0, k }
}

/// A BPF comparison of the accumulator with `k` (`op`: `BPF_JEQ`, ...).
pub(crate) fn jump(op: u32, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code: (libc::BPF_JMP | op | libc::BPF_K) as u16, jt, jf, k }
}

/// A BPF load of the `seccomp_data` word at `offset`.
pub(crate) fn load(offset: u32) -> sock_filter {
    statement(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, offset)
}

/// A BPF return of `action` (`SECCOMP_RET_*`).
pub(crate) fn answer(action: u32) -> sock_filter {
    statement(libc::BPF_RET | libc::BPF_K, action)
}

/// Installs `program` on the calling thread with seccomp `flags`; returns
/// what the kernel returns (a listener's descriptor with
/// `SECCOMP_FILTER_FLAG_NEW_LISTENER`). Needs `no_new_privs` or root.
pub(crate) fn install_program(program: &[sock_filter], flags: libc::c_ulong) -> std::io::Result<i64> {
    let len = u16::try_from(program.len()).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let fprog = libc::sock_fprog { len, filter: program.as_ptr() as *mut libc::sock_filter };
    // SAFETY: seccompiler's `sock_filter` is `repr(C)` with the kernel's
    // fields in the kernel's order (code, jt, jf, k), as `libc::sock_filter`
    // is; seccomp(2) copies the program `fprog` points at, and both outlive
    // the call.
    let rc = unsafe { libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, flags, &fprog) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}

fn errno(code: i32) -> u32 {
    libc::SECCOMP_RET_ERRNO | (code as u32 & libc::SECCOMP_RET_DATA)
}

/// The default lists as one program: the architecture is checked, then the
/// call's number is found by binary search. A chain of comparisons costs
/// one step per rule on every call the command makes, and the kernel runs
/// the program for every call number when it installs it (to cache what is
/// always allowed): with this list that made installing it take ~0.3 ms per
/// action, where a search takes a few steps.
fn default_program() -> Result<BpfProgram, String> {
    let listed = DENIED.iter().map(|(name, _)| (*name, Verdict::Deny));
    let listed = listed.chain(UNAVAILABLE.iter().map(|name| (*name, Verdict::Unavailable)));
    let listed = listed.chain(["clone", "unshare"].map(|name| (name, Verdict::DenyNewUserNamespace)));
    let mut calls: Vec<(u32, Verdict)> = listed.filter_map(|(name, verdict)| Some((number(name)?, verdict))).collect();
    calls.sort();
    calls.dedup_by_key(|(nr, _)| *nr);
    let mut program = vec![load(ARCH), jump(libc::BPF_JEQ, AUDIT_ARCH, 1, 0), answer(libc::SECCOMP_RET_KILL_PROCESS)];
    program.push(load(NR));
    // The x32 ABI's calls (numbers with bit 30 set) have x86_64's
    // architecture value: none is available.
    #[cfg(target_arch = "x86_64")]
    program.extend([jump(libc::BPF_JGE, 0x4000_0000, 0, 1), answer(errno(libc::ENOSYS))]);
    program.extend(search(&calls)?);
    Ok(program)
}

/// Instructions that answer `calls` (sorted by number; the number is in the
/// accumulator) and allow every other call.
fn search(calls: &[(u32, Verdict)]) -> Result<Vec<sock_filter>, String> {
    if calls.len() <= 4 {
        let mut out = Vec::new();
        for &(nr, verdict) in calls {
            let action = match verdict {
                Verdict::Deny => vec![answer(errno(libc::EPERM))],
                Verdict::Unavailable => vec![answer(errno(libc::ENOSYS))],
                Verdict::DenyNewUserNamespace => vec![
                    load(ARG0_LOW),
                    jump(libc::BPF_JSET, NEW_USER_NAMESPACE, 0, 1),
                    answer(errno(libc::EPERM)),
                    answer(libc::SECCOMP_RET_ALLOW),
                ],
            };
            out.push(jump(libc::BPF_JEQ, nr, 0, action.len() as u8));
            out.extend(action);
        }
        out.push(answer(libc::SECCOMP_RET_ALLOW));
        return Ok(out);
    }
    let middle = calls.len() / 2;
    let below = search(&calls[..middle])?;
    let above = search(&calls[middle..])?;
    let skip = u8::try_from(below.len()).map_err(|_| "the seccomp filter grew too large to jump over".to_owned())?;
    let mut out = vec![jump(libc::BPF_JGE, calls[middle].0, skip, 0)];
    out.extend(below);
    out.extend(above);
    Ok(out)
}

/// The compiled filters, installed together (the kernel applies every one).
pub struct Filters {
    programs: Vec<BpfProgram>,
}

fn rule(name: &str) -> serde_json::Value {
    json!({ "syscall": name })
}

impl Filters {
    /// The default filter plus, when given, one denying the `extra` calls
    /// (by name) with EPERM. Unknown names are an error naming them.
    pub fn compile(extra: &[String]) -> Result<Self, String> {
        let mut programs = vec![default_program()?];
        if !extra.is_empty() {
            let arch = TargetArch::try_from(std::env::consts::ARCH)
                .map_err(|_| format!("seccomp filters are not supported on {}", std::env::consts::ARCH))?;
            let denied: Vec<serde_json::Value> = extra.iter().map(|name| rule(name)).collect();
            let spec = json!({
                "extra": { "mismatch_action": "allow", "match_action": { "errno": libc::EPERM }, "filter": denied },
            });
            let mut map: BpfMap = seccompiler::compile_from_json(spec.to_string().as_bytes(), arch)
                .map_err(|e| format!("compiling the seccomp filter with --seccomp-deny {}: {e}", extra.join(",")))?;
            programs.extend(map.remove("extra"));
        }
        Ok(Filters { programs })
    }

    /// Installs the filters on the calling thread; they are inherited by
    /// every child and kept across execve. Needs `no_new_privs` (or root).
    pub fn install(&self) -> Result<(), String> {
        for program in &self.programs {
            install_program(program, 0).map_err(|e| format!("installing the seccomp filter: {e}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_filter_compiles_and_unknown_names_are_named() {
        assert!(Filters::compile(&[]).is_ok());
        assert!(Filters::compile(&["ptrace".into()]).is_ok());
        let err = Filters::compile(&["no_such_call".into()]).err().unwrap();
        assert!(err.contains("--seccomp-deny no_such_call"), "{err}");
    }

    /// Runs `program` (of the instructions the generator uses) on one call;
    /// returns the answer and the number of instructions run.
    fn run(program: &[sock_filter], arch: u32, nr: u32, arg0: u64) -> (u32, usize) {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_ne_bytes());
        data[4..8].copy_from_slice(&arch.to_ne_bytes());
        data[16..24].copy_from_slice(&arg0.to_ne_bytes());
        let (mut pc, mut a, mut steps) = (0usize, 0u32, 0usize);
        loop {
            let i = &program[pc];
            steps += 1;
            let code = u32::from(i.code);
            if code == libc::BPF_LD | libc::BPF_W | libc::BPF_ABS {
                a = u32::from_ne_bytes(data[i.k as usize..][..4].try_into().unwrap());
                pc += 1;
            } else if code == libc::BPF_RET | libc::BPF_K {
                return (i.k, steps);
            } else {
                assert_eq!(code & 0x07, libc::BPF_JMP, "unexpected instruction {code:#x}");
                let taken = match code & 0xf0 {
                    libc::BPF_JEQ => a == i.k,
                    libc::BPF_JGE => a >= i.k,
                    libc::BPF_JSET => a & i.k != 0,
                    other => panic!("unexpected jump {other:#x}"),
                };
                pc += 1 + usize::from(if taken { i.jt } else { i.jf });
            }
        }
    }

    #[test]
    fn the_default_program_answers_every_call_as_the_lists_say_in_a_few_steps() {
        let program = default_program().unwrap();
        let listed = |names: &[&str], nr: u32| names.iter().any(|name| number(name) == Some(nr));
        let denied: Vec<&str> = DENIED.iter().map(|(name, _)| *name).collect();
        let mut longest = 0;
        for nr in 0..1024u32 {
            for arg0 in [0, u64::from(NEW_USER_NAMESPACE), libc::CLONE_NEWNS as u64 | libc::SIGCHLD as u64] {
                let expected = if listed(&denied, nr) {
                    errno(libc::EPERM)
                } else if listed(UNAVAILABLE, nr) {
                    errno(libc::ENOSYS)
                } else if listed(&["clone", "unshare"], nr) && arg0 & u64::from(NEW_USER_NAMESPACE) != 0 {
                    errno(libc::EPERM)
                } else {
                    libc::SECCOMP_RET_ALLOW
                };
                let (answer, steps) = run(&program, AUDIT_ARCH, nr, arg0);
                assert_eq!(answer, expected, "call {nr} with flags {arg0:#x}");
                longest = longest.max(steps);
            }
        }
        let nr = |n: libc::c_long| n as u32;
        assert_eq!(run(&program, AUDIT_ARCH, nr(libc::SYS_mount), 0).0, errno(libc::EPERM));
        assert_eq!(run(&program, AUDIT_ARCH, nr(libc::SYS_clone3), 0).0, errno(libc::ENOSYS));
        assert_eq!(run(&program, AUDIT_ARCH, nr(libc::SYS_read), 0).0, libc::SECCOMP_RET_ALLOW);
        assert_eq!(run(&program, AUDIT_ARCH ^ 1, nr(libc::SYS_read), 0).0, libc::SECCOMP_RET_KILL_PROCESS);
        #[cfg(target_arch = "x86_64")]
        assert_eq!(run(&program, AUDIT_ARCH, 0x4000_0000 | nr(libc::SYS_read), 0).0, errno(libc::ENOSYS));
        assert!(longest <= 16, "a search, not a chain: {longest} steps for the slowest call");
    }
}
