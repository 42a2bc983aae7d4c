//! `casbuild exec`: run one action on this host, in the sandbox over a /cas
//! mount — a stored Action by digest, or a command over a local directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use casbuild_cas::action::ActionSpec;
use casbuild_cas::digest::{Digest, DigestFunction};
use casbuild_cas::store::{BlobStore, RemoteStore};
use casbuild_exec::cgroup::Cgroups;
use casbuild_exec::runner::{unread_inputs, ActionError, Execution, Runner, RunnerConfig};
use casbuild_mount::MountOptions;
use casbuild_proto::reapi::action_cache_client::ActionCacheClient;
use casbuild_proto::reapi::UpdateActionResultRequest;

use crate::cmd::cas::{download_file, download_tree, file_paths, upload, OutputRoot, Remote};
use crate::cmd::mount::{mount_cas, open_cache, retrying};
use crate::config::{default_data_dir, parse_size};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    remote: Remote,
    /// Where to mount the CAS [default: a private directory under the cache dir].
    #[arg(long)]
    mount: Option<PathBuf>,
    /// Local blob cache [default: $XDG_CACHE_HOME/casbuild/mount-cache].
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Byte budget of the local blob cache.
    #[arg(long, value_parser = parse_size, default_value = "20GiB")]
    cache_size: u64,
    /// Do not write the result to the action cache.
    #[arg(long)]
    no_cache: bool,
    /// Upload this directory as the input root and run the command after `--`.
    #[arg(long)]
    input: Option<PathBuf>,
    /// A declared output (relative to the input root), downloaded after the run; repeatable.
    #[arg(long = "output")]
    outputs: Vec<String>,
    /// NAME=VALUE for the command's environment; repeatable [default: PATH=/usr/local/bin:/usr/bin:/bin].
    #[arg(long = "env")]
    env: Vec<String>,
    /// Where outputs are downloaded [default: the --input directory].
    #[arg(long)]
    out: Option<PathBuf>,
    /// After a successful run, list the declared inputs the command never touched.
    #[arg(long)]
    show_unread: bool,
    /// Seconds the command may run.
    #[arg(long)]
    timeout: Option<u64>,
    /// Most the command may return, outputs, stdout and stderr together.
    #[arg(long, value_parser = parse_size, default_value = "16GiB")]
    max_output_size: u64,
    /// HASH/SIZE of a stored Action to run (instead of --input and a command).
    action: Option<String>,
    /// The command and its arguments, after `--`.
    #[arg(last = true)]
    command: Vec<String>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let function = args.remote.digest_function;
    // Its errors name the address and say what to check.
    let remote = args.remote.connect().await?;

    // What to run: a stored action, or one built from --input and the command.
    let (action_digest, input_dir) = match (&args.action, &args.input) {
        (Some(text), None) if args.command.is_empty() => {
            (Digest::parse(function, text).with_context(|| format!("action digest {text:?}"))?, None)
        }
        (None, Some(dir)) if !args.command.is_empty() => (store_action(&remote, &args, dir).await?, Some(dir.clone())),
        _ => bail!("give either ACTION_DIGEST, or --input DIR and a command after `--`"),
    };
    eprintln!("casbuild: action {action_digest}");

    let cache_dir = args.cache_dir.clone().unwrap_or_else(|| default_data_dir().join("mount-cache"));
    let mountpoint =
        args.mount.clone().unwrap_or_else(|| default_data_dir().join(format!("exec-mount-{}", std::process::id())));
    let scratch = default_data_dir().join(format!("exec-scratch-{}", std::process::id()));
    let mut config = RunnerConfig::new(scratch.clone(), std::env::current_exe().context("finding casbuild itself")?);
    config.max_output_bytes = args.max_output_size;
    match Cgroups::host() {
        Ok(cgroups) => config.cgroups = Some(cgroups),
        Err(e) => eprintln!("casbuild: warning: the action runs without a memory or process-count limit: {e}"),
    }
    let timeout = Duration::from_secs(60);
    let options = MountOptions { readers: Some(config.gid), ..Default::default() };
    let local = open_cache(&cache_dir, args.cache_size).await?;
    let cas = retrying(remote.clone());
    let instance = &args.remote.instance;
    let mount = Arc::new(mount_cas(&mountpoint, local, cas.clone(), instance, timeout, options).await?);
    let runner = Runner::new(config, mount.clone(), cas)?;
    let outcome = runner.execute_in(instance, &action_digest).await;
    runner.close().await;
    drop(runner);
    casbuild_exec::scratch::flush();
    let _ = std::fs::remove_dir_all(&scratch);
    if let Ok(mount) = Arc::try_unwrap(mount) {
        tokio::task::spawn_blocking(move || mount.unmount()).await?.context("unmounting")?;
        let _ = std::fs::remove_dir(&mountpoint);
    }
    let execution = match outcome {
        Ok(execution) => execution,
        Err(ActionError::MissingBlobs(digests)) => bail!(
            "the CAS lacks blobs this action needs: {}",
            digests.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
        ),
        Err(e) => return Err(e.into()),
    };

    let cacheable = !args.no_cache && !execution.do_not_cache && execution.result.exit_code == 0;
    if cacheable {
        let mut client = ActionCacheClient::new(remote.channel());
        client
            .update_action_result(UpdateActionResultRequest {
                instance_name: args.remote.instance.clone(),
                action_digest: Some(action_digest.to_proto()),
                action_result: Some(execution.result.clone()),
                results_cache_policy: None,
                digest_function: function.to_proto() as i32,
            })
            .await
            .context("writing the action cache")?;
    }
    match input_dir {
        None => print_result(&execution, function),
        Some(dir) => {
            let out = args.out.clone().unwrap_or(dir);
            replay_and_download(&remote, &execution, function, &out).await?;
            // A failed run's report is at the end of its stderr already.
            if execution.result.exit_code == 0 {
                for line in execution.message.lines() {
                    eprintln!("casbuild: {line}");
                }
            }
        }
    }
    if args.show_unread && execution.result.exit_code == 0 {
        let declared = file_paths(&remote, &execution.input_root).await?;
        for path in unread_inputs(declared.iter().map(String::as_str), &execution.access) {
            eprintln!("casbuild: unread input: {path}");
        }
    }
    std::process::exit(execution.result.exit_code.clamp(0, 255))
}

