//! Blobs in S3-compatible object storage (AWS S3, GCS's interoperability
//! endpoint, Ceph RGW, MinIO, Garage, ...), through the `object_store` crate.
//!
//! Each blob is one object, `PREFIX/cas/INSTANCE/FUNCTION/HASH-SIZE`. Writes
//! are hashed as they arrive; a small blob is one PUT after its digest has
//! checked out, a large one a multipart upload whose parts go out while the
//! bytes arrive and which is completed (made visible) only once the whole blob
//! has checked out, and aborted otherwise. Whole reads are verified as they
//! stream (a bucket is storage someone else runs: an object whose bytes do not
//! match its name is deleted and reported missing, never served whole).
//! Partial reads are ranged GETs and cannot be checked against the digest, so
//! the storage in front of this store ([`super::TieredStore::read_through`])
//! never serves them: it copies whole blobs into the local disk tier, verified,
//! and serves ranges from there.
//!
//! Requests are bounded in concurrency and retried with backoff by the crate;
//! a store that cannot be reached fails calls as [`StoreError::Unavailable`]
//! naming the endpoint and bucket.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::limit::LimitStore;
use object_store::path::Path as ObjectPath;
use object_store::{BackoffConfig, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig, WriteMultipart};

use crate::digest::Digest;
use crate::namespace::instance_dir;
use crate::store::verify::verified;
use crate::store::{read_range, BlobStore, BlobStream, BlobWriter, StoreError, Verifier};

/// Blobs larger than this go up as multipart uploads.
const MULTIPART_THRESHOLD: u64 = 16 << 20;
/// The size of one part of a multipart upload (S3 wants at least 5 MiB).
const PART_SIZE: usize = 8 << 20;
/// Parts of one upload in flight at once.
const PARTS_IN_FLIGHT: usize = 4;
/// Existence checks (HEAD requests) of one FindMissing call in flight at once.
const HEADS_IN_FLIGHT: usize = 32;

/// Where the bucket is and how to reach it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectStoreConfig {
    /// The S3 endpoint URL (`https://s3.example.com`, `http://127.0.0.1:9000`);
    /// `None` for AWS S3 itself.
    pub endpoint: Option<String>,
    /// The bucket; it must exist.
    pub bucket: String,
    /// A key prefix under which casbuild keeps everything, so one bucket can
    /// serve several clusters.
    pub prefix: String,
    /// The region (`us-east-1` for most non-AWS servers).
    pub region: String,
    /// A file with `access_key_id = "..."` and `secret_access_key = "..."`
    /// lines; without it credentials come from the environment
    /// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`).
    pub credentials_file: Option<PathBuf>,
    /// Requests in flight at once, over all instances.
    pub max_requests: usize,
    /// How long one request, with its retries, may take before it fails.
    pub request_timeout: Duration,
}

impl ObjectStoreConfig {
    /// A configuration for `bucket` with the defaults: AWS's endpoint, no
    /// prefix, `us-east-1`, credentials from the environment, 64 requests in
    /// flight, 30 s per request with retries.
    pub fn new(bucket: impl Into<String>) -> Self {
        ObjectStoreConfig {
            endpoint: None,
            bucket: bucket.into(),
            prefix: String::new(),
            region: "us-east-1".into(),
            credentials_file: None,
            max_requests: 64,
            request_timeout: Duration::from_secs(30),
        }
    }

    /// How the store is named in messages: endpoint and bucket.
    fn describe(&self) -> String {
        format!(
            "object store {} bucket {}",
            self.endpoint.as_deref().unwrap_or("https://s3.amazonaws.com"),
            self.bucket
        )
    }
}

/// Keys read from a credentials file.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialsFile {
    access_key_id: String,
    secret_access_key: String,
    #[serde(default)]
    session_token: Option<String>,
}

/// One instance's view of the blobs in a bucket. Cloning gives another handle
/// onto the same connection pool.
#[derive(Clone)]
pub struct ObjectBlobStore {
    inner: Arc<dyn ObjectStore>,
    /// `PREFIX/cas`, under which every instance has its directory.
    base: ObjectPath,
    /// `PREFIX/cas/INSTANCE`.
    root: ObjectPath,
    describe: Arc<str>,
}

impl std::fmt::Debug for ObjectBlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectBlobStore").field("store", &self.describe).field("root", &self.root).finish()
    }
}

