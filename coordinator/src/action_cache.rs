//! `ActionCache`: GetActionResult and UpdateActionResult.
//!
//! A result is only returned while every blob it references is still in the
//! CAS, so a client never receives a hit it cannot download.

use std::sync::Arc;

use casbuild_cas::digest::{Digest, DigestFunction};
use casbuild_cas::error::Invalid;
use casbuild_cas::storage::Storage;
use casbuild_cas::store::{BlobStore, StoreError};
use casbuild_cas::tree::{check_output_path, child_digest, validate_directory};
use casbuild_proto::reapi::action_cache_server::ActionCache;
use casbuild_proto::reapi::{ActionResult, GetActionResultRequest, Tree, UpdateActionResultRequest};
use prost::Message;
use tonic::{Request, Response, Status};

use crate::auth::{admit, Permission};
use crate::status::{call_status, precondition_missing, request_digest, store_status};

/// The action cache service over a coordinator's [`Storage`].
pub struct ActionCacheService {
    storage: Arc<Storage>,
}

impl ActionCacheService {
    /// Serves `storage`.
    pub fn new(storage: Arc<Storage>) -> Self {
        ActionCacheService { storage }
    }
}

/// Why a result may not be stored.
#[derive(Debug)]
pub(crate) enum Unusable {
    /// A path or Tree is malformed (a path outside the output root, a Tree
    /// entry named `..`, a digest that does not parse).
    Invalid(Invalid),
    /// It references blobs the CAS does not have.
    Missing(Vec<Digest>),
    /// The CAS could not say which blobs it has.
    Store(StoreError),
}

/// Every blob digest `result` references: output files, stdout/stderr,
/// output directory Trees and the files inside them, after checking every
/// output path and every name in those Trees. A Tree that is gone is listed
/// as referenced (the caller then finds it missing).
async fn referenced_blobs(
    cas: &dyn BlobStore,
    function: DigestFunction,
    result: &ActionResult,
) -> Result<Vec<Digest>, Invalid> {
    check_paths(result)?;
    let mut digests = Vec::new();
    for file in &result.output_files {
        digests.push(child_digest(function, &file.path, file.digest.as_ref())?);
    }
    for (name, digest) in [("stdout", &result.stdout_digest), ("stderr", &result.stderr_digest)] {
        if let Some(digest) = digest {
            digests.push(child_digest(function, name, Some(digest))?);
        }
    }
    for dir in &result.output_directories {
        let tree_digest = child_digest(function, &dir.path, dir.tree_digest.as_ref())?;
        digests.push(tree_digest);
        let Ok(bytes) = cas.read_all(&tree_digest).await else { continue };
        let tree = Tree::decode(bytes)
            .map_err(|e| Invalid(format!("output directory {:?}: Tree does not decode: {e}", dir.path)))?;
        let root = tree
            .root
            .as_ref()
            .ok_or_else(|| Invalid(format!("output directory {:?}: its Tree has no root", dir.path)))?;
        for directory in std::iter::once(root).chain(tree.children.iter()) {
            validate_directory(directory, function)
                .map_err(|e| e.context(format!("output directory {:?}", dir.path)))?;
            for file in &directory.files {
                digests.push(child_digest(function, &file.name, file.digest.as_ref())?);
            }
        }
    }
    Ok(digests)
}

