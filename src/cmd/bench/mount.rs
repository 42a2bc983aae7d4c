//! `casbuild bench mount`: the /cas mount against the same trees on local
//! disk and against eager staging (downloading a whole tree before use).
//!
//! Tree A is many small files in many directories, tree B a few large files.
//! Both are uploaded to a coordinator in this process; every cold figure uses
//! a fresh mount with an empty blob cache.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use casbuild_cas::digest::{Digest, DigestFunction};
use casbuild_cas::store::RemoteStore;
use casbuild_mount::{CasMount, MountOptions, PrefetchLimits};

use super::{gb_per_s, median, noise, print_table, settle_disk, LocalServer, Row};
use crate::cmd::mount::{mount_cas, open_cache};
use crate::config::parse_size;

#[derive(clap::Args)]
pub struct MountArgs {
    /// Files in tree A (1–8 KiB each).
    #[arg(long, default_value_t = 100_000)]
    files: usize,
    /// Directories tree A's files are spread over.
    #[arg(long, default_value_t = 1_000)]
    dirs: usize,
    /// Size of tree B's large file.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    big: u64,
    /// Number of tree B's medium files.
    #[arg(long, default_value_t = 100)]
    medium_count: usize,
    /// Size of each of tree B's medium files.
    #[arg(long, default_value = "10MiB", value_parser = parse_size)]
    medium: u64,
    /// Repetitions of each measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Files fetched at once by the prefetch of the random 1% read.
    #[arg(long, default_value_t = 16)]
    prefetch_concurrency: usize,
    /// Scratch directory [default: a temp dir].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Run only these sections (registration, walk, random, all, first, sequential) [default: all].
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Record metrics in this process (mount, store, server), as `--metrics-listen` makes a worker do (to
    /// measure what recording costs: compare with a run without).
    #[arg(long)]
    metrics: bool,
}

/// The fixture: a server holding both trees, and their local copies.
struct Setup {
    server: LocalServer,
    scratch: PathBuf,
    tree_a: PathBuf,
    root_a: Digest,
    files_a: Vec<PathBuf>,
    tree_b: PathBuf,
    root_b: Digest,
    mounts: usize,
}

/// A fresh mount with an empty blob cache.
struct Fresh {
    mount: CasMount,
    cache_dir: PathBuf,
}

impl Setup {
    async fn fresh_mount(&mut self) -> anyhow::Result<Fresh> {
        self.fresh_mount_with(MountOptions::default()).await
    }

    async fn fresh_mount_with(&mut self, options: MountOptions) -> anyhow::Result<Fresh> {
        self.mounts += 1;
        let cache_dir = self.scratch.join(format!("cache-{}", self.mounts));
        let mountpoint = self.scratch.join(format!("mnt-{}", self.mounts));
        let remote = self.server.remote.clone();
        let timeout = Duration::from_secs(60);
        let local = open_cache(&cache_dir, u64::MAX).await?;
        let mount = mount_cas(&mountpoint, local, Arc::new(remote), "", timeout, options).await?;
        Ok(Fresh { mount, cache_dir })
    }
}

impl Fresh {
    async fn close(self) -> anyhow::Result<()> {
        let Fresh { mount, cache_dir } = self;
        let mountpoint = mount.mountpoint().to_path_buf();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            mount.unmount()?;
            std::fs::remove_dir_all(&cache_dir)?;
            std::fs::remove_dir(&mountpoint)?;
            Ok(())
        })
        .await?
    }
}

