//! A REAPI CAS reached over gRPC, as a [`BlobStore`]: FindMissingBlobs,
//! BatchUpdateBlobs/BatchReadBlobs for small blobs, ByteStream for large ones.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::store::channel::{connect_channel, ConnectOptions, RemoteChannel};
use async_trait::async_trait;
use bytes::Bytes;
use casbuild_proto::bytestream::byte_stream_client::ByteStreamClient;
use casbuild_proto::bytestream::{ReadRequest, WriteRequest, WriteResponse};
use casbuild_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use casbuild_proto::reapi::{
    batch_update_blobs_request, BatchReadBlobsRequest, BatchUpdateBlobsRequest, Directory, FindMissingBlobsRequest,
    GetTreeRequest,
};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

use crate::digest::{Digest, DigestFunction};
use crate::resource::{Compressor, ResourceName};
use crate::store::verify::verified;
use crate::store::{read_range, BlobStore, BlobStream, BlobWriter, CasInstances, SharedStore, StoreError, CHUNK_SIZE};

/// How to talk to the remote CAS.
#[derive(Clone, Debug)]
pub struct RemoteStoreOptions {
    /// The REAPI instance name.
    pub instance: String,
    /// Largest total of blob bytes sent or asked for in one batch call.
    pub max_batch_bytes: u64,
    /// Bound on connecting and on each unary call.
    pub timeout: Duration,
    /// TLS material and credential.
    pub connect: ConnectOptions,
}

impl Default for RemoteStoreOptions {
    fn default() -> Self {
        RemoteStoreOptions {
            instance: String::new(),
            max_batch_bytes: 4 << 20,
            timeout: Duration::from_secs(60),
            connect: ConnectOptions::default(),
        }
    }
}

/// Digests per FindMissingBlobs call, to stay far below message size limits.
const FIND_MISSING_CHUNK: usize = 16_384;

/// Per-blob bytes a batch entry costs beyond its data (digest and framing).
const BATCH_ENTRY_OVERHEAD: u64 = 128;

/// A client of a remote REAPI CAS. Cheap to clone.
#[derive(Clone)]
pub struct RemoteStore {
    channel: RemoteChannel,
    options: RemoteStoreOptions,
}

impl RemoteStore {
    /// Connects to `url` (`grpc://HOST:PORT`, or `grpcs://HOST:PORT` for TLS).
    pub async fn connect(url: &str, options: RemoteStoreOptions) -> Result<Self, StoreError> {
        let channel = connect_channel(url, options.timeout, &options.connect).await?;
        Ok(RemoteStore { channel, options })
    }

    /// Wraps an existing channel.
    pub fn from_channel(channel: RemoteChannel, options: RemoteStoreOptions) -> Self {
        RemoteStore { channel, options }
    }

    /// The underlying channel, for other services on the same server.
    pub fn channel(&self) -> RemoteChannel {
        self.channel.clone()
    }

    /// The instance this store reads and writes.
    pub fn instance(&self) -> &str {
        &self.options.instance
    }

    /// The same server and channel, for another instance.
    pub fn with_instance(&self, instance: &str) -> RemoteStore {
        let options = RemoteStoreOptions { instance: instance.to_owned(), ..self.options.clone() };
        RemoteStore { channel: self.channel.clone(), options }
    }

    fn cas(&self) -> ContentAddressableStorageClient<RemoteChannel> {
        ContentAddressableStorageClient::new(self.channel.clone())
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }

    fn bytestream(&self) -> ByteStreamClient<RemoteChannel> {
        ByteStreamClient::new(self.channel.clone()).max_decoding_message_size(usize::MAX)
    }

    async fn batch_update(&self, blobs: Vec<(Digest, Bytes)>) -> Result<(), StoreError> {
        for (function, blobs) in by_function(blobs, |(d, _)| d.function) {
            let requests = blobs
                .into_iter()
                .map(|(digest, data)| batch_update_blobs_request::Request {
                    digest: Some(digest.to_proto()),
                    data: Vec::from(data),
                    compressor: 0,
                })
                .collect();
            let request = BatchUpdateBlobsRequest {
                instance_name: self.options.instance.clone(),
                requests,
                digest_function: function.to_proto() as i32,
            };
            let response =
                self.cas().batch_update_blobs(self.unary(request)).await.map_err(|s| from_status(s, None))?;
            for entry in response.into_inner().responses {
                if let Some(status) = entry.status.filter(|s| s.code != 0) {
                    let digest = entry.digest.map(|d| format!("{}/{}", d.hash, d.size_bytes)).unwrap_or_default();
                    return Err(StoreError::InvalidArgument(format!("uploading {digest}: {}", status.message)));
                }
            }
        }
        Ok(())
    }