/// Uploads the input directory, the Command and the Action; returns the Action's digest.
async fn store_action(remote: &RemoteStore, args: &Args, dir: &Path) -> anyhow::Result<Digest> {
    let function = args.remote.digest_function;
    let input_root = upload(remote, dir, function).await?;
    let mut env = BTreeMap::new();
    for pair in &args.env {
        match pair.split_once('=') {
            Some((name, value)) if !name.is_empty() => env.insert(name.to_owned(), value.to_owned()),
            _ => bail!("--env {pair:?} must look like NAME=VALUE"),
        };
    }
    env.entry("PATH".to_owned()).or_insert_with(|| "/usr/local/bin:/usr/bin:/bin".to_owned());
    let action = ActionSpec {
        argv: args.command.clone(),
        env,
        outputs: args.outputs.clone(),
        input_root: Some(input_root),
        timeout_secs: args.timeout,
        platform: BTreeMap::new(),
    }
    .encode(function);
    remote.write_batch(action.blobs).await?;
    Ok(action.digest)
}

fn print_result(execution: &Execution, function: DigestFunction) {
    let result = &execution.result;
    let digest = |d: &Option<casbuild_proto::reapi::Digest>| {
        d.as_ref().and_then(|d| Digest::from_proto(function, d).ok()).map(|d| d.to_string()).unwrap_or_default()
    };
    println!("exit_code: {}", result.exit_code);
    for file in &result.output_files {
        let exec = if file.is_executable { " executable" } else { "" };
        println!("output_file: {} {}{exec}", file.path, digest(&file.digest));
    }
    for dir in &result.output_directories {
        println!("output_directory: {} tree {}", dir.path, digest(&dir.tree_digest));
    }
    for link in &result.output_symlinks {
        println!("output_symlink: {} -> {}", link.path, link.target);
    }
    println!("stdout: {}", digest(&result.stdout_digest));
    println!("stderr: {}", digest(&result.stderr_digest));
    if let Some(meta) = &result.execution_metadata {
        println!("worker: {}", meta.worker);
    }
    for line in execution.message.lines() {
        println!("message: {line}");
    }
}

/// Writes the command's stdout and stderr to ours and downloads its outputs into `out`.
async fn replay_and_download(
    remote: &RemoteStore,
    execution: &Execution,
    function: DigestFunction,
    out: &Path,
) -> anyhow::Result<()> {
    use std::io::Write;
    let result = &execution.result;
    let proto = |d: &Option<casbuild_proto::reapi::Digest>| -> anyhow::Result<Option<Digest>> {
        d.as_ref().map(|d| Digest::from_proto(function, d)).transpose().map_err(anyhow::Error::from)
    };
    for (digest, to_stdout) in [(&result.stdout_digest, true), (&result.stderr_digest, false)] {
        if let Some(digest) = proto(digest)?.filter(|d| !d.is_empty_blob()) {
            let bytes = remote.read_all(&digest).await?;
            if to_stdout {
                std::io::stdout().write_all(&bytes)?;
            } else {
                std::io::stderr().write_all(&bytes)?;
            }
        }
    }
    let root = OutputRoot::open(out)?;
    for file in &result.output_files {
        let digest = proto(&file.digest)?.context("an output file without a digest")?;
        let dest = root.place(&file.path)?;
        download_file(remote, &digest, &dest, file.is_executable).await?;
    }
    for dir in &result.output_directories {
        let digest = proto(&dir.tree_digest)?.context("an output directory without a tree")?;
        let dest = root.place(&dir.path)?;
        download_tree(remote, &digest, &dest).await?;
    }
    // Links last: nothing is written through a link the result made.
    for link in &result.output_symlinks {
        let dest = root.place(&link.path)?;
        std::os::unix::fs::symlink(&link.target, &dest).with_context(|| format!("symlink {}", dest.display()))?;
    }
    Ok(())
}
