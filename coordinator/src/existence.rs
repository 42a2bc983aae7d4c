//! The existence filter (yadcc's idea): a Bloom filter of each instance's
//! action-cache keys, which host daemons fetch once and then refresh with
//! only the keys added since, so that a compile the cluster has certainly
//! never seen skips the cache lookup.
//!
//! Keys are action digests, already uniformly random, so the filter needs no
//! hashing of its own: hash function i is the digest's i-th 8-byte word.

use std::sync::{Arc, Mutex};

use std::time::Duration;

use casbuild_cas::database::Database;
use casbuild_cas::digest::DigestFunction;
use casbuild_cas::storage::Storage;
use casbuild_proto::cc::existence_filter_server::ExistenceFilter;
use casbuild_proto::cc::get_filter_response::Filter;
use casbuild_proto::cc::{AddedKeys, Bloom as WireBloom, GetFilterRequest, GetFilterResponse};
use lru::LruCache;
use tokio::sync::OnceCell;
use tonic::{Request, Response, Status};

/// Bits in a filter: 1 MiB, about 2% false positives at a million keys.
pub const BITS: usize = 1 << 23;
/// Hash functions per key.
pub const HASHES: u32 = 4;
/// Keys kept for incremental refreshes; past this a new epoch starts and
/// callers take the whole filter again.
const MAX_LOG: usize = 1 << 20;

/// A Bloom filter over digests' hash bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bloom {
    bits: Vec<u8>,
    hashes: u32,
}

impl Default for Bloom {
    fn default() -> Self {
        Bloom { bits: vec![0; BITS / 8], hashes: HASHES }
    }
}

impl Bloom {
    /// A filter received on the wire; None when malformed.
    pub fn from_wire(wire: WireBloom) -> Option<Bloom> {
        (!wire.bits.is_empty() && (1..=4).contains(&wire.hashes))
            .then_some(Bloom { bits: wire.bits, hashes: wire.hashes })
    }

    /// The filter for the wire.
    pub fn to_wire(&self) -> WireBloom {
        WireBloom { bits: self.bits.clone(), hashes: self.hashes }
    }

    fn positions<'a>(&'a self, key: &'a [u8]) -> impl Iterator<Item = usize> + 'a {
        let bits = self.bits.len() as u64 * 8;
        (0..self.hashes as usize).map(move |i| {
            let mut word = [0u8; 8];
            let chunk = key.get(i * 8..i * 8 + 8).unwrap_or(&[]);
            word[..chunk.len()].copy_from_slice(chunk);
            (u64::from_le_bytes(word) % bits) as usize
        })
    }

    /// Adds a key (a digest's raw hash bytes).
    pub fn insert(&mut self, key: &[u8]) {
        let positions: Vec<usize> = self.positions(key).collect();
        for bit in positions {
            self.bits[bit / 8] |= 1 << (bit % 8);
        }
    }

    /// The chance that a key never inserted is reported present: the share
    /// of bits set, to the power of the number of hashes.
    pub fn false_positive_rate(&self) -> f64 {
        let set: u64 = self.bits.iter().map(|b| u64::from(b.count_ones())).sum();
        (set as f64 / (self.bits.len() as f64 * 8.0)).powi(self.hashes as i32)
    }

    /// False only if `key` was never inserted.
    pub fn may_contain(&self, key: &[u8]) -> bool {
        self.positions(key).all(|bit| self.bits[bit / 8] & (1 << (bit % 8)) != 0)
    }
}

struct Inner {
    bloom: Bloom,
    /// Keys added since this epoch began, for incremental refreshes.
    log: Vec<Vec<u8>>,
    epoch: u64,
}

/// One instance's filter: built from a scan of the action cache on first
/// use, then kept current by the action cache's write observer.
struct InstanceFilter {
    inner: Mutex<Inner>,
    scanned: OnceCell<()>,
}

