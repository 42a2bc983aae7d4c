//! A CAS server for tests that serves whatever it is given: blobs whose
//! bytes do not match their digests (`lies`), and trees whose names no honest
//! server would store. Clients and the mount must refuse both.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use casbuild_cas::digest::DigestFunction;
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

/// Blobs by hash; `lies` holds the hashes served with one byte flipped.
/// ByteStream reads honour `read_offset`/`read_limit` and send 64 KiB
/// chunks, each after `pace` (a slow link, so that reads meet a stream in
/// progress).
#[derive(Clone, Default)]
pub struct Liar {
    pub blobs: Arc<HashMap<String, Bytes>>,
    pub lies: Arc<Vec<String>>,
    pub pace: std::time::Duration,
}

impl Liar {
    /// A server of exactly these blobs (by their BLAKE3 digests), none altered.
    pub fn honest(blobs: &[Bytes]) -> Liar {
        let map = blobs.iter().map(|b| (DigestFunction::Blake3.digest_of(b).hash_hex(), b.clone())).collect();
        Liar { blobs: Arc::new(map), ..Default::default() }
    }

    /// Serves the CAS and ByteStream, plus whatever `more` adds, on a
    /// loopback port of `runtime`; returns its grpc:// address.
    pub fn spawn(
        self,
        runtime: &tokio::runtime::Runtime,
        more: impl FnOnce(tonic::transport::server::Router) -> tonic::transport::server::Router,
    ) -> String {
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let url = format!("grpc://{}", listener.local_addr().unwrap());
        let router = tonic::transport::Server::builder()
            .add_service(ContentAddressableStorageServer::new(self.clone()))
            .add_service(ByteStreamServer::new(self));
        runtime.spawn(more(router).serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)));
        url
    }

    fn serve(&self, hash: &str) -> Option<Vec<u8>> {
        let mut data = self.blobs.get(hash)?.to_vec();
        if self.lies.iter().any(|h| h == hash) {
            data[0] ^= 0xff;
        }
        Some(data)
    }
}

/// A Directory of plain files `(name, contents)` in this order, encoded,
/// and its BLAKE3 digest (the digest function of these servers).
pub fn directory_of(files: &[(&str, &[u8])]) -> (Bytes, casbuild_cas::digest::Digest) {
    let files = files
        .iter()
        .map(|(name, data)| FileNode {
            name: (*name).into(),
            digest: Some(DigestFunction::Blake3.digest_of(data).to_proto()),
            ..Default::default()
        })
        .collect();
    let bytes = Bytes::from(Directory { files, ..Default::default() }.encode_to_vec());
    let digest = DigestFunction::Blake3.digest_of(&bytes);
    (bytes, digest)
}

/// A /cas mount at `dir/cas` of the server at `url` (its disk cache in
/// `dir/cache`, returned for checks of what was kept).
pub fn mount_of(
    runtime: &tokio::runtime::Runtime,
    url: &str,
    dir: &std::path::Path,
    idle: std::time::Duration,
) -> (casbuild_mount::CasMount, casbuild_cas::store::DiskStore) {
    use casbuild_cas::store::{DiskStore, RemoteStore, RemoteStoreOptions};
    let remote = runtime.block_on(RemoteStore::connect(url, RemoteStoreOptions::default())).unwrap();
    let local = DiskStore::open(&dir.join("cache"), 1 << 30).unwrap();
    let cache = Arc::new(casbuild_mount::BlobCache::new(local.clone(), Arc::new(remote), "", idle));
    let options = casbuild_mount::MountOptions::default();
    let mount = casbuild_mount::CasMount::mount(&dir.join("cas"), cache, runtime.handle().clone(), &options).unwrap();
    (mount, local)
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

    /// Every Directory reachable from the root, as stored (names unchecked).
    async fn get_tree(&self, request: Request<GetTreeRequest>) -> Result<Response<Self::GetTreeStream>, Status> {
        let root = request.into_inner().root_digest.unwrap_or_default();
        let mut directories = Vec::new();
        let mut queue = vec![root.hash];
        let mut seen = std::collections::HashSet::new();
        while let Some(hash) = queue.pop() {
            if !seen.insert(hash.clone()) {
                continue;
            }
            let data = self.serve(&hash).ok_or_else(|| Status::not_found(hash.clone()))?;
            let directory = Directory::decode(data.as_slice()).map_err(|e| Status::internal(e.to_string()))?;
            queue.extend(directory.directories.iter().filter_map(|d| d.digest.as_ref().map(|d| d.hash.clone())));
            directories.push(directory);
        }
        let response = GetTreeResponse { directories, next_page_token: String::new() };
        Ok(Response::new(futures::stream::iter([Ok(response)]).boxed()))
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
        let request = request.into_inner();
        let name = request.resource_name;
        let hash = name.rsplit('/').nth(1).unwrap_or_default().to_owned();
        let data = self.serve(&hash).ok_or_else(|| Status::not_found(name))?;
        let start = (request.read_offset.max(0) as usize).min(data.len());
        let end = match request.read_limit {
            0 => data.len(),
            limit => start.saturating_add(limit.max(0) as usize).min(data.len()),
        };
        let chunks: Vec<Vec<u8>> = data[start..end].chunks(64 << 10).map(<[u8]>::to_vec).collect();
        let pace = self.pace;
        let stream = futures::stream::iter(chunks).then(move |data| async move {
            if !pace.is_zero() {
                tokio::time::sleep(pace).await;
            }
            Ok(ReadResponse { data })
        });
        Ok(Response::new(stream.boxed()))
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