impl ObjectBlobStore {
    /// Connects (lazily: no request is made here) to the bucket, in the
    /// default instance's namespace. Fails on a bad configuration or an
    /// unreadable credentials file.
    pub fn open(config: &ObjectStoreConfig) -> Result<Self, StoreError> {
        let describe = config.describe();
        let invalid = |what: String| StoreError::InvalidArgument(format!("{describe}: {what}"));
        if config.bucket.is_empty() {
            return Err(invalid("the bucket name is empty".into()));
        }
        // reqwest's rustls takes the process's crypto provider; tonic's is
        // ring too. Installing fails harmlessly when one is installed already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            // Requests are signed without hashing their bodies once more:
            // every blob is hashed on arrival and verified on every read,
            // which is what protects its bytes (in transit too).
            .with_unsigned_payload(true)
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(50),
                    max_backoff: Duration::from_secs(2),
                    base: 2.0,
                },
                max_retries: 5,
                retry_timeout: config.request_timeout,
            })
            .with_client_options(
                object_store::ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_timeout(config.request_timeout),
            );
        if let Some(endpoint) = &config.endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"))
                .with_virtual_hosted_style_request(false);
        }
        if let Some(path) = &config.credentials_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| invalid(format!("reading credentials file {}: {e}", path.display())))?;
            let keys: CredentialsFile = toml::from_str(&text)
                .map_err(|e| invalid(format!("credentials file {}: {}", path.display(), e.message())))?;
            builder = builder.with_access_key_id(keys.access_key_id).with_secret_access_key(keys.secret_access_key);
            if let Some(token) = keys.session_token {
                builder = builder.with_token(token);
            }
        }
        let store = builder.build().map_err(|e| invalid(e.to_string()))?;
        let limited = LimitStore::new(store, config.max_requests.max(1));
        let base: ObjectPath = config.prefix.split('/').filter(|part| !part.is_empty()).chain(["cas"]).collect();
        let root = base.clone().join(instance_dir("").as_str());
        Ok(ObjectBlobStore { inner: Arc::new(limited), base, root, describe: describe.into() })
    }

    /// A handle onto the same bucket for another instance.
    pub fn namespace(&self, instance: &str) -> Self {
        ObjectBlobStore { root: self.base.clone().join(instance_dir(instance).as_str()), ..self.clone() }
    }

    /// The object key of a blob.
    pub fn key(&self, digest: &Digest) -> ObjectPath {
        self.root
            .clone()
            .join(digest.function.name())
            .join(format!("{}-{}", digest.hash_hex(), digest.size_bytes).as_str())
    }

    /// Translates the crate's error, naming the store and the blob.
    fn error(&self, digest: &Digest, error: object_store::Error) -> StoreError {
        use object_store::Error as E;
        match error {
            E::NotFound { .. } => StoreError::not_found(digest),
            E::PermissionDenied { .. } => StoreError::Refused {
                code: tonic::Code::PermissionDenied,
                message: format!("{} refused access to {digest:?}: {error}", self.describe),
            },
            E::Unauthenticated { .. } => StoreError::Refused {
                code: tonic::Code::Unauthenticated,
                message: format!("{} did not accept casbuild's credentials: {error}", self.describe),
            },
            other => StoreError::Unavailable(format!("{} failed on {digest:?}: {other}", self.describe)),
        }
    }

    /// Removes an object whose bytes do not match its name, so that the next
    /// FindMissing asks for it again.
    fn corrupt(&self, digest: &Digest) -> StoreError {
        tracing::warn!(blob = ?digest, store = %self.describe, "object does not match its digest; deleting it");
        let (inner, key) = (self.inner.clone(), self.key(digest));
        tokio::spawn(async move {
            if let Err(e) = inner.delete(&key).await {
                tracing::warn!("could not delete corrupt object {key}: {e}");
            }
        });
        StoreError::NotFound {
            digest: *digest,
            detail: "its object in the object store did not match its digest and has been removed".into(),
        }
    }
}