/// Every output path of `result` is relative, normalized and used once.
// The legacy symlink lists are still filled by REAPI < 2.1 clients.
#[allow(deprecated)]
fn check_paths(result: &ActionResult) -> Result<(), Invalid> {
    fn link(l: &casbuild_proto::reapi::OutputSymlink) -> (&String, Option<&str>) {
        (&l.path, Some(l.target.as_str()))
    }
    let paths = result
        .output_files
        .iter()
        .map(|f| (&f.path, None))
        .chain(result.output_directories.iter().map(|d| (&d.path, None)))
        .chain(result.output_symlinks.iter().map(link))
        .chain(result.output_file_symlinks.iter().map(link))
        .chain(result.output_directory_symlinks.iter().map(link));
    // Path → the link's target, if it is a link.
    let mut seen = std::collections::HashMap::new();
    for (path, target) in paths {
        check_output_path(path)?;
        // REAPI lists a link both in output_symlinks and in the older
        // per-kind lists: a repeat is fine only as the very same link.
        match seen.insert(path.as_str(), target) {
            Some(previous) if previous.is_none() || previous != target => {
                return Err(Invalid(format!("output path {path:?} appears twice")));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Checks a result before it is stored, from a client or a worker alike:
/// paths and Trees well formed, every referenced blob in the CAS (REAPI
/// asks a server to refuse incomplete results).
pub(crate) async fn check_result(
    cas: &dyn BlobStore,
    function: DigestFunction,
    result: &ActionResult,
) -> Result<(), Unusable> {
    let referenced = referenced_blobs(cas, function, result).await.map_err(Unusable::Invalid)?;
    let missing = cas.find_missing(&referenced).await.map_err(Unusable::Store)?;
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Unusable::Missing(missing))
    }
}

/// What the action cache holds for an action, as far as a caller may use it.
pub(crate) enum Lookup {
    /// A result whose every referenced blob is still in the CAS.
    Hit(Box<ActionResult>),
    /// Nothing usable, and why (no entry, or a blob it names is gone).
    Miss(String),
}

/// The one action-cache lookup that GetActionResult, Execute and build
/// graphs share: a result counts only while every blob it references is
/// still in the CAS. An error is the store failing, not a miss.
pub(crate) async fn cached_result(storage: &Storage, instance: &str, action: &Digest) -> Result<Lookup, StoreError> {
    let Some(result) = storage.action_cache().get(instance, action).await? else {
        return Ok(Lookup::Miss(format!("no cached result for action {action}")));
    };
    let cas = storage.cas(instance);
    let referenced = match referenced_blobs(cas.as_ref(), action.function, &result).await {
        Ok(referenced) => referenced,
        Err(e) => return Ok(Lookup::Miss(format!("cached result for action {action} is unusable: {e}"))),
    };
    let missing = cas.find_missing(&referenced).await?;
    Ok(match missing.first() {
        Some(gone) => Lookup::Miss(format!(
            "cached result for action {action} references blob {gone}, which is no longer in the CAS"
        )),
        None => Lookup::Hit(Box::new(result)),
    })
}

/// Action-cache lookups by this process: misses, hits (for the status page;
/// the metrics carry them by caller).
static LOOKUPS: [std::sync::atomic::AtomicU64; 2] = [const { std::sync::atomic::AtomicU64::new(0) }; 2];

/// Action-cache lookups so far: (hits, misses).
pub fn lookup_counts() -> (u64, u64) {
    let load = |i: usize| LOOKUPS[i].load(std::sync::atomic::Ordering::Relaxed);
    (load(1), load(0))
}

/// Counts an action-cache lookup by what asked (`execute`,
/// `get_action_result`) and its outcome.
pub(crate) fn count_lookup(via: &'static str, lookup: &Lookup) {
    let hit = matches!(lookup, Lookup::Hit(_));
    LOOKUPS[usize::from(hit)].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let result = if hit { "hit" } else { "miss" };
    metrics::counter!("casbuild_action_cache_lookups_total", "via" => via, "result" => result).increment(1);
}

#[tonic::async_trait]
impl ActionCache for ActionCacheService {
    async fn get_action_result(
        &self,
        request: Request<GetActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        let (_, request) = admit(request, Permission::ReadCache, |r| &r.instance_name)?;
        let action = request_digest(request.digest_function, request.action_digest.as_ref(), "action_digest")?;
        let lookup = cached_result(&self.storage, &request.instance_name, &action).await.map_err(store_status)?;
        count_lookup("get_action_result", &lookup);
        match lookup {
            Lookup::Hit(result) => Ok(Response::new(*result)),
            Lookup::Miss(why) => Err(Status::not_found(why)),
        }
    }

    async fn update_action_result(
        &self,
        request: Request<UpdateActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        // Results normally come from casbuild's own workers; a client may
        // write one only with the cache-write role.
        let (_, request) = admit(request, Permission::WriteActionCache, |r| &r.instance_name)?;
        let action = request_digest(request.digest_function, request.action_digest.as_ref(), "action_digest")?;
        let result = request.action_result.ok_or_else(|| Status::invalid_argument("action_result is missing"))?;
        let cas = self.storage.cas(&request.instance_name);
        match check_result(cas.as_ref(), action.function, &result).await {
            Ok(()) => {}
            Err(Unusable::Invalid(problem)) => return Err(problem.context("action_result").into()),
            Err(Unusable::Store(e)) => return Err(store_status(e)),
            Err(Unusable::Missing(missing)) => {
                let mut status = precondition_missing(&missing);
                status.message = format!("action_result references blobs the CAS lacks: {}", status.message);
                return Err(call_status(status));
            }
        }
        self.storage.action_cache().update(&request.instance_name, &action, &result).await.map_err(store_status)?;
        Ok(Response::new(result))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use casbuild_cas::storage::StorageConfig;
    use casbuild_proto::reapi::OutputFile;

    /// Every entry file under `dir`.
    fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                found.extend(files_under(&path));
            } else {
                found.push(path);
            }
        }
        found
    }

    #[tokio::test]
    async fn the_shared_lookup_tells_a_hit_from_a_miss_from_a_failing_store() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(&StorageConfig::new(dir.path().to_path_buf())).unwrap();
        let f = DigestFunction::Sha256;
        let action = f.digest_of(b"an action");
        let miss = |lookup| matches!(lookup, Lookup::Miss(_));
        assert!(miss(cached_result(&storage, "", &action).await.unwrap()), "no entry");

        let output = f.digest_of(b"output");
        let result = ActionResult {
            output_files: vec![OutputFile {
                path: "out".into(),
                digest: Some(output.to_proto()),
                ..Default::default()
            }],
            ..Default::default()
        };
        storage.action_cache().update("", &action, &result).await.unwrap();
        let gone = cached_result(&storage, "", &action).await.unwrap();
        assert!(matches!(&gone, Lookup::Miss(why) if why.contains("no longer in the CAS")), "the output is not stored");
        storage.cas("").write(&output, "output".into()).await.unwrap();
        assert!(matches!(cached_result(&storage, "", &action).await.unwrap(), Lookup::Hit(_)));

        // An entry the store cannot read is an error for the caller, not a miss.
        let entries = files_under(&dir.path().join("ac"));
        let entry = entries.iter().find(|p| p.to_string_lossy().contains(&action.hash_hex())).unwrap();
        std::fs::remove_file(entry).unwrap();
        std::fs::create_dir(entry).unwrap();
        assert!(cached_result(&storage, "", &action).await.is_err());
    }
}
