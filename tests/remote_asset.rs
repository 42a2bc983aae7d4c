//! The Remote Asset API on the coordinator's port, as BuildStream uses it:
//! push a source blob and a tree under URIs with qualifiers, fetch them back;
//! expiry, qualifiers, instances, persistence across a restart, and assets
//! whose blobs are gone.

mod common;

use casbuild_cas::digest::{Digest, DigestFunction};
use casbuild_proto::asset::fetch_client::FetchClient;
use casbuild_proto::asset::push_client::PushClient;
use casbuild_proto::asset::{
    FetchBlobRequest, FetchDirectoryRequest, PushBlobRequest, PushDirectoryRequest, Qualifier,
};
use casbuild_proto::protobuf::Timestamp;
use common::{casbuild, sample_tree, Coordinator};
use tonic::Code;

const F: DigestFunction = DigestFunction::Blake3;

fn qualifier(name: &str, value: &str) -> Qualifier {
    Qualifier { name: name.into(), value: value.into() }
}

fn upload(server: &Coordinator, path: &std::path::Path) -> Digest {
    let out = casbuild().args(["cas", "upload", "--remote", &server.url()]).arg(path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Digest::parse(F, String::from_utf8(out.stdout).unwrap().trim()).unwrap()
}

fn fetch_blob(uri: &str, qualifiers: Vec<Qualifier>) -> FetchBlobRequest {
    FetchBlobRequest { uris: vec![uri.into()], qualifiers, digest_function: F.to_proto() as i32, ..Default::default() }
}

#[tokio::test]
async fn assets_are_pushed_fetched_expired_and_never_served_without_their_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("storage");
    let server = Coordinator::start(&storage, &[]);
    let tarball = dir.path().join("src.tar.gz");
    let contents = common::bytes(3, 100_000);
    std::fs::write(&tarball, &contents).unwrap();
    let blob = upload(&server, &tarball);
    let tree_dir = dir.path().join("tree");
    sample_tree(&tree_dir);
    let tree = upload(&server, &tree_dir);

    let mut push = PushClient::new(server.channel().await);
    let mut fetch = FetchClient::new(server.channel().await);
    let uri = "https://example.org/src-1.0.tar.gz";
    // The qualifier must describe the content (the server checks it).
    let sri = {
        use base64::Engine;
        use sha2::Digest as _;
        format!("sha256-{}", base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(&contents)))
    };
    let checksum = qualifier("checksum.sri", &sri);
    push.push_blob(PushBlobRequest {
        uris: vec![uri.into(), "https://mirror.example.org/src-1.0.tar.gz".into()],
        qualifiers: vec![checksum.clone()],
        blob_digest: Some(blob.to_proto()),
        digest_function: F.to_proto() as i32,
        ..Default::default()
    })
    .await
    .unwrap();
    let got = fetch.fetch_blob(fetch_blob(uri, vec![checksum.clone()])).await.unwrap().into_inner();
    assert_eq!(got.blob_digest, Some(blob.to_proto()));
    assert_eq!(got.uri, uri);
    // Any of the pushed URIs finds it; the first URI that has it wins.
    let mut either = fetch_blob("https://unknown.example.org/x", vec![checksum.clone()]);
    either.uris.push("https://mirror.example.org/src-1.0.tar.gz".into());
    assert_eq!(fetch.fetch_blob(either).await.unwrap().into_inner().uri, "https://mirror.example.org/src-1.0.tar.gz");
    // Qualifiers are part of the identity.
    let err = fetch.fetch_blob(fetch_blob(uri, vec![])).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = fetch.fetch_blob(fetch_blob(uri, vec![qualifier("checksum.sri", "sha256-other")])).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // Nothing is downloaded from the internet: unknown URIs are NOT_FOUND.
    let err = fetch.fetch_blob(fetch_blob("https://example.org/never-pushed", vec![])).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // Instances are separate.
    let mut other = fetch_blob(uri, vec![checksum.clone()]);
    other.instance_name = "other".into();
    assert_eq!(fetch.fetch_blob(other).await.unwrap_err().code(), Code::NotFound);

    // A directory, with a blob it references.
    let dir_uri = "git://example.org/repo.git?ref=v1";
    push.push_directory(PushDirectoryRequest {
        uris: vec![dir_uri.into()],
        root_directory_digest: Some(tree.to_proto()),
        references_blobs: vec![blob.to_proto()],
        digest_function: F.to_proto() as i32,
        ..Default::default()
    })
    .await
    .unwrap();
    let request = || FetchDirectoryRequest {
        uris: vec![dir_uri.into()],
        digest_function: F.to_proto() as i32,
        ..Default::default()
    };
    let got = fetch.fetch_directory(request()).await.unwrap().into_inner();
    assert_eq!(got.root_directory_digest, Some(tree.to_proto()));
    assert_eq!(fetch.fetch_blob(fetch_blob(dir_uri, vec![])).await.unwrap_err().code(), Code::NotFound, "kinds differ");

    // Expiry the client asked for.
    push.push_blob(PushBlobRequest {
        uris: vec!["https://example.org/short-lived".into()],
        blob_digest: Some(blob.to_proto()),
        expire_at: Some(Timestamp { seconds: 1, nanos: 0 }),
        digest_function: F.to_proto() as i32,
        ..Default::default()
    })
    .await
    .unwrap();
    let err = fetch.fetch_blob(fetch_blob("https://example.org/short-lived", vec![])).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "expired");

    // Pushing what the CAS does not have is refused; bad requests are named.
    let absent = F.digest_of(b"never uploaded");
    let err = push
        .push_blob(PushBlobRequest {
            uris: vec!["https://example.org/absent".into()],
            blob_digest: Some(absent.to_proto()),
            digest_function: F.to_proto() as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains(&absent.hash_hex()), "{}", err.message());
    let err = fetch.fetch_blob(FetchBlobRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let twice = fetch_blob(uri, vec![qualifier("a", "1"), qualifier("a", "2")]);
    assert_eq!(fetch.fetch_blob(twice).await.unwrap_err().code(), Code::InvalidArgument);

    // Assets persist across a crash; once a referenced blob is gone, not served.
    drop(server); // SIGKILL
    let server = Coordinator::start(&storage, &[]);
    let mut fetch = FetchClient::new(server.channel().await);
    assert_eq!(
        fetch.fetch_blob(fetch_blob(uri, vec![checksum.clone()])).await.unwrap().into_inner().blob_digest,
        Some(blob.to_proto())
    );
    assert!(fetch.fetch_directory(request()).await.is_ok());
    let blob_file = server.blob_path(&blob);
    drop(server);
    std::fs::remove_file(blob_file).unwrap();
    let server = Coordinator::start(&storage, &[]);
    let mut fetch = FetchClient::new(server.channel().await);
    assert_eq!(fetch.fetch_blob(fetch_blob(uri, vec![checksum])).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(fetch.fetch_directory(request()).await.unwrap_err().code(), Code::NotFound, "its reference is gone");
}
