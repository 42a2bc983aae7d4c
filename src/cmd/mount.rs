//! `casbuild mount`: the /cas filesystem of a remote CAS, for inspection and
//! for tools; workers mount it in-process instead.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use casbuild_cas::store::{CasInstances, DiskStore, RemoteStore, RemoteStoreOptions, RetryPolicy, RetryingCas};
use casbuild_mount::{BlobCache, CasMount, MountOptions};

use crate::cmd::coordinator::shutdown_signal;
use crate::config::{default_data_dir, parse_size};

#[derive(clap::Args)]
pub struct Args {
    /// Where to mount (created if missing; a stale mount there is detached).
    mountpoint: PathBuf,
    /// The CAS server, as grpc://HOST:PORT (grpcs:// for TLS).
    #[arg(long, env = "CASBUILD_REMOTE", default_value = "grpc://127.0.0.1:8980")]
    remote: String,
    /// REAPI instance name.
    #[arg(long, default_value = "")]
    instance: String,
    /// Local blob cache [default: $XDG_CACHE_HOME/casbuild/mount-cache].
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Byte budget of the local blob cache (open files are never evicted).
    #[arg(long, value_parser = parse_size, default_value = "20GiB")]
    cache_size: u64,
    /// Seconds a fetch may go without progress before the read fails with EIO.
    #[arg(long, default_value_t = 30)]
    fetch_timeout: u64,
    /// FUSE request threads.
    #[arg(long, default_value_t = 16)]
    threads: usize,
    /// Serve every read from userspace even where FUSE passthrough works.
    #[arg(long)]
    no_passthrough: bool,
    #[command(flatten)]
    auth: crate::cmd::client_args::ClientAuth,
}

/// Opens a blob cache of `budget` bytes in `cache_dir`, off the async
/// threads (it indexes what is there).
pub async fn open_cache(cache_dir: &Path, budget: u64) -> anyhow::Result<DiskStore> {
    let dir = cache_dir.to_path_buf();
    let local = tokio::task::spawn_blocking(move || DiskStore::open_cache(&dir, budget))
        .await?
        .with_context(|| format!("opening the blob cache in {}", cache_dir.display()))?;
    Ok(local)
}

/// A remote CAS whose calls are retried when it is briefly unavailable (a
/// restarting coordinator, a dropped connection).
pub fn retrying(remote: RemoteStore) -> Arc<dyn CasInstances> {
    Arc::new(RetryingCas::new(Arc::new(remote), RetryPolicy::default()))
}

/// Mounts `instance` of `cas` at `mountpoint` over the disk cache `local`,
/// off the async threads: the one way the CLI's commands get a /cas mount.
pub async fn mount_cas(
    mountpoint: &Path,
    local: DiskStore,
    cas: Arc<dyn CasInstances>,
    instance: &str,
    fetch_timeout: Duration,
    options: MountOptions,
) -> anyhow::Result<CasMount> {
    let cache = Arc::new(BlobCache::new(local, cas, instance, fetch_timeout));
    let runtime = tokio::runtime::Handle::current();
    let point = mountpoint.to_path_buf();
    let mount = tokio::task::spawn_blocking(move || CasMount::mount(&point, cache, runtime, &options))
        .await?
        .with_context(|| format!("mounting the CAS at {} (needs root and /dev/fuse)", mountpoint.display()))?;
    Ok(mount)
}

/// Mounts, prints the mount point, and unmounts on SIGINT or SIGTERM.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let timeout = Duration::from_secs(args.fetch_timeout.max(1));
    let remote = RemoteStore::connect(
        &args.remote,
        RemoteStoreOptions {
            instance: args.instance.clone(),
            timeout,
            connect: args.auth.options()?,
            ..Default::default()
        },
    )
    .await?;
    let cache_dir = args.cache_dir.unwrap_or_else(|| default_data_dir().join("mount-cache"));
    let _claims = crate::claims::claim("mount", &[("mount", &args.mountpoint), ("cache", &cache_dir)])?;
    let options = MountOptions { threads: args.threads, passthrough: !args.no_passthrough, ..Default::default() };
    let local = open_cache(&cache_dir, args.cache_size).await?;
    let mount = mount_cas(&args.mountpoint, local, retrying(remote), &args.instance, timeout, options).await?;
    let shutdown = shutdown_signal()?;
    println!("casbuild mount ready at {}", mount.mountpoint().display());
    shutdown.await;
    let stats = mount.stats();
    tokio::task::spawn_blocking(move || mount.unmount()).await?.context("unmounting")?;
    eprintln!("casbuild mount: unmounted ({} blobs fetched)", stats.remote_reads);
    Ok(())
}