pub async fn bench_mount(args: MountArgs) -> anyhow::Result<()> {
    if args.metrics {
        // As `--metrics-listen` does: every FUSE request and fetch from here on is recorded.
        crate::cmd::ops::install_recorder()?;
    }
    let scratch = super::scratch_dir(args.dir.as_deref())?;
    let mut setup = prepare(&args, scratch.path()).await?;
    let runs = args.runs.max(1);
    let mut rows = Vec::new();

    let wanted = |section: &str| args.only.is_empty() || args.only.iter().any(|s| s == section);
    if wanted("registration") {
        eprintln!("bench: registration");
        rows.extend(registration(&mut setup).await?);
    }
    if wanted("walk") {
        eprintln!("bench: find + stat of tree A");
        rows.extend(walk_tree(&mut setup, runs).await?);
    }
    if wanted("random") {
        eprintln!("bench: reading 1% of tree A");
        let limits = PrefetchLimits { concurrency: args.prefetch_concurrency, ..PrefetchLimits::default() };
        rows.extend(random_percent(&mut setup, runs, limits).await?);
    }
    if wanted("all") {
        eprintln!("bench: reading all of tree A");
        rows.push(read_all(&mut setup, runs).await?);
    }
    if wanted("first") {
        eprintln!("bench: first MiB of the {} file, at its start and its middle", bytesize::ByteSize(args.big));
        rows.extend(first_bytes(&mut setup, runs, args.big).await?);
    }
    if wanted("sequential") {
        eprintln!("bench: sequential read of the {} file", bytesize::ByteSize(args.big));
        rows.extend(sequential(&mut setup, runs, args.big).await?);
    }

    print_table(&rows);
    setup.server.stop().await;
    Ok(())
}

/// Writes both trees, uploads them, and returns the fixture.
async fn prepare(args: &MountArgs, scratch: &Path) -> anyhow::Result<Setup> {
    let server = LocalServer::start(&scratch.join("store")).await?;
    let (tree_a, tree_b) = (scratch.join("tree-a"), scratch.join("tree-b"));
    eprintln!(
        "bench: writing tree A ({} files in {} directories) and tree B ({} + {} × {})",
        args.files,
        args.dirs,
        bytesize::ByteSize(args.big),
        args.medium_count,
        bytesize::ByteSize(args.medium)
    );
    let (a, b, files, dirs) = (tree_a.clone(), tree_b.clone(), args.files, args.dirs.max(1));
    let (big, medium_count, medium) = (args.big, args.medium_count, args.medium);
    let files_a = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<PathBuf>> {
        let mut paths = Vec::with_capacity(files);
        for i in 0..files {
            let dir = a.join(format!("d{:04}", i % dirs));
            if i < dirs {
                std::fs::create_dir_all(&dir)?;
            }
            let rel = PathBuf::from(format!("d{:04}/f{i:06}", i % dirs));
            let size = 1024 + (i * 7919) % (7 * 1024 + 1);
            std::fs::write(a.join(&rel), noise(i as u64 + 1, size))?;
            paths.push(rel);
        }
        std::fs::create_dir_all(&b)?;
        std::fs::write(b.join("big.bin"), noise(u64::MAX, big as usize))?;
        for i in 0..medium_count {
            std::fs::write(b.join(format!("m{i:03}.bin")), noise(u64::MAX - 1 - i as u64, medium as usize))?;
        }
        Ok(paths)
    })
    .await??;
    let start = Instant::now();
    let root_a = crate::cmd::cas::upload(&server.remote, &tree_a, DigestFunction::Blake3).await?;
    let root_b = crate::cmd::cas::upload(&server.remote, &tree_b, DigestFunction::Blake3).await?;
    eprintln!("bench: uploaded both trees in {:.1} s", start.elapsed().as_secs_f64());
    Ok(Setup { server, scratch: scratch.to_path_buf(), tree_a, root_a, files_a, tree_b, root_b, mounts: 0 })
}

/// Empties the kernel's page, dentry and inode caches (needs root).
fn drop_caches() -> anyhow::Result<()> {
    let status = std::process::Command::new("sync").status().context("running sync")?;
    anyhow::ensure!(status.success(), "sync failed");
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("writing /proc/sys/vm/drop_caches (needs root)")
}

/// Runs blocking file system work off the async runtime and times it.
async fn timed<T: Send + 'static>(
    work: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<(Duration, T)> {
    tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        let value = work()?;
        Ok((start.elapsed(), value))
    })
    .await?
}

