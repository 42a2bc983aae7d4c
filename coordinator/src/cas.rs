//! `ContentAddressableStorage`: FindMissingBlobs, the batch calls, and GetTree.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use casbuild_cas::digest::Digest;
use casbuild_cas::storage::Storage;
use casbuild_cas::store::BlobStore;
use casbuild_cas::tree::{child_digest, decode_directory};
use casbuild_proto::reapi::content_addressable_storage_server::ContentAddressableStorage;
use casbuild_proto::reapi::{
    batch_read_blobs_response, batch_update_blobs_response, compressor, BatchReadBlobsRequest, BatchReadBlobsResponse,
    BatchUpdateBlobsRequest, BatchUpdateBlobsResponse, FindMissingBlobsRequest, FindMissingBlobsResponse,
    GetChunkMappingRequest, GetChunkMappingResponse, GetTreeRequest, GetTreeResponse, RegisterChunkMappingRequest,
    RegisterChunkMappingResponse, SpliceBlobRequest, SpliceBlobResponse, SplitBlobRequest, SplitBlobResponse,
};
use futures::stream::{self, BoxStream, StreamExt};
use tonic::{Request, Response, Status};

use crate::auth::{admit, Permission};
use crate::compression::{compress, decompress_exact};
use crate::status::{request_digest, rpc_ok, rpc_status, store_status};

/// Batch calls run this many blob reads or writes at once.
const BATCH_CONCURRENCY: usize = 32;

/// Directories per GetTree page when the client sets no page size, and the
/// most it may ask for.
const TREE_PAGE_DEFAULT: usize = 1000;
const TREE_PAGE_MAX: usize = 10_000;

/// The CAS service over a coordinator's [`Storage`].
pub struct CasService {
    storage: Arc<Storage>,
    max_batch_bytes: u64,
}

impl CasService {
    /// Serves `storage`, refusing batches whose blobs total over `max_batch_bytes`.
    pub fn new(storage: Arc<Storage>, max_batch_bytes: u64) -> Self {
        CasService { storage, max_batch_bytes }
    }

    /// Refuses a batch whose sizes add up to more than the limit; the sum is
    /// checked, so declared sizes near 2^64 cannot wrap around it.
    fn check_batch_size(&self, sizes: impl IntoIterator<Item = u64>, what: &str) -> Result<(), Status> {
        let total = sizes.into_iter().try_fold(0u64, |sum, size| sum.checked_add(size)).unwrap_or(u64::MAX);
        if total > self.max_batch_bytes {
            return Err(Status::invalid_argument(format!(
                "{what} of {total} bytes is over the batch limit of {} bytes (max_batch_total_size_bytes); \
                 use ByteStream for large blobs",
                self.max_batch_bytes
            )));
        }
        Ok(())
    }
}

/// One BatchUpdateBlobs entry: decode, verify, store.
async fn update_one(
    cas: &dyn BlobStore,
    function: i32,
    entry: casbuild_proto::reapi::batch_update_blobs_request::Request,
) -> batch_update_blobs_response::Response {
    let digest_proto = entry.digest.clone();
    let result = async {
        let digest = request_digest(function, entry.digest.as_ref(), "digest")?;
        let data = match compressor::Value::try_from(entry.compressor) {
            Ok(compressor::Value::Identity) => Bytes::from(entry.data),
            Ok(compressor::Value::Zstd) => decompress_exact(&entry.data, digest.size_bytes)?,
            _ => return Err(Status::invalid_argument(format!("compressor {} is not supported", entry.compressor))),
        };
        cas.write(&digest, data).await.map_err(store_status)
    }
    .await;
    batch_update_blobs_response::Response {
        digest: digest_proto,
        status: Some(match result {
            Ok(()) => rpc_ok(),
            Err(status) => rpc_status(&status),
        }),
    }
}