    /// Every Directory of the tree rooted at `root`, following GetTree's pages.
    pub async fn get_tree(&self, root: &Digest) -> Result<Vec<Directory>, StoreError> {
        let mut page_token = String::new();
        let mut directories = Vec::new();
        loop {
            let request = GetTreeRequest {
                instance_name: self.options.instance.clone(),
                root_digest: Some(root.to_proto()),
                page_size: 0,
                page_token: page_token.clone(),
                digest_function: root.function.to_proto() as i32,
            };
            let mut stream = self.cas().get_tree(request).await.map_err(|s| from_status(s, Some(root)))?.into_inner();
            while let Some(page) = stream.next().await {
                let page = page.map_err(|s| from_status(s, Some(root)))?;
                directories.extend(page.directories);
                page_token = page.next_page_token;
            }
            if page_token.is_empty() {
                return Ok(directories);
            }
        }
    }

    async fn write_stream(&self, digest: &Digest, data: Bytes) -> Result<(), StoreError> {
        let mut writer = self.begin_write(digest).await?;
        writer.write(data).await?;
        writer.commit().await
    }

    fn unary<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.options.timeout);
        request
    }
}

/// Groups items by digest function, keeping their order within each group.
fn by_function<T>(items: Vec<T>, function: impl Fn(&T) -> DigestFunction) -> BTreeMap<DigestFunction, Vec<T>> {
    let mut groups: BTreeMap<DigestFunction, Vec<T>> = BTreeMap::new();
    for item in items {
        groups.entry(function(&item)).or_default().push(item);
    }
    groups
}

/// Maps a gRPC status from the server to a store error.
pub fn from_status(status: tonic::Status, digest: Option<&Digest>) -> StoreError {
    let message = status.message().to_string();
    match (status.code(), digest) {
        (tonic::Code::NotFound, Some(d)) => StoreError::NotFound { digest: *d, detail: message },
        (tonic::Code::InvalidArgument, _) => StoreError::InvalidArgument(message),
        (tonic::Code::ResourceExhausted, _) => StoreError::ResourceExhausted(message),
        (
            code @ (tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Aborted
            | tonic::Code::Internal
            | tonic::Code::Unknown
            | tonic::Code::Cancelled),
            _,
        ) => StoreError::Unavailable(format!("remote CAS: {code:?}: {message}")),
        (code, _) => StoreError::Refused { code, message },
    }
}

#[async_trait]
impl BlobStore for RemoteStore {
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>, StoreError> {
        let mut missing = Vec::new();
        for (function, digests) in by_function(digests.to_vec(), |d| d.function) {
            for chunk in digests.chunks(FIND_MISSING_CHUNK) {
                let request = FindMissingBlobsRequest {
                    instance_name: self.options.instance.clone(),
                    blob_digests: chunk.iter().map(Digest::to_proto).collect(),
                    digest_function: function.to_proto() as i32,
                };
                let response =
                    self.cas().find_missing_blobs(self.unary(request)).await.map_err(|s| from_status(s, None))?;
                for d in response.into_inner().missing_blob_digests {
                    missing.push(
                        Digest::from_proto(function, &d).map_err(|e| StoreError::InvalidArgument(e.to_string()))?,
                    );
                }
            }
        }
        Ok(missing)
    }

    async fn read(&self, digest: &Digest, offset: u64, limit: Option<u64>) -> Result<BlobStream, StoreError> {
        let (start, end) = read_range(digest, offset, limit)?;
        if digest.is_empty_blob() || start == end {
            return Ok(futures::stream::empty().boxed());
        }
        let request = ReadRequest {
            resource_name: ResourceName::read(&self.options.instance, Compressor::Identity, *digest).to_string(),
            read_offset: start as i64,
            read_limit: (end - start) as i64,
        };
        let digest = *digest;
        let stream = self.bytestream().read(request).await.map_err(|s| from_status(s, Some(&digest)))?.into_inner();
        let stream = stream
            .map(move |r| r.map(|resp| Bytes::from(resp.data)).map_err(|s| from_status(s, Some(&digest))))
            .boxed();
        if start == 0 && end == digest.size_bytes {
            let stream = verified(stream, digest, move || StoreError::NotFound {
                digest,
                detail: "the remote sent bytes that do not match the digest".into(),
            });
            return Ok(stream);
        }
        Ok(stream)
    }

    async fn begin_write(&self, digest: &Digest) -> Result<Box<dyn BlobWriter>, StoreError> {
        let (tx, rx) = mpsc::channel::<WriteRequest>(4);
        let mut client = self.bytestream();
        let d = *digest;
        let call = tokio::spawn(async move {
            client.write(ReceiverStream::new(rx)).await.map(|r| r.into_inner()).map_err(|s| from_status(s, Some(&d)))
        });
        let resource = ResourceName::write(&self.options.instance, Compressor::Identity, *digest).to_string();
        Ok(Box::new(RemoteWriter { digest: *digest, resource, tx: Some(tx), call, written: 0 }))
    }

    async fn write(&self, digest: &Digest, data: Bytes) -> Result<(), StoreError> {
        if digest.is_empty_blob() {
            return crate::store::Verifier::check(*digest, &data);
        }
        if data.len() as u64 + BATCH_ENTRY_OVERHEAD <= self.options.max_batch_bytes / 2 {
            crate::store::Verifier::check(*digest, &data)?;
            return self.batch_update(vec![(*digest, data)]).await;
        }
        self.write_stream(digest, data).await
    }

