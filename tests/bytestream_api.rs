//! ByteStream reads and writes against a real coordinator process.

mod common;

use casbuild_cas::resource::{Compressor, ResourceName};
use casbuild_cas::Digest;
use casbuild_proto::bytestream::{QueryWriteStatusRequest, ReadRequest, WriteRequest};
use casbuild_proto::reapi::FindMissingBlobsRequest;
use common::{blake3, bytes, sha256, Coordinator};
use futures::StreamExt;
use tonic::Code;

const MIB: usize = 1 << 20;

fn write_name(digest: &Digest) -> String {
    ResourceName::write("", Compressor::Identity, *digest).to_string()
}

/// WriteRequests carrying `data` from `offset` in chunks of `chunk` bytes.
fn requests(name: &str, data: &[u8], offset: usize, chunk: usize, finish: bool) -> Vec<WriteRequest> {
    let mut out = Vec::new();
    let mut at = offset;
    for piece in data[offset..].chunks(chunk) {
        out.push(WriteRequest {
            resource_name: if out.is_empty() { name.to_string() } else { String::new() },
            write_offset: at as i64,
            finish_write: false,
            data: piece.to_vec(),
        });
        at += piece.len();
    }
    if finish {
        match out.last_mut() {
            Some(last) => last.finish_write = true,
            None => out.push(WriteRequest {
                resource_name: name.to_string(),
                write_offset: at as i64,
                finish_write: true,
                data: vec![],
            }),
        }
    }
    out
}

async fn read_all(server: &Coordinator, name: String, offset: i64, limit: i64) -> Result<Vec<u8>, tonic::Status> {
    let mut stream = server
        .bytestream()
        .await
        .read(ReadRequest { resource_name: name, read_offset: offset, read_limit: limit })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk?.data);
    }
    Ok(out)
}

#[tokio::test]
async fn a_200_mib_blob_round_trips_with_offsets_and_limits() {
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start(dir.path(), &[]);
    let data = bytes(7, 200 * MIB);
    let digest = blake3(&data);
    let response = server
        .bytestream()
        .await
        .write(futures::stream::iter(requests(&write_name(&digest), &data, 0, MIB, true)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.committed_size, data.len() as i64);

    let read_name = ResourceName::read("", Compressor::Identity, digest).to_string();
    let back = read_all(&server, read_name.clone(), 0, 0).await.unwrap();
    assert_eq!(blake3(&back), digest);
    let part = read_all(&server, read_name.clone(), 150 * MIB as i64 + 3, 1000).await.unwrap();
    assert_eq!(part, &data[150 * MIB + 3..150 * MIB + 1003]);
    let tail = read_all(&server, read_name.clone(), data.len() as i64 - 10, 0).await.unwrap();
    assert_eq!(tail, &data[data.len() - 10..]);
    let err = read_all(&server, read_name, data.len() as i64 + 1, 0).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange);
}