impl InstanceFilter {
    fn new() -> Self {
        let inner = Inner { bloom: Bloom::default(), log: Vec::new(), epoch: new_epoch() };
        InstanceFilter { inner: Mutex::new(inner), scanned: OnceCell::new() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a key another coordinator wrote, unless the filter may hold it
    /// already (then every client's filter says "maybe" for it anyway).
    fn add_if_new(&self, key: &[u8]) {
        if !self.lock().bloom.may_contain(key) {
            self.add(key);
        }
    }

    fn add(&self, key: &[u8]) {
        let mut inner = self.lock();
        inner.bloom.insert(key);
        if inner.log.len() >= MAX_LOG {
            inner.log.clear();
            inner.epoch = new_epoch();
        }
        inner.log.push(key.to_vec());
    }
}

fn new_epoch() -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().0 | 1
}

/// Filters kept per instance at most (each holds 1 MiB of bits and a
/// delta log); the least recently asked for is dropped, and rebuilt from the
/// action cache (under a new epoch) when asked for again.
const MAX_FILTERS: usize = 64;

type Filters = Arc<Mutex<LruCache<String, Arc<InstanceFilter>>>>;

/// The ExistenceFilter service.
#[derive(Clone)]
pub struct ExistenceService {
    storage: Arc<Storage>,
    filters: Filters,
}

impl ExistenceService {
    /// Serves filters of `storage`'s action cache, observing its writes.
    pub fn new(storage: Arc<Storage>) -> Self {
        let filters: Filters =
            Arc::new(Mutex::new(LruCache::new(std::num::NonZeroUsize::new(MAX_FILTERS).expect("non-zero"))));
        let observed = filters.clone();
        let installed = storage.action_cache().observe(Box::new(move |instance, digest| {
            let filter = observed.lock().unwrap_or_else(|e| e.into_inner()).peek(instance).cloned();
            if let Some(filter) = filter {
                filter.add(&digest.hash);
            }
        }));
        if !installed {
            tracing::warn!("the action cache already has an observer; existence filters will only see restarts");
        }
        if let Some(database) = storage.action_cache().database() {
            tokio::spawn(follow_database(Arc::downgrade(&filters), database.clone()));
        }
        ExistenceService { storage, filters }
    }

    async fn filter(&self, instance: &str) -> Result<Arc<InstanceFilter>, Status> {
        let filter = self
            .filters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(instance.to_owned(), || Arc::new(InstanceFilter::new()))
            .clone();
        let (storage, scanning, name) = (self.storage.clone(), filter.clone(), instance.to_owned());
        filter
            .scanned
            .get_or_try_init(|| async move {
                let cache = storage.action_cache();
                let mut keys = Vec::new();
                for function in [DigestFunction::Sha256, DigestFunction::Blake3] {
                    keys.extend(cache.keys(&name, function).await.map_err(crate::status::store_status)?);
                }
                let mut inner = scanning.lock();
                for key in &keys {
                    inner.bloom.insert(&key.hash);
                }
                Ok::<(), Status>(())
            })
            .await?;
        Ok(filter)
    }
}

/// How often a coordinator on a shared database looks for results the
/// other coordinators wrote.
const FOLLOW_PERIOD: Duration = Duration::from_secs(2);
/// How far before the previous look each look reaches back: a result's
/// `written_at` is its transaction's start, which may precede its commit.
const FOLLOW_OVERLAP: Duration = Duration::from_secs(10);

/// Adds the results other coordinators write to the shared database to the
/// filters built here (local writes arrive through the observer), so a
/// `casbuild cc` daemon on any coordinator learns of every coordinator's
/// results at its next refresh. Ends when the service is gone.
async fn follow_database(filters: std::sync::Weak<Mutex<LruCache<String, Arc<InstanceFilter>>>>, database: Database) {
    // From before any filter here was built: each filter's scan covers what
    // came before it, this covers what comes after.
    let mut since = loop {
        match database.now().await {
            Ok(now) => break now,
            Err(e) => tracing::debug!("existence filters: {e}"),
        }
        tokio::time::sleep(FOLLOW_PERIOD).await;
    };
    loop {
        tokio::time::sleep(FOLLOW_PERIOD).await;
        let Some(filters) = filters.upgrade() else { return };
        let built: Vec<(String, Arc<InstanceFilter>)> = filters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, filter)| filter.scanned.initialized())
            .map(|(name, filter)| (name.clone(), filter.clone()))
            .collect();
        drop(filters);
        let Ok(now) = database.now().await else { continue };
        let from = since.checked_sub(FOLLOW_OVERLAP).unwrap_or(since);
        let mut complete = true;
        for (instance, filter) in built {
            match database.action_hashes_since(&instance, from).await {
                Ok(hashes) => hashes.iter().for_each(|hash| filter.add_if_new(hash)),
                Err(e) => {
                    tracing::debug!("existence filters: {e}");
                    complete = false;
                    break;
                }
            }
        }
        if complete {
            since = now;
        }
    }
}

