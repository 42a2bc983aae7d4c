//! The sandbox flags `casbuild worker` and `casbuild up` share: who actions
//! run as, what they see, and every limit they run under.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use casbuild_exec::cgroup::Cgroups;
use casbuild_exec::runner::RunnerConfig;
use casbuild_mount::MountOptions;

use crate::config::{parse_duration, parse_size};

#[derive(clap::Args, Clone, Debug)]
pub struct SandboxArgs {
    /// A host path visible read-only in every sandbox; repeatable [default: /usr, /bin, /lib*, /sbin and the /etc
    /// files tools need].
    #[arg(long = "toolchain")]
    toolchain: Vec<PathBuf>,
    /// User ids sandboxed commands run as, FIRST-LAST: each running action gets one of its own, so at most
    /// that many run at once. Pick ids no person or service on the host uses.
    #[arg(long, value_parser = parse_uids, default_value = "2990000-2990255")]
    sandbox_uids: (u32, u32),
    /// The group id sandboxed commands run as; only it (and root) may read the /cas mount [default: the first
    /// sandbox uid].
    #[arg(long)]
    sandbox_gid: Option<u32>,
    /// Largest file an action may write, stdout and stderr included; writing past it kills the writer.
    #[arg(long, value_parser = parse_size, default_value = "4GiB")]
    max_file_size: u64,
    /// Most an action may return, outputs, stdout and stderr together; past it no outputs are returned.
    #[arg(long, value_parser = parse_size, default_value = "16GiB")]
    max_output_size: u64,
    /// Processes and threads an action may run at once (its cgroup's pids.max, and RLIMIT_NPROC of its user).
    #[arg(long, default_value_t = 512)]
    max_processes: u64,
    /// Memory of an action, everything it started and what it keeps in its scratch space included.
    #[arg(long, value_parser = parse_size, default_value = "8GiB")]
    max_memory: u64,
    /// Bytes an action may write into its working tree, /tmp and /dev/shm together (a tmpfs of this size).
    #[arg(long, value_parser = parse_size, default_value = "4GiB")]
    max_scratch_size: u64,
    /// The timeout of an action that sets none, like 90s, 30m or 2h.
    #[arg(long, value_parser = parse_duration, default_value = "30m")]
    default_timeout: Duration,
    /// The longest timeout an action may set; an action asking for more is refused.
    #[arg(long, value_parser = parse_duration, default_value = "2h")]
    max_timeout: Duration,
    /// Run actions without a cgroup each (no memory limit, no process limit beyond RLIMIT_NPROC); for hosts
    /// where casbuild may not create cgroups.
    #[arg(long)]
    no_cgroups: bool,
    /// A system call to deny (EPERM) on top of the default seccomp filter (docs/SECURITY.md); repeatable.
    #[arg(long = "seccomp-deny")]
    seccomp_deny: Vec<String>,
    /// Build a new sandbox for every action instead of keeping a warm one per sandbox user that runs one action
    /// after another (docs/adr/0008-warm-sandbox-slots.md); slower, for comparison.
    #[arg(long)]
    cold_sandboxes: bool,
}

/// `FIRST-LAST` (or one id) as a range of user ids, root excluded.
fn parse_uids(text: &str) -> Result<(u32, u32), String> {
    let (first, last) = text.split_once('-').unwrap_or((text, text));
    let parse =
        |s: &str| s.trim().parse::<u32>().map_err(|_| format!("{text:?} is not a uid range like 2990000-2990255"));
    let (first, last) = (parse(first)?, parse(last)?);
    if first == 0 || last < first {
        return Err(format!("{text:?}: give FIRST-LAST with 0 < FIRST <= LAST (root never runs actions)"));
    }
    Ok((first, last))
}

impl SandboxArgs {
    /// Applies the flags to `config` for a host running `slots` actions at once.
    pub fn apply(&self, config: &mut RunnerConfig, slots: u64) -> anyhow::Result<()> {
        let (first, last) = self.sandbox_uids;
        let ids = u64::from(last - first) + 1;
        if slots > ids {
            bail!(
                "--sandbox-uids {first}-{last} has {ids} ids for {slots} slots: each running action needs an id of \
                 its own"
            );
        }
        if self.default_timeout > self.max_timeout {
            bail!("--default-timeout is longer than --max-timeout");
        }
        config.uids = self.sandbox_uids;
        config.gid = self.sandbox_gid.unwrap_or(first);
        config.limits.max_file_bytes = self.max_file_size;
        config.limits.max_processes = self.max_processes;
        config.limits.max_memory_bytes = self.max_memory;
        config.limits.max_scratch_bytes = self.max_scratch_size;
        config.max_output_bytes = self.max_output_size;
        config.default_timeout = self.default_timeout;
        config.max_timeout = self.max_timeout;
        if !self.toolchain.is_empty() {
            if let Some(bad) = self.toolchain.iter().find(|p| !p.is_absolute()) {
                bail!("--toolchain {} must be an absolute path", bad.display());
            }
            config.toolchain = self.toolchain.clone();
        }
        // Unknown names are an error now, not at the first action.
        casbuild_exec::seccomp::Filters::compile(&self.seccomp_deny).map_err(anyhow::Error::msg)?;
        config.seccomp_deny = self.seccomp_deny.clone();
        config.warm_sandboxes = !self.cold_sandboxes;
        if !self.no_cgroups {
            let cgroups = Cgroups::host()
                .map_err(anyhow::Error::msg)
                .context("setting up a cgroup per action (run as root, or pass --no-cgroups to go without)")?;
            config.cgroups = Some(cgroups);
        }
        Ok(())
    }

    /// How to mount /cas: readable by root and the sandbox group only.
    pub fn mount_options(&self) -> MountOptions {
        MountOptions { readers: Some(self.sandbox_gid.unwrap_or(self.sandbox_uids.0)), ..Default::default() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_ranges_parse_with_clear_errors() {
        assert_eq!(parse_uids("100-163"), Ok((100, 163)));
        assert_eq!(parse_uids("61234"), Ok((61234, 61234)));
        assert!(parse_uids("0-10").unwrap_err().contains("root"));
        assert!(parse_uids("9-3").is_err());
    }
}