/// One BatchReadBlobs entry.
async fn read_one(cas: &dyn BlobStore, digest: Digest, zstd: bool) -> batch_read_blobs_response::Response {
    let result = async {
        let data = cas.read_all(&digest).await.map_err(store_status)?;
        // Compress only where it pays: small blobs go as they are.
        if zstd && data.len() >= 4096 {
            let packed = compress(&data)?;
            if packed.len() < data.len() {
                return Ok((packed, compressor::Value::Zstd));
            }
        }
        Ok::<_, Status>((Vec::from(data), compressor::Value::Identity))
    }
    .await;
    let (data, compressor, status) = match result {
        Ok((data, compressor)) => (data, compressor as i32, rpc_ok()),
        Err(status) => (Vec::new(), 0, rpc_status(&status)),
    };
    batch_read_blobs_response::Response { digest: Some(digest.to_proto()), data, compressor, status: Some(status) }
}

#[tonic::async_trait]
impl ContentAddressableStorage for CasService {
    async fn find_missing_blobs(
        &self,
        request: Request<FindMissingBlobsRequest>,
    ) -> Result<Response<FindMissingBlobsResponse>, Status> {
        let (_, request) = admit(request, Permission::ReadCache, |r| &r.instance_name)?;
        let digests = request
            .blob_digests
            .iter()
            .map(|d| request_digest(request.digest_function, Some(d), "blob_digests"))
            .collect::<Result<Vec<_>, _>>()?;
        let missing = self.storage.cas(&request.instance_name).find_missing(&digests).await.map_err(store_status)?;
        Ok(Response::new(FindMissingBlobsResponse {
            missing_blob_digests: missing.iter().map(Digest::to_proto).collect(),
        }))
    }

    async fn batch_update_blobs(
        &self,
        request: Request<BatchUpdateBlobsRequest>,
    ) -> Result<Response<BatchUpdateBlobsResponse>, Status> {
        let (_, request) = admit(request, Permission::WriteCas, |r| &r.instance_name)?;
        // What an entry takes in memory: its bytes, or what they decompress to
        // (the declared size, which decompression is held to).
        let sizes = request.requests.iter().map(|r| {
            let declared = r.digest.as_ref().map_or(0, |d| d.size_bytes.max(0) as u64);
            (r.data.len() as u64).max(declared)
        });
        self.check_batch_size(sizes, "BatchUpdateBlobs request")?;
        let cas = self.storage.cas(&request.instance_name);
        let function = request.digest_function;
        let responses = stream::iter(request.requests)
            .map(|entry| {
                let cas = cas.clone();
                async move { update_one(cas.as_ref(), function, entry).await }
            })
            .buffered(BATCH_CONCURRENCY)
            .collect()
            .await;
        Ok(Response::new(BatchUpdateBlobsResponse { responses }))
    }

    async fn batch_read_blobs(
        &self,
        request: Request<BatchReadBlobsRequest>,
    ) -> Result<Response<BatchReadBlobsResponse>, Status> {
        let (_, request) = admit(request, Permission::ReadCache, |r| &r.instance_name)?;
        let digests = request
            .digests
            .iter()
            .map(|d| request_digest(request.digest_function, Some(d), "digests"))
            .collect::<Result<Vec<_>, _>>()?;
        self.check_batch_size(digests.iter().map(|d| d.size_bytes), "BatchReadBlobs of blobs")?;
        let zstd = request.acceptable_compressors.contains(&(compressor::Value::Zstd as i32));
        let cas = self.storage.cas(&request.instance_name);
        let responses = stream::iter(digests)
            .map(|digest| {
                let cas = cas.clone();
                async move { read_one(cas.as_ref(), digest, zstd).await }
            })
            .buffered(BATCH_CONCURRENCY)
            .collect()
            .await;
        Ok(Response::new(BatchReadBlobsResponse { responses }))
    }

    type GetTreeStream = BoxStream<'static, Result<GetTreeResponse, Status>>;