#[tokio::test]
async fn an_interrupted_write_resumes_where_query_write_status_says() {
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start(dir.path(), &[]);
    let data = bytes(9, 10 * MIB + 123);
    let digest = sha256(&data);
    let name = write_name(&digest);
    let mut client = server.bytestream().await;

    // First attempt: 4 MiB, then the stream ends without finish_write.
    let first: Vec<_> = requests(&name, &data[..4 * MIB], 0, MIB, false);
    let err = client.write(futures::stream::iter(first)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let status =
        client.query_write_status(QueryWriteStatusRequest { resource_name: name.clone() }).await.unwrap().into_inner();
    assert_eq!((status.committed_size, status.complete), (4 * MIB as i64, false));

    // Resuming at the wrong offset is refused and keeps the upload.
    let wrong = vec![WriteRequest { resource_name: name.clone(), write_offset: 3, finish_write: false, data: vec![1] }];
    let err = client.write(futures::stream::iter(wrong)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("does not continue"), "{}", err.message());

    // Resume from the committed size.
    let rest = requests(&name, &data, 4 * MIB, MIB, true);
    let response = client.write(futures::stream::iter(rest)).await.unwrap().into_inner();
    assert_eq!(response.committed_size, data.len() as i64);
    let status = client.query_write_status(QueryWriteStatusRequest { resource_name: name }).await.unwrap().into_inner();
    assert!(status.complete);
    let back = read_all(&server, ResourceName::read("", Compressor::Identity, digest).to_string(), 0, 0).await.unwrap();
    assert_eq!(back, data);
}

#[tokio::test]
async fn bad_writes_are_refused_and_leave_nothing_visible() {
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start(dir.path(), &[]);
    let mut client = server.bytestream().await;
    let data = bytes(3, 3 * MIB);
    let digest = sha256(&data);

    // Ends early: finish_write before all bytes arrived.
    let short = requests(&write_name(&digest), &data[..2 * MIB], 0, MIB, true);
    let err = client.write(futures::stream::iter(short)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("ended before"), "{}", err.message());

    // Overruns its size.
    let mut long = data.clone();
    long.extend_from_slice(b"extra");
    let err =
        client.write(futures::stream::iter(requests(&write_name(&digest), &long, 0, MIB, true))).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("more than its size"), "{}", err.message());

    // Wrong content: INVALID_ARGUMENT naming the digest.
    let mut wrong = data.clone();
    wrong[12345] ^= 0xff;
    let err =
        client.write(futures::stream::iter(requests(&write_name(&digest), &wrong, 0, MIB, true))).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains(&digest.hash_hex()), "{}", err.message());

    // Malformed resource names.
    for name in ["", "uploads/u/blobs/zz/1", "blobs/abc/1", "x/uploads/u/compressed-blobs/lz4/aa/1"] {
        let request =
            vec![WriteRequest { resource_name: name.into(), write_offset: 0, finish_write: true, data: vec![] }];
        let err = client.write(futures::stream::iter(request)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{name}");
    }
    let err = read_all(&server, "nonsense".into(), 0, 0).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err =
        read_all(&server, ResourceName::read("", Compressor::Identity, digest).to_string(), 0, 0).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let missing = server
        .cas()
        .await
        .find_missing_blobs(FindMissingBlobsRequest { blob_digests: vec![digest.to_proto()], ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(missing.missing_blob_digests.len(), 1);
    assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0, "no temp file left behind");
}

#[tokio::test]
async fn zstd_writes_and_reads_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start(dir.path(), &[]);
    let mut client = server.bytestream().await;
    let mut data = b"a fairly compressible line of build output\n".repeat(200_000);
    data.extend(bytes(1, 3 * MIB)); // and an incompressible tail
    let digest = blake3(&data);
    let packed = zstd::bulk::compress(&data, 3).unwrap();
    let name = ResourceName::write("ci", Compressor::Zstd, digest).to_string();
    client.write(futures::stream::iter(requests(&name, &packed, 0, 256 << 10, true))).await.unwrap();

    let compressed_name = ResourceName::read("ci", Compressor::Zstd, digest).to_string();
    let packed_back = read_all(&server, compressed_name.clone(), 0, 0).await.unwrap();
    assert!(packed_back.len() < data.len());
    assert_eq!(zstd::stream::decode_all(packed_back.as_slice()).unwrap(), data);
    let from_offset = read_all(&server, compressed_name.clone(), 1000, 0).await.unwrap();
    assert_eq!(zstd::stream::decode_all(from_offset.as_slice()).unwrap(), &data[1000..]);
    let err = read_all(&server, compressed_name, 0, 10).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let plain =
        read_all(&server, ResourceName::read("ci", Compressor::Identity, digest).to_string(), 0, 0).await.unwrap();
    assert_eq!(plain, data);

    // A zstd upload whose content is not what the digest says.
    let other = zstd::bulk::compress(b"something else", 3).unwrap();
    let wrong = ResourceName::write("ci", Compressor::Zstd, blake3(b"expected")).to_string();
    let err = client.write(futures::stream::iter(requests(&wrong, &other, 0, 1024, true))).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // Not zstd at all.
    let garbage = ResourceName::write("ci", Compressor::Zstd, blake3(b"expected")).to_string();
    let err =
        client.write(futures::stream::iter(requests(&garbage, b"not zstd data", 0, 1024, true))).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn many_concurrent_writers_of_one_blob_leave_one_correct_copy() {
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start(dir.path(), &[]);
    let data = bytes(11, 6 * MIB);
    let digest = sha256(&data);
    let mut tasks = Vec::new();
    for _ in 0..24 {
        let mut client = server.bytestream().await;
        let reqs = requests(&write_name(&digest), &data, 0, 512 << 10, true);
        tasks.push(tokio::spawn(async move { client.write(futures::stream::iter(reqs)).await }));
    }
    for task in tasks {
        let response = task.await.unwrap().unwrap().into_inner();
        assert_eq!(response.committed_size, data.len() as i64);
    }
    let file = server.blob_path(&digest);
    assert_eq!(std::fs::read(&file).unwrap(), data);
    assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    // A write of a blob already stored ends at once with its full size.
    let one = vec![WriteRequest {
        resource_name: write_name(&digest),
        write_offset: 0,
        finish_write: false,
        data: data[..10].to_vec(),
    }];
    let response = server.bytestream().await.write(futures::stream::iter(one)).await.unwrap().into_inner();
    assert_eq!(response.committed_size, data.len() as i64);
}

#[tokio::test]
async fn parked_uploads_hold_at_most_their_share_of_the_disk_budget() {
    let dir = tempfile::tempdir().unwrap();
    // 16 MiB: 15 MiB for blobs, of which 1/16 (960 KiB) for parked uploads.
    let server = Coordinator::start(dir.path(), &["--max-disk", "16MiB"]);
    let client = server.bytestream().await;
    let interrupt = |name: String, data: Vec<u8>, sent: usize| {
        let mut client = client.clone();
        async move {
            let partial = requests(&name, &data[..sent], 0, 64 << 10, false);
            assert_eq!(client.write(futures::stream::iter(partial)).await.unwrap_err().code(), Code::InvalidArgument);
        }
    };
    let status = |name: String| {
        let mut client = client.clone();
        async move { client.query_write_status(QueryWriteStatusRequest { resource_name: name }).await.unwrap().into_inner() }
    };
    let blobs: Vec<Vec<u8>> = (0..3).map(|i| bytes(40 + i, 2 * MIB)).collect();
    let names: Vec<String> = blobs.iter().map(|b| write_name(&sha256(b))).collect();
    let tmp_files = || std::fs::read_dir(dir.path().join("tmp")).unwrap().count();

    interrupt(names[0].clone(), blobs[0].clone(), 600 << 10).await;
    assert_eq!(status(names[0].clone()).await.committed_size, 600 << 10);
    // A second parked upload would pass the share: the older one goes, with its file.
    interrupt(names[1].clone(), blobs[1].clone(), 600 << 10).await;
    assert_eq!(status(names[0].clone()).await.committed_size, 0);
    assert_eq!(status(names[1].clone()).await.committed_size, 600 << 10);
    assert_eq!(tmp_files(), 1);
    // One larger than the whole share is not parked at all.
    interrupt(names[2].clone(), blobs[2].clone(), 1536 << 10).await;
    assert_eq!(status(names[2].clone()).await.committed_size, 0);
    assert_eq!(status(names[1].clone()).await.committed_size, 600 << 10);
    assert_eq!(tmp_files(), 1);

    // The evicted upload starts over and completes.
    let again = requests(&names[0], &blobs[0], 0, MIB, true);
    client.clone().write(futures::stream::iter(again)).await.unwrap();
    assert!(status(names[0].clone()).await.complete);
}