fn micros(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn millis(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

fn row(name: String, casbuild: String, baseline_name: &'static str, baseline: String, ratio: f64) -> Row {
    Row { name, casbuild, baseline_name, baseline, ratio }
}

/// Registration latency for both trees, against creating one directory.
async fn registration(setup: &mut Setup) -> anyhow::Result<Vec<Row>> {
    let fresh = setup.fresh_mount().await?;
    let mut rows = Vec::new();
    let mkdir_root = setup.scratch.join("mkdir");
    std::fs::create_dir_all(&mkdir_root)?;
    let (_, mkdir) = timed(move || {
        let mut samples = Vec::new();
        for i in 0..1000 {
            let start = Instant::now();
            std::fs::create_dir(mkdir_root.join(i.to_string()))?;
            samples.push(start.elapsed());
        }
        std::fs::remove_dir_all(&mkdir_root)?;
        Ok(median(samples))
    })
    .await?;
    for (label, root) in [("tree A", setup.root_a), ("tree B", setup.root_b)] {
        let mut samples = Vec::new();
        for i in 0..1000 {
            let name = format!("{label}-{i}");
            let start = Instant::now();
            fresh.mount.register(&name, root)?;
            samples.push(start.elapsed());
        }
        let took = median(samples);
        rows.push(row(
            format!("register {label} as an input root"),
            micros(took),
            "mkdir of one empty directory on local disk",
            micros(mkdir),
            mkdir.as_secs_f64() / took.as_secs_f64(),
        ));
    }
    fresh.close().await?;
    Ok(rows)
}

/// Entries under `dir`, each stat'ed, recursively.
fn walk(dir: &Path) -> std::io::Result<usize> {
    let mut count = 0;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let meta = std::fs::symlink_metadata(&path)?;
        count += 1;
        if meta.is_dir() {
            count += walk(&path)?;
        }
    }
    Ok(count)
}

/// `find`+stat of tree A on a fresh mount (cold) and again (warm), against
/// the local copy after dropping the kernel's caches (cold) and again (warm).
async fn walk_tree(setup: &mut Setup, runs: usize) -> anyhow::Result<Vec<Row>> {
    let (mut cold, mut warm, mut local_cold, mut local_warm) = (vec![], vec![], vec![], vec![]);
    let want = setup.files_a.len()
        + setup.files_a.iter().filter_map(|p| p.parent()).collect::<std::collections::BTreeSet<_>>().len();
    for run in 0..runs {
        let fresh = setup.fresh_mount().await?;
        let root = fresh.mount.register("a", setup.root_a)?;
        for samples in [&mut cold, &mut warm] {
            let path = root.clone();
            let (took, n) = timed(move || Ok(walk(&path)?)).await?;
            anyhow::ensure!(n == want, "the mount showed {n} entries, not {want}");
            samples.push(took);
        }
        fresh.close().await?;
        drop_caches()?;
        for samples in [&mut local_cold, &mut local_warm] {
            let path = setup.tree_a.clone();
            let (took, n) = timed(move || Ok(walk(&path)?)).await?;
            anyhow::ensure!(n == want, "the local tree has {n} entries, not {want}");
            samples.push(took);
        }
        eprintln!(
            "  run {}: mount cold {:?} warm {:?}; local disk cold {:?} warm {:?}",
            run + 1,
            cold[run],
            warm[run],
            local_cold[run],
            local_warm[run]
        );
    }
    let (cold, warm, local_cold, local_warm) = (median(cold), median(warm), median(local_cold), median(local_warm));
    Ok(vec![
        row(
            format!("find + stat of tree A ({want} entries), cold"),
            millis(cold),
            "same tree on local disk, kernel caches dropped",
            millis(local_cold),
            local_cold.as_secs_f64() / cold.as_secs_f64(),
        ),
        row(
            format!("find + stat of tree A ({want} entries), warm"),
            millis(warm),
            "same tree on local disk, warm",
            millis(local_warm),
            local_warm.as_secs_f64() / warm.as_secs_f64(),
        ),
    ])
}

/// Reads each file fully; returns the bytes read.
fn read_files(root: &Path, files: &[PathBuf]) -> std::io::Result<u64> {
    let mut total = 0;
    let mut buf = vec![0; 64 << 10];
    for rel in files {
        let mut file = std::fs::File::open(root.join(rel))?;
        loop {
            match file.read(&mut buf)? {
                0 => break,
                n => total += n as u64,
            }
        }
    }
    Ok(total)
}

/// Downloads the tree to a new directory, as `casbuild cas download` does.
async fn stage(remote: &RemoteStore, root: &Digest, dest: &Path) -> anyhow::Result<()> {
    crate::cmd::cas::download(remote, root, dest, false).await
}

/// One run of reading `files` of tree A through a fresh mount, and of
/// staging the whole tree and then reading them from local disk.
async fn lazy_and_eager(setup: &mut Setup, files: Vec<PathBuf>, run: usize) -> anyhow::Result<(Duration, Duration)> {
    let fresh = setup.fresh_mount().await?;
    settle_disk().await?;
    let root = fresh.mount.register("a", setup.root_a)?;
    let list = files.clone();
    let (lazy, _) = timed(move || Ok(read_files(&root, &list)?)).await?;
    fresh.close().await?;

    let dest = setup.scratch.join(format!("staged-{run}"));
    settle_disk().await?;
    let start = Instant::now();
    stage(&setup.server.remote, &setup.root_a, &dest).await?;
    let staged = dest.clone();
    timed(move || Ok(read_files(&staged, &files)?)).await?;
    let eager = start.elapsed();
    tokio::fs::remove_dir_all(&dest).await?;
    Ok((lazy, eager))
}

/// Reading `files` through a fresh mount that prefetches them from
/// registration on, as a worker does with the access profile of the
/// command's last run (whose paths are sorted); then reading them again (warm).
async fn prefetched(
    setup: &mut Setup,
    files: Vec<PathBuf>,
    limits: PrefetchLimits,
) -> anyhow::Result<(Duration, Duration)> {
    let fresh = setup.fresh_mount().await?;
    settle_disk().await?;
    let mut profile: Vec<String> = files.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    profile.sort_unstable();
    let start = Instant::now();
    let root = fresh.mount.register("a", setup.root_a)?;
    let prefetch = fresh.mount.prefetch("a", profile, limits)?;
    let (cold, warm) = timed(move || {
        read_files(&root, &files)?;
        let cold = start.elapsed();
        let again = Instant::now();
        read_files(&root, &files)?;
        Ok((cold, again.elapsed()))
    })
    .await?
    .1;
    drop(prefetch);
    fresh.close().await?;
    Ok((cold, warm))
}

/// Reading `files` from the local copy of tree A after dropping the kernel's
/// caches, and again (warm).
async fn local_cold(setup: &Setup, files: Vec<PathBuf>) -> anyhow::Result<(Duration, Duration)> {
    drop_caches()?;
    let tree = setup.tree_a.clone();
    let (cold, files) = timed(move || Ok(read_files(&tree, &files).map(|_| files)?)).await?;
    let tree = setup.tree_a.clone();
    let (warm, _) = timed(move || Ok(read_files(&tree, &files)?)).await?;
    Ok((cold, warm))
}

/// Reading a random 1% of tree A: lazily, and prefetched from a profile,
/// against staging all of it first and against local disk.
async fn random_percent(setup: &mut Setup, runs: usize, limits: PrefetchLimits) -> anyhow::Result<Vec<Row>> {
    let count = (setup.files_a.len() / 100).max(1);
    // A different random sample each run (xorshift-driven).
    let all = setup.files_a.clone();
    let sample = |run: usize| -> Vec<PathBuf> {
        noise(run as u64 + 77, count * 8)
            .chunks(8)
            .map(|c| all[u64::from_le_bytes(c.try_into().unwrap()) as usize % all.len()].clone())
            .collect()
    };
    let (mut lazy, mut eager, mut fetched_ahead, mut local) = (vec![], vec![], vec![], vec![]);
    let (mut warm, mut local_warm) = (vec![], vec![]);
    // The server's copy stays in memory (as a CAS server's hot data is):
    // the local disk's runs, which drop the kernel's caches, come last.
    for run in 0..runs {
        let files = sample(run);
        let (l, e) = lazy_and_eager(setup, files.clone(), run).await?;
        lazy.push(l);
        eager.push(e);
        let (p, w) = prefetched(setup, files, limits).await?;
        fetched_ahead.push(p);
        warm.push(w);
        eprintln!(
            "  run {}: lazy {:?}, prefetched {:?}, warm re-read {:?}, eager staging {:?}",
            run + 1,
            lazy[run],
            fetched_ahead[run],
            warm[run],
            eager[run]
        );
    }
    for run in 0..runs {
        let (cold, warm) = local_cold(setup, sample(run)).await?;
        local.push(cold);
        local_warm.push(warm);
        eprintln!("  run {}: local disk cold {:?}, warm {:?}", run + 1, local[run], local_warm[run]);
    }
    let (lazy, eager, prefetched, local) = (median(lazy), median(eager), median(fetched_ahead), median(local));
    let (warm, local_warm) = (median(warm), median(local_warm));
    let name = format!("read a random 1% of tree A ({count} files), cold");
    let local_name = "the same files on local disk, cold (caches dropped)";
    Ok(vec![
        row(
            name.clone(),
            millis(lazy),
            "eager staging: download the whole tree, then read",
            millis(eager),
            eager.as_secs_f64() / lazy.as_secs_f64(),
        ),
        row(name.clone(), millis(lazy), local_name, millis(local), local.as_secs_f64() / lazy.as_secs_f64()),
        row(
            format!("{name}, prefetched from an access profile"),
            millis(prefetched),
            local_name,
            millis(local),
            local.as_secs_f64() / prefetched.as_secs_f64(),
        ),
        row(
            format!("re-read the same {count} files, warm (open + read + close each)"),
            millis_fine(warm),
            "the same files on local disk, warm",
            millis_fine(local_warm),
            local_warm.as_secs_f64() / warm.as_secs_f64(),
        ),
    ])
}

/// Reading every file of tree A through a fresh mount, against staging it.
async fn read_all(setup: &mut Setup, runs: usize) -> anyhow::Result<Row> {
    let (mut lazy, mut eager) = (vec![], vec![]);
    for run in 0..runs {
        let (l, e) = lazy_and_eager(setup, setup.files_a.clone(), run).await?;
        lazy.push(l);
        eager.push(e);
        eprintln!("  run {}: lazy {:?}, eager staging {:?}", run + 1, lazy[run], eager[run]);
    }
    let (lazy, eager) = (median(lazy), median(eager));
    Ok(row(
        format!("read all of tree A ({} files), cold, one reader", setup.files_a.len()),
        millis(lazy),
        "eager staging: download the whole tree, then read",
        millis(eager),
        eager.as_secs_f64() / lazy.as_secs_f64(),
    ))
}

/// Reading the large file of tree B, cold and warm, against local disk.
/// Opens `path` and reads 1 MiB at `offset`.
fn first_mib(path: &Path, offset: u64) -> anyhow::Result<()> {
    let file = std::fs::File::open(path)?;
    let mut buf = vec![0; 1 << 20];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, offset)?;
    Ok(())
}

