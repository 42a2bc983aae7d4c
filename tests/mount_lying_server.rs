//! A CAS server that lies: it serves file blobs whose bytes do not match
//! their digests. The mount must answer EIO and keep nothing of them — for
//! small blobs (BatchReadBlobs) and large ones (ByteStream). Needs root.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use casbuild_fs::digest::{Digest, DigestFunction};
use casbuild_fs::mount::{BlobCache, CasMount, MountOptions};
use casbuild_fs::store::BlobStore;
use casbuild_fs::store::{DiskStore, RemoteStore, RemoteStoreOptions};
use casbuild_proto::bytestream::byte_stream_server::{ByteStream, ByteStreamServer};
use casbuild_proto::bytestream::{
    QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, ReadResponse, WriteRequest, WriteResponse,
};
use casbuild_proto::reapi::content_addressable_storage_server::{
    ContentAddressableStorage, ContentAddressableStorageServer,
};
use casbuild_proto::reapi::{
    batch_read_blobs_response, BatchReadBlobsRequest, BatchReadBlobsResponse, BatchUpdateBlobsRequest,
    BatchUpdateBlobsResponse, Directory, FileNode, FindMissingBlobsRequest, FindMissingBlobsResponse,
    GetChunkMappingRequest, GetChunkMappingResponse, GetTreeRequest, GetTreeResponse, RegisterChunkMappingRequest,
    RegisterChunkMappingResponse, SpliceBlobRequest, SpliceBlobResponse, SplitBlobRequest, SplitBlobResponse,
};
use futures::stream::BoxStream;
use futures::StreamExt;
use prost::Message;
use tonic::{Request, Response, Status, Streaming};

const F: DigestFunction = DigestFunction::Blake3;

/// Blobs by hash; `lies` holds the hashes served with one byte flipped.
#[derive(Clone, Default)]
struct Liar {
    blobs: Arc<HashMap<String, Bytes>>,
    lies: Arc<Vec<String>>,
}

impl Liar {
    fn serve(&self, hash: &str) -> Option<Vec<u8>> {
        let mut data = self.blobs.get(hash)?.to_vec();
        if self.lies.iter().any(|h| h == hash) {
            data[0] ^= 0xff;
        }
        Some(data)
    }
}

#[tonic::async_trait]
impl ContentAddressableStorage for Liar {
    async fn find_missing_blobs(
        &self,
        _: Request<FindMissingBlobsRequest>,
    ) -> Result<Response<FindMissingBlobsResponse>, Status> {
        Ok(Response::new(FindMissingBlobsResponse { missing_blob_digests: vec![] }))
    }

    async fn batch_update_blobs(
        &self,
        _: Request<BatchUpdateBlobsRequest>,
    ) -> Result<Response<BatchUpdateBlobsResponse>, Status> {
        Err(Status::unimplemented("read-only"))
    }

    async fn batch_read_blobs(
        &self,
        request: Request<BatchReadBlobsRequest>,
    ) -> Result<Response<BatchReadBlobsResponse>, Status> {
        let responses = request
            .into_inner()
            .digests
            .into_iter()
            .map(|d| {
                let data = self.serve(&d.hash).unwrap_or_default();
                batch_read_blobs_response::Response { digest: Some(d), data, compressor: 0, status: None }
            })
            .collect();
        Ok(Response::new(BatchReadBlobsResponse { responses }))
    }

    type GetTreeStream = BoxStream<'static, Result<GetTreeResponse, Status>>;

    async fn get_tree(&self, _: Request<GetTreeRequest>) -> Result<Response<Self::GetTreeStream>, Status> {
        Err(Status::unimplemented("no GetTree"))
    }

    async fn split_blob(&self, _: Request<SplitBlobRequest>) -> Result<Response<SplitBlobResponse>, Status> {
        Err(Status::unimplemented("no SplitBlob"))
    }

    type GetChunkMappingStream = BoxStream<'static, Result<GetChunkMappingResponse, Status>>;

    async fn get_chunk_mapping(
        &self,
        _: Request<GetChunkMappingRequest>,
    ) -> Result<Response<Self::GetChunkMappingStream>, Status> {
        Err(Status::unimplemented("no chunk mappings"))
    }

