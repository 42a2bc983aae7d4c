//! The Remote Asset API (`build.bazel.remote.asset.v1`): Push records that a
//! URI (with qualifiers) names a blob or a Directory tree already in the CAS;
//! Fetch answers from those records only — casbuild never downloads from the
//! internet. An asset is served only while it has not expired and everything
//! it names and references is still in the CAS.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use casbuild_cas::asset_store::AssetEntry;
use casbuild_cas::digest::Digest;
use casbuild_cas::storage::Storage;
use casbuild_cas::tree::{missing_in_tree, MissingError};
use casbuild_proto::asset::fetch_server::Fetch;
use casbuild_proto::asset::push_server::Push;
use casbuild_proto::asset::{
    FetchBlobRequest, FetchBlobResponse, FetchDirectoryRequest, FetchDirectoryResponse, PushBlobRequest,
    PushBlobResponse, PushDirectoryRequest, PushDirectoryResponse, Qualifier,
};
use casbuild_proto::protobuf::Timestamp;
use casbuild_proto::reapi;
use tonic::{Request, Response, Status};

use crate::auth::{admit, Permission};
use crate::status::{check_instance, request_digest, rpc_ok, store_status};

/// Fetch and Push over a coordinator's storage.
#[derive(Clone)]
pub struct AssetService {
    storage: Arc<Storage>,
}

impl AssetService {
    /// Serves `storage`'s assets.
    pub fn new(storage: Arc<Storage>) -> Self {
        AssetService { storage }
    }

    /// The blobs of `entry` (its digest, references and, for trees, every
    /// Directory and file) that the CAS lacks.
    async fn missing(&self, instance: &str, entry: &AssetEntry) -> Result<Vec<Digest>, Status> {
        let cas = self.storage.cas(instance);
        let parse = |d: &reapi::Digest, field: &str| request_digest(entry.digest_function, Some(d), field);
        let root = entry_digest(entry)?;
        let mut trees = Vec::new();
        let mut blobs = Vec::new();
        if entry.directory {
            trees.push(root);
        } else {
            blobs.push(root);
        }
        for d in &entry.references_directories {
            trees.push(parse(d, "references_directories")?);
        }
        for d in &entry.references_blobs {
            blobs.push(parse(d, "references_blobs")?);
        }
        let mut missing = cas.find_missing(&blobs).await.map_err(store_status)?;
        for tree in trees {
            match missing_in_tree(cas.as_ref(), &tree).await {
                Ok(absent) => missing.extend(absent),
                Err(MissingError::Tree(e)) => return Err(Status::invalid_argument(e.to_string())),
                Err(MissingError::Store(e)) => return Err(store_status(e)),
            }
        }
        Ok(missing)
    }

    /// The first of `uris` with a live, complete asset of the wanted kind.
    async fn fetch(
        &self,
        instance: &str,
        function: i32,
        uris: &[String],
        qualifiers: &[Qualifier],
        oldest: Option<&Timestamp>,
        directory: bool,
    ) -> Result<(String, AssetEntry), Status> {
        check_instance(instance)?;
        if uris.is_empty() {
            return Err(Status::invalid_argument("at least one URI is required"));
        }
        let pairs = pairs(qualifiers)?;
        let now = unix_now();
        for uri in uris {
            let Some(entry) = self.storage.assets().get(instance, uri, &pairs).await.map_err(store_status)? else {
                continue;
            };
            let expired = entry.expire_at != 0 && entry.expire_at <= now;
            let too_old = oldest.is_some_and(|t| entry.pushed_at < t.seconds);
            let other_function = function != 0 && function != entry.digest_function;
            if entry.directory != directory || expired || too_old || other_function {
                continue;
            }
            if !self.missing(instance, &entry).await?.is_empty() {
                continue;
            }
            // Served only while its content matches what a checksum.sri vouches for.
            if entry.directory || self.checksum_matches(instance, &entry, &pairs).await? {
                return Ok((uri.clone(), entry));
            }
        }
        Err(Status::not_found(format!("no usable asset for {} with these qualifiers", uris.join(", "))))
    }

    /// Records `entry` under every URI, after checking the CAS has it all.
    async fn push(
        &self,
        instance: &str,
        uris: &[String],
        qualifiers: &[Qualifier],
        entry: AssetEntry,
    ) -> Result<(), Status> {
        check_instance(instance)?;
        if uris.is_empty() {
            return Err(Status::invalid_argument("at least one URI is required"));
        }
        let pairs = pairs(qualifiers)?;
        let missing = self.missing(instance, &entry).await?;
        if !missing.is_empty() {
            return Err(Status::failed_precondition(format!(
                "the asset references {} blob(s) the CAS does not have: {}",
                missing.len(),
                crate::status::some_digests(&missing)
            )));
        }
        if !entry.directory {
            let digest = entry_digest(&entry)?;
            crate::sri::check(self.storage.cas(instance).as_ref(), &digest, &pairs).await?;
        } else if pairs.iter().any(|(name, _)| name == crate::sri::QUALIFIER) {
            return Err(Status::invalid_argument(format!(
                "qualifier {} describes a blob's content; a directory cannot carry it",
                crate::sri::QUALIFIER
            )));
        }
        for uri in uris {
            self.storage.assets().put(instance, uri, &pairs, &entry).await.map_err(store_status)?;
        }
        Ok(())
    }