/// Latency to the first MiB of the cold large file, at its start and its
/// middle (a fresh mount each, so nothing of the file is local), against
/// the same reads of the local copy with the kernel's caches dropped.
async fn first_bytes(setup: &mut Setup, runs: usize, size: u64) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (label, offset) in [("start", 0), ("middle", size / 2)] {
        let (mut mount, mut local) = (vec![], vec![]);
        for run in 0..runs {
            let fresh = setup.fresh_mount().await?;
            let path = fresh.mount.register("b", setup.root_b)?.join("big.bin");
            drop_caches()?;
            let (took, ()) = timed(move || first_mib(&path, offset)).await?;
            mount.push(took);
            // Let the stream finish (and verify) before the next measurement.
            fresh.mount.verify_streamed("b").await.map_err(anyhow::Error::msg)?;
            fresh.close().await?;
            drop_caches()?;
            let path = setup.tree_b.join("big.bin");
            let (took, ()) = timed(move || first_mib(&path, offset)).await?;
            local.push(took);
            eprintln!("  run {}, {label}: mount {} local disk {}", run + 1, micros(mount[run]), micros(local[run]));
        }
        let (mount, local) = (median(mount), median(local));
        rows.push(row(
            format!("open + first 1 MiB at the {label} of a cold {} file", bytesize::ByteSize(size)),
            millis_fine(mount),
            "local disk, kernel caches dropped",
            millis_fine(local),
            local.as_secs_f64() / mount.as_secs_f64(),
        ));
    }
    Ok(rows)
}