    async fn get_tree(&self, request: Request<GetTreeRequest>) -> Result<Response<Self::GetTreeStream>, Status> {
        let (_, request) = admit(request, Permission::ReadCache, |r| &r.instance_name)?;
        let root = request_digest(request.digest_function, request.root_digest.as_ref(), "root_digest")?;
        let page_size = match request.page_size {
            n if n < 0 => return Err(Status::invalid_argument(format!("page_size {n} is negative"))),
            0 => TREE_PAGE_DEFAULT,
            n => (n as usize).min(TREE_PAGE_MAX),
        };
        let skip: usize = match request.page_token.as_str() {
            "" => 0,
            token => token
                .parse()
                .map_err(|_| Status::invalid_argument(format!("page_token {token:?} was not issued by this server")))?,
        };
        let cas = self.storage.cas(&request.instance_name);
        // The root must exist; below it, missing parts are omitted as REAPI allows.
        if !cas.find_missing(&[root]).await.map_err(store_status)?.is_empty() {
            return Err(Status::not_found(format!("root directory {root} is not in the CAS")));
        }
        let walk = TreeWalk::new(cas, root, skip);
        let pages = stream::unfold(Some(walk), move |walk| async move {
            let mut walk = walk?;
            match walk.next_page(page_size).await {
                Ok((directories, more)) => {
                    let next_page_token = if more { walk.position.to_string() } else { String::new() };
                    Some((Ok(GetTreeResponse { directories, next_page_token }), more.then_some(walk)))
                }
                Err(status) => Some((Err(status), None)),
            }
        });
        Ok(Response::new(pages.boxed()))
    }

    async fn split_blob(&self, _: Request<SplitBlobRequest>) -> Result<Response<SplitBlobResponse>, Status> {
        Err(Status::unimplemented("blob splitting is not supported (split_blob_support is false)"))
    }

    type GetChunkMappingStream = BoxStream<'static, Result<GetChunkMappingResponse, Status>>;

    async fn get_chunk_mapping(
        &self,
        _: Request<GetChunkMappingRequest>,
    ) -> Result<Response<Self::GetChunkMappingStream>, Status> {
        Err(Status::unimplemented("chunk mappings are not supported"))
    }

    async fn splice_blob(&self, _: Request<SpliceBlobRequest>) -> Result<Response<SpliceBlobResponse>, Status> {
        Err(Status::unimplemented("blob splicing is not supported (splice_blob_support is false)"))
    }

    async fn register_chunk_mapping(
        &self,
        _: Request<tonic::Streaming<RegisterChunkMappingRequest>>,
    ) -> Result<Response<RegisterChunkMappingResponse>, Status> {
        Err(Status::unimplemented("chunk mappings are not supported"))
    }
}

/// A breadth-first walk over a Directory tree that visits each distinct
/// Directory once. Its position (directories produced so far) is the page
/// token: resuming re-walks the tree to that point, which is cheap because
/// Directory blobs are small and served from the memory tier.
struct TreeWalk {
    cas: Arc<dyn BlobStore>,
    queue: VecDeque<Digest>,
    seen: HashSet<Digest>,
    skip: usize,
    position: usize,
}

impl TreeWalk {
    fn new(cas: Arc<dyn BlobStore>, root: Digest, skip: usize) -> Self {
        TreeWalk { cas, queue: VecDeque::from([root]), seen: HashSet::from([root]), skip, position: 0 }
    }

    /// The next `size` directories, and whether more follow.
    async fn next_page(&mut self, size: usize) -> Result<(Vec<casbuild_proto::reapi::Directory>, bool), Status> {
        let mut page = Vec::new();
        while page.len() < size {
            let Some(digest) = self.queue.pop_front() else { break };
            let bytes = match self.cas.read_all(&digest).await {
                Ok(bytes) => bytes,
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(store_status(e)),
            };
            let directory = decode_directory(&digest, &bytes).map_err(|e| Status::invalid_argument(e.to_string()))?;
            for child in &directory.directories {
                let child = child_digest(digest.function, &child.name, child.digest.as_ref())
                    .map_err(|e| Status::invalid_argument(format!("directory {digest}: {e}")))?;
                if self.seen.insert(child) {
                    self.queue.push_back(child);
                }
            }
            self.position += 1;
            if self.position > self.skip {
                page.push(directory);
            }
        }
        Ok((page, !self.queue.is_empty()))
    }
}
