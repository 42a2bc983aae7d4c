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

use seccompiler::{BpfMap, BpfProgram, TargetArch};
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
const NEW_USER_NAMESPACE: u64 = libc::CLONE_NEWUSER as u64;

/// The compiled filters, installed together (the kernel applies every one).
pub struct Filters {
    programs: Vec<BpfProgram>,
}

fn rule(name: &str) -> serde_json::Value {
    json!({ "syscall": name })
}

/// `name` with its flags argument (`index`) asking for a new user namespace.
fn user_namespace_rule(name: &str, index: u8) -> serde_json::Value {
    json!({
        "syscall": name,
        "args": [{ "index": index, "type": "qword", "op": { "masked_eq": NEW_USER_NAMESPACE }, "val": NEW_USER_NAMESPACE }]
    })
}

impl Filters {
    /// The default filters plus `extra` syscall names denied with EPERM.
    /// Unknown names are an error naming them.
    pub fn compile(extra: &[String]) -> Result<Self, String> {
        let arch = TargetArch::try_from(std::env::consts::ARCH)
            .map_err(|_| format!("seccomp filters are not supported on {}", std::env::consts::ARCH))?;
        let mut denied: Vec<serde_json::Value> =
            DENIED.iter().map(|(name, _)| rule(name)).chain(extra.iter().map(|name| rule(name))).collect();
        denied.push(user_namespace_rule("unshare", 0));
        // clone's flags are its first argument on every supported architecture.
        denied.push(user_namespace_rule("clone", 0));
        let unavailable: Vec<serde_json::Value> = UNAVAILABLE.iter().map(|name| rule(name)).collect();
        let spec = json!({
            "denied": { "mismatch_action": "allow", "match_action": { "errno": libc::EPERM }, "filter": denied },
            "unavailable": { "mismatch_action": "allow", "match_action": { "errno": libc::ENOSYS }, "filter": unavailable },
        });
        let text = spec.to_string();
        let mut map: BpfMap = seccompiler::compile_from_json(text.as_bytes(), arch).map_err(|e| match extra {
            [] => format!("compiling the seccomp filter: {e}"),
            _ => format!("compiling the seccomp filter with --seccomp-deny {}: {e}", extra.join(",")),
        })?;
        let programs = ["denied", "unavailable"].iter().filter_map(|name| map.remove(*name)).collect();
        Ok(Filters { programs })
    }

    /// Installs the filters on the calling thread; they are inherited by
    /// every child and kept across execve. Needs `no_new_privs` (or root).
    pub fn install(&self) -> Result<(), String> {
        for program in &self.programs {
            seccompiler::apply_filter(program).map_err(|e| format!("installing the seccomp filter: {e}"))?;
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
}
