//! `casbuild bench cas`: the storage API over loopback.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use casbuild_cas::digest::{Digest, DigestFunction};
use casbuild_cas::store::{BlobStore, RemoteStore, CHUNK_SIZE};
use casbuild_proto::reapi::capabilities_client::CapabilitiesClient;
use casbuild_proto::reapi::GetCapabilitiesRequest;
use futures::StreamExt;

use super::{gb_per_s, median, noise, print_table, settle_disk, LocalServer, Row};
use crate::config::parse_size;

#[derive(clap::Args)]
pub struct CasArgs {
    /// Size of the large blob moved through ByteStream.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    size: u64,
    /// Repetitions of each measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Record metrics in this process's server, as `--metrics-listen` makes a coordinator do (to measure
    /// what recording costs: compare with a run without).
    #[arg(long)]
    metrics: bool,
    /// Number of digests / small blobs in the FindMissing and batch workloads.
    #[arg(long, default_value_t = 10_000)]
    count: usize,
    /// Size of each small blob.
    #[arg(long, default_value = "4KiB", value_parser = parse_size)]
    small_size: u64,
    /// Scratch directory for the store and the baselines [default: a temp dir].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Digest function of the blobs.
    #[arg(long, default_value = "sha256")]
    digest_function: DigestFunction,
    /// An `s3s-fs` binary: also measure the calls through a coordinator keeping its blobs in a bucket of
    /// that S3-compatible server (started on loopback), against the local disk tier alone.
    #[arg(long)]
    s3_server: Option<PathBuf>,
    /// Measure only the object-storage rows (with --s3-server).
    #[arg(long, requires = "s3_server")]
    only_object_store: bool,
}

pub async fn bench_cas(args: CasArgs) -> anyhow::Result<()> {
    if args.metrics {
        // As `--metrics-listen` does: every call from here on is recorded.
        crate::cmd::ops::install_recorder()?;
    }
    let scratch = super::scratch_dir(args.dir.as_deref())?;
    let function = args.digest_function;
    let mut rows = Vec::new();
    if let Some(binary) = &args.s3_server {
        eprintln!("bench: the calls through an S3-compatible bucket ({}), against the local disk", binary.display());
        let (size, count, small) = (args.size, args.count, args.small_size);
        rows.extend(super::objects::rows(binary, scratch.path(), function, size, count, small, args.runs).await?);
        if args.only_object_store {
            print_table(&rows);
            return Ok(());
        }
    }
    let server = LocalServer::start(&scratch.path().join("store")).await?;
    let remote = server.remote.clone();

    eprintln!("bench: {} runs of a {} blob over ByteStream", args.runs, bytesize::ByteSize(args.size));
    let (upload, download, native_write, native_read) =
        large_blob(&remote, function, args.size, args.runs, &scratch.path().join("native")).await?;
    rows.push(Row {
        name: format!("ByteStream upload, {} blob", bytesize::ByteSize(args.size)),
        casbuild: format!("{:.2} GB/s", gb_per_s(args.size, upload)),
        baseline_name: "write to a local file",
        baseline: format!("{:.2} GB/s", gb_per_s(args.size, native_write)),
        ratio: native_write.as_secs_f64() / upload.as_secs_f64(),
    });
    rows.push(Row {
        name: format!("ByteStream download, {} blob", bytesize::ByteSize(args.size)),
        casbuild: format!("{:.2} GB/s", gb_per_s(args.size, download)),
        baseline_name: "read the local file",
        baseline: format!("{:.2} GB/s", gb_per_s(args.size, native_read)),
        ratio: native_read.as_secs_f64() / download.as_secs_f64(),
    });

    eprintln!("bench: {} small blobs of {}", args.count, bytesize::ByteSize(args.small_size));
    let (batch, native_files) =
        small_blobs(&remote, function, args.count, args.small_size, args.runs, &scratch.path().join("files")).await?;
    rows.push(Row {
        name: format!("BatchUpdateBlobs, {} × {}", args.count, bytesize::ByteSize(args.small_size)),
        casbuild: format!("{:.0} ms", batch.as_secs_f64() * 1e3),
        baseline_name: "create, write, rename each as a local file, one thread",
        baseline: format!("{:.0} ms", native_files.as_secs_f64() * 1e3),
        ratio: native_files.as_secs_f64() / batch.as_secs_f64(),
    });

    let (find_missing, round_trip) = find_missing_latency(&remote, function, args.count, args.runs.max(21)).await?;
    rows.push(Row {
        name: format!("FindMissingBlobs, {} digests", args.count),
        casbuild: format!("{:.2} ms", find_missing.as_secs_f64() * 1e3),
        baseline_name: "empty GetCapabilities call",
        baseline: format!("{:.2} ms", round_trip.as_secs_f64() * 1e3),
        ratio: round_trip.as_secs_f64() / find_missing.as_secs_f64(),
    });

    eprintln!("bench: the same calls with an API key, and with a key over TLS");
    rows.extend(secured(&remote, function, args.size, args.runs, scratch.path()).await?);

    print_table(&rows);
    drop(remote);
    server.stop().await;
    Ok(())
}