    async fn splice_blob(&self, _: Request<SpliceBlobRequest>) -> Result<Response<SpliceBlobResponse>, Status> {
        Err(Status::unimplemented("no SpliceBlob"))
    }

    async fn register_chunk_mapping(
        &self,
        _: Request<Streaming<RegisterChunkMappingRequest>>,
    ) -> Result<Response<RegisterChunkMappingResponse>, Status> {
        Err(Status::unimplemented("no chunk mappings"))
    }
}

#[tonic::async_trait]
impl ByteStream for Liar {
    type ReadStream = BoxStream<'static, Result<ReadResponse, Status>>;

    async fn read(&self, request: Request<ReadRequest>) -> Result<Response<Self::ReadStream>, Status> {
        // blobs/{hash}/{size} or blobs/blake3/{hash}/{size}: the hash is the second-to-last part.
        let name = request.into_inner().resource_name;
        let hash = name.rsplit('/').nth(1).unwrap_or_default().to_owned();
        let data = self.serve(&hash).ok_or_else(|| Status::not_found(name))?;
        let chunks: Vec<Result<ReadResponse, Status>> =
            data.chunks(64 << 10).map(|c| Ok(ReadResponse { data: c.to_vec() })).collect();
        Ok(Response::new(futures::stream::iter(chunks).boxed()))
    }

    async fn write(&self, _: Request<Streaming<WriteRequest>>) -> Result<Response<WriteResponse>, Status> {
        Err(Status::unimplemented("read-only"))
    }

    async fn query_write_status(
        &self,
        _: Request<QueryWriteStatusRequest>,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        Err(Status::unimplemented("read-only"))
    }
}

#[test]
fn blobs_that_do_not_match_their_digest_are_never_served_or_kept() {
    if !common::needs_root("blobs_that_do_not_match_their_digest", true) {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (small, large, honest) = (common::bytes(1, 10_000), common::bytes(2, 300_000), common::bytes(3, 5_000));
    let file = |name: &str, data: &[u8]| FileNode {
        name: name.into(),
        digest: Some(F.digest_of(data).to_proto()),
        is_executable: false,
        node_properties: None,
    };
    let root = Directory {
        files: vec![file("honest.txt", &honest), file("large.bin", &large), file("small.bin", &small)],
        ..Default::default()
    };
    let root_bytes = Bytes::from(root.encode_to_vec());
    let root_digest = F.digest_of(&root_bytes);
    let mut blobs = HashMap::new();
    for data in [&small, &large, &honest] {
        blobs.insert(F.digest_of(data).hash_hex(), Bytes::from(data.clone()));
    }
    blobs.insert(root_digest.hash_hex(), root_bytes);
    let liar = Liar {
        blobs: Arc::new(blobs),
        lies: Arc::new(vec![F.digest_of(&small).hash_hex(), F.digest_of(&large).hash_hex()]),
    };

    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let url = format!("grpc://{}", listener.local_addr().unwrap());
    runtime.spawn(
        tonic::transport::Server::builder()
            .add_service(ContentAddressableStorageServer::new(liar.clone()))
            .add_service(ByteStreamServer::new(liar))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let dir = tempfile::tempdir().unwrap();
    let remote = runtime.block_on(RemoteStore::connect(&url, RemoteStoreOptions::default())).unwrap();
    let local = DiskStore::open(&dir.path().join("cache"), 1 << 30).unwrap();
    let cache = Arc::new(BlobCache::new(local.clone(), remote, Duration::from_secs(5)));
    let mount =
        CasMount::mount(&dir.path().join("cas"), cache, runtime.handle().clone(), &MountOptions::default()).unwrap();
    let input = mount.register("liar", root_digest).unwrap();

    assert_eq!(std::fs::read(input.join("honest.txt")).unwrap(), honest, "true blobs are served");
    for name in ["small.bin", "large.bin"] {
        let err = std::fs::read(input.join(name)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{name}: a blob that fails its digest is an I/O error");
    }
    let lied: Vec<Digest> = [&small, &large].iter().map(|d| F.digest_of(d)).collect();
    let kept = runtime.block_on(local.find_missing(&lied)).unwrap();
    assert_eq!(kept, lied, "nothing of the false blobs was cached");
    assert_eq!(std::fs::read_dir(dir.path().join("cache/tmp")).unwrap().count(), 0, "no partial file left");
    mount.unmount().unwrap();
}
