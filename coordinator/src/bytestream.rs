//! `ByteStream`: streamed reads and writes of single blobs, plain or zstd, with
//! resumable uploads.
//!
//! An upload is a session keyed by its resource name. When a Write stream ends
//! without `finish_write` (a dropped connection), the session — its temp file
//! and hash state — is kept, `QueryWriteStatus` reports how much was
//! committed, and a new Write to the same name continues from there. Idle
//! sessions are dropped after [`SESSION_IDLE`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::auth::{check, principal, Permission};
use bytes::Bytes;
use casbuild_cas::resource::{Compressor, ResourceName};
use casbuild_cas::storage::Storage;
use casbuild_cas::store::{BlobStream, BlobWriter};
use casbuild_proto::bytestream::byte_stream_server::ByteStream;
use casbuild_proto::bytestream::{
    QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, ReadResponse, WriteRequest, WriteResponse,
};
use futures::stream::{BoxStream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::compression::StreamDecoder;
use crate::status::{digest_status, store_status};

/// How long an interrupted upload can wait for its client to resume it.
pub const SESSION_IDLE: Duration = Duration::from_secs(600);

/// Most interrupted uploads kept at once; the oldest go first beyond it.
const MAX_SESSIONS: usize = 4096;

/// The ByteStream service over a coordinator's [`Storage`].
pub struct ByteStreamService {
    storage: Arc<Storage>,
    sessions: Mutex<HashMap<String, Session>>,
}

/// An upload in progress.
struct Session {
    resource: ResourceName,
    writer: Box<dyn BlobWriter>,
    decoder: Option<StreamDecoder>,
    /// The next `write_offset` the client must send (in the request's offset
    /// space: uncompressed bytes, or compressed bytes after a zstd start).
    committed: i64,
    last_used: Instant,
}

impl ByteStreamService {
    /// Serves `storage`.
    pub fn new(storage: Arc<Storage>) -> Self {
        ByteStreamService { storage, sessions: Mutex::new(HashMap::new()) }
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Parks an interrupted upload for a later resume, dropping stale ones
    /// and, beyond the count or the bytes parked uploads may hold on disk
    /// (the entries' share of the disk budget), the least recently used.
    fn park(&self, name: String, mut session: Session) {
        session.last_used = Instant::now();
        let max_bytes = self.storage.disk().budget() / casbuild_cas::storage::ENTRY_SHARE;
        if session.committed.max(0) as u64 > max_bytes {
            // Larger than all parked uploads may be: dropped with its
            // temporary file; the client's next Write starts over.
            tracing::debug!("upload {name} is too large to park ({} bytes)", session.committed);
            return;
        }
        let mut sessions = self.sessions();
        sessions.retain(|_, s| s.last_used.elapsed() < SESSION_IDLE);
        let bytes = |s: &Session| s.committed.max(0) as u64;
        let mut parked: u64 = sessions.values().map(bytes).sum();
        while sessions.len() >= MAX_SESSIONS || (!sessions.is_empty() && parked + bytes(&session) > max_bytes) {
            let oldest = sessions.iter().min_by_key(|(_, s)| s.last_used).map(|(k, _)| k.clone());
            match oldest.and_then(|key| sessions.remove(&key)) {
                Some(evicted) => parked -= bytes(&evicted),
                None => break,
            }
        }
        sessions.insert(name, session);
    }

    /// Feeds one request's data into the session.
    async fn accept(session: &mut Session, data: Vec<u8>) -> Result<(), Status> {
        let len = data.len() as i64;
        match &mut session.decoder {
            None => session.writer.write(Bytes::from(data)).await.map_err(store_status)?,
            Some(decoder) => {
                let mut input = data.as_slice();
                while let Some(piece) = decoder.step(&mut input)? {
                    session.writer.write(piece).await.map_err(store_status)?;
                }
            }
        }
        session.committed += len;
        Ok(())
    }

    /// Runs the body of a Write call; on an interrupted stream the session is
    /// handed back for parking.
    async fn write_stream(
        &self,
        name: &str,
        mut session: Session,
        first: WriteRequest,
        stream: &mut Streaming<WriteRequest>,
    ) -> Result<WriteResponse, (Status, Option<Session>)> {
        let mut next = Some(first);
        loop {
            let request = match next.take() {
                Some(request) => request,
                None => match stream.next().await {
                    Some(Ok(request)) => request,
                    Some(Err(status)) => return Err((status, Some(session))),
                    None => {
                        let status = Status::invalid_argument(format!(
                            "write of {name} ended after {} bytes without finish_write; resume it at that offset",
                            session.committed
                        ));
                        return Err((status, Some(session)));
                    }
                },
            };
            if !request.resource_name.is_empty() && request.resource_name != name {
                let status = Status::invalid_argument(format!(
                    "resource_name changed mid-stream from {name:?} to {:?}",
                    request.resource_name
                ));
                return Err((status, Some(session)));
            }
            if request.write_offset != session.committed {
                let status = Status::invalid_argument(format!(
                    "write_offset {} of {name} does not continue the upload at {}",
                    request.write_offset, session.committed
                ));
                return Err((status, Some(session)));
            }
            if let Err(status) = Self::accept(&mut session, request.data).await {
                return Err((status, None)); // bad data: the upload cannot continue
            }
            if request.finish_write {
                let committed = session.committed;
                session.writer.commit().await.map_err(|e| (store_status(e), None))?;
                return Ok(WriteResponse { committed_size: committed });
            }
        }
    }
}

#[tonic::async_trait]
impl ByteStream for ByteStreamService {
    type ReadStream = BoxStream<'static, Result<ReadResponse, Status>>;

    async fn read(&self, request: Request<ReadRequest>) -> Result<Response<Self::ReadStream>, Status> {
        let principal = principal(&request)?;
        let request = request.into_inner();
        let resource = ResourceName::parse_read(&request.resource_name).map_err(digest_status)?;
        check(&principal, Permission::ReadCache, &resource.instance)?;
        if request.read_offset < 0 || request.read_limit < 0 {
            return Err(Status::invalid_argument(format!(
                "read_offset {} and read_limit {} must not be negative",
                request.read_offset, request.read_limit
            )));
        }
        let offset = request.read_offset as u64;
        let limit = (request.read_limit > 0).then_some(request.read_limit as u64);
        let cas = self.storage.cas(&resource.instance);
        let digest = resource.digest;
        let stream: BlobStream = match resource.compressor {
            Compressor::Identity => cas.read(&digest, offset, limit).await.map_err(store_status)?,
            Compressor::Zstd => {
                if limit.is_some() {
                    return Err(Status::invalid_argument("read_limit must be 0 for compressed-blobs reads"));
                }
                let plain = cas.read(&digest, offset, None).await.map_err(store_status)?;
                return Ok(Response::new(compressed(plain)));
            }
        };
        let responses = stream.map(|chunk| match chunk {
            // Without a copy when the chunk owns its buffer (as disk reads do).
            Ok(data) => Ok(ReadResponse { data: Vec::from(data) }),
            Err(e) => Err(store_status(e)),
        });
        Ok(Response::new(responses.boxed()))
    }

    async fn write(&self, request: Request<Streaming<WriteRequest>>) -> Result<Response<WriteResponse>, Status> {
        let principal = principal(&request)?;
        let mut stream = request.into_inner();
        let first = match stream.next().await {
            Some(first) => first?,
            None => return Err(Status::invalid_argument("write stream carried no request")),
        };
        let name = first.resource_name.clone();
        if name.is_empty() {
            return Err(Status::invalid_argument("the first WriteRequest must name the resource"));
        }
        let resource = ResourceName::parse_write(&name).map_err(digest_status)?;
        check(&principal, Permission::WriteCas, &resource.instance)?;
        let parked = self.sessions().remove(&name);
        let session = match parked {
            Some(session) => session,
            None => {
                if first.write_offset != 0 {
                    return Err(Status::invalid_argument(format!(
                        "write_offset {} for {name}, but no upload under that name is in progress",
                        first.write_offset
                    )));
                }
                let cas = self.storage.cas(&resource.instance);
                let digest = resource.digest;
                if cas.find_missing(&[digest]).await.map_err(store_status)?.is_empty() {
                    // Already stored: end the upload at once, as REAPI allows.
                    let committed_size = match resource.compressor {
                        Compressor::Identity => digest.size_bytes as i64,
                        Compressor::Zstd => -1,
                    };
                    return Ok(Response::new(WriteResponse { committed_size }));
                }
                let writer = cas.begin_write(&digest).await.map_err(store_status)?;
                let decoder = match resource.compressor {
                    Compressor::Identity => None,
                    Compressor::Zstd => Some(StreamDecoder::new()?),
                };
                Session { resource, writer, decoder, committed: 0, last_used: Instant::now() }
            }
        };
        match self.write_stream(&name, session, first, &mut stream).await {
            Ok(response) => Ok(Response::new(response)),
            Err((status, parked)) => {
                if let Some(session) = parked {
                    tracing::debug!("upload {} interrupted at {}: {}", session.resource, session.committed, status);
                    self.park(name, session);
                }
                Err(status)
            }
        }
    }

    async fn query_write_status(
        &self,
        request: Request<QueryWriteStatusRequest>,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        let principal = principal(&request)?;
        let name = request.into_inner().resource_name;
        let resource = ResourceName::parse_write(&name).map_err(digest_status)?;
        check(&principal, Permission::WriteCas, &resource.instance)?;
        if let Some(session) = self.sessions().get(&name) {
            return Ok(Response::new(QueryWriteStatusResponse { committed_size: session.committed, complete: false }));
        }
        let stored =
            self.storage.cas(&resource.instance).find_missing(&[resource.digest]).await.map_err(store_status)?;
        let response = if stored.is_empty() {
            QueryWriteStatusResponse { committed_size: resource.digest.size_bytes as i64, complete: true }
        } else {
            QueryWriteStatusResponse { committed_size: 0, complete: false }
        };
        Ok(Response::new(response))
    }
}

/// Compresses a plain stream chunk by chunk into one zstd stream, on blocking
/// threads so compression never stalls the async runtime.
fn compressed(plain: BlobStream) -> BoxStream<'static, Result<ReadResponse, Status>> {
    type Encoder = zstd::stream::write::Encoder<'static, Vec<u8>>;
    let encoder: Option<Encoder> = Some(Encoder::new(Vec::new(), 1).expect("zstd level 1 is valid"));
    futures::stream::unfold((plain, encoder), |(mut plain, encoder)| async move {
        let mut encoder = encoder?;
        let chunk = match plain.next().await {
            Some(Err(e)) => return Some((Err(store_status(e)), (plain, None))),
            Some(Ok(data)) => Some(data),
            None => None,
        };
        let step = tokio::task::spawn_blocking(move || -> std::io::Result<(Vec<u8>, Option<Encoder>)> {
            use std::io::Write;
            match chunk {
                Some(data) => {
                    encoder.write_all(&data)?;
                    let out = std::mem::take(encoder.get_mut());
                    Ok((out, Some(encoder)))
                }
                None => Ok((encoder.finish()?, None)),
            }
        })
        .await;
        match step {
            Ok(Ok((data, encoder))) => Some((Ok(ReadResponse { data }), (plain, encoder))),
            Ok(Err(e)) => Some((Err(Status::internal(format!("compressing: {e}"))), (plain, None))),
            Err(e) => Some((Err(Status::internal(format!("compression task: {e}"))), (plain, None))),
        }
    })
    .filter(|r| futures::future::ready(!matches!(r, Ok(ReadResponse { data }) if data.is_empty())))
    .boxed()
}