    /// Whether a blob entry's content matches its `checksum.sri` qualifier
    /// (true without one); a malformed qualifier is an error.
    async fn checksum_matches(
        &self,
        instance: &str,
        entry: &AssetEntry,
        pairs: &[(String, String)],
    ) -> Result<bool, Status> {
        let digest = entry_digest(entry)?;
        match crate::sri::check(self.storage.cas(instance).as_ref(), &digest, pairs).await {
            Ok(()) => Ok(true),
            Err(status) if status.message().contains("does not match") => Ok(false),
            Err(status) => Err(status),
        }
    }
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Qualifiers as pairs; a name given twice is the client's mistake.
fn pairs(qualifiers: &[Qualifier]) -> Result<Vec<(String, String)>, Status> {
    let mut out: Vec<(String, String)> = qualifiers.iter().map(|q| (q.name.clone(), q.value.clone())).collect();
    out.sort();
    if let Some(w) = out.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(Status::invalid_argument(format!("qualifier {:?} is given twice", w[0].0)));
    }
    Ok(out)
}

fn expiry(entry: &AssetEntry) -> Option<Timestamp> {
    (entry.expire_at != 0).then_some(Timestamp { seconds: entry.expire_at, nanos: 0 })
}

/// The blob or root Directory an entry records.
fn entry_digest(entry: &AssetEntry) -> Result<Digest, Status> {
    let digest = entry.digest.as_ref().ok_or_else(|| Status::internal("asset entry without a digest"))?;
    request_digest(entry.digest_function, Some(digest), "digest")
}

fn new_entry(
    function: i32,
    digest: Digest,
    directory: bool,
    expire_at: Option<&Timestamp>,
    references_blobs: Vec<reapi::Digest>,
    references_directories: Vec<reapi::Digest>,
) -> AssetEntry {
    AssetEntry {
        digest: Some(digest.to_proto()),
        directory,
        digest_function: function,
        expire_at: expire_at.map_or(0, |t| t.seconds.max(1)),
        pushed_at: unix_now(),
        references_blobs,
        references_directories,
    }
}

impl AssetService {
    /// Answers a fetch of either kind; the directory kind renames the digest field.
    async fn answer(&self, r: FetchBlobRequest, directory: bool) -> Result<FetchBlobResponse, Status> {
        let oldest = r.oldest_content_accepted.as_ref();
        let (uri, entry) =
            self.fetch(&r.instance_name, r.digest_function, &r.uris, &r.qualifiers, oldest, directory).await?;
        Ok(FetchBlobResponse {
            status: Some(rpc_ok()),
            uri,
            qualifiers: r.qualifiers,
            expires_at: expiry(&entry),
            blob_digest: entry.digest,
            digest_function: entry.digest_function,
        })
    }
}

#[tonic::async_trait]
impl Fetch for AssetService {
    async fn fetch_blob(&self, request: Request<FetchBlobRequest>) -> Result<Response<FetchBlobResponse>, Status> {
        let (_, request) = admit(request, Permission::ReadCache, |r| &r.instance_name)?;
        Ok(Response::new(self.answer(request, false).await?))
    }

    async fn fetch_directory(
        &self,
        request: Request<FetchDirectoryRequest>,
    ) -> Result<Response<FetchDirectoryResponse>, Status> {
        let (_, r) = admit(request, Permission::ReadCache, |r| &r.instance_name)?;
        let as_blob = FetchBlobRequest {
            instance_name: r.instance_name,
            timeout: r.timeout,
            oldest_content_accepted: r.oldest_content_accepted,
            uris: r.uris,
            qualifiers: r.qualifiers,
            digest_function: r.digest_function,
        };
        let found = self.answer(as_blob, true).await?;
        Ok(Response::new(FetchDirectoryResponse {
            status: found.status,
            uri: found.uri,
            qualifiers: found.qualifiers,
            expires_at: found.expires_at,
            root_directory_digest: found.blob_digest,
            digest_function: found.digest_function,
        }))
    }
}

#[tonic::async_trait]
impl Push for AssetService {
    async fn push_blob(&self, request: Request<PushBlobRequest>) -> Result<Response<PushBlobResponse>, Status> {
        let (_, r) = admit(request, Permission::WriteActionCache, |r| &r.instance_name)?;
        let digest = request_digest(r.digest_function, r.blob_digest.as_ref(), "blob_digest")?;
        let function = digest.function.to_proto() as i32;
        let entry =
            new_entry(function, digest, false, r.expire_at.as_ref(), r.references_blobs, r.references_directories);
        self.push(&r.instance_name, &r.uris, &r.qualifiers, entry).await?;
        Ok(Response::new(PushBlobResponse {}))
    }

    async fn push_directory(
        &self,
        request: Request<PushDirectoryRequest>,
    ) -> Result<Response<PushDirectoryResponse>, Status> {
        let (_, r) = admit(request, Permission::WriteActionCache, |r| &r.instance_name)?;
        let digest = request_digest(r.digest_function, r.root_directory_digest.as_ref(), "root_directory_digest")?;
        let function = digest.function.to_proto() as i32;
        let entry =
            new_entry(function, digest, true, r.expire_at.as_ref(), r.references_blobs, r.references_directories);
        self.push(&r.instance_name, &r.uris, &r.qualifiers, entry).await?;
        Ok(Response::new(PushDirectoryResponse {}))
    }
}