fn millis_fine(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

async fn sequential(setup: &mut Setup, runs: usize, size: u64) -> anyhow::Result<Vec<Row>> {
    let (mut cold, mut warm, mut local_cold, mut local_warm) = (vec![], vec![], vec![], vec![]);
    let (mut reread, mut whole) = (vec![], vec![]);
    let mut passthrough = false;
    for run in 0..runs {
        // The old way, in the same run: the whole blob fetched before the open returns.
        let fresh = setup.fresh_mount_with(MountOptions { stream_min: u64::MAX, ..Default::default() }).await?;
        let path = fresh.mount.register("b", setup.root_b)?.join("big.bin");
        let (took, n) = timed(move || Ok(read_files(Path::new("/"), &[path])?)).await?;
        anyhow::ensure!(n == size, "read {n} bytes, not {size}");
        whole.push(took);
        fresh.close().await?;
        drop_caches()?;

        let fresh = setup.fresh_mount().await?;
        let file = fresh.mount.register("b", setup.root_b)?.join("big.bin");
        // Cold (streamed in), the first re-read (the cache file's first
        // passthrough read), then warm.
        for samples in [&mut cold, &mut reread, &mut warm] {
            let path = file.clone();
            let (took, n) = timed(move || Ok(read_files(Path::new("/"), &[path])?)).await?;
            anyhow::ensure!(n == size, "read {n} bytes, not {size}");
            samples.push(took);
            // The cold read ends when its last byte has arrived; the blob is
            // then verified and committed to the cache (not timed).
            fresh.mount.verify_streamed("b").await.map_err(anyhow::Error::msg)?;
            // While the kernel's release of the streamed handle has not
            // reached the mount, new opens of the file are served from
            // userspace too (mixing them with passthrough fails in the
            // kernel): measure warm opens once it has, as later in a build.
            for _ in 0..100 {
                if fresh.mount.stats().open_files == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        passthrough = fresh.mount.stats().passthrough;
        fresh.close().await?;
        drop_caches()?;
        for samples in [&mut local_cold, &mut local_warm] {
            let path = setup.tree_b.join("big.bin");
            let (took, _) = timed(move || Ok(read_files(Path::new("/"), &[path])?)).await?;
            samples.push(took);
        }
        eprintln!(
            "  run {}: mount cold {:.2} GB/s (fetched whole first {:.2} GB/s) first re-read {:.2} GB/s warm {:.2} GB/s; \
             local disk cold {:.2} GB/s warm {:.2} GB/s",
            run + 1,
            gb_per_s(size, cold[run]),
            gb_per_s(size, whole[run]),
            gb_per_s(size, reread[run]),
            gb_per_s(size, warm[run]),
            gb_per_s(size, local_cold[run]),
            gb_per_s(size, local_warm[run])
        );
    }
    let (cold, warm, local_cold, local_warm) = (median(cold), median(warm), median(local_cold), median(local_warm));
    let whole = median(whole);
    let size_text = bytesize::ByteSize(size);
    let how = if passthrough { "passthrough" } else { "userspace reads" };
    Ok(vec![
        row(
            format!("sequential read of a {size_text} file, cold (fetch included)"),
            format!("{:.2} GB/s", gb_per_s(size, cold)),
            "local disk, kernel caches dropped",
            format!("{:.2} GB/s", gb_per_s(size, local_cold)),
            local_cold.as_secs_f64() / cold.as_secs_f64(),
        ),
        row(
            format!("sequential read of a {size_text} file, cold, streamed"),
            format!("{:.2} GB/s", gb_per_s(size, cold)),
            "the same, fetched whole before the open returns",
            format!("{:.2} GB/s", gb_per_s(size, whole)),
            whole.as_secs_f64() / cold.as_secs_f64(),
        ),
        row(
            format!("sequential read of a {size_text} file, warm ({how})"),
            format!("{:.2} GB/s", gb_per_s(size, warm)),
            "local disk, warm",
            format!("{:.2} GB/s", gb_per_s(size, local_warm)),
            local_warm.as_secs_f64() / warm.as_secs_f64(),
        ),
    ])
}