#[tonic::async_trait]
impl ExistenceFilter for ExistenceService {
    async fn get_filter(&self, request: Request<GetFilterRequest>) -> Result<Response<GetFilterResponse>, Status> {
        let (_, request) = crate::auth::admit(request, crate::auth::Permission::ReadCache, |r| &r.instance_name)?;
        let filter = self.filter(&request.instance_name).await?;
        let inner = filter.lock();
        let generation = inner.log.len() as u64;
        // Past this many keys a delta outweighs the whole filter (and could
        // outgrow a message): send the filter instead.
        let behind = generation.saturating_sub(request.generation);
        let incremental =
            request.epoch == inner.epoch && request.generation <= generation && behind <= (BITS / 8 / 34) as u64;
        let filter = if incremental {
            Filter::Added(AddedKeys { keys: inner.log[request.generation as usize..].to_vec() })
        } else {
            Filter::Full(inner.bloom.to_wire())
        };
        let kind = if incremental { "incremental" } else { "full" };
        metrics::counter!("casbuild_existence_filter_requests_total", "kind" => kind).increment(1);
        // Of the filter just served (filters are per instance; the metric is not).
        metrics::gauge!("casbuild_existence_filter_bytes").set(inner.bloom.bits.len() as f64);
        metrics::gauge!("casbuild_existence_filter_false_positive_estimate").set(inner.bloom.false_positive_rate());
        Ok(Response::new(GetFilterResponse { epoch: inner.epoch, generation, filter: Some(filter) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inserted_keys_are_found_and_most_others_are_not() {
        let mut bloom = Bloom::default();
        let key = |i: u32| DigestFunction::Blake3.digest_of(&i.to_le_bytes()).hash;
        for i in 0..10_000 {
            bloom.insert(&key(i));
        }
        assert!((0..10_000).all(|i| bloom.may_contain(&key(i))));
        let false_positives = (10_000..20_000).filter(|i| bloom.may_contain(&key(*i))).count();
        assert!(bloom.false_positive_rate() < 0.001, "the estimate agrees: {}", bloom.false_positive_rate());
        assert_eq!(Bloom::default().false_positive_rate(), 0.0);
        assert!(false_positives < 10, "{false_positives} false positives in 10,000");
        let back = Bloom::from_wire(bloom.to_wire()).unwrap();
        assert_eq!(back, bloom);
    }

    #[tokio::test]
    async fn refreshes_carry_only_the_keys_added_since() {
        use casbuild_cas::storage::StorageConfig;
        use casbuild_proto::reapi::ActionResult;
        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(Storage::open(&StorageConfig::new(dir.path().to_path_buf())).unwrap());
        let old = DigestFunction::Blake3.digest_of(b"cached before the first request");
        storage.action_cache().update("i", &old, &ActionResult::default()).await.unwrap();
        let service = ExistenceService::new(storage.clone());
        let get = |epoch, generation| {
            let request = GetFilterRequest { instance_name: "i".into(), epoch, generation };
            let service = service.clone();
            let mut request = Request::new(request);
            request.extensions_mut().insert(crate::auth::Principal::trusted());
            async move { service.get_filter(request).await.unwrap().into_inner() }
        };
        // First: the whole filter, built from a scan of the action cache.
        let first = get(0, 0).await;
        let Some(Filter::Full(bits)) = first.filter else { panic!("a full filter first") };
        let bloom = Bloom::from_wire(bits).unwrap();
        assert!(bloom.may_contain(&old.hash));
        let new = DigestFunction::Blake3.digest_of(b"cached later");
        assert!(!bloom.may_contain(&new.hash));
        // A write, then a refresh: only the new key travels.
        storage.action_cache().update("i", &new, &ActionResult::default()).await.unwrap();
        let second = get(first.epoch, first.generation).await;
        assert_eq!(second.epoch, first.epoch);
        assert_eq!(second.generation, first.generation + 1);
        let Some(Filter::Added(added)) = second.filter else { panic!("an incremental refresh") };
        assert_eq!(added.keys, vec![new.hash.to_vec()]);
        // Another instance's writes are not in this filter; a stale epoch gets it whole.
        storage.action_cache().update("other", &old, &ActionResult::default()).await.unwrap();
        let third = get(second.epoch, second.generation).await;
        assert!(matches!(third.filter, Some(Filter::Added(AddedKeys { ref keys })) if keys.is_empty()));
        assert!(matches!(get(12345, 1).await.filter, Some(Filter::Full(_))));
    }
}
