//! `casbuild bench cas --s3-server PATH`: the same storage calls through a
//! coordinator that keeps its blobs in an S3-compatible bucket (a real
//! server started on loopback from PATH, `s3s-fs`), against a coordinator on
//! its local disk only, in the same run.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use casbuild_cas::digest::{Digest, DigestFunction};
use casbuild_cas::storage::StorageConfig;
use casbuild_cas::store::{BlobStore, ObjectStoreConfig, RemoteStore, CHUNK_SIZE};
use futures::StreamExt;

use super::{gb_per_s, median, noise, LocalServer, Row};

const BUCKET: &str = "casbuild-bench";

/// An `s3s-fs` process on loopback, killed when dropped.
struct S3Server {
    child: Child,
    endpoint: String,
}

impl S3Server {
    fn start(binary: &Path, root: &Path) -> anyhow::Result<S3Server> {
        std::fs::create_dir_all(root.join(BUCKET))?;
        let mut child = Command::new(binary)
            .args(["--host", "127.0.0.1", "--port", "0", "--access-key", "bench", "--secret-key", "bench-secret"])
            .arg(root)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let stdout = child.stdout.take().context("piped stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let endpoint = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(at) = line.find("server is running at ") {
                        let rest = &line[at + "server is running at ".len()..];
                        break rest.split_whitespace().next().unwrap_or_default().to_owned();
                    }
                }
                _ => anyhow::bail!("{} exited before listening", binary.display()),
            }
        };
        std::thread::spawn(move || lines.for_each(drop));
        Ok(S3Server { child, endpoint })
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A coordinator in this process whose blobs go to the bucket, its disk under `dir`.
async fn bucket_server(dir: &Path, s3: &S3Server, credentials: &Path) -> anyhow::Result<LocalServer> {
    let mut storage = StorageConfig::new(dir.to_path_buf());
    storage.max_disk = u64::MAX;
    let mut objects = ObjectStoreConfig::new(BUCKET);
    objects.endpoint = Some(s3.endpoint.clone());
    objects.credentials_file = Some(credentials.to_path_buf());
    storage.objects = Some(objects);
    LocalServer::start_on(storage, Default::default(), Default::default()).await
}

/// Streams `blob` into `remote` in chunks; how long until it committed.
pub async fn upload(remote: &RemoteStore, digest: &Digest, blob: &Bytes) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut writer = remote.begin_write(digest).await?;
    for at in (0..blob.len()).step_by(CHUNK_SIZE) {
        writer.write(blob.slice(at..blob.len().min(at + CHUNK_SIZE))).await?;
    }
    writer.commit().await?;
    Ok(start.elapsed())
}

/// Reads a whole blob from `remote`; how long it took.
pub async fn download(remote: &RemoteStore, digest: &Digest) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut stream = remote.read(digest, 0, None).await?;
    let mut received = 0u64;
    while let Some(chunk) = stream.next().await {
        received += chunk?.len() as u64;
    }
    anyhow::ensure!(received == digest.size_bytes, "downloaded {received} bytes, not {}", digest.size_bytes);
    Ok(start.elapsed())
}