    /// Small blobs packed into BatchUpdateBlobs calls under the batch limit,
    /// large ones through ByteStream.
    async fn write_batch(&self, blobs: Vec<(Digest, Bytes)>) -> Result<(), StoreError> {
        let limit = self.options.max_batch_bytes;
        let mut batch: Vec<(Digest, Bytes)> = Vec::new();
        let mut batch_bytes = 0;
        for (digest, data) in blobs {
            let cost = data.len() as u64 + BATCH_ENTRY_OVERHEAD;
            if cost > limit / 2 {
                self.write_stream(&digest, data).await?;
                continue;
            }
            if batch_bytes + cost > limit {
                self.batch_update(std::mem::take(&mut batch)).await?;
                batch_bytes = 0;
            }
            batch_bytes += cost;
            batch.push((digest, data));
        }
        if !batch.is_empty() {
            self.batch_update(batch).await?;
        }
        Ok(())
    }

    /// BatchReadBlobs calls under the batch limit, each blob verified.
    async fn read_batch(&self, digests: &[Digest]) -> Result<Vec<(Digest, Result<Bytes, StoreError>)>, StoreError> {
        let mut out = Vec::with_capacity(digests.len());
        for (function, digests) in by_function(digests.to_vec(), |d| d.function) {
            let mut start = 0;
            while start < digests.len() {
                let mut end = start;
                let mut bytes = 0;
                while end < digests.len()
                    && (end == start
                        || bytes + digests[end].size_bytes + BATCH_ENTRY_OVERHEAD <= self.options.max_batch_bytes)
                {
                    bytes += digests[end].size_bytes + BATCH_ENTRY_OVERHEAD;
                    end += 1;
                }
                let request = BatchReadBlobsRequest {
                    instance_name: self.options.instance.clone(),
                    digests: digests[start..end].iter().map(Digest::to_proto).collect(),
                    acceptable_compressors: vec![],
                    digest_function: function.to_proto() as i32,
                };
                let response =
                    self.cas().batch_read_blobs(self.unary(request)).await.map_err(|s| from_status(s, None))?;
                for entry in response.into_inner().responses {
                    let Some(digest) = entry.digest.and_then(|d| Digest::from_proto(function, &d).ok()) else {
                        continue;
                    };
                    let result = match entry.status.filter(|s| s.code != 0) {
                        Some(status) => {
                            Err(from_status(tonic::Status::new(status.code.into(), status.message), Some(&digest)))
                        }
                        None => crate::store::Verifier::check(digest, &entry.data).map(|()| Bytes::from(entry.data)),
                    };
                    out.push((digest, result));
                }
                start = end;
            }
        }
        Ok(out)
    }
}

impl CasInstances for RemoteStore {
    fn instance(&self, instance: &str) -> SharedStore {
        Arc::new(self.with_instance(instance))
    }
}

/// Streams one blob into ByteStream.Write.
struct RemoteWriter {
    digest: Digest,
    resource: String,
    tx: Option<mpsc::Sender<WriteRequest>>,
    call: JoinHandle<Result<WriteResponse, StoreError>>,
    written: u64,
}

impl RemoteWriter {
    async fn send(&mut self, data: Bytes, finish_write: bool) -> Result<(), StoreError> {
        let request = WriteRequest {
            // Only the first message has to name the resource.
            resource_name: if self.written == 0 { self.resource.clone() } else { String::new() },
            write_offset: self.written as i64,
            finish_write,
            data: Vec::from(data),
        };
        let len = request.data.len() as u64;
        let sent = match &self.tx {
            Some(tx) => tx.send(request).await.is_ok(),
            None => false,
        };
        if !sent {
            // The call ended early: the server already has the blob or refused it.
            return Ok(());
        }
        self.written += len;
        Ok(())
    }
}

#[async_trait]
impl BlobWriter for RemoteWriter {
    async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        let mut at = 0;
        while at < chunk.len() {
            let piece = chunk.slice(at..chunk.len().min(at + CHUNK_SIZE));
            at += piece.len();
            self.send(piece, false).await?;
        }
        Ok(())
    }

    fn written(&self) -> u64 {
        self.written
    }

    async fn commit(mut self: Box<Self>) -> Result<(), StoreError> {
        self.send(Bytes::new(), true).await?;
        self.tx = None;
        let response = (&mut self.call)
            .await
            .map_err(|e| StoreError::Unavailable(format!("upload task of {:?}: {e}", self.digest)))??;
        let committed = response.committed_size;
        if committed != self.digest.size_bytes as i64 {
            return Err(StoreError::Unavailable(format!(
                "upload of {:?}: server committed {committed} bytes, not {}",
                self.digest, self.digest.size_bytes
            )));
        }
        Ok(())
    }
}