/// What authentication and TLS cost: GetCapabilities round trips with an API
/// key (plaintext and over TLS) against the open server's, and a ByteStream
/// download over TLS against the plaintext one. Certificates come from the
/// `openssl` command (scripts/setup-debian.sh installs it).
async fn secured(
    open: &RemoteStore,
    function: DigestFunction,
    size: u64,
    runs: usize,
    scratch: &std::path::Path,
) -> anyhow::Result<Vec<Row>> {
    use casbuild_cas::store::ConnectOptions;
    use casbuild_coordinator::auth::{AuthConfig, Authenticator, KeyConfig, Role};
    let pki = super::pki::Pki::new(&scratch.join("pki")).map_err(anyhow::Error::msg)?;
    let (key, hash) = casbuild_coordinator::auth::new_key();
    let table = AuthConfig {
        keys: vec![KeyConfig { name: "bench".into(), blake3: hash, roles: vec![Role::Admin], instances: None }],
        ..Default::default()
    };
    let auth = Arc::new(Authenticator::new(Some(&table), None).map_err(anyhow::Error::msg)?);
    let tls = tonic::transport::ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(
        std::fs::read(pki.path("server.pem"))?,
        std::fs::read(pki.path("server.key"))?,
    ));
    let with_key = ConnectOptions { api_key: Some(key.clone()), ..Default::default() };
    let with_tls =
        ConnectOptions { ca_pem: Some(std::fs::read(pki.path("ca.pem"))?), api_key: Some(key), identity: None };
    let config = |tls: Option<tonic::transport::ServerTlsConfig>| casbuild_coordinator::ServerConfig {
        auth: auth.clone(),
        tls,
        ..Default::default()
    };
    let keyed = LocalServer::start_with(&scratch.join("keyed"), config(None), with_key).await?;
    let secure = LocalServer::start_with(&scratch.join("secure"), config(Some(tls)), with_tls).await?;

    let round_trip = |remote: RemoteStore| async move {
        let mut client = CapabilitiesClient::new(remote.channel());
        let mut times = Vec::new();
        for _ in 0..501 {
            let start = Instant::now();
            client.get_capabilities(GetCapabilitiesRequest::default()).await.context("GetCapabilities")?;
            times.push(start.elapsed());
        }
        anyhow::Ok(median(times))
    };
    let (open_rt, keyed_rt, secure_rt) = (
        round_trip(open.clone()).await?,
        round_trip(keyed.remote.clone()).await?,
        round_trip(secure.remote.clone()).await?,
    );

    let blob = Bytes::from(noise(7, size as usize));
    let digest = function.digest_of(&blob);
    let download = |remote: RemoteStore| {
        let blob = blob.clone();
        async move {
            remote.write(&digest, blob).await?;
            let mut times = Vec::new();
            for _ in 0..runs {
                let start = Instant::now();
                let mut stream = remote.read(&digest, 0, None).await?;
                while let Some(chunk) = stream.next().await {
                    chunk?;
                }
                times.push(start.elapsed());
            }
            anyhow::Ok(median(times))
        }
    };
    let (plain_down, secure_down) = (download(open.clone()).await?, download(secure.remote.clone()).await?);
    keyed.stop().await;
    secure.stop().await;
    let ms = |d: Duration| format!("{:.3} ms", d.as_secs_f64() * 1e3);
    Ok(vec![
        Row {
            name: "GetCapabilities round trip, API key".into(),
            casbuild: ms(keyed_rt),
            baseline_name: "the same call, open server, no key",
            baseline: ms(open_rt),
            ratio: open_rt.as_secs_f64() / keyed_rt.as_secs_f64(),
        },
        Row {
            name: "GetCapabilities round trip, API key over TLS".into(),
            casbuild: ms(secure_rt),
            baseline_name: "the same call, open server, no key",
            baseline: ms(open_rt),
            ratio: open_rt.as_secs_f64() / secure_rt.as_secs_f64(),
        },
        Row {
            name: format!("ByteStream download over TLS, {} blob", bytesize::ByteSize(size)),
            casbuild: format!("{:.2} GB/s", gb_per_s(size, secure_down)),
            baseline_name: "the same download, plaintext",
            baseline: format!("{:.2} GB/s", gb_per_s(size, plain_down)),
            ratio: plain_down.as_secs_f64() / secure_down.as_secs_f64(),
        },
    ])
}