/// The rows: large upload, cold and warm large download, small-blob batch
/// upload and FindMissing, each through the bucket against the local disk.
pub async fn rows(
    binary: &Path,
    scratch: &Path,
    function: DigestFunction,
    size: u64,
    count: usize,
    small_size: u64,
    runs: usize,
) -> anyhow::Result<Vec<Row>> {
    let s3 = S3Server::start(binary, &scratch.join("s3"))?;
    let credentials = scratch.join("s3-credentials.toml");
    std::fs::write(&credentials, "access_key_id = \"bench\"\nsecret_access_key = \"bench-secret\"\n")?;
    let disk = LocalServer::start(&scratch.join("disk-only")).await?;
    let bucket = bucket_server(&scratch.join("bucket-a"), &s3, &credentials).await?;
    let (mut up_disk, mut up_bucket, mut down_disk, mut down_cold, mut down_warm) =
        (vec![], vec![], vec![], vec![], vec![]);
    let data = noise(2, size as usize);
    for run in 0..runs {
        let mut blob = data.clone();
        blob[..8].copy_from_slice(&(run as u64 + 100).to_le_bytes());
        let blob = Bytes::from(blob);
        let digest = function.digest_of(&blob);
        super::settle_disk().await?;
        up_disk.push(upload(&disk.remote, &digest, &blob).await?);
        super::settle_disk().await?;
        up_bucket.push(upload(&bucket.remote, &digest, &blob).await?);
        down_disk.push(download(&disk.remote, &digest).await?);
        // A coordinator that has never seen the blob: it comes from the
        // bucket, verified, into its disk tier, and out.
        let fresh = bucket_server(&scratch.join(format!("bucket-b{run}")), &s3, &credentials).await?;
        down_cold.push(download(&fresh.remote, &digest).await?);
        down_warm.push(download(&fresh.remote, &digest).await?);
        fresh.stop().await;
        eprintln!(
            "  run {}: upload {:.2} vs {:.2} GB/s (disk), download cold {:.2}, warm {:.2} vs {:.2} GB/s (disk)",
            run + 1,
            gb_per_s(size, up_bucket[run]),
            gb_per_s(size, up_disk[run]),
            gb_per_s(size, down_cold[run]),
            gb_per_s(size, down_warm[run]),
            gb_per_s(size, down_disk[run]),
        );
    }

    let (mut batch_disk, mut batch_bucket, mut find_disk, mut find_bucket) = (vec![], vec![], vec![], vec![]);
    for run in 0..runs {
        let blobs = super::small_blobs_of(function, count, small_size, (run * count) as u64 + 5_000_000);
        for (server, times) in [(&disk, &mut batch_disk), (&bucket, &mut batch_bucket)] {
            super::settle_disk().await?;
            let start = Instant::now();
            server.remote.write_batch(blobs.clone()).await?;
            times.push(start.elapsed());
        }
        // Half present (just written), half absent: the absent half is what
        // a bucket-backed coordinator must ask the bucket about.
        let mut digests: Vec<Digest> = blobs.iter().take(count / 2).map(|(d, _)| *d).collect();
        digests.extend((0..count - count / 2).map(|i| function.digest_of(format!("absent {run} {i}").as_bytes())));
        for (server, times) in [(&disk, &mut find_disk), (&bucket, &mut find_bucket)] {
            let start = Instant::now();
            let missing = server.remote.find_missing(&digests).await?;
            times.push(start.elapsed());
            anyhow::ensure!(missing.len() == count - count / 2, "FindMissing found {} missing", missing.len());
        }
        eprintln!(
            "  run {}: batch upload {:?} vs {:?} (disk), FindMissing {:?} vs {:?} (disk)",
            run + 1,
            batch_bucket[run],
            batch_disk[run],
            find_bucket[run],
            find_disk[run]
        );
    }
    bucket.stop().await;
    disk.stop().await;

    let size_name = bytesize::ByteSize(size);
    let rate = |d: Duration| format!("{:.2} GB/s", gb_per_s(size, d));
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
    let ratio = |baseline: Duration, measured: Duration| baseline.as_secs_f64() / measured.as_secs_f64();
    let (up_disk, up_bucket, down_disk) = (median(up_disk), median(up_bucket), median(down_disk));
    let (down_cold, down_warm) = (median(down_cold), median(down_warm));
    let (batch_disk, batch_bucket, find_disk, find_bucket) =
        (median(batch_disk), median(batch_bucket), median(find_disk), median(find_bucket));
    let baseline_name = "the same call, local disk tier only";
    Ok(vec![
        Row {
            name: format!("ByteStream upload, {size_name} blob, through the bucket"),
            casbuild: rate(up_bucket),
            baseline_name,
            baseline: rate(up_disk),
            ratio: ratio(up_disk, up_bucket),
        },
        Row {
            name: format!("ByteStream download, {size_name}, cold (from the bucket)"),
            casbuild: rate(down_cold),
            baseline_name,
            baseline: rate(down_disk),
            ratio: ratio(down_disk, down_cold),
        },
        Row {
            name: format!("ByteStream download, {size_name}, warm (disk tier in front of the bucket)"),
            casbuild: rate(down_warm),
            baseline_name,
            baseline: rate(down_disk),
            ratio: ratio(down_disk, down_warm),
        },
        Row {
            name: format!("BatchUpdateBlobs, {count} × {}, through the bucket", bytesize::ByteSize(small_size)),
            casbuild: ms(batch_bucket),
            baseline_name,
            baseline: ms(batch_disk),
            ratio: ratio(batch_disk, batch_bucket),
        },
        Row {
            name: format!("FindMissingBlobs, {count} digests, half absent (asked of the bucket)"),
            casbuild: ms(find_bucket),
            baseline_name,
            baseline: ms(find_disk),
            ratio: ratio(find_disk, find_bucket),
        },
    ])
}
