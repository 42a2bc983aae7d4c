//! Metrics of a local storage tier (`memory`, `disk`): bytes served and
//! stored, evictions, and what the tier holds. Recorded through the
//! `metrics` facade; free when no recorder is installed.

/// One tier's metrics, labelled with its name.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TierMetrics(pub &'static str);

impl TierMetrics {
    /// `bytes` served to a reader.
    pub fn read(self, bytes: u64) {
        metrics::counter!("casbuild_cas_read_bytes_total", "tier" => self.0).increment(bytes);
    }

    /// A new blob of `bytes` stored.
    pub fn stored(self, bytes: u64) {
        metrics::counter!("casbuild_cas_written_bytes_total", "tier" => self.0).increment(bytes);
    }

    /// `blobs` blobs of `bytes` in all evicted.
    pub fn evicted(self, blobs: u64, bytes: u64) {
        if blobs > 0 {
            metrics::counter!("casbuild_cas_evictions_total", "tier" => self.0).increment(blobs);
            metrics::counter!("casbuild_cas_evicted_bytes_total", "tier" => self.0).increment(bytes);
        }
    }

    /// The tier now holds `blobs` blobs of `bytes` (of `budget`).
    pub fn holds(self, blobs: usize, bytes: u64, budget: u64) {
        metrics::gauge!("casbuild_cas_blobs", "tier" => self.0).set(blobs as f64);
        metrics::gauge!("casbuild_cas_stored_bytes", "tier" => self.0).set(bytes as f64);
        metrics::gauge!("casbuild_cas_budget_bytes", "tier" => self.0).set(budget as f64);
    }
}