/// Median times of: upload through ByteStream, download through ByteStream,
/// writing the same bytes to a local file, reading that file back.
async fn large_blob(
    remote: &RemoteStore,
    function: DigestFunction,
    size: u64,
    runs: usize,
    native: &std::path::Path,
) -> anyhow::Result<(Duration, Duration, Duration, Duration)> {
    let data = Bytes::from(noise(1, size as usize));
    let (mut up, mut down, mut write, mut read) = (vec![], vec![], vec![], vec![]);
    for run in 0..runs {
        // A distinct blob each run, so no upload is short-cut as already present.
        let mut blob = data.to_vec();
        blob[..8].copy_from_slice(&(run as u64 + 1).to_le_bytes());
        let blob = Bytes::from(blob);
        let digest = function.digest_of(&blob);

        settle_disk().await?;
        up.push(super::objects::upload(remote, &digest, &blob).await?);
        down.push(super::objects::download(remote, &digest).await?);

        let (path, bytes) = (native.to_path_buf(), blob.clone());
        settle_disk().await?;
        let (w, r) = tokio::task::spawn_blocking(move || -> std::io::Result<(Duration, Duration)> {
            use std::io::{Read, Write};
            let start = Instant::now();
            let mut file = std::fs::File::create(&path)?;
            for piece in bytes.chunks(CHUNK_SIZE) {
                file.write_all(piece)?;
            }
            drop(file);
            let w = start.elapsed();
            let start = Instant::now();
            let mut file = std::fs::File::open(&path)?;
            let mut buf = vec![0u8; CHUNK_SIZE];
            while file.read(&mut buf)? > 0 {}
            let r = start.elapsed();
            std::fs::remove_file(&path)?;
            Ok((w, r))
        })
        .await??;
        write.push(w);
        read.push(r);
        eprintln!(
            "  run {}: upload {:.2} GB/s, download {:.2} GB/s, file write {:.2} GB/s, file read {:.2} GB/s",
            run + 1,
            gb_per_s(size, up[run]),
            gb_per_s(size, down[run]),
            gb_per_s(size, w),
            gb_per_s(size, r)
        );
    }
    Ok((median(up), median(down), median(write), median(read)))
}

/// Median times of uploading `count` distinct small blobs with batch calls,
/// and of writing them as files (create, write, rename, like the disk store).
async fn small_blobs(
    remote: &RemoteStore,
    function: DigestFunction,
    count: usize,
    size: u64,
    runs: usize,
    native: &std::path::Path,
) -> anyhow::Result<(Duration, Duration)> {
    let (mut batch, mut files) = (vec![], vec![]);
    for run in 0..runs {
        let blobs = super::small_blobs_of(function, count, size, (run * count) as u64 + 1_000_000);
        settle_disk().await?;
        let start = Instant::now();
        remote.write_batch(blobs.clone()).await?;
        batch.push(start.elapsed());

        let dir = native.join(run.to_string());
        settle_disk().await?;
        let elapsed = tokio::task::spawn_blocking(move || -> std::io::Result<Duration> {
            std::fs::create_dir_all(&dir)?;
            let start = Instant::now();
            for (digest, data) in &blobs {
                let tmp = dir.join(format!("{}.tmp", digest.hash_hex()));
                std::fs::write(&tmp, data)?;
                std::fs::rename(&tmp, dir.join(digest.hash_hex()))?;
            }
            let elapsed = start.elapsed();
            std::fs::remove_dir_all(&dir)?;
            Ok(elapsed)
        })
        .await??;
        files.push(elapsed);
        eprintln!("  run {}: batch upload {:?}, local files {:?}", run + 1, batch[run], elapsed);
    }
    Ok((median(batch), median(files)))
}

/// Median latency of FindMissingBlobs for `count` digests (half of them
/// present), and of an empty round trip on the same channel.
async fn find_missing_latency(
    remote: &RemoteStore,
    function: DigestFunction,
    count: usize,
    runs: usize,
) -> anyhow::Result<(Duration, Duration)> {
    let present: Vec<(Digest, Bytes)> = (0..count / 2)
        .map(|i| {
            let data = Bytes::from(format!("present blob {i}"));
            (function.digest_of(&data), data)
        })
        .collect();
    remote.write_batch(present.clone()).await?;
    let mut digests: Vec<Digest> = present.iter().map(|(d, _)| *d).collect();
    digests.extend((0..count - count / 2).map(|i| function.digest_of(format!("absent blob {i}").as_bytes())));
    let mut capabilities = CapabilitiesClient::new(remote.channel());
    let (mut find, mut ping) = (vec![], vec![]);
    for _ in 0..runs {
        let start = Instant::now();
        let missing = remote.find_missing(&digests).await?;
        find.push(start.elapsed());
        anyhow::ensure!(missing.len() == count - count / 2, "FindMissing found {} missing", missing.len());
        let start = Instant::now();
        capabilities.get_capabilities(GetCapabilitiesRequest::default()).await.context("GetCapabilities")?;
        ping.push(start.elapsed());
    }
    Ok((median(find), median(ping)))
}