#[async_trait]
impl BlobStore for ObjectBlobStore {
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>, StoreError> {
        let wanted: Vec<Digest> = digests.iter().filter(|d| !d.is_empty_blob()).copied().collect();
        let checks = wanted.into_iter().map(|digest| {
            let this = self.clone();
            async move {
                match this.inner.head(&this.key(&digest)).await {
                    // An object of the wrong size is not the blob (nor is it
                    // served: reads verify); the client uploads it again.
                    Ok(meta) => Ok((meta.size != digest.size_bytes).then_some(digest)),
                    Err(object_store::Error::NotFound { .. }) => Ok(Some(digest)),
                    Err(e) => Err(this.error(&digest, e)),
                }
            }
        });
        let found: Vec<Option<Digest>> = futures::stream::iter(checks).buffered(HEADS_IN_FLIGHT).try_collect().await?;
        Ok(found.into_iter().flatten().collect())
    }

    async fn read(&self, digest: &Digest, offset: u64, limit: Option<u64>) -> Result<BlobStream, StoreError> {
        let (start, end) = read_range(digest, offset, limit)?;
        if digest.is_empty_blob() || start == end {
            return Ok(futures::stream::empty().boxed());
        }
        let key = self.key(digest);
        if (start, end) != (0, digest.size_bytes) {
            let bytes = self.inner.get_range(&key, start..end).await.map_err(|e| self.error(digest, e))?;
            return Ok(futures::stream::once(async move { Ok(bytes) }).boxed());
        }
        let got = self.inner.get(&key).await.map_err(|e| self.error(digest, e))?;
        let this = self.clone();
        let digest = *digest;
        let stream = got.into_stream().map_err(move |e| this.error(&digest, e)).boxed();
        let this = self.clone();
        Ok(verified(stream, digest, move || this.corrupt(&digest)))
    }

    async fn begin_write(&self, digest: &Digest) -> Result<Box<dyn BlobWriter>, StoreError> {
        Ok(Box::new(ObjectWriter {
            store: self.clone(),
            digest: *digest,
            verifier: Verifier::new(*digest),
            buffered: Vec::new(),
            upload: None,
        }))
    }
}

/// A blob on its way into the bucket.
struct ObjectWriter {
    store: ObjectBlobStore,
    digest: Digest,
    verifier: Verifier,
    /// A small blob's bytes until commit.
    buffered: Vec<Bytes>,
    /// A large blob's multipart upload, started with its first bytes.
    upload: Option<WriteMultipart>,
}

impl ObjectWriter {
    async fn abort(&mut self) {
        if let Some(upload) = self.upload.take() {
            if let Err(e) = upload.abort().await {
                tracing::warn!("aborting the upload of {:?}: {e}", self.digest);
            }
        }
    }
}

#[async_trait]
impl BlobWriter for ObjectWriter {
    async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        if let Err(e) = self.verifier.update(&chunk) {
            self.abort().await;
            return Err(e);
        }
        if self.digest.size_bytes <= MULTIPART_THRESHOLD {
            self.buffered.push(chunk);
            return Ok(());
        }
        if self.upload.is_none() {
            let key = self.store.key(&self.digest);
            let upload = self.store.inner.put_multipart(&key).await.map_err(|e| self.store.error(&self.digest, e))?;
            self.upload = Some(WriteMultipart::new_with_chunk_size(upload, PART_SIZE));
        }
        let upload = self.upload.as_mut().expect("started above");
        if let Err(e) = upload.wait_for_capacity(PARTS_IN_FLIGHT).await {
            self.abort().await;
            return Err(self.store.error(&self.digest, e));
        }
        upload.put(chunk);
        Ok(())
    }

    fn written(&self) -> u64 {
        self.verifier.count()
    }

    async fn commit(mut self: Box<Self>) -> Result<(), StoreError> {
        let verifier = std::mem::replace(&mut self.verifier, Verifier::new(self.digest));
        if let Err(e) = verifier.finish() {
            self.abort().await;
            return Err(e);
        }
        if self.digest.is_empty_blob() {
            return Ok(());
        }
        let (store, digest) = (self.store.clone(), self.digest);
        match self.upload.take() {
            Some(upload) => upload.finish().await.map(drop).map_err(|e| store.error(&digest, e)),
            None => {
                let payload: PutPayload = std::mem::take(&mut self.buffered).into_iter().collect();
                store.inner.put(&store.key(&digest), payload).await.map(drop).map_err(|e| store.error(&digest, e))
            }
        }
    }
}

impl Drop for ObjectWriter {
    fn drop(&mut self) {
        // An abandoned multipart upload holds its parts (and is billed for
        // them) until aborted.
        if let Some(upload) = self.upload.take() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let _ = upload.abort().await;
                });
            }
        }
    }
}
