//! Blobs in S3-compatible object storage: a real server (`s3s-fs`) on
//! loopback, driven through casbuild's store and through coordinators that
//! share one bucket.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use casbuild_cas::digest::{Digest, DigestFunction};
use casbuild_cas::store::{BlobStore, ObjectBlobStore, ObjectStoreConfig, StoreError};
use common::s3::S3Server;
use common::{bytes, casbuild, Coordinator};

const BUCKET: &str = "casbuild-blobs";

fn store_config(server: &S3Server, dir: &Path) -> ObjectStoreConfig {
    let mut config = ObjectStoreConfig::new(BUCKET);
    config.endpoint = Some(server.endpoint.clone());
    config.prefix = "cluster-a".into();
    config.credentials_file = Some(server.credentials_file(dir));
    config.request_timeout = Duration::from_secs(5);
    config
}

fn key(digest: &Digest) -> String {
    format!("cluster-a/cas/default/{}/{}-{}", digest.function.name(), digest.hash_hex(), digest.size_bytes)
}

/// Waits (at most 10 s) for `done`.
fn eventually(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_go_into_a_real_bucket_and_come_back_verified() {
    let dir = tempfile::tempdir().unwrap();
    let Some(server) = S3Server::start("object_store", &dir.path().join("s3"), &[BUCKET]) else { return };
    let store = ObjectBlobStore::open(&store_config(&server, dir.path())).unwrap();

    let small = Bytes::from(bytes(1, 3000));
    // Large enough for a multipart upload of three parts.
    let large = Bytes::from(bytes(2, (20 << 20) + 12_345));
    let (small_d, large_d) = (DigestFunction::Sha256.digest_of(&small), DigestFunction::Sha256.digest_of(&large));
    let absent = DigestFunction::Sha256.digest_of(b"never written");
    store.write(&small_d, small.clone()).await.unwrap();
    let mut writer = store.begin_write(&large_d).await.unwrap();
    for chunk in large.chunks(1 << 20) {
        writer.write(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    writer.commit().await.unwrap();
    assert_eq!(server.keys(BUCKET), {
        let mut keys = vec![key(&small_d), key(&large_d)];
        keys.sort();
        keys
    });
    assert_eq!(store.find_missing(&[small_d, large_d, absent]).await.unwrap(), vec![absent]);
    assert_eq!(store.namespace("other").find_missing(&[small_d]).await.unwrap(), vec![small_d], "per instance");
    assert_eq!(store.read_all(&small_d).await.unwrap(), small);
    assert_eq!(store.read_all(&large_d).await.unwrap(), large);
    let range = casbuild_cas::store::collect(store.read(&large_d, 10 << 20, Some(100)).await.unwrap(), 100).await;
    assert_eq!(range.unwrap(), large.slice(10 << 20..(10 << 20) + 100), "a ranged GET");
    assert!(store.read_all(&absent).await.unwrap_err().is_not_found());

    // Bytes that are not the blob never become an object, small or multipart.
    let lie = DigestFunction::Sha256.digest_of(&bytes(3, 3000));
    let err = store.write(&lie, small.clone()).await.unwrap_err();
    assert!(matches!(err, StoreError::DigestMismatch(_)), "{err:?}");
    let big_lie = Digest { size_bytes: large.len() as u64, ..DigestFunction::Sha256.digest_of(b"x") };
    let mut writer = store.begin_write(&big_lie).await.unwrap();
    for chunk in large.chunks(1 << 20) {
        writer.write(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    assert!(matches!(writer.commit().await.unwrap_err(), StoreError::DigestMismatch(_)));
    assert_eq!(server.keys(BUCKET).len(), 2, "{:?}", server.keys(BUCKET));

    // An object changed in the bucket is detected, never served whole, and removed.
    let file = server.object_file(BUCKET, &key(&small_d));
    std::fs::write(&file, bytes(4, 3000)).unwrap();
    let err = store.read_all(&small_d).await.unwrap_err();
    assert!(err.is_not_found() && err.to_string().contains("did not match its digest"), "{err}");
    eventually("the corrupt object's removal", || !file.exists());
    assert_eq!(store.find_missing(&[small_d]).await.unwrap(), vec![small_d]);
    let file = server.object_file(BUCKET, &key(&large_d));
    let mut flipped = std::fs::read(&file).unwrap();
    flipped[15 << 20] ^= 1;
    std::fs::write(&file, flipped).unwrap();
    assert!(store.read_all(&large_d).await.unwrap_err().is_not_found());
}

#[test]
fn an_unreachable_bucket_or_bad_credentials_fail_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut server) = S3Server::start("object_store", &dir.path().join("s3"), &[BUCKET]) else { return };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let blob = Bytes::from_static(b"blob");
    let digest = DigestFunction::Sha256.digest_of(&blob);

    let mut wrong = store_config(&server, dir.path());
    let keys = dir.path().join("wrong.toml");
    std::fs::write(&keys, "access_key_id = \"casbuild-test\"\nsecret_access_key = \"wrong\"\n").unwrap();
    wrong.credentials_file = Some(keys);
    let store = ObjectBlobStore::open(&wrong).unwrap();
    let err = runtime.block_on(store.write(&digest, blob.clone())).unwrap_err();
    assert!(
        matches!(&err, StoreError::Refused { code: tonic::Code::PermissionDenied, message }
        if message.contains("refused access")),
        "{err:?}"
    );

    let mut config = store_config(&server, dir.path());
    config.request_timeout = Duration::from_secs(2);
    let store = ObjectBlobStore::open(&config).unwrap();
    server.stop();
    let err = runtime.block_on(store.write(&digest, blob.clone())).unwrap_err();
    assert!(matches!(&err, StoreError::Unavailable(m) if m.contains(&server.endpoint)), "{err:?}");
    server.restart();
    runtime.block_on(store.write(&digest, blob)).unwrap();

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "access_key = 1\n").unwrap();
    config.credentials_file = Some(bad.clone());
    let err = ObjectBlobStore::open(&config).unwrap_err().to_string();
    assert!(err.contains(&bad.display().to_string()), "{err}");
}

/// A coordinator keeping its blobs in the bucket, its disk as a cache.
fn coordinator(server: &S3Server, dir: &Path, name: &str, extra: &[&str]) -> Coordinator {
    let config = server.config_table(dir, BUCKET, "prefix = \"cluster-a\"\nrequest_timeout = \"3s\"\n");
    Coordinator::start_with_config(&dir.join(name), &config, extra)
}

fn cas(args: &[&str]) -> std::process::Output {
    casbuild().arg("cas").args(args).output().expect("running casbuild cas")
}

fn ok(args: &[&str]) -> String {
    let out = cas(args);
    assert!(out.status.success(), "casbuild cas {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[test]
fn coordinators_share_blobs_through_the_bucket_and_survive_its_outage() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut server) = S3Server::start("object_store", &dir.path().join("s3"), &[BUCKET]) else { return };
    let first = coordinator(&server, dir.path(), "first", &["--metrics-listen", "127.0.0.1:0"]);
    let second = coordinator(&server, dir.path(), "second", &[]);
    let (a, b) = (first.url(), second.url());

    let src = dir.path().join("src");
    common::sample_tree(&src);
    let root = ok(&["upload", "--remote", &a, src.to_str().unwrap()]);
    assert!(server.keys(BUCKET).len() >= 5, "{:?}", server.keys(BUCKET));
    // The second coordinator never saw the upload: its blobs come from the bucket.
    let out = dir.path().join("through-second");
    ok(&["download", "--remote", &b, &root, out.to_str().unwrap()]);
    assert_eq!(std::fs::read(out.join("src/main.c")).unwrap(), std::fs::read(src.join("src/main.c")).unwrap());

    // With the bucket gone, what the disk tier holds is still served; new
    // blobs are refused as unavailable, naming the bucket; then it recovers.
    server.stop();
    let again = dir.path().join("again");
    ok(&["download", "--remote", &a, &root, again.to_str().unwrap()]);
    let new_file = dir.path().join("new.txt");
    std::fs::write(&new_file, b"written while the bucket is away").unwrap();
    let failed = cas(&["upload", "--remote", &a, new_file.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success());
    assert!(stderr.contains("Unavailable") || stderr.contains("UNAVAILABLE"), "{stderr}");
    assert!(stderr.contains(&format!("object store {} bucket {BUCKET}", server.endpoint)), "{stderr}");
    let readyz = || common::http::get(&first.metrics_addr(), "/readyz");
    eventually("readiness to fail", || readyz().0 == 503);
    assert!(readyz().1.contains("the object store does not take writes"), "{}", readyz().1);
    server.restart();
    eventually("readiness to return", || readyz().0 == 200);
    let digest = ok(&["upload", "--remote", &a, new_file.to_str().unwrap()]);

    // A blob corrupted in the bucket is never served by a coordinator that
    // has to fetch it, and is removed from the bucket.
    let (hash, size) = digest.split_once('/').unwrap();
    let object = server.object_file(BUCKET, &format!("cluster-a/cas/default/blake3/{hash}-{size}"));
    std::fs::write(&object, b"WRITTEN while the bucket is away").unwrap();
    let fetched = dir.path().join("fetched.txt");
    let failed = cas(&["download", "--remote", &b, "--file", &digest, fetched.to_str().unwrap()]);
    assert!(!failed.status.success(), "a corrupt blob was served");
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains("did not match its digest"), "{stderr}");
    assert!(std::fs::read(&fetched).map_or(true, |data| data != b"WRITTEN while the bucket is away"));
    eventually("the corrupt object's removal", || !object.exists());
    drop((first, second));
}
